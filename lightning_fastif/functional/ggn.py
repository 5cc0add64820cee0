"""The generalised Gauss-Newton curvature ``G = J^T (d^2 l / d o^2) J`` of a batch's loss through the model's outputs.

``o = outputs(theta)`` are the model's outputs on a batch (``[B, C]`` logits, or any pytree of tensors), ``l(o)``
the loss of those outputs summed (or averaged) over the batch, ``J = do/dtheta``. ``G`` drops the term of the
Hessian that multiplies the loss's first derivative by the outputs' second derivative, so it is positive
semi-definite whenever ``l`` is convex in the outputs (cross-entropy, MSE, BCE), and equals the Hessian when the
outputs are linear in ``theta`` (a linear or logistic regression).

A product ``G v`` is exact for its batch. The default (``method="fused"``) takes one pass of the network per call:

- one vector: a forward pass with dual tensors (forward-mode AD) gives the outputs and ``J v`` together while
  recording the reverse graph; ``H_o (J v)`` comes from the output-space Hessian; one backward gives ``J^T H_o J v``;
- ``k`` vectors: one forward, one backward that records its own graph (``u -> J^T u``), then ``J V`` as the
  derivative of that backward in ``u`` and ``J^T H_o J V`` as one more backward, both batched over the ``k``
  vectors (``is_grads_batched``): no forward-over-reverse through the network, and no second forward.

``H_o`` is closed form for cross-entropy of integer labels (``diag(p) - p p^T`` per example, label smoothing
included) and for the mean squared error (``2/K I``), and autodiff (forward-over-reverse on the loss of the outputs
only, which is cheap) for any other loss. ``method="functorch"`` is the first implementation (``torch.func`` vjp +
jvp + forward-over-reverse, one ``jvp`` forward per vector): kept as the reference and as the fallback for models
whose operators lack a double backward or forward-mode formula. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD
from torch.func import grad, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lightning_fastif.errors import ConfigurationError, UnsupportedModelError
from lightning_fastif.functional.batch import labels_of
from lightning_fastif.functional.params import ParamSpec

__all__ = [
    "GGN_FAILURES",
    "GGN_METHODS",
    "LossOfOutputs",
    "OutputHessian",
    "OutputsFn",
    "basis_rows",
    "batch_ggn",
    "batch_ggn_vp",
    "output_hessian_of",
]

OutputsFn = Callable[[dict[str, Tensor], Any], Any]
LossOfOutputs = Callable[[Any, Any], Tensor]
GGN_METHODS = ("fused", "functorch")

GGN_FAILURES = (RuntimeError, NotImplementedError, TypeError)
"""What a product raises when the model's operators cannot take it (autograd's and torch.func's errors)."""
_FAILURES = GGN_FAILURES


def basis_rows(start: int, count: int, p: int, like: Tensor) -> Tensor:
    """Rows ``start .. start + count`` of the ``[P, P]`` identity, without building the identity: ``[count, P]``."""
    rows = torch.zeros(count, p, dtype=like.dtype, device=like.device)
    rows[torch.arange(count), torch.arange(start, start + count)] = 1
    return rows


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    return losses.sum() if reduction == "sum" else losses.mean()


# ---------------------------------------------------------------------------------------------- output Hessians
class OutputHessian:
    """A closed-form output-space Hessian ``d^2 l_i / d o_i^2`` of a per-example loss of one output tensor.

    Args:
        kind: ``"cross_entropy"`` (integer class labels, logits ``[B, C]``; label smoothing does not change it) or
            ``"mse"`` (mean squared error over each example's ``K`` outputs).
        ignore_index: for cross-entropy, the label whose examples have loss 0 (and Hessian 0).
    """

    def __init__(self, kind: str, ignore_index: int | None = None) -> None:
        if kind not in ("cross_entropy", "mse"):
            raise ConfigurationError(f"Expected `kind` to be 'cross_entropy' or 'mse', but got {kind!r}.")
        self.kind, self.ignore_index = kind, ignore_index

    def __repr__(self) -> str:
        return f"OutputHessian({self.kind!r}, ignore_index={self.ignore_index})"

    def prepare(self, outputs: Any, batch: Any) -> Callable[[Tensor], Tensor] | None:
        """``u [..., B, C] -> H_o u`` for these outputs, or None when the closed form does not apply to them (an
        output pytree, soft targets...): the caller then differentiates the loss."""
        if not isinstance(outputs, Tensor) or not outputs.is_floating_point() or outputs.dim() < 1:
            return None
        if self.kind == "mse":
            k = max(1, outputs[0].numel())
            return lambda u: u * (2.0 / k)
        labels = labels_of(batch)
        if outputs.dim() != 2 or not isinstance(labels, Tensor) or labels.is_floating_point():
            return None
        if labels.shape != outputs.shape[:1]:
            return None
        p = torch.softmax(outputs.detach(), dim=-1)
        if self.ignore_index is not None:
            p = p * (labels != self.ignore_index).to(p.dtype).unsqueeze(-1)

        def apply(u: Tensor) -> Tensor:
            return p * u - p * (p * u).sum(-1, keepdim=True)

        return apply


