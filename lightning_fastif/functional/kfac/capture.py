"""K-FAC's per-batch capture by hooks: each layer's activations ``a`` and pre-activation gradients ``g``.

The labels backpropagated follow ``fisher`` (sampled from the model, their exact expectation, or the real ones; see
:mod:`lightning_fastif.functional.kfac`). Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import logits_of
from lightning_fastif.functional.kfac.layers import LayerSlot, _conv_padding

__all__ = ["FISHER_KINDS", "MAX_OUTPUT_DIM", "Captured", "capture_batch", "example_seed", "fisher_mode"]

FISHER_KINDS = ("true", "exact", "empirical")
MAX_OUTPUT_DIM = 256
"""Largest per-example output size for which ``fisher="true"`` samples from the output Hessian of a ``loss_fn``."""


def _activations(slot: LayerSlot, mod: nn.Module, x: Tensor) -> Tensor:
    """Layer input -> ``[B, T, in_dim]`` (positions ``T`` folded per example)."""
    if slot.kind in ("linear", "conv1d"):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if not isinstance(mod, nn.Conv2d):  # kfac_layers admits only Linear, Conv1D and Conv2d slots
        raise TypeError(f"internal: a K-FAC conv slot on a {type(mod).__name__}")
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=_conv_padding(mod), stride=mod.stride)
    return cols.transpose(1, 2)  # [B, L, C_in * kh * kw]


def _out_grads(slot: LayerSlot, g: Tensor) -> Tensor:
    """Gradient of the layer output -> ``[B, T, out_dim]``."""
    if slot.kind in ("linear", "conv1d"):
        return g.reshape(g.shape[0], -1, g.shape[-1])
    return g.flatten(2).transpose(1, 2)  # [B, C_out, H, W] -> [B, HW, C_out]


def example_seed(seed: int, example_id: int) -> int:
    """The seed of an example's sampled label: a function of ``(seed, example id)`` only."""
    return (seed * 1_000_003 + 15_485_863 * (example_id + 1)) % (2**63 - 1)


