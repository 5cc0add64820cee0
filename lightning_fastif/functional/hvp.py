"""Exact Hessian-vector products and dense Hessians of a batch's loss.

Two exact ways to get ``H v``: double backward (``autograd.grad`` of the gradient, batched over the vectors), and
forward-over-reverse (``jvp(grad(f))``). Measured on the digits MLP (8,970 parameters, batch 8, one thread),
double backward took 1.3 ms against 6.2 ms per product, so it is the default; forward-over-reverse is the fallback
when autograd cannot be used (inside another ``torch.func`` transform).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import grad, hessian, jvp, vmap

from lightning_fastif.errors import UnsupportedModelError
from lightning_fastif.functional.grads import Loss, flat_loss
from lightning_fastif.functional.params import ParamSpec

__all__ = ["add_batch_hessian", "batch_hessian", "batch_hvp", "saved_graph_bytes"]


def _hvp_double_backward(f: Any, theta: Tensor, vectors: Tensor) -> Tensor:
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(t), t, create_graph=True)
        if vectors.shape[0] == 1:
            (hv,) = torch.autograd.grad(g, t, vectors[0], allow_unused=True)
            hv = torch.zeros_like(t) if hv is None else hv
            return hv[None].detach()
        try:  # one vmapped backward over all vectors
            (hv,) = torch.autograd.grad(
                g, t, vectors, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            return (torch.zeros_like(vectors) if hv is None else hv).detach()
        except RuntimeError:  # an operator without a batching rule: one backward per vector
            rows = []
            for v in vectors:
                (hv,) = torch.autograd.grad(g, t, v, retain_graph=True, allow_unused=True)
                rows.append(torch.zeros_like(t) if hv is None else hv)
            return torch.stack(rows).detach()


def _hvp_forward_over_reverse(f: Any, theta: Tensor, vectors: Tensor) -> Tensor:
    g = grad(f)

    def one(v: Tensor) -> Tensor:
        return jvp(g, (theta,), (v,))[1]

    if vectors.shape[0] == 1:  # vmap over one row only adds overhead
        return one(vectors[0])[None]
    return vmap(one)(vectors)


def batch_hvp(
    loss: Loss,
    theta: Tensor,
    spec: ParamSpec,
    batch: Any,
    vectors: Tensor,
    reduction: str = "mean",
    method: str = "auto",
) -> Tensor:
    """``H_b v`` for each row of ``vectors [Q, P]`` -> ``[Q, P]`` (or ``[P]`` -> ``[P]``), with ``H_b`` the Hessian of
    the batch's mean (or summed, ``reduction="sum"``) loss at ``theta``. Exact for the batch.

    Args:
        method: ``"double_backward"``, ``"forward_over_reverse"`` or ``"auto"`` (double backward, falling back to
            forward-over-reverse inside other ``torch.func`` transforms).
    """
    f = flat_loss(loss, spec, batch, reduction)
    single = vectors.dim() == 1
    vecs = vectors[None] if single else vectors
    if method == "forward_over_reverse":
        out = _hvp_forward_over_reverse(f, theta, vecs)
    else:
        try:
            out = _hvp_double_backward(f, theta, vecs)
        except RuntimeError as first:
            if method == "double_backward":
                raise
            try:
                out = _hvp_forward_over_reverse(f, theta, vecs)
            except (RuntimeError, NotImplementedError) as second:
                raise UnsupportedModelError(
                    "Cannot take Hessian-vector products of this model: double backward failed "
                    f"({str(first)[:160]}) and forward-over-reverse failed ({str(second)[:160]}). Fused kernels "
                    "are the usual cause: for attention use the math path (Hugging Face: "
                    '`attn_implementation="eager"`; torch: `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`).'
                ) from second
    return out[0] if single else out


def batch_hessian(loss: Loss, theta: Tensor, spec: ParamSpec, batch: Any, reduction: str = "mean") -> Tensor:
    """Dense Hessian ``[P, P]`` of the batch's mean (or summed) loss at ``theta``."""
    return hessian(flat_loss(loss, spec, batch, reduction))(theta)


def add_batch_hessian(
    loss: Loss,
    theta: Tensor,
    spec: ParamSpec,
    batch: Any,
    out: Tensor,
    chunk_size: int,
    reduction: str = "sum",
) -> Tensor:
    """Add the batch's dense Hessian to ``out [P, P]`` in place, ``chunk_size`` tangent columns at a time.

    The gradient graph is built once and differentiated again for each chunk of identity rows (one batched
    backward per chunk), so the working memory is the graph plus ``chunk_size`` vectors' backward, never ``P`` of
    them at once. Falls back to forward-over-reverse products where double backward fails.
    """
    from lightning_fastif.functional.ggn import basis_rows

    p = theta.numel()
    k = max(1, min(int(chunk_size), p))
    f = flat_loss(loss, spec, batch, reduction)
    try:
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(f(t), t, create_graph=True)
            for at in range(0, p, k):
                rows = basis_rows(at, min(k, p - at), p, theta)
                if rows.shape[0] == 1:
                    (hv,) = torch.autograd.grad(g, t, rows[0], retain_graph=True, allow_unused=True)
                    hv = None if hv is None else hv[None]
                else:
                    (hv,) = torch.autograd.grad(
                        g, t, rows, is_grads_batched=True, retain_graph=True, allow_unused=True
                    )
                if hv is not None:
                    out[at : at + rows.shape[0]] += hv.detach()
                del hv, rows
    except RuntimeError:  # no double backward / no batching rule: the generic product, chunk by chunk
        for at in range(0, p, k):
            rows = basis_rows(at, min(k, p - at), p, theta)
            out[at : at + rows.shape[0]] += batch_hvp(loss, theta, spec, batch, rows, reduction=reduction)
    return out


def saved_graph_bytes(fn: Any) -> tuple[Any, int]:
    """Run ``fn()`` and count the bytes of the tensors autograd saves for backward meanwhile (each storage once).

    Returns:
        ``(fn's result, bytes)``: a measured size of the graph that a backward through ``fn`` keeps alive.
    """
    seen: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (functorch wrappers)
            seen[(id(t), 0)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())