def output_hessian_of(loss: Any) -> OutputHessian | None:
    """The closed-form output Hessian of a resolved loss (``PerExampleLoss``), or None to differentiate it.

    Closed form: the default cross-entropy, and a loss module found on the model that is ``nn.CrossEntropyLoss``
    without class weights (label smoothing and ``ignore_index`` allowed) or ``nn.MSELoss``. A user's ``loss_fn`` is
    differentiated (its form is unknown).
    """
    source = getattr(loss, "source", None)
    if source == "classification":
        return OutputHessian("cross_entropy")
    if source == "model_loss" and getattr(loss, "module_loss", None) is not None:
        module = loss.module_loss.module
        if type(module) is nn.CrossEntropyLoss and module.weight is None:
            return OutputHessian("cross_entropy", int(module.ignore_index))
        if type(module) is nn.MSELoss:
            return OutputHessian("mse")
    return None


def _float_leaves(tree: Any) -> tuple[list[Any], Any, list[int]]:
    leaves, spec = tree_flatten(tree)
    floats = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.is_floating_point()]
    return leaves, spec, floats


def _output_hvp(
    loss_of_outputs: LossOfOutputs,
    outputs: Any,
    batch: Any,
    reduction: str,
    output_hessian: OutputHessian | None,
    batched: bool,
) -> Callable[[list[Tensor]], list[Tensor]]:
    """``[J v per float output leaf] -> [H_o J v per leaf]`` (each ``[k, ...]`` when ``batched``)."""
    leaves, spec, floats = _float_leaves(outputs)
    scale = 1.0
    if reduction != "sum":
        first = leaves[floats[0]] if floats else None
        scale = 1.0 / max(1, int(first.shape[0])) if first is not None and first.dim() else 1.0
    closed = output_hessian.prepare(outputs, batch) if output_hessian is not None else None
    if closed is not None:
        return lambda us: [closed(us[0]) * scale]
    primals = tuple(leaves[i].detach() for i in floats)

    def loss_of(*fl: Tensor) -> Tensor:
        full = list(leaves)
        for i, t in zip(floats, fl):
            full[i] = t
        return _reduce(loss_of_outputs(tree_unflatten(full, spec), batch), reduction)

    dloss = grad(loss_of, argnums=tuple(range(len(floats))))

    def one(*us: Tensor) -> tuple[Tensor, ...]:
        return jvp(dloss, primals, us)[1]

    return lambda us: list(vmap(one)(*us) if batched else one(*us))