def _example_noise(seed: int, ids: list[int], shape: tuple[int, ...], kind: str, like: Tensor) -> Tensor:
    gen = torch.Generator()
    rows = []
    for i in ids:
        gen.manual_seed(example_seed(seed, i))
        rows.append(
            torch.rand(shape, generator=gen) if kind == "uniform" else torch.randn(shape, generator=gen)
        )
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def _output_hessian_root(loss: Any, outputs: Tensor, batch: Any) -> Tensor:
    """``R [B, K, K]`` with ``R_i R_i^T = H_i``, the Hessian of example i's loss with respect to its ``K`` outputs
    (negative eigenvalues of a non-convex loss clipped to 0)."""
    b = outputs.shape[0]
    k = outputs[0].numel()
    if k > MAX_OUTPUT_DIM:
        raise ConfigurationError(
            f"Expected model outputs of at most {MAX_OUTPUT_DIM} values per example for a sampled or exact Fisher "
            f"with a `loss_fn`, but got {k}. Use `fisher='empirical'`."
        )
    with torch.enable_grad():
        o = outputs.detach().requires_grad_(True)
        g = torch.autograd.grad(loss(o, batch).sum(), o, create_graph=True)[0].reshape(b, k)
        cols = []
        for j in range(
            k
        ):  # per-example losses: the Hessian is block diagonal, so one pass per output coordinate
            (h,) = torch.autograd.grad(g[:, j].sum(), o, retain_graph=True, allow_unused=True)
            cols.append(torch.zeros(b, k, dtype=o.dtype, device=o.device) if h is None else h.reshape(b, k))
    hess = torch.stack(cols, -1).detach()
    hess = 0.5 * (hess + hess.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(hess)
    return evecs * evals.clamp_min(0).sqrt()[:, None, :]


def fisher_mode(loss: Any, fisher: str) -> str:
    """How ``fisher`` is realised for ``loss``: ``"sampled_labels"`` (default classification loss),
    ``"output_hessian"`` (a separable loss: ``loss.split()``), or ``"empirical"`` (asked for, or a loss that cannot
    be split, such as a module's own ``per_example_loss``)."""
    if fisher == "empirical":
        return "empirical"
    if (
        fisher == "true"
        and callable(getattr(getattr(loss, "token_loss", None), "sampled_batch", None))
        and callable(getattr(loss, "split", None))
    ):
        return "sampled_tokens"  # a sequence loss: one token drawn per position from the model's distribution
    source = getattr(loss, "source", "classification")
    if source == "classification":
        return "sampled_labels" if fisher == "true" else "exact_labels"
    split = getattr(loss, "split", None)
    if callable(split) and split() is not None:
        return "output_hessian" if fisher == "true" else "exact_output_hessian"
    return "empirical"


class _Recorder:
    """Forward hooks that keep each slot's inputs and output tensors (several calls of one module are kept apart)."""

    def __init__(self, model: nn.Module, slots: list[LayerSlot]) -> None:
        self.inputs: dict[str, list[Tensor]] = {s.module: [] for s in slots}
        self.outputs: dict[str, list[Tensor]] = {s.module: [] for s in slots}
        self.handles = []
        for s in slots:
            mod = model.get_submodule(s.module) if s.module else model
            self.handles.append(mod.register_forward_hook(self._hook(s)))

    def _hook(self, slot: LayerSlot) -> Callable[..., Tensor]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            x = args[0].detach()
            self.inputs[slot.module].append(_activations(slot, mod, x) if slot.weight is not None else x)
            self.outputs[slot.module].append(out)
            # downstream layers get a copy: an in-place op after the layer (ReLU(inplace=True)) must not turn the
            # recorded output into the post-activation
            return out.clone()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _position_mask(batch: Any, x: Tensor) -> Tensor | None:
    """``[B, T]`` 0/1 weights for sequence positions (``attention_mask`` of a dict batch) when they match ``x``."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if (
        isinstance(mask, Tensor)
        and mask.dim() == 2
        and x.dim() == 3
        and tuple(mask.shape) == tuple(x.shape[:2])
    ):
        return mask.to(dtype=x.dtype)
    return None


@dataclass
class Captured:
    """One batch's per-layer activations ``a [B, T, a_dim]`` and output gradients ``g [B, K, T, out]`` (masked).

    ``K`` is the number of backward passes: 1 for a sampled or empirical Fisher, the number of outputs for the exact
    expectation (the Fisher is the sum over the ``K`` passes)."""

    a: dict[str, Tensor]
    g: dict[str, Tensor]
    positions: dict[str, Tensor]  # per-example number of valid positions [B]


def capture_batch(
    loss: Any,
    model: nn.Module,
    slots: list[LayerSlot],
    params: dict[str, Tensor],
    batch: Any,
    ids: list[int],
    fisher: str = "true",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Captured:
    """Run one batch forward and backward with hooks and return each layer's ``a`` and ``g``.

    Args:
        loss: the per-example loss ``(params, batch) -> [B]`` (a ``PerExampleLoss``).
        model: the module whose layers ``slots`` name (``loss.model``).
        slots: from :func:`kfac_layers`.
        params: the selected parameters ``{name: tensor}`` (substituted functionally; the model is unchanged).
        batch: a training batch (already on the right device).
        ids: the dataset positions of the batch's examples (they seed the sampled labels).
        fisher: ``"true"`` (one sampled label per example), ``"exact"`` (the expectation over labels) or
            ``"empirical"``.
        seed: base seed of the sampled labels.
        dtype: of the predictive probabilities the labels are drawn from (the factors' math dtype).
    """
    rec = _Recorder(model, slots)
    top: list[Any] = []
    top_handle = (
        model.register_forward_hook(lambda _m, _a, out: top.append(out)) if fisher != "empirical" else None
    )
    try:
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            mode = fisher_mode(loss, fisher)
            if mode == "empirical":
                roots, grad_outs = [loss(leaves, batch).sum()], [None]
            elif mode == "sampled_tokens":
                outputs_fn, loss_of_outputs = loss.split()
                out = outputs_fn(leaves, batch)
                noise = _example_noise(seed, ids, tuple(out.shape[1:]), "uniform", out).clamp(1e-12, 1 - 1e-7)
                drawn = loss.token_loss.sampled_batch(out, batch, noise)
                roots, grad_outs = [loss_of_outputs(out, drawn).sum()], [None]
            elif mode in ("output_hessian", "exact_output_hessian"):
                outputs_fn, loss_of_outputs = loss.split()
                out = outputs_fn(leaves, batch)
                if not isinstance(out, Tensor):
                    raise ConfigurationError(
                        f"Expected the model's outputs to be a tensor for `fisher={fisher!r}` with a `loss_fn`, "
                        f"but got {type(out).__name__}. Use `fisher='empirical'`."
                    )
                root = _output_hessian_root(loss_of_outputs, out, batch)  # [B, K, K]
                if mode == "output_hessian":  # one draw r ~ N(0, H_out) per example
                    eps = _example_noise(seed, ids, (root.shape[1],), "normal", out)
                    grad_outs = [(root @ eps[:, :, None]).reshape(out.shape)]
                else:  # the expectation in closed form: one backward pass per column of the root
                    grad_outs = [root[:, :, c].reshape(out.shape) for c in range(root.shape[2])]
                roots = [out]
            else:
                loss(leaves, batch)  # the forward pass fills the hooks; the real labels' loss is not used
                logits = logits_of(top[-1]) if top else None
                if logits is None or logits.dim() != 2:
                    raise ConfigurationError(
                        f"Expected logits [B, C] for `fisher={fisher!r}` with the default classification loss, but "
                        f"got {None if logits is None else tuple(logits.shape)}. Use `fisher='empirical'`."
                    )
                roots = [logits]
                p = torch.softmax(logits.detach().to(dtype), 1)
                if mode == "sampled_labels":
                    u = _example_noise(seed, ids, (logits.shape[1],), "uniform", p).clamp(1e-12, 1 - 1e-7)
                    sampled = (p.log() - torch.log(-torch.log(u))).argmax(1)  # Gumbel-max: y ~ softmax
                    grad_outs = [(p - F.one_hot(sampled, p.shape[1])).to(logits.dtype)]  # dCE/dlogits
                else:  # exact: diag(p) - p p^T = sum_c r_c r_c^T with r_c = sqrt(p_c) (e_c - p)
                    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
                    grad_outs = [
                        (p[:, c : c + 1].sqrt() * (eye[c] - p)).to(logits.dtype) for c in range(p.shape[1])
                    ]
            outs = [t for s in slots for t in rec.outputs[s.module]]
            draws = []
            for k, gout in enumerate(grad_outs):
                draws.append(
                    torch.autograd.grad(
                        roots,
                        outs,
                        grad_outputs=None if gout is None else [gout],
                        allow_unused=True,
                        retain_graph=k < len(grad_outs) - 1,
                    )
                )
    finally:
        rec.remove()
        if top_handle is not None:
            top_handle.remove()
    a_out, g_out, pos_out = {}, {}, {}
    index = 0
    for s in slots:
        a_parts, g_parts, m_parts = [], [], []
        for x, out in zip(rec.inputs[s.module], rec.outputs[s.module]):
            per_draw = [torch.zeros_like(out) if d[index] is None else d[index].detach() for d in draws]
            index += 1
            gg = torch.stack([_out_grads(s, g) for g in per_draw], 1)  # [B, K, T, out]
            bsz, t = gg.shape[0], gg.shape[2]
            cols = []
            if s.weight is not None:
                cols.append(x)
            if s.bias is not None:
                cols.append(torch.ones(bsz, t, 1, dtype=gg.dtype, device=gg.device))
            a = torch.cat(cols, -1)
            mask = _position_mask(batch, a) if s.kind in ("linear", "conv1d") else None
            if mask is not None:
                a, gg = a * mask[..., None], gg * mask[:, None, :, None]
                m_parts.append(mask.sum(1))
            else:
                m_parts.append(torch.full((bsz,), float(t), dtype=gg.dtype, device=gg.device))
            a_parts.append(a)
            g_parts.append(gg)
        # several calls of one module: positions of one example, side by side
        a_out[s.module] = torch.cat(a_parts, 1)
        g_out[s.module] = torch.cat(g_parts, 2)
        pos_out[s.module] = torch.stack(m_parts).sum(0)
    return Captured(a_out, g_out, pos_out)
