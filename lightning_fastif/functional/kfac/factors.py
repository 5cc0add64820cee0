"""K-FAC/EK-FAC factor fitting: covariance sums, their eigendecomposition, EK-FAC's corrected eigenvalues, and
the passes over a training set (all-reduced over ranks through a callable). Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.errors import ConfigurationError, NonFiniteError
from lightning_fastif.functional.kfac.capture import FISHER_KINDS, Captured, capture_batch
from lightning_fastif.functional.kfac.layers import LayerSlot, kfac_layers
from lightning_fastif.functional.params import ParamSpec

__all__ = [
    "KFACFactors",
    "accumulate_covariances",
    "accumulate_eigenvalues",
    "finalize_covariances",
    "fit_factors",
    "math_dtype",
]

Progress = Callable[[str, int, int], None]
Reduce = Callable[[Tensor], Tensor]


def math_dtype(device: torch.device | str, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype of the factors' sums and eigendecompositions: ``dtype`` when given (``torch.float32``/``float64``
    or their names), else float64 on the CPU (cheap there, and what the float64 tests compare against) and float32
    on an accelerator (float64 runs many times slower on most GPUs).

    Example:
        >>> math_dtype("cpu"), math_dtype("cuda"), math_dtype("cuda", "float64")
        (torch.float64, torch.float32, torch.float64)
    """
    if dtype is None:
        return torch.float64 if torch.device(device).type == "cpu" else torch.float32
    named = {"float32": torch.float32, "float64": torch.float64}
    got = named.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if got not in (torch.float32, torch.float64):
        raise ConfigurationError(f"Expected `dtype` to be 'float32', 'float64' or None, but got {dtype!r}.")
    return got


@dataclass
class KFACFactors:
    """Fitted factors of every layer (on the parameters' device, in :func:`math_dtype`: float64 on the CPU).

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


def accumulate_covariances(
    captured: Captured, sums: dict[str, Tensor] | None = None, dtype: torch.dtype = torch.float64
) -> dict[str, Tensor]:
    """Add one batch's ``sum a a^T``, ``sum g g^T`` and the position count to ``sums`` (in ``dtype``)."""
    sums = {} if sums is None else sums
    for mod, a in captured.a.items():
        a2 = a.reshape(-1, a.shape[-1]).to(dtype)
        g2 = captured.g[mod].reshape(-1, captured.g[mod].shape[-1]).to(dtype)  # draws and positions as rows
        for key, val in (
            (f"A/{mod}", a2.T @ a2),
            (f"G/{mod}", g2.T @ g2),
            (f"T/{mod}", captured.positions[mod].to(dtype).sum().reshape(1)),
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
    """Add one batch's ``sum_i (Q_G^T D_i Q_A)^2`` (EK-FAC's correction) to ``sums`` (in the factors' dtype)."""
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
    dtype: torch.dtype | str | None = None,
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
        dtype: of the sums and eigendecompositions (:func:`math_dtype`: None is float64 on the CPU, float32 on an
            accelerator).
    """
    if fisher not in FISHER_KINDS:
        raise ConfigurationError(
            f"Expected `fisher` to be 'true', 'exact' or 'empirical', but got {fisher!r}."
        )
    reduce = all_reduce or (lambda t: t)
    dt = math_dtype(theta.device, dtype)
    slots = kfac_layers(model, spec.names)
    params = spec.unflatten(theta)

    def run(
        stage: str, step: Callable[[Captured, dict[str, Tensor]], dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        sums: dict[str, Tensor] = {}
        for i, (ids, batch) in enumerate(batches()):
            sums = step(capture_batch(loss, model, slots, params, batch, ids, fisher, seed, dt), sums)
            if progress is not None:
                progress(stage, i + 1, num_batches)
        return sums

    sums = run("kfac factors", lambda c, s: accumulate_covariances(c, s, dt))
    sums = _reduced(sums, _cov_keys(slots), reduce, theta.device, dt)
    factors = finalize_covariances(slots, sums, num_examples)
    if kind == "ekfac":
        lam = run("ekfac eigenvalues", lambda c, s: accumulate_eigenvalues(c, factors, s))
        shapes = {f"L/{s.module}": (s.out_dim, s.a_dim) for s in slots}
        lam = _reduced(lam, shapes, reduce, theta.device, dt)
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
    sums: dict[str, Tensor],
    shapes: dict[str, tuple[int, ...]],
    reduce: Reduce,
    device: torch.device,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """All-reduce every sum in one flat buffer (a rank with an empty shard contributes zeros)."""
    keys = list(shapes)
    flat = torch.cat(
        [
            sums[k].reshape(-1).to(device, dtype)
            if k in sums
            else torch.zeros(math.prod(shapes[k]), dtype=dtype, device=device)
            for k in keys
        ]
    )
    out = reduce(flat)
    flat = flat if out is None else out
    pieces = torch.split(flat, [math.prod(shapes[k]) for k in keys])
    return {k: p.reshape(shapes[k]) for k, p in zip(keys, pieces)}
