"""Kronecker-factored curvature (K-FAC and EK-FAC) of ``nn.Linear`` and ``nn.Conv2d`` layers, fitted by hooks.

For a layer with input activations ``a`` (a ones column appended when its bias is selected) and pre-activation
gradients ``g`` (the gradient of an example's loss with respect to the layer's output), one example's weight
gradient is ``D = sum_t g_t a_t^T`` ``[out, in(+1)]``, summed over the positions ``t`` that share the weight
(tokens of a sequence, pixels of a convolution; one position for a plain ``Linear``). The Fisher block of the layer,
``F = E[vec(D) vec(D)^T]`` (row-major ``vec``), is approximated by

- **K-FAC**: ``F ~ G (x) A`` with ``A = (1/N) sum_i sum_t a a^T`` and ``G = (1/(N T)) sum_i sum_t g g^T``
  (Grosse & Martens' KFC normalisation: per example for A, per position for G);
- **EK-FAC** (George et al., 2018): the same eigenbasis ``Q = Q_G (x) Q_A`` with the eigenvalues replaced by the
  exact diagonal of ``F`` in that basis, ``Lambda[o, i] = E[(Q_G^T D Q_A)[o, i]^2]`` (a second pass).

Layers are independent blocks (block-diagonal over layers). The damped inverse-vector product of a layer is
``Q_G [(Q_G^T V Q_A) / (Lambda + damping)] Q_A^T`` with ``Lambda = lambda_G lambda_A^T`` for K-FAC.

``fisher="true"`` backpropagates labels sampled from the model's own predictive distribution (one per example,
seeded by the example's position so that sharding does not change it): for the default classification loss a
categorical draw from ``softmax(logits)``; for a separable ``loss_fn`` a draw ``r ~ N(0, H_out)`` from the
per-example Hessian of the loss with respect to the outputs (for cross-entropy both have covariance
``diag(p) - p p^T``: the Fisher equals the Gauss-Newton matrix). ``fisher="exact"`` takes that expectation in
closed form instead of drawing from it: ``K`` backward passes per batch with the columns of a root ``R R^T = H_out``
(``r_c = sqrt(p_c) (e_c - p)`` for cross-entropy), so the factors are those of the Gauss-Newton matrix itself (no
Monte Carlo noise; ``K`` times the backward cost). ``fisher="empirical"`` backpropagates the real labels' losses.

Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fastif.errors import ConfigurationError, NonFiniteError, UnsupportedModelError
from lightning_fastif.functional.batch import logits_of
from lightning_fastif.functional.params import ParamSpec

__all__ = [
    "FISHER_KINDS",
    "KFACFactors",
    "LayerSlot",
    "accumulate_covariances",
    "accumulate_eigenvalues",
    "capture_batch",
    "finalize_covariances",
    "fisher_mode",
    "fit_factors",
    "kfac_layers",
    "kfac_unsupported",
    "layer_matrices",
    "preconditioned_cg",
    "solve_kfac",
]

FISHER_KINDS = ("true", "exact", "empirical")
MAX_OUTPUT_DIM = 256
"""Largest per-example output size for which ``fisher="true"`` samples from the output Hessian of a ``loss_fn``."""

Progress = Callable[[str, int, int], None]
Reduce = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class LayerSlot:
    """One supported layer with at least one selected parameter.

    Attributes:
        module: the module's name in ``model.named_modules()``.
        kind: ``"linear"`` or ``"conv2d"``.
        weight, bias: full parameter names if selected, else ``None``.
        out_dim: output features / channels.
        in_dim: weight columns (``in_features`` or ``C_in * kh * kw``); 0 when the weight is not selected.
    """

    module: str
    kind: str
    weight: str | None
    bias: str | None
    out_dim: int
    in_dim: int

    @property
    def a_dim(self) -> int:
        """Size of the activation factor: weight columns plus the ones column of a selected bias."""
        return self.in_dim + (1 if self.bias is not None else 0)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                return None  # asymmetric 'same' padding
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(m.padding[0]), int(m.padding[1]))


def _why_unsupported(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return None
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"grouped Conv2d (groups={m.groups})"
        if m.padding_mode != "zeros":
            return f"Conv2d with padding_mode={m.padding_mode!r}"
        if _conv_padding(m) is None:
            return "Conv2d with asymmetric 'same' padding"
        return None
    return type(m).__name__


def _owner(model: nn.Module, name: str) -> tuple[str, str, nn.Module | None]:
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return mod_name, attr, None
    if attr not in dict(mod.named_parameters(recurse=False)):
        return mod_name, attr, None
    return mod_name, attr, mod


def kfac_unsupported(model: nn.Module, param_names: Iterable[str]) -> list[str]:
    """The selected parameters that K-FAC/EK-FAC cannot take, each with its module type: ``[]`` when all fit.

    Supported: ``weight`` and ``bias`` of ``nn.Linear`` and of ``nn.Conv2d`` (groups 1, zero padding), wherever
    they sit (inside transformer blocks too). A module walk, no forward pass.

    Example:
        >>> m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        >>> kfac_unsupported(m, ["0.weight", "1.weight"])
        ['1.weight (LayerNorm)']
    """
    bad = []
    for name in param_names:
        _, attr, mod = _owner(model, name)
        if mod is None:
            bad.append(f"{name} (a parameter not owned by a Linear or Conv2d module)")
            continue
        why = _why_unsupported(mod)
        if why is not None and next(mod.children(), None) is not None:
            why = f"a free nn.Parameter of {type(mod).__name__}"
        if why is None and attr not in ("weight", "bias"):
            why = f"{type(mod).__name__}.{attr}"
        if why is not None:
            bad.append(f"{name} ({why})")
    return bad


def kfac_layers(model: nn.Module, param_names: Iterable[str]) -> list[LayerSlot]:
    """The supported layers holding the selected parameters, in module order.

    Raises:
        UnsupportedModelError: some selected parameters are not in a supported layer (the message names them).
    """
    names = list(param_names)
    bad = kfac_unsupported(model, names)
    if bad:
        shown = ", ".join(bad[:20]) + (f", ... ({len(bad)} in all)" if len(bad) > 20 else "")
        raise UnsupportedModelError(
            "K-FAC/EK-FAC take only the weight and bias of nn.Linear and nn.Conv2d layers, but the selected "
            f"parameters include {shown}. Select only such layers with `params` (e.g. ['encoder.*.dense.*']), "
            "or use CGSolver (on curvature='gauss_newton') or ExactSolver for the others."
        )
    chosen = set(names)
    slots = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        w = f"{prefix}weight" if f"{prefix}weight" in chosen else None
        b = f"{prefix}bias" if mod.bias is not None and f"{prefix}bias" in chosen else None
        if w is None and b is None:
            continue
        in_dim = int(mod.weight[0].numel()) if w is not None else 0
        kind = "linear" if isinstance(mod, nn.Linear) else "conv2d"
        slots.append(LayerSlot(mod_name, kind, w, b, int(mod.weight.shape[0]), in_dim))
    return slots


# ----------------------------------------------------------------------------------------------- capture
def _activations(slot: LayerSlot, mod: nn.Module, x: Tensor) -> Tensor:
    """Layer input -> ``[B, T, in_dim]`` (positions ``T`` folded per example)."""
    if slot.kind == "linear":
        return x.reshape(x.shape[0], -1, x.shape[-1])
    assert isinstance(mod, nn.Conv2d)
    cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=_conv_padding(mod), stride=mod.stride)
    return cols.transpose(1, 2)  # [B, L, C_in * kh * kw]


def _out_grads(slot: LayerSlot, g: Tensor) -> Tensor:
    """Gradient of the layer output -> ``[B, T, out_dim]``."""
    if slot.kind == "linear":
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
                p = torch.softmax(logits.detach().double(), 1)
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
            mask = _position_mask(batch, a) if s.kind == "linear" else None
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


# ----------------------------------------------------------------------------------------------- fitting
@dataclass
class KFACFactors:
    """Fitted factors of every layer (float64 on the parameters' device).

    Attributes:
        slots: the layers.
        a_cov, g_cov: ``{module: [a_dim, a_dim]}`` and ``{module: [out, out]}``.
        a_eval, a_evec, g_eval, g_evec: their eigendecompositions.
        corrected: EK-FAC's eigenvalues ``{module: [out, a_dim]}`` (empty until the second pass).
        num_examples: N.
    """

    slots: list[LayerSlot]
    a_cov: dict[str, Tensor]
    g_cov: dict[str, Tensor]
    a_eval: dict[str, Tensor] = field(default_factory=dict)
    a_evec: dict[str, Tensor] = field(default_factory=dict)
    g_eval: dict[str, Tensor] = field(default_factory=dict)
    g_evec: dict[str, Tensor] = field(default_factory=dict)
    corrected: dict[str, Tensor] = field(default_factory=dict)
    num_examples: int = 0

    def eigendecompose(self) -> None:
        for s in self.slots:
            self.a_eval[s.module], self.a_evec[s.module] = torch.linalg.eigh(_sym(self.a_cov[s.module]))
            self.g_eval[s.module], self.g_evec[s.module] = torch.linalg.eigh(_sym(self.g_cov[s.module]))

    def eigenvalues(self, kind: str) -> dict[str, Tensor]:
        """Per-layer eigenvalues ``[out, a_dim]``: ``lambda_G lambda_A^T`` (``"kfac"``) or the corrected ones."""
        if kind == "ekfac":
            return self.corrected
        return {
            s.module: self.g_eval[s.module].clamp_min(0)[:, None]
            * self.a_eval[s.module].clamp_min(0)[None, :]
            for s in self.slots
        }

    def tensors(self) -> dict[str, Tensor]:
        """Flat ``{"<kind>/<module>": tensor}`` for saving."""
        out = {}
        for kind in ("a_cov", "g_cov", "a_eval", "a_evec", "g_eval", "g_evec", "corrected"):
            for mod, t in getattr(self, kind).items():
                out[f"{kind}/{mod}"] = t
        return out

    @classmethod
    def from_tensors(
        cls, slots: list[LayerSlot], tensors: dict[str, Tensor], num_examples: int
    ) -> KFACFactors:
        f = cls(slots, {}, {}, num_examples=num_examples)
        for key, t in tensors.items():
            kind, _, mod = key.partition("/")
            getattr(f, kind)[mod] = t
        return f


def _sym(m: Tensor) -> Tensor:
    return 0.5 * (m + m.T)


def accumulate_covariances(captured: Captured, sums: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Add one batch's ``sum a a^T``, ``sum g g^T`` and the position count to ``sums`` (float64)."""
    sums = {} if sums is None else sums
    for mod, a in captured.a.items():
        a2 = a.reshape(-1, a.shape[-1]).double()
        g2 = captured.g[mod].reshape(-1, captured.g[mod].shape[-1]).double()  # draws and positions as rows
        for key, val in (
            (f"A/{mod}", a2.T @ a2),
            (f"G/{mod}", g2.T @ g2),
            (f"T/{mod}", captured.positions[mod].double().sum().reshape(1)),
        ):
            sums[key] = val if key not in sums else sums[key] + val
    return sums


def finalize_covariances(slots: list[LayerSlot], sums: dict[str, Tensor], num_examples: int) -> KFACFactors:
    """Covariances from (all-reduced) sums: ``A = sum a a^T / N``, ``G = sum g g^T / (total positions)``."""
    a_cov, g_cov = {}, {}
    for s in slots:
        positions = float(sums[f"T/{s.module}"])
        a_cov[s.module] = sums[f"A/{s.module}"] / num_examples
        g_cov[s.module] = sums[f"G/{s.module}"] / max(positions, 1.0)
    factors = KFACFactors(slots, a_cov, g_cov, num_examples=num_examples)
    factors.eigendecompose()
    return factors


def accumulate_eigenvalues(
    captured: Captured, factors: KFACFactors, sums: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Add one batch's ``sum_i (Q_G^T D_i Q_A)^2`` (EK-FAC's correction) to ``sums`` (float64)."""
    sums = {} if sums is None else sums
    for mod, a in captured.a.items():
        qa, qg = factors.a_evec[mod], factors.g_evec[mod]
        ra = a.to(qa.dtype) @ qa  # [B, T, a_dim]
        rg = captured.g[mod].to(qg.dtype) @ qg  # [B, K, T, out]
        if ra.shape[1] == 1:  # one position: (g a^T)^2 = (g^2)(a^2)^T, summed over examples by one product
            val = rg[:, :, 0].square().sum(1).T @ ra[:, 0].square()
        else:
            val = sum(torch.einsum("bto,bti->boi", rg[:, k], ra).square().sum(0) for k in range(rg.shape[1]))
        key = f"L/{mod}"
        sums[key] = val if key not in sums else sums[key] + val
    return sums


def layer_matrices(spec: ParamSpec, slots: list[LayerSlot], vectors: Tensor) -> dict[str, Tensor]:
    """``[Q, P]`` -> ``{module: V [Q, out, a_dim]}`` (weight columns, then the bias column)."""
    parts = spec.unflatten(vectors)
    q = vectors.shape[0]
    out = {}
    for s in slots:
        cols = []
        if s.weight is not None:
            cols.append(parts[s.weight].reshape(q, s.out_dim, -1))
        if s.bias is not None:
            cols.append(parts[s.bias].reshape(q, s.out_dim, 1))
        out[s.module] = torch.cat(cols, -1)
    return out


def solve_kfac(
    factors: KFACFactors, spec: ParamSpec, vectors: Tensor, damping: float, kind: str = "ekfac"
) -> Tensor:
    """``x = (F_approx + damping I)^{-1} v`` for each row of ``vectors [Q, P]`` -> ``[Q, P]``.

    ``F_approx`` is block-diagonal over layers, each block ``Q diag(Lambda) Q^T`` with ``Q = Q_G (x) Q_A`` and
    ``Lambda`` the K-FAC (``kind="kfac"``) or EK-FAC (``"ekfac"``) eigenvalues.

    Raises:
        ConfigurationError: the vectors do not have ``P = spec.numel`` columns, or a parameter of ``spec`` has no
            layer in ``factors``.
        NonFiniteError: some ``Lambda + damping`` is zero (``damping = 0`` with a zero eigenvalue).
    """
    if vectors.dim() != 2 or vectors.shape[1] != spec.numel:
        raise ConfigurationError(f"Expected vectors [Q, {spec.numel}], but got {tuple(vectors.shape)}.")
    covered = {n for s in factors.slots for n in (s.weight, s.bias) if n is not None}
    missing = [n for n in spec.names if n not in covered]
    if missing:
        raise ConfigurationError(
            f"Expected fitted factors for every selected parameter, but {missing} have none."
        )
    if vectors.shape[0] == 0:
        return vectors.clone()
    mats = layer_matrices(spec, factors.slots, vectors)
    evals = factors.eigenvalues(kind)
    result: dict[str, Tensor] = {}
    for s in factors.slots:
        qa, qg = factors.a_evec[s.module], factors.g_evec[s.module]
        denom = evals[s.module] + damping
        if bool((denom <= 0).any()):
            raise NonFiniteError(
                f"Expected every eigenvalue + `damping` of layer {s.module!r} to be positive, but some are "
                f"{float(denom.min()):.3g} (damping = {damping:g}). Use a positive `damping`."
            )
        v = mats[s.module].to(qa.dtype)
        x = qg @ ((qg.T @ v @ qa) / denom) @ qa.T  # [Q, out, a_dim]
        x = x.to(vectors.dtype)
        if s.weight is not None:
            result[s.weight] = x[..., : s.in_dim].reshape(
                vectors.shape[0], *spec.shapes[spec.names.index(s.weight)]
            )
        if s.bias is not None:
            result[s.bias] = x[..., -1]
    return spec.flatten({n: result[n] for n in spec.names})


# ----------------------------------------------------------------------------------------------- passes
def fit_factors(
    loss: Any,
    model: nn.Module,
    theta: Tensor,
    spec: ParamSpec,
    batches: Callable[[], Iterator[tuple[list[int], Any]]],
    num_examples: int,
    num_batches: int,
    *,
    kind: str = "ekfac",
    fisher: str = "true",
    seed: int = 0,
    all_reduce: Reduce | None = None,
    progress: Progress | None = None,
) -> KFACFactors:
    """Fit K-FAC (one pass) or EK-FAC (two passes) factors over a training set (or this rank's shard of it).

    Args:
        loss: ``(params, batch) -> [B]``; model: the module holding the layers (``loss.model``).
        theta, spec: the selected parameters, flat ``[P]``, and their layout.
        batches: ``() -> iterator of (ids, batch)`` over this rank's examples (called once per pass).
        num_examples: N over all ranks; num_batches: batches per pass on this rank (for progress).
        kind: ``"kfac"`` or ``"ekfac"``; fisher: ``"true"``, ``"exact"`` or ``"empirical"``; seed: of the sampled
            labels.
        all_reduce: sums a tensor over ranks (identity if None): the factors equal one process's.
        progress: ``callback(stage, done, total)``.
    """
    if fisher not in FISHER_KINDS:
        raise ConfigurationError(
            f"Expected `fisher` to be 'true', 'exact' or 'empirical', but got {fisher!r}."
        )
    reduce = all_reduce or (lambda t: t)
    slots = kfac_layers(model, spec.names)
    params = spec.unflatten(theta)

    def run(
        stage: str, step: Callable[[Captured, dict[str, Tensor]], dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        sums: dict[str, Tensor] = {}
        for i, (ids, batch) in enumerate(batches()):
            sums = step(capture_batch(loss, model, slots, params, batch, ids, fisher, seed), sums)
            if progress is not None:
                progress(stage, i + 1, num_batches)
        return sums

    sums = run("kfac factors", lambda c, s: accumulate_covariances(c, s))
    sums = _reduced(sums, _cov_keys(slots), reduce, theta.device)
    factors = finalize_covariances(slots, sums, num_examples)
    if kind == "ekfac":
        lam = run("ekfac eigenvalues", lambda c, s: accumulate_eigenvalues(c, factors, s))
        shapes = {f"L/{s.module}": (s.out_dim, s.a_dim) for s in slots}
        lam = _reduced(lam, shapes, reduce, theta.device)
        factors.corrected = {s.module: lam[f"L/{s.module}"] / num_examples for s in slots}
    for name, t in factors.tensors().items():
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(
                f"Expected finite K-FAC factors, but {name} has NaN or inf: check the training data and the model."
            )
    return factors


def _cov_keys(slots: list[LayerSlot]) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}
    for s in slots:
        keys[f"A/{s.module}"] = (s.a_dim, s.a_dim)
        keys[f"G/{s.module}"] = (s.out_dim, s.out_dim)
        keys[f"T/{s.module}"] = (1,)
    return keys


def _reduced(
    sums: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], reduce: Reduce, device: torch.device
) -> dict[str, Tensor]:
    """All-reduce every sum in one flat buffer (a rank with an empty shard contributes zeros)."""
    keys = list(shapes)
    flat = torch.cat(
        [
            sums[k].reshape(-1).double().to(device)
            if k in sums
            else torch.zeros(math.prod(shapes[k]), dtype=torch.float64, device=device)
            for k in keys
        ]
    )
    out = reduce(flat)
    flat = flat if out is None else out
    pieces = torch.split(flat, [math.prod(shapes[k]) for k in keys])
    return {k: p.reshape(shapes[k]) for k, p in zip(keys, pieces)}


def preconditioned_cg(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precond: Callable[[Tensor], Tensor],
    damping: float,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, int, float, float]:
    """Preconditioned conjugate gradient on ``(C + damping I) x = rhs`` for every row of ``rhs [Q, P]``.

    ``precond(r)`` applies an approximate inverse ``M^-1`` (EK-FAC's); the first iterate is the EK-FAC answer,
    optimally scaled, and each further iteration (one product with ``C``) moves towards the exact solution. Rows
    stop one by one when the preconditioned residual ``sqrt(r' M^-1 r)`` falls to ``tol`` times its start
    ``sqrt(v' M^-1 v)``: with ``M ~ C + damping I`` that is the error of x in the ``(C + damping I)``-norm, which
    is the norm that matters for influence scores (their mean square error over training gradients is
    ``e' C e`` for the Fisher/Gauss-Newton C); the plain residual ``||r||`` weights the high-curvature directions,
    which PCG leaves for last.

    Returns:
        ``x [Q, P]``, the iterations run, the largest relative preconditioned residual and the largest relative
        plain residual ``||r|| / ||rhs||`` (both of the recurrence).
    """
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    tiny = torch.finfo(rhs.dtype).tiny
    bnorm = rhs.norm(dim=1).clamp_min(tiny)
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum(1)
    rz0 = rz.clamp_min(tiny)
    it = 0
    for it in range(1, max_iter + 1):
        active = rz.clamp_min(0).sqrt() > tol * rz0.sqrt()
        if not bool(active.any()):
            it -= 1
            break
        ap = matvec(p) + damping * p
        pap = (p * ap).sum(1)
        alpha = torch.where(active & (pap > 0), rz / torch.where(pap > 0, pap, torch.ones_like(pap)), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        z = precond(r)
        rz_new = (r * z).sum(1)
        p = z + torch.where(active, rz_new / rz.clamp_min(tiny), 0.0)[:, None] * p
        rz = torch.where(active, rz_new, rz)
    rel_m = float((rz.clamp_min(0) / rz0).sqrt().max())
    return x, it, rel_m, float((r.norm(dim=1) / bnorm).max())
