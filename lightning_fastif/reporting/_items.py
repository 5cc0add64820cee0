"""What the HTML report and the W&B table share: fetching raw inputs by id, labels, and result coercion.

A *lookup* maps an id (a training id or a query id) to what the dataset holds at that position. It may return the
raw input ``x``, a pair ``(x, label)`` (what most map-style datasets return, so ``dataset.__getitem__`` works as
is), or a dict item such as a Hugging Face dataset row (the label is read from ``"label"``/``"labels"``). A
map-style dataset itself may be passed instead of a callable.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_fastif.errors import ConfigurationError, expected
from lightning_fastif.reporting.render import Decoder, RenderedInput, Renderer, render_example
from lightning_fastif.results import InfluenceResult

Lookup = Callable[[int], Any]
ClassNames = Sequence[str] | Mapping[int, str]

_LABEL_KEYS = ("label", "labels", "target", "y")


@dataclass(frozen=True)
class ExampleView:
    """One example ready to display: its rendered input and label (either may be missing).

    Attributes:
        id: the training id or query id.
        rendered: the rendered input, ``None`` when no lookup was given or it failed.
        label: the label the lookup returned (``None`` if none).
        error: why the input is missing, when the lookup raised.
    """

    id: int
    rendered: RenderedInput | None
    label: Any = None
    error: str | None = None


def as_lookup(obj: Any, name: str) -> Lookup | None:
    """Accept a callable, a map-style dataset (anything with ``__getitem__``) or ``None``."""
    if obj is None or callable(obj):
        return obj
    if hasattr(obj, "__getitem__"):
        return obj.__getitem__
    raise ConfigurationError(
        expected(name, "a callable id -> x or (x, label), a map-style dataset, or None", type(obj).__name__)
    )


def split_item(item: Any) -> tuple[Any, Any]:
    """Split what a lookup returned into ``(x, label)``."""
    if isinstance(item, tuple | list) and len(item) == 2 and _is_label(item[1]):
        return item[0], _scalar(item[1])
    if isinstance(item, Mapping):
        for key in _LABEL_KEYS:
            if key in item and _is_label(item[key]):
                return item, _scalar(item[key])
    return item, None


def format_label(label: Any, class_names: ClassNames | None = None) -> str:
    """``"3"``, or ``"3 (cat)"`` with class names; ``"–"`` for no label."""
    label = _scalar(label)
    if label is None:
        return "–"
    if class_names is not None and isinstance(label, numbers.Integral) and not isinstance(label, bool):
        index = int(label)
        if isinstance(class_names, Mapping):
            name = class_names.get(index)
        else:
            name = class_names[index] if 0 <= index < len(class_names) else None
        if name is not None:
            return f"{index} ({name})"
    return str(label)


def check_class_names(
    class_names: Any, results: Sequence[InfluenceResult] | None = None
) -> ClassNames | None:
    """``class_names`` as given, after checking its type and, with ``results``, that a list names every class
    the results' labels and predictions use (a short list would leave some classes unnamed, silently)."""
    if class_names is None or isinstance(class_names, Mapping):
        return class_names
    if not isinstance(class_names, Sequence) or isinstance(class_names, str):
        raise ConfigurationError(
            expected("class_names", "a list of names or a mapping class -> name", class_names)
        )
    if results:
        used = [c for r in results for c in _classes(r)]
        if used and max(used) >= len(class_names):
            raise ConfigurationError(
                f"Expected `class_names` to name every class the results use (classes 0 to {max(used)}: "
                f"{max(used) + 1} names), but got {len(class_names)} name(s): {list(class_names)[:10]}."
            )
    return class_names


def _classes(result: InfluenceResult) -> list[int]:
    """The class ids in a result: its label, prediction and the listed examples' labels (ints only)."""
    values = [result.label, result.prediction, *(result.helpful_labels or []), *(result.harmful_labels or [])]
    return [
        int(v) for v in map(_scalar, values) if isinstance(v, numbers.Integral) and not isinstance(v, bool)
    ]


