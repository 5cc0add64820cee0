"""How a batch is read: moving it to a device, finding the model inputs and labels, counting its examples.

Conventions (DESIGN section 3): a batch is ``(x, y, ...)`` (tuple or list: ``x`` is the model input, ``y`` the
labels), a dict (the model is called with every key but ``labels``; ``labels`` are the labels), or a bare tensor
(an input without labels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FORWARD_FN_HELP",
    "ForwardFn",
    "batch_digest",
    "batch_size",
    "call_model",
    "check_forward_fn",
    "example_digests",
    "fetch",
    "labels_of",
    "logits_of",
    "move_to",
    "slice_batch",
]


def move_to(batch: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a nested batch to ``device``; floating tensors also to ``dtype`` when given."""
    if isinstance(batch, Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, dtype) for v in batch)
    return batch


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for v in batch.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(batch, (list, tuple)):
        for v in batch:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the leading dimension of its first tensor."""
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise TypeError(f"Cannot find a batched tensor in a batch of type {type(batch).__name__}.")
    return int(t.shape[0])


def slice_batch(batch: Any, index: slice | Tensor) -> Any:
    """The sub-batch at ``index`` along the leading dimension of every batched tensor (others kept as they are)."""
    n = batch_size(batch)

    def cut(v: Any) -> Any:
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
            return v[index]
        if isinstance(v, Mapping):
            return {k: cut(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            if len(v) == n and not any(isinstance(x, (Tensor, Mapping, list, tuple)) for x in v):
                idx = range(n)[index] if isinstance(index, slice) else index.tolist()
                return [v[i] for i in idx]
            return type(v)(cut(x) for x in v)
        return v

    return cut(batch)


def model_args(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of the model call for a batch (see the module docstring)."""
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in ("labels", "label")}
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
        return (batch[0],), {}
    raise TypeError(f"Cannot read model inputs from a batch of type {type(batch).__name__}.")


ForwardFn = Callable[[torch.nn.Module, Any], Any]
"""``forward_fn(model, batch) -> outputs``: how the model is called on a batch (every path of the library uses it)."""

FORWARD_FN_HELP = (
    "Say how the model is called on a batch with `forward_fn=callable(model, batch) -> outputs` (for example "
    "`forward_fn=lambda model, batch: model(batch[0], batch[1])`); InfluenceModule, FeatureIndexCallback and "
    "build_index all take it."
)


def check_forward_fn(forward_fn: Any) -> ForwardFn | None:
    """``forward_fn`` itself when it is None or callable; else a :class:`ConfigurationError`."""
    if forward_fn is not None and not callable(forward_fn):
        from lightning_fastif.errors import ConfigurationError

        raise ConfigurationError(
            f"Expected `forward_fn` to be a callable(model, batch) -> outputs or None, but got {forward_fn!r}."
        )
    return forward_fn


def call_model(model: torch.nn.Module, batch: Any, forward_fn: ForwardFn | None = None) -> Any:
    """The model's outputs on a batch: ``forward_fn(model, batch)`` when given, else the default convention.

    The default: ``model(x)`` for ``(x, y, ...)`` batches, ``model(**inputs)`` for dict batches (every key but
    ``labels``), ``model(batch)`` for a bare tensor.

    Raises:
        ModelCallError: the default convention's call raised ``TypeError`` (a ``forward`` that takes more than
            ``batch[0]``, such as ``forward(inputs, target)``); the message names ``forward_fn``.
    """
    if forward_fn is not None:
        return forward_fn(model, batch)
    args, kwargs = model_args(batch)
    try:
        return model(*args, **kwargs)
    except TypeError as err:
        from lightning_fastif.errors import ModelCallError

        shown = (
            f"model(**{{{', '.join(map(repr, kwargs))}}})" if kwargs else f"model(<{type(args[0]).__name__}>)"
        )
        raise ModelCallError(
            f"Calling the model on a batch by the default convention, {shown} (the first element of a tuple batch, "
            f"or the keys of a dict batch but `labels`), raised TypeError: {err}. {FORWARD_FN_HELP}"
        ) from err


def labels_of(batch: Any) -> Tensor | None:
    """The labels of a batch (``batch[1]`` or ``batch["labels"]``), or ``None`` when it has none."""
    if isinstance(batch, Mapping):
        lab = batch.get("labels", batch.get("label"))
        return lab if isinstance(lab, Tensor) else None
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


def logits_of(outputs: Any) -> Tensor | None:
    """The logits tensor of a model output: the output itself, its ``.logits``, its ``"logits"`` key, or the only
    tensor of a tuple (``None`` for a tuple of several tensors: which one is the logits is ambiguous)."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), Tensor):
        return outputs["logits"]
    lg = getattr(outputs, "logits", None)
    if isinstance(lg, Tensor):
        return lg
    if isinstance(outputs, (list, tuple)):  # the only tensor of a tuple; several tensors: ambiguous, None
        tensors = [t for t in outputs if isinstance(t, Tensor)]
        return tensors[0] if len(tensors) == 1 else None
    return None


def fetch(dataset: Any, ids: list[int], collate_fn: Any = None) -> Any:
    """The batch of examples ``ids`` of a map-style dataset.

    A ``TensorDataset`` is indexed directly (one gather per tensor); otherwise the examples are collated with
    ``collate_fn`` (default: torch's ``default_collate``).
    """
    from torch.utils.data import TensorDataset
    from torch.utils.data.dataloader import default_collate

    if collate_fn is None and isinstance(dataset, TensorDataset):
        index = torch.as_tensor(ids, dtype=torch.long)
        return tuple(t[index] for t in dataset.tensors)
    return (collate_fn or default_collate)([dataset[i] for i in ids])


def batch_digest(batch: Any) -> str:
    """A SHA-256 (hex) of everything in ``batch``: the dtype, shape and bytes of each tensor, the repr of the rest.

    Two batches with equal inputs and labels give the same string; one changed value, label or dtype changes it.
    """
    import hashlib

    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, Tensor):
            t = value.detach().to("cpu")
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            h.update(f"{{{len(value)}".encode())
            for k in sorted(value, key=str):
                h.update(repr(str(k)).encode())
                feed(value[k])
        elif isinstance(value, (list, tuple)):
            h.update(f"[{len(value)}".encode())
            for v in value:
                feed(v)
        else:
            h.update(repr(value).encode())

    feed(batch)
    return h.hexdigest()


def example_digests(batch: Any) -> list[str]:
    """:func:`batch_digest` of each example of ``batch`` (input and label), in order: ``B`` strings.

    Example:
        >>> a = example_digests((torch.zeros(2, 3), torch.tensor([0, 1])))
        >>> a[0] != a[1]
        True
    """
    return [batch_digest(slice_batch(batch, torch.tensor([i]))) for i in range(batch_size(batch))]
