"""The K-FAC/EK-FAC damped inverse-vector product, and conjugate gradient preconditioned by it.

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_fastif.errors import ConfigurationError, NonFiniteError
from lightning_fastif.functional.kfac.factors import KFACFactors
from lightning_fastif.functional.kfac.layers import LayerSlot, weight_matrix
from lightning_fastif.functional.params import ParamSpec

__all__ = ["layer_matrices", "preconditioned_cg", "solve_kfac"]


def layer_matrices(spec: ParamSpec, slots: list[LayerSlot], vectors: Tensor) -> dict[str, Tensor]:
    """``[Q, P]`` -> ``{module: V [Q, out, a_dim]}`` (weight columns, then the bias column)."""
    parts = spec.unflatten(vectors)
    q = vectors.shape[0]
    out = {}
    for s in slots:
        cols = []
        if s.weight is not None:
            cols.append(weight_matrix(s, parts[s.weight]))
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
            w = x[..., : s.in_dim]
            w = w.transpose(-1, -2) if s.kind == "conv1d" else w  # Conv1D stores W [in, out]
            result[s.weight] = w.reshape(vectors.shape[0], *spec.shapes[spec.names.index(s.weight)])
        if s.bias is not None:
            result[s.bias] = x[..., -1]
    return spec.flatten({n: result[n] for n in spec.names})


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
