"""Per-example loss resolution (DESIGN section 3) as a pure function of ``(params, batch)``.

The three sources, in order: an explicit ``loss_fn(outputs, batch) -> [B]``; the wrapped module's
``per_example_loss(batch) -> [B]``; the default classification loss (batch ``(x, y)`` or a dict with ``labels``,
logits = ``model(x)`` or its ``.logits``, cross-entropy without reduction).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_fastif.errors import ConfigurationError, LossResolutionError
from lightning_fastif.functional.batch import call_model, labels_of, logits_of

__all__ = ["PerExampleLoss", "resolve_loss"]

LossFn = Callable[[Any, Any], Tensor]

_HOW_TO = (
    "Provide one of: (1) `loss_fn=callable(outputs, batch) -> per-example losses [B]`; (2) a method "
    "`per_example_loss(self, batch) -> [B]` on the module; (3) batches the default classification loss reads: "
    "`(x, y)` or a dict with `labels`, where `model(x)` returns logits `[B, C]` (or an object with `.logits`)."
)


class _LossGraph(nn.Module):
    """The model plus how to turn a batch into per-example losses; a module so ``functional_call`` can swap weights."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(call_model(self.model, batch), batch)
        if callable(getattr(self.model, "per_example_loss", None)):
            return self.model.per_example_loss(batch)
        labels = labels_of(batch)
        if labels is None:
            raise LossResolutionError(
                f"Cannot compute per-example losses for a batch of type {type(batch).__name__}: it has no labels "
                f"(expected `(x, y)` or a dict with `labels`). {_HOW_TO}"
            )
        try:
            outputs = call_model(self.model, batch)
        except TypeError as err:
            raise LossResolutionError(f"Calling the model on the batch failed ({err}). {_HOW_TO}") from err
        logits = logits_of(outputs)
        if logits is None or logits.dim() != 2 or labels.dim() != 1 or labels.is_floating_point():
            got = None if logits is None else tuple(logits.shape)
            raise LossResolutionError(
                f"The default classification loss expects logits [B, C] and integer labels [B], but got logits "
                f"{got} and labels {tuple(labels.shape)} ({labels.dtype}). {_HOW_TO}"
            )
        return F.cross_entropy(logits, labels, reduction="none")


class PerExampleLoss:
    """``(params, batch) -> [B]`` per-example losses of a model, with ``params`` substituted functionally.

    Args:
        model: the user's module; never mutated (weights are swapped in with ``functional_call``).
        loss_fn: optional ``callable(outputs, batch) -> [B]``.

    Example:
        >>> m = nn.Linear(3, 2)
        >>> loss = PerExampleLoss(m)
        >>> params = {n: p.detach() for n, p in m.named_parameters()}
        >>> loss(params, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))).shape
        torch.Size([4])
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigurationError(
                f"Expected `loss_fn` to be a callable(outputs, batch) -> [B] or None, but got {loss_fn!r}."
            )
        self.model = model
        self.loss_fn = loss_fn
        self.source = (
            "loss_fn"
            if loss_fn is not None
            else "per_example_loss"
            if callable(getattr(model, "per_example_loss", None))
            else "classification"
        )
        self._graph = _LossGraph(model, loss_fn)

    def __call__(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """Per-example losses ``[B]`` at ``params`` (names as in ``model.named_parameters()``)."""
        # every parameter is passed: the unselected ones detached, so autograd records nothing for them
        full = {f"model.{k}": p.detach() for k, p in self.model.named_parameters()}
        full.update({f"model.{k}": v for k, v in params.items()})
        losses = functional_call(self._graph, full, (batch,))
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise LossResolutionError(
                f"Expected the {self.source} loss to return per-example losses of shape [B] (no reduction), "
                f"but got {got}. {_HOW_TO}"
            )
        return losses


def resolve_loss(model: nn.Module, loss_fn: LossFn | None = None) -> PerExampleLoss:
    """The per-example loss of ``model`` by the resolution order of DESIGN section 3."""
    return PerExampleLoss(model, loss_fn)


def check_finite(values: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming the examples whose ``values`` are NaN or infinite."""
    from lightning_fastif.errors import NonFiniteError

    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if values.dim() else [0]
        raise NonFiniteError(
            f"Expected a finite {what}, but got NaN or inf at batch position(s) {rows[:20]}: check the inputs and "
            "the model's outputs for those examples (a diverged checkpoint gives this too)."
        )
