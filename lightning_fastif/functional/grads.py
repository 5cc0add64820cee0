"""Gradients: mean-loss gradients, per-example gradients (``vmap(grad)``, chunked, with a loop fallback)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from lightning_fastif.functional.batch import batch_size, slice_batch
from lightning_fastif.functional.params import ParamSpec

__all__ = ["flat_loss", "mean_grad", "per_example_grads", "per_example_grads_and_losses"]

Loss = Callable[[dict[str, Tensor], Any], Tensor]


def flat_loss(loss: Loss, spec: ParamSpec, batch: Any, reduction: str = "mean") -> Callable[[Tensor], Tensor]:
    """``theta [P] -> loss`` for a batch: the per-example losses ``[B]`` (``"none"``), their mean or sum."""

    def f(theta: Tensor) -> Tensor:
        losses = loss(spec.unflatten(theta), batch)
        if reduction == "none":
            return losses
        return losses.sum() if reduction == "sum" else losses.mean()

    return f


def mean_grad(loss: Loss, theta: Tensor, spec: ParamSpec, batch: Any) -> Tensor:
    """Gradient ``[P]`` of the mean per-example loss of a batch at ``theta``."""
    return grad(flat_loss(loss, spec, batch))(theta)


def _unsqueeze_tensors(example: Any) -> Any:
    if isinstance(example, Tensor):
        return example.unsqueeze(0)
    if isinstance(example, dict):
        return {k: _unsqueeze_tensors(v) for k, v in example.items()}
    if isinstance(example, (list, tuple)):
        return type(example)(_unsqueeze_tensors(v) for v in example)
    return example


def _has_only_tensors(batch: Any) -> bool:
    if isinstance(batch, Tensor):
        return True
    if isinstance(batch, dict):
        return all(_has_only_tensors(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return all(_has_only_tensors(v) for v in batch)
    return False


def per_example_grads(
    loss: Loss, theta: Tensor, spec: ParamSpec, batch: Any, chunk_size: int | None = 64
) -> Tensor:
    """Per-example gradients ``[B, P]``; see :func:`per_example_grads_and_losses`."""
    return per_example_grads_and_losses(loss, theta, spec, batch, chunk_size)[0]


def per_example_grads_and_losses(
    loss: Loss, theta: Tensor, spec: ParamSpec, batch: Any, chunk_size: int | None = 64
) -> tuple[Tensor, Tensor]:
    """Per-example gradients ``[B, P]`` and losses ``[B]`` at ``theta``, from one pass.

    ``vmap(grad)`` over chunks of ``chunk_size`` examples; a plain loop over examples when the batch holds
    non-tensor leaves or the model does not support ``vmap`` (for example a GRU).

    Example:
        >>> from lightning_fastif.functional.losses import PerExampleLoss
        >>> m = torch.nn.Linear(3, 2)
        >>> params = {n: p.detach() for n, p in m.named_parameters()}
        >>> spec = ParamSpec.of(params)
        >>> g, losses = per_example_grads_and_losses(
        ...     PerExampleLoss(m), spec.flatten(params), spec, (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
        ... )
        >>> g.shape, losses.shape
        (torch.Size([5, 8]), torch.Size([5]))
    """
    n = batch_size(batch)
    step = n if not chunk_size else max(1, int(chunk_size))

    def one(params: dict[str, Tensor], example: Any) -> tuple[dict[str, Tensor], Tensor]:
        return grad_and_value(lambda p: loss(p, _unsqueeze_tensors(example)).sum())(params)

    if _has_only_tensors(batch):
        try:
            # differentiate the parameter dict, not the flat vector: the backward of the flat vector's split
            # assembled every [chunk, P] row by concatenation (1.5x slower on a 235k-parameter MLP)
            batched = vmap(one, in_dims=(None, 0))
            params = spec.unflatten(theta)
            parts = [batched(params, slice_batch(batch, slice(i, i + step))) for i in range(0, n, step)]
            return torch.cat([spec.flatten(g) for g, _ in parts]), torch.cat([v for _, v in parts])
        except (RuntimeError, NotImplementedError) as err:  # operators without batching rules: loop below
            if randomness_error(err) is not None:  # a loop would differentiate a different function each call
                raise randomness_error(err) from err  # type: ignore[misc]
            warnings.warn(
                f"vmap over examples failed for this model ({type(err).__name__}: {str(err)[:200]}); computing "
                "per-example gradients one example at a time (correct, but slower). Data-dependent Python control "
                "flow in the model (for example a check on a padding mask) is the usual cause.",
                stacklevel=2,
            )
    rows = [
        grad_and_value(flat_loss(loss, spec, slice_batch(batch, slice(i, i + 1)), "sum"))(theta)
        for i in range(n)
    ]
    return torch.stack([g for g, _ in rows]), torch.stack([v for _, v in rows])


RANDOMNESS_MESSAGE = "vmap: called random operation"


def randomness_error(err: BaseException) -> Exception | None:
    """The clear error for torch.func's "called random operation" (the forward draws random numbers), or None."""
    if RANDOMNESS_MESSAGE not in str(err):
        return None
    from lightning_fastif.errors import UnsupportedModelError

    return UnsupportedModelError(
        "Expected the model's forward to be deterministic in eval mode (influence differentiates the same "
        "function for every example), but it draws random numbers: dropout that ignores eval mode (e.g. "
        "`F.dropout(x, p, training=True)`), or `torch.rand`/`torch.randn`/`torch.bernoulli` in `forward`. Make "
        "that randomness follow `self.training` (the library calls `model.eval()`), or pass a `forward_fn` that "
        f"skips it. (torch.func said: {str(err)[:120]})"
    )