def check_title(title: Any) -> str:
    """``title``: a string (a page title)."""
    if not isinstance(title, str):
        raise ConfigurationError(expected("title", "a str", title))
    return title


def check_decoder(decoder: Any) -> Any:
    """``decoder``: None, a callable (``tokenizer.decode``), a list of tokens indexed by id or a mapping id ->
    token."""
    if decoder is None or callable(decoder) or isinstance(decoder, Mapping):
        return decoder
    if isinstance(decoder, Sequence) and not isinstance(decoder, (str, bytes)):
        return decoder
    raise ConfigurationError(
        expected(
            "decoder",
            "None, a callable token ids -> text (e.g. tokenizer.decode), a list of tokens or a mapping id -> token",
            decoder,
        )
    )


def coerce_results(results: Any) -> list[InfluenceResult]:
    """Accept one result, or an iterable of ``InfluenceResult`` or of their ``to_dict()`` dicts."""
    if isinstance(results, InfluenceResult | Mapping):
        results = [results]
    if not isinstance(results, Iterable) or isinstance(results, str | bytes):
        raise ConfigurationError(
            expected("results", "an iterable of InfluenceResult", type(results).__name__)
        )
    out: list[InfluenceResult] = []
    for position, result in enumerate(results):
        if isinstance(result, InfluenceResult):
            out.append(result)
        elif isinstance(result, Mapping):
            out.append(InfluenceResult.from_dict(dict(result)))
        else:
            raise ConfigurationError(
                expected(f"results[{position}]", "an InfluenceResult or its to_dict()", type(result).__name__)
            )
    return out


class ExampleCache:
    """Fetch, split and render examples by id, once each; a failing lookup becomes a warning, not a crash.

    Args:
        lookup: a callable, a map-style dataset or ``None`` (ids only).
        name: the argument name, for messages (``"train_lookup"``).
        render_kwargs: passed to :func:`render_example` (``image_shape``, ``decoder``, ``renderer``...).
    """

    def __init__(self, lookup: Any, name: str, **render_kwargs: Any) -> None:
        self._lookup = as_lookup(lookup, name)
        self._name = name
        self._render_kwargs = render_kwargs
        self._cache: dict[int, ExampleView] = {}
        self._warned = False

    def get(self, index: int) -> ExampleView:
        index = int(index)
        if index not in self._cache:
            self._cache[index] = self._fetch(index)
        return self._cache[index]

    def _fetch(self, index: int) -> ExampleView:
        if self._lookup is None:
            return ExampleView(index, None)
        try:
            item = self._lookup(index)
        except Exception as error:  # a report must not die on one bad example
            return self._failed(index, error, None)
        x, label = split_item(item)
        try:
            return ExampleView(index, render_example(x, **self._render_kwargs), label)
        except ConfigurationError:  # the caller's own arguments (image_shape, renderer...) are wrong: say so
            raise
        except Exception as error:
            return self._failed(index, error, label)

    def _failed(self, index: int, error: Exception, label: Any) -> ExampleView:
        reason = f"{type(error).__name__}: {error}"
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"`{self._name}` failed for id {index} ({reason}); the report shows the id without its input.",
                stacklevel=4,
            )
        return ExampleView(index, None, label, error=reason)


def render_kwargs(
    image_shape: Sequence[int] | None, decoder: Decoder | None, renderer: Renderer | None
) -> dict[str, Any]:
    return {"image_shape": image_shape, "decoder": check_decoder(decoder), "renderer": renderer}


def _is_label(value: Any) -> bool:
    value = _scalar(value)
    return value is None or (isinstance(value, numbers.Number) and not isinstance(value, complex))


def _scalar(value: Any) -> Any:
    """0-d tensors and numpy scalars become Python numbers; anything else is returned unchanged."""
    if hasattr(value, "ndim") and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    if hasattr(value, "numel") and callable(value.numel) and value.numel() == 1 and hasattr(value, "item"):
        return value.item()
    return value
