"""The generalised Gauss-Newton curvature ``G = J^T (d^2 l / d o^2) J`` of a batch's loss through the model's outputs.

``o = outputs(theta)`` are the model's outputs on a batch (``[B, C]`` logits, or any pytree of tensors), ``l(o)``
the loss of those outputs summed (or averaged) over the batch, ``J = do/dtheta``. ``G`` drops the term of the
Hessian that multiplies the loss's first derivative by the outputs' second derivative, so it is positive
semi-definite whenever ``l`` is convex in the outputs (cross-entropy, MSE, BCE), and equals the Hessian when the
outputs are linear in ``theta`` (a linear or logistic regression).

A product ``G v`` is exact for its batch: ``J v`` by forward mode (``jvp``), ``H_o (J v)`` by forward-over-reverse
on the loss of the outputs, and ``J^T (.)`` by one reverse pass (``vjp``) shared by all vectors. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from lightning_fastif.errors import UnsupportedModelError
from lightning_fastif.functional.params import ParamSpec

__all__ = ["LossOfOutputs", "OutputsFn", "basis_rows", "batch_ggn", "batch_ggn_vp"]

OutputsFn = Callable[[dict[str, Tensor], Any], Any]
LossOfOutputs = Callable[[Any, Any], Tensor]


def basis_rows(start: int, count: int, p: int, like: Tensor) -> Tensor:
    """Rows ``start .. start + count`` of the ``[P, P]`` identity, without building the identity: ``[count, P]``."""
    rows = torch.zeros(count, p, dtype=like.dtype, device=like.device)
    rows[torch.arange(count), torch.arange(start, start + count)] = 1
    return rows


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    return losses.sum() if reduction == "sum" else losses.mean()


def batch_ggn_vp(
    outputs_fn: OutputsFn,
    loss_of_outputs: LossOfOutputs,
    theta: Tensor,
    spec: ParamSpec,
    batch: Any,
    vectors: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """``G_b v`` for each row of ``vectors [Q, P]`` -> ``[Q, P]`` (or ``[P]`` -> ``[P]``), with ``G_b`` the
    Gauss-Newton matrix of the batch's mean (or summed, ``reduction="sum"``) loss at ``theta [P]``.

    Args:
        outputs_fn: ``(params dict, batch) -> outputs`` (a tensor or a pytree of tensors).
        loss_of_outputs: ``(outputs, batch) -> [B]`` per-example losses of those outputs.
        theta: flat selected parameters ``[P]``.
        spec: how ``theta`` maps to named parameters.
        batch: the batch.
        vectors: tangents ``[Q, P]`` or ``[P]``.
        reduction: ``"mean"`` or ``"sum"`` over the batch.

    Example:
        >>> g = batch_ggn_vp(outputs_fn, loss_of_outputs, theta, spec, batch, torch.eye(theta.numel()))  # [P, P]
    """
    single = vectors.dim() == 1
    vecs = vectors[None] if single else vectors
    theta = theta.detach()

    def f(t: Tensor) -> Any:
        return outputs_fn(spec.unflatten(t), batch)

    def loss_of(o: Any) -> Tensor:
        return _reduce(loss_of_outputs(o, batch), reduction)

    try:
        with torch.enable_grad():
            out, pullback = vjp(f, theta)
            out = torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
            dloss = grad(loss_of)

            def one(v: Tensor) -> Tensor:
                jv = jvp(f, (theta,), (v.to(theta.dtype),))[1]
                hjv = jvp(dloss, (out,), (jv,))[1]
                return pullback(hjv)[0]

            if vecs.shape[0] == 1:
                res = one(vecs[0])[None]
            else:
                try:
                    res = vmap(one)(vecs)
                except (RuntimeError, NotImplementedError):  # an operator without a batching rule
                    res = torch.stack([one(v) for v in vecs])
    except (RuntimeError, NotImplementedError, TypeError) as err:
        raise UnsupportedModelError(
            f"Cannot take Gauss-Newton products of this model ({str(err)[:200]}): forward mode (jvp) through the "
            'model\'s outputs failed. Use `curvature="hessian"`, or the math attention path for attention '
            '(Hugging Face: `attn_implementation="eager"`).'
        ) from err
    res = res.detach()
    return res[0] if single else res


def batch_ggn(
    outputs_fn: OutputsFn,
    loss_of_outputs: LossOfOutputs,
    theta: Tensor,
    spec: ParamSpec,
    batch: Any,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Dense Gauss-Newton matrix ``[P, P]`` of a batch's loss, built ``chunk_size`` tangent columns at a time."""
    p = theta.numel()
    k = p if chunk_size is None else max(1, int(chunk_size))
    out = torch.empty(p, p, dtype=theta.dtype, device=theta.device)
    for at in range(0, p, k):
        rows = basis_rows(at, min(k, p - at), p, theta)
        out[at : at + k] = batch_ggn_vp(outputs_fn, loss_of_outputs, theta, spec, batch, rows, reduction)
    return out