# ---------------------------------------------------------------------------------------------- products
def batch_ggn_vp(
    outputs_fn: OutputsFn,
    loss_of_outputs: LossOfOutputs,
    theta: Tensor,
    spec: ParamSpec,
    batch: Any,
    vectors: Tensor,
    reduction: str = "mean",
    output_hessian: OutputHessian | None = None,
    method: str = "fused",
    fallback: bool = True,
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
        output_hessian: the loss's closed-form output Hessian (:func:`output_hessian_of`), or None to
            differentiate ``loss_of_outputs``.
        method: ``"fused"`` (one pass, see the module docstring) or ``"functorch"`` (the first implementation).
        fallback: with ``"fused"``, take ``"functorch"`` when the fused pass fails (an operator without a double
            backward or a forward-mode formula); False lets that failure propagate (the caller may remember it).

    Example:
        >>> g = batch_ggn_vp(outputs_fn, loss_of_outputs, theta, spec, batch, torch.eye(theta.numel()))  # [P, P]
    """
    if method not in GGN_METHODS:
        raise ConfigurationError(f"Expected `method` to be 'fused' or 'functorch', but got {method!r}.")
    single = vectors.dim() == 1
    vecs = (vectors[None] if single else vectors).to(theta.dtype)
    res: Tensor | None = None
    if method == "fused":
        try:
            res = _fused(outputs_fn, loss_of_outputs, theta, spec, batch, vecs, reduction, output_hessian)
        except _FAILURES:
            if not fallback:
                raise
            res = None  # an operator without a double backward or a forward-mode formula: the reference path
    if res is None:
        res = _functorch(outputs_fn, loss_of_outputs, theta, spec, batch, vecs, reduction)
    res = res.detach()
    return res[0] if single else res


def _fused(
    outputs_fn: OutputsFn,
    loss_of_outputs: LossOfOutputs,
    theta: Tensor,
    spec: ParamSpec,
    batch: Any,
    vecs: Tensor,
    reduction: str,
    output_hessian: OutputHessian | None,
) -> Tensor:
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        if (
            vecs.shape[0] == 1
        ):  # forward with dual tensors: outputs and J v in one pass, reverse graph recorded
            with fwAD.dual_level():
                out_dual = outputs_fn(spec.unflatten(fwAD.make_dual(t, vecs[0])), batch)
                duals, tspec = tree_flatten(out_dual)
                pairs = [tuple(fwAD.unpack_dual(o)) if isinstance(o, Tensor) else (o, None) for o in duals]
            outputs = tree_unflatten([primal for primal, _ in pairs], tspec)
            _, _, floats = _float_leaves(outputs)
            prims = [pairs[i][0] for i in floats]
            jvs = [pairs[i][1] if pairs[i][1] is not None else torch.zeros_like(pairs[i][0]) for i in floats]
            hjv = _output_hvp(loss_of_outputs, outputs, batch, reduction, output_hessian, batched=False)(jvs)
            return _pull(prims, t, hjv, batched=False)[None]
        outputs = outputs_fn(spec.unflatten(t), batch)
        flat, _, floats = _float_leaves(outputs)
        prims = [flat[i] for i in floats]
        live = [o for o in prims if o.requires_grad]
        us = [torch.zeros_like(o, requires_grad=True) for o in live]
        if live:  # J^T u with its own graph; its derivative in u along V is J V
            (jt_u,) = torch.autograd.grad(live, t, us, create_graph=True)
            jv_live = torch.autograd.grad(
                jt_u, us, vecs, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
        k = vecs.shape[0]
        it = iter(jv_live if live else [])
        jvs = []
        for o in prims:
            jv = next(it) if o.requires_grad else None
            jvs.append(jv if jv is not None else o.new_zeros((k, *o.shape)))
        hjv = _output_hvp(loss_of_outputs, outputs, batch, reduction, output_hessian, batched=True)(jvs)
        return _pull(prims, t, hjv, batched=True)


def _pull(prims: list[Tensor], t: Tensor, cotangents: list[Tensor], batched: bool) -> Tensor:
    """``J^T c`` summed over the output leaves (``[P]``, or ``[k, P]`` when ``batched``)."""
    pairs = [(o, c) for o, c in zip(prims, cotangents) if o.requires_grad]
    shape = (cotangents[0].shape[0], t.numel()) if batched and cotangents else (t.numel(),)
    if not pairs:
        return t.new_zeros(shape)
    (res,) = torch.autograd.grad(
        [o for o, _ in pairs], t, [c for _, c in pairs], is_grads_batched=batched, allow_unused=True
    )
    return t.new_zeros(shape) if res is None else res


def _functorch(
    outputs_fn: OutputsFn,
    loss_of_outputs: LossOfOutputs,
    theta: Tensor,
    spec: ParamSpec,
    batch: Any,
    vecs: Tensor,
    reduction: str,
) -> Tensor:
    """The first implementation: ``torch.func`` vjp + one jvp forward per vector + forward-over-reverse."""
    theta = theta.detach()

    def f(t: Tensor) -> Any:
        return outputs_fn(spec.unflatten(t), batch)

    def loss_of(o: Any) -> Tensor:
        return _reduce(loss_of_outputs(o, batch), reduction)

    try:
        with torch.enable_grad():
            out, pullback = vjp(f, theta)
            out = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
            dloss = grad(loss_of)

            def one(v: Tensor) -> Tensor:
                jv = jvp(f, (theta,), (v,))[1]
                hjv = jvp(dloss, (out,), (jv,))[1]
                return pullback(hjv)[0]

            if vecs.shape[0] == 1:
                return one(vecs[0])[None]
            try:
                return vmap(one)(vecs)
            except (RuntimeError, NotImplementedError):  # an operator without a batching rule
                return torch.stack([one(v) for v in vecs])
    except _FAILURES as err:
        raise UnsupportedModelError(
            f"Cannot take Gauss-Newton products of this model ({str(err)[:200]}): forward mode (jvp) through the "
            'model\'s outputs failed. Use `curvature="hessian"`, or the math attention path for attention '
            '(Hugging Face: `attn_implementation="eager"`).'
        ) from err


def batch_ggn(
    outputs_fn: OutputsFn,
    loss_of_outputs: LossOfOutputs,
    theta: Tensor,
    spec: ParamSpec,
    batch: Any,
    reduction: str = "mean",
    chunk_size: int | None = None,
    output_hessian: OutputHessian | None = None,
    method: str = "fused",
) -> Tensor:
    """Dense Gauss-Newton matrix ``[P, P]`` of a batch's loss, built ``chunk_size`` tangent columns at a time."""
    p = theta.numel()
    k = p if chunk_size is None else max(1, int(chunk_size))
    out = torch.empty(p, p, dtype=theta.dtype, device=theta.device)
    for at in range(0, p, k):
        rows = basis_rows(at, min(k, p - at), p, theta)
        out[at : at + k] = batch_ggn_vp(
            outputs_fn, loss_of_outputs, theta, spec, batch, rows, reduction, output_hessian, method
        )
    return out
