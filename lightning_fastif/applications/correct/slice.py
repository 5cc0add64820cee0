"""The failing slice of error correction: its spec, its selection from the model's predictions, and accuracy.

Part of ``lightning_fastif.applications.correct``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import call_model, labels_of, logits_of, move_to

__all__ = ["SliceSpec", "predictions", "select_slice"]


@dataclass
class SliceSpec:
    """The slice of test examples the model gets wrong, named in the config.

    Attributes:
        kind: ``class`` (misclassified examples of class ``label``), ``pair`` (examples of class ``label``
            predicted as ``predicted``: "true a, predicted b") or ``ids`` (the given ``ids``).
        label: the true class (``class`` and ``pair``).
        predicted: the wrongly predicted class (``pair``).
        ids: positions in the split (``ids``).
        split: the datamodule split the slice comes from (``test``, ``val``...); ``evaluate`` on the whole of it.
        anchor_fraction: share of the slice drawn (per seed) as the anchor pool; the rest is the held-out slice.
    """

    kind: str = "pair"
    label: int | None = None
    predicted: int | None = None
    ids: list[int] | None = None
    split: str = "test"
    anchor_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("class", "pair", "ids"):
            raise ConfigurationError(
                f"Expected `slice.kind` to be class, pair or ids, but got {self.kind!r}."
            )
        if self.kind in ("class", "pair") and not _is_int(self.label):
            raise ConfigurationError(
                f"Expected `slice.label` to be a class index with `kind: {self.kind}`, but got {self.label!r}."
            )
        if self.kind == "pair" and not _is_int(self.predicted):
            raise ConfigurationError(
                f"Expected `slice.predicted` to be a class index with `kind: pair`, but got {self.predicted!r}."
            )
        if self.kind == "ids" and not self.ids:
            raise ConfigurationError(
                "Expected `slice.ids` to be a non-empty list with `kind: ids`, but got none."
            )
        if not 0.0 < float(self.anchor_fraction) < 1.0:
            raise ConfigurationError(
                f"Expected `slice.anchor_fraction` to lie in (0, 1), but got {self.anchor_fraction!r}."
            )

    def describe(self) -> str:
        if self.kind == "pair":
            return f"true {self.label}, predicted {self.predicted}"
        if self.kind == "class":
            return f"misclassified {self.label}"
        return f"{len(self.ids or [])} given ids"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def predictions(
    model: nn.Module,
    dataset: Any,
    ids: Sequence[int] | None = None,
    collate_fn: Any = None,
    batch_size: int = 512,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(predicted classes [n], labels [n])`` of ``dataset`` rows ``ids`` (all if None), model in eval mode.

    ``forward_fn(model, batch)`` calls the model (default: ``model(x)`` / ``model(**inputs)``)."""
    part = dataset if ids is None else Subset(dataset, list(ids))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    preds, labels = [], []
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in DataLoader(part, batch_size=batch_size, collate_fn=collate_fn):
                batch = move_to(batch, device)
                logits, y = logits_of(call_model(model, batch, forward_fn)), labels_of(batch)
                if logits is None or y is None or logits.dim() != 2:
                    raise ConfigurationError(
                        "Expected a classifier (logits [B, C]) and labelled batches for error correction, but the "
                        "model or data gave none."
                    )
                preds.append(logits.argmax(-1).cpu())
                labels.append(y.reshape(-1).cpu())
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not preds:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(preds), torch.cat(labels)


def select_slice(
    model: nn.Module,
    dataset: Any,
    spec: SliceSpec,
    collate_fn: Any = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> list[int]:
    """Positions in ``dataset`` of the slice ``spec`` names, under ``model``'s current predictions.

    Example:
        >>> ids = select_slice(model, test_set, SliceSpec(kind="pair", label=3, predicted=8))
    """
    n = len(dataset)
    if spec.kind == "ids":
        bad = [i for i in spec.ids or [] if not _is_int(i) or not 0 <= i < n]
        if bad:
            raise ConfigurationError(f"Expected `slice.ids` to lie in [0, {n}), but got {bad[:10]}.")
        return sorted({int(i) for i in spec.ids or []})
    preds, labels = predictions(model, dataset, collate_fn=collate_fn, forward_fn=forward_fn)
    wrong = (labels == spec.label) & (preds != spec.label)
    if spec.kind == "pair":
        wrong &= preds == spec.predicted
    return wrong.nonzero().flatten().tolist()


def _accuracy(
    model: nn.Module, dataset: Any, ids: Sequence[int] | None, collate_fn: Any, bs: int, fwd: Any = None
) -> float:
    if ids is not None and len(ids) == 0:
        return float("nan")
    preds, labels = predictions(model, dataset, ids, collate_fn, bs, fwd)
    return float((preds == labels).float().mean()) if len(labels) else float("nan")
