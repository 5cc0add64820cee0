"""The pure algorithms behind the solvers, on a plain matrix-vector product: conjugate gradient, LiSSA, Lanczos
extreme eigenvalues, power iteration, the relative residual and ``damping="auto"``.

Each takes a ``matvec`` (``V [Q, P] -> A V``) so it is tested against ``torch.linalg`` on known matrices.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_fastif.errors import NonFiniteError, SolverDivergenceError
from lightning_fastif.functional.solvers.base import (
    AUTO_DAMPING_FRACTION,
    AUTO_DAMPING_MARGIN,
    LISSA_SETTLED,
    MatVec,
    SolverDiagnostics,
)


# ---------------------------------------------------------------------------------------------- pure algorithms
def conjugate_gradient(
    matvec: MatVec, rhs: Tensor, damping: float = 0.0, max_iter: int = 100, tol: float = 1e-6
) -> tuple[Tensor, SolverDiagnostics]:
    """Solve ``(A + damping I) x = rhs`` for every row of ``rhs [Q, P]`` by conjugate gradient.

    Args:
        matvec: ``V [Q, P] -> A V`` row-wise, ``A`` symmetric positive (semi)definite.
        rhs: right-hand sides ``[Q, P]``.
        damping: added to the diagonal.
        max_iter: most iterations.
        tol: stop when every ``||r|| <= tol * ||rhs||``.

    Returns:
        ``x [Q, P]`` and diagnostics (iterations, largest relative residual, converged).
    """
    start = time.perf_counter()
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(-1)
    bnorm = rhs.norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    it = 0
    for _ in range(max_iter):
        active = rs.sqrt() > tol * bnorm
        if not bool(active.any()):
            break
        it += 1
        ap = matvec(p) + damping * p
        pap = (p * ap).sum(-1)
        if bool((pap[active] <= 0).any()):
            raise SolverDivergenceError(
                "CG met a direction of non-positive curvature: H + damping*I is not positive definite. "
                "Increase `damping` (for a network: 1e-3 to 1e-2 of the Hessian's scale) or use LiSSASolver."
            )
        alpha = torch.where(active, rs / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(-1)
        beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), torch.zeros_like(rs))
        p = r + beta[:, None] * p
        rs = rs_new
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(
                "Expected finite CG iterates, but got NaN or inf: check `damping` and the model."
            )
    rel = float((rs.sqrt() / bnorm).max())
    diag = SolverDiagnostics(
        "cg",
        iterations=it,
        residual_norm=rel,
        estimate_norm=float(x.norm(dim=-1).max()),
        converged=rel <= tol,
    )
    diag.seconds = time.perf_counter() - start
    return x, diag


def lanczos_extremes(
    matvec: MatVec, like: Tensor, iters: int = 30, seed: int = 0, tol: float = 1e-6
) -> tuple[float, float]:
    """Estimates ``(lambda_min, lambda_max)`` of a symmetric operator by Lanczos with full reorthogonalisation.

    Args:
        matvec: ``V [1, P] -> A V`` row-wise.
        like: a tensor ``[P]`` (or ``[Q, P]``) giving the size, dtype and device.
        iters: Krylov dimension (most products).
        seed: seed of the start vector.
        tol: stop early when the Krylov space becomes invariant.

    Ritz values lie inside the spectrum, so ``lambda_max`` is approached from below and ``lambda_min`` from above:
    a small negative tail of a large network's Hessian is found only roughly; callers add a margin.
    """
    p = like.shape[-1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(p, generator=gen, dtype=torch.float64).to(device=like.device)
    q = q / q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(min(iters, p)):
        w = matvec(basis[-1].to(like.dtype)[None])[0].to(torch.float64)
        a = float(w @ basis[-1])
        alphas.append(a)
        w = w - a * basis[-1] - (betas[-1] * basis[-2] if betas else 0.0)
        stack = torch.stack(basis)
        w = w - stack.T @ (stack @ w)  # full reorthogonalisation (twice is enough)
        w = w - stack.T @ (stack @ w)
        b = float(w.norm())
        if b <= tol * max(1.0, max(abs(x) for x in alphas)):
            break
        betas.append(b)
        basis.append(w / b)
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    ev = torch.linalg.eigvalsh(t)
    return float(ev[0]), float(ev[-1])


def auto_damping(lambda_min: float, lambda_max: float) -> float:
    """``damping="auto"``: ``max(1e-2 * lambda_max, 2 * (-lambda_min))`` (and > 0).

    1% of the largest eigenvalue caps the condition number at about 100 (CG converges in tens of products), and
    twice the most negative eigenvalue makes an indefinite Hessian's damped system positive definite with margin.
    """
    lam = max(AUTO_DAMPING_FRACTION * max(lambda_max, 0.0), AUTO_DAMPING_MARGIN * max(0.0, -lambda_min))
    return float(lam) if lam > 0 else 1e-8


def relative_residual(matvec: MatVec, x: Tensor, rhs: Tensor, damping: float) -> float:
    """``max_q ||(A + damping I) x_q - v_q|| / ||v_q||`` with one batched product ``A x``."""
    if rhs.numel() == 0:
        return 0.0
    r = matvec(x) + damping * x - rhs
    vnorm = rhs.norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    return float((r.norm(dim=-1) / vnorm).max())


def lissa(
    sample_hvp: Callable[[int, int], MatVec],
    rhs: Tensor,
    damping: float,
    scale: float,
    depth: int,
    chains: list[int],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, SolverDiagnostics]:
    """FastIF's LiSSA recursion, summed over the given chains (divide by the number of repeats afterwards).

    For each chain ``c``: ``h_0 = v``; ``h_j = v + (1 - d) h_{j-1} - H_j h_{j-1} / s`` with ``d = damping / s``
    and ``H_j = sample_hvp(c, j)`` the HVP of a fresh random batch; the chain's estimate is ``h_J / s``, which
    tends to ``(H + damping I)^{-1} v`` when ``s`` exceeds H's largest eigenvalue.

    Diagnostics: ``residual_norm`` is the largest relative change of the last step, ``||h_J - h_{J-1}|| / ||h_J||``;
    ``extra["damped_mode_remaining"]`` is ``(1 - d)^J``, the factor by which the slowest direction (a zero
    eigenvalue of H) has not yet converged. ``converged`` needs both below 1e-2: otherwise increase ``depth`` (to
    about ``5 scale / damping``) or ``damping``. With several repeats, :class:`LiSSASolver` also measures the
    chains' disagreement (``extra["chain_spread"]``, the relative standard error of their mean: the minibatch noise
    that neither of the two sees) and needs it below 1e-2 too.

    Raises:
        SolverDivergenceError: the iterates become non-finite or grow past ``2 (j + 1) ||v||``, which a
            recursion of non-expansive steps cannot reach (each step adds at most ``|v|``); the message names
            `scale`.
    """
    start = time.perf_counter()
    d = damping / scale
    vnorm = rhs.norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    total = torch.zeros_like(rhs)
    sumsq = torch.zeros(
        rhs.shape[0], dtype=rhs.dtype, device=rhs.device
    )  # sum over chains of |x_c|^2, per query
    done = 0
    last_step = 0.0
    for c in chains:
        h = rhs.clone()
        for j in range(1, depth + 1):
            h_prev = h
            h = rhs + (1.0 - d) * h - sample_hvp(c, j)(h) / scale
            hnorm = h.norm(dim=-1)
            if not bool(torch.isfinite(hnorm).all()) or bool((hnorm > 2.0 * (j + 1) * vnorm).any()):
                raise SolverDivergenceError(
                    f"LiSSA diverged at iteration {j} of chain {c} (|h| = {float(hnorm.max()):.3g} for |v| = "
                    f"{float(vnorm.max()):.3g}): either `scale` = {scale:g} is smaller than the curvature's largest "
                    "eigenvalue on some batches (increase `scale` or `batch_size`), or the damped curvature is "
                    "indefinite (`damping` <= -lambda_min: no scale helps; raise `damping` or use Gauss-Newton)."
                )
            done += 1
            if progress is not None:
                progress(done, depth * len(chains))
        total = total + h / scale
        sumsq = sumsq + (h / scale).pow(2).sum(-1)
        # the last step's relative change: near 0 once the recursion has settled (minibatch noise keeps it above 0)
        last_step = max(last_step, float(((h - h_prev).norm(dim=-1) / hnorm.clamp_min(1e-30)).max()))
    remaining = (1.0 - d) ** depth
    diag = SolverDiagnostics(
        "lissa",
        iterations=depth * len(chains),
        residual_norm=last_step,
        # settled, and the slowest (damped) mode's remaining factor (1 - d)^J small: otherwise depth is too short
        converged=last_step < LISSA_SETTLED and remaining < LISSA_SETTLED,
        estimate_norm=float((total / max(1, len(chains))).norm(dim=-1).max()) if chains else 0.0,
        extra={
            "chains": list(chains),
            "d": d,
            "damped_mode_remaining": remaining,
            "last_step_change": last_step,
            "_sumsq": sumsq,  # for the chain spread over all ranks (LiSSASolver pops it)
        },
        measure="damped_mode_remaining",
        value=remaining,
        tolerance=LISSA_SETTLED,
    )
    diag.seconds = time.perf_counter() - start
    return total, diag


def _power_iteration(matvec: MatVec, like: Tensor, iters: int = 20, seed: int = 0) -> float:
    """Largest ``|eigenvalue|`` of a symmetric operator by power iteration (``iters`` products)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(like.shape[-1], generator=gen, dtype=torch.float64).to(like.device, like.dtype)
    v = v / v.norm().clamp_min(1e-30)
    lam = 0.0
    for _ in range(iters):
        w = matvec(v[None])[0]
        n = float(w.norm())
        if not math.isfinite(n) or n == 0.0:
            return 0.0 if n == 0.0 else float("inf")
        lam = n
        v = w / n
    return lam
