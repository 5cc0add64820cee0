"""Exact Hessian-vector products and dense Hessians of a batch's loss (forward-over-reverse)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.func import grad, hessian, jvp, vmap

from lightning_fastif.functional.grads import Loss, flat_loss
from lightning_fastif.functional.params import ParamSpec

__all__ = ["batch_hessian", "batch_hvp"]


def batch_hvp(
    loss: Loss, theta: Tensor, spec: ParamSpec, batch: Any, vectors: Tensor, reduction: str = "mean"
) -> Tensor:
    """``H_b v`` for each row of ``vectors [Q, P]`` -> ``[Q, P]``, with ``H_b`` the Hessian of the batch's mean
    (or summed, ``reduction="sum"``) loss at ``theta``. Exact for the batch: ``jvp(grad(f))``, vmapped over Q.
    """
    g = grad(flat_loss(loss, spec, batch, reduction))

    def one(v: Tensor) -> Tensor:
        return jvp(g, (theta,), (v,))[1]

    if vectors.dim() == 1:
        return one(vectors)
    if vectors.shape[0] == 1:  # vmap over one row only adds overhead
        return one(vectors[0])[None]
    return vmap(one)(vectors)


def batch_hessian(loss: Loss, theta: Tensor, spec: ParamSpec, batch: Any, reduction: str = "mean") -> Tensor:
    """Dense Hessian ``[P, P]`` of the batch's mean (or summed) loss at ``theta``."""
    return hessian(flat_loss(loss, spec, batch, reduction))(theta)
