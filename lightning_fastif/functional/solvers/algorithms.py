"""The pure algorithms behind the solvers, on a plain matrix-vector product: conjugate gradient, block conjugate
gradient (all queries in one Krylov space), LiSSA, Lanczos
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


def _orthonormal_rows(z: Tensor, rank_tol: float) -> Tensor:
    """An orthonormal basis ``[k, P]`` (``k <= rows``) of the span of the rows of ``z [s, P]``, dropping directions
    whose singular value (after scaling every row to unit norm) is below ``rank_tol``: rank-revealing, in float64.

    The Gram matrix's eigendecomposition gives the basis; one more Cholesky-QR pass restores orthonormality to
    working precision (the Gram matrix squares the condition number, the second pass undoes that loss).
    """
    z64 = z.to(torch.float64)
    norms = z64.norm(dim=-1)
    keep = norms > 0
    if not bool(keep.any()):
        return z.new_zeros(0, z.shape[-1])
    z64 = z64[keep] / norms[keep, None]
    ev, vec = torch.linalg.eigh(z64 @ z64.T)  # ascending
    good = ev > rank_tol**2 * float(ev[-1])
    if not bool(good.any()):
        return z.new_zeros(0, z.shape[-1])
    basis = (vec[:, good].T @ z64) / ev[good].sqrt()[:, None]
    chol, info = torch.linalg.cholesky_ex(basis @ basis.T)
    if int(info) == 0:
        basis = torch.linalg.solve_triangular(chol, basis, upper=False)
    return basis.to(z.dtype)


def block_conjugate_gradient(
    matvec: MatVec,
    rhs: Tensor,
    damping: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-6,
    rank_tol: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    recycle: tuple[Tensor, Tensor] | None = None,
    keep: list[tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, SolverDiagnostics]:
    """Solve ``(A + damping I) X = rhs`` for all rows of ``rhs [Q, P]`` at once by block conjugate gradient.

    O'Leary's block CG in the breakdown-free form (Ji & Li, 2017): the search directions of all unconverged
    queries form one block, orthonormalised with a rank-revealing step that drops dependent directions (repeated
    or linearly dependent right-hand sides, a residual block that lost rank). Each iteration costs one batched
    product ``A P`` with ``P [k, P]``, ``k <= Q``; the Krylov space grows by ``k`` directions per iteration and is
    shared by every query, so on a curvature whose large eigenvalues are few the iterations drop several-fold
    against one CG per query. A query whose residual reaches ``tol * ||rhs_q||`` is frozen (its ``x`` and residual
    stop changing) and its direction leaves the block.

    Args:
        matvec: ``V [k, P] -> A V`` row-wise, ``A`` symmetric positive (semi)definite.
        rhs: right-hand sides ``[Q, P]``.
        damping: added to the diagonal.
        max_iter: most iterations (batched products).
        tol: a query has converged when ``||r_q|| <= tol * ||rhs_q||``.
        rank_tol: singular values below this fraction of the largest (rows scaled to unit norm) count as
            dependent; default 1e-4 in float32, 1e-7 in float64 (the Gram matrix of the rank-revealing step
            resolves singular values down to about the square root of float64's precision).
        progress: optional ``callback(iteration, max_iter)``.
        recycle: ``(W [m, P], (A + damping I) W [m, P])`` from earlier solves on the same system: the start is the
            Galerkin solution in ``span(W)`` (no product needed), so a later batch of queries begins where the
            earlier Krylov space left off.
        keep: when given, every search block and its product ``(direction [k, P], (A + damping I) direction)`` is
            appended to it (for ``recycle`` later).

    Returns:
        ``x [Q, P]`` and diagnostics; ``extra`` holds ``per_query_iterations`` (the iteration at which each query
        converged, or the last one), ``per_query_residual`` (recursive relative residuals) and ``block_sizes``
        (search directions kept per iteration).

    Raises:
        SolverDivergenceError: ``P^T (A + damping I) P`` is not positive definite (an indefinite system).
        NonFiniteError: the iterates become NaN or inf.

    Example:
        >>> a = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> x, d = block_conjugate_gradient(lambda v: v @ a, torch.eye(5, dtype=torch.float64)[:2], tol=1e-12)
        >>> torch.allclose(x[0, 0], torch.tensor(1.0, dtype=torch.float64)), d.converged
        (True, True)
    """
    start = time.perf_counter()
    q_count = rhs.shape[0]
    if rank_tol is None:
        rank_tol = 1e-4 if rhs.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-7
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    if recycle is not None and recycle[0].shape[0] > 0:
        w, aw = recycle
        w64 = w.to(torch.float64)
        m = w64 @ aw.to(torch.float64).T
        # W A W^T is singular when the directions of several solves overlap: a pseudo-inverse on its range
        cut = 1e-10 if rhs.dtype == torch.float64 else 1e-5
        pinv = torch.linalg.pinv(0.5 * (m + m.T), hermitian=True, rtol=cut)
        coef = (pinv @ (w64 @ rhs.to(torch.float64).T)).to(rhs.dtype)  # [m, Q]
        x = coef.T @ w
        r = rhs - coef.T @ aw
    bnorm = rhs.norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    rel = r.norm(dim=-1) / bnorm
    active = rel > tol
    done_at = torch.zeros(q_count, dtype=torch.long)
    sizes: list[int] = []
    direction = (
        _orthonormal_rows(r[active], rank_tol) if bool(active.any()) else rhs.new_zeros(0, rhs.shape[-1])
    )
    it = 0
    while it < max_iter and bool(active.any()) and direction.shape[0] > 0:
        it += 1
        sizes.append(int(direction.shape[0]))
        a_dir = matvec(direction) + damping * direction  # [k, P]
        if keep is not None:
            keep.append((direction, a_dir))
        gram = direction @ a_dir.T  # P^T A P, [k, k]
        gram = 0.5 * (gram + gram.T)
        chol, info = torch.linalg.cholesky_ex(gram.to(torch.float64))
        if int(info) != 0:
            raise SolverDivergenceError(
                "Block CG met a direction of non-positive curvature: H + damping*I is not positive definite. "
                "Increase `damping` (for a network: 1e-3 to 1e-2 of the Hessian's scale) or use LiSSASolver."
            )
        ids = active.nonzero().flatten()
        coef = torch.cholesky_solve((direction @ r[ids].T).to(torch.float64), chol).to(rhs.dtype)  # [k, a]
        x[ids] += coef.T @ direction
        r[ids] -= coef.T @ a_dir
        if not bool(torch.isfinite(x[ids]).all()):
            raise NonFiniteError(
                "Expected finite block-CG iterates, but got NaN or inf: check `damping` and the model."
            )
        rel = r.norm(dim=-1) / bnorm
        now_done = active & (rel <= tol)
        done_at[now_done] = it
        active = active & ~now_done
        if progress is not None:
            progress(it, max_iter)
        if not bool(active.any()):
            break
        ids = active.nonzero().flatten()
        # the next block: the active residuals made A-conjugate to the current directions, then orthonormalised
        beta = torch.cholesky_solve((a_dir @ r[ids].T).to(torch.float64), chol).to(rhs.dtype)  # [k, a]
        direction = _orthonormal_rows(r[ids] - beta.T @ direction, rank_tol)
    done_at[active] = it
    worst = float(rel.max()) if q_count else 0.0
    diag = SolverDiagnostics(
        "block_cg",
        iterations=it,
        residual_norm=worst,
        estimate_norm=float(x.norm(dim=-1).max()) if q_count else 0.0,
        converged=worst <= tol,
        measure="relative_residual",
        value=worst,
        tolerance=tol,
        extra={
            "per_query_iterations": done_at.tolist(),
            "per_query_residual": rel.tolist(),
            "block_sizes": sizes,
            "vector_products": int(sum(sizes)),
        },
    )
    diag.seconds = time.perf_counter() - start
    return x, diag


def lanczos_extremes(
    matvec: MatVec,
    like: Tensor,
    iters: int = 30,
    seed: int = 0,
    tol: float = 1e-6,
    settle: float | None = None,
) -> tuple[float, float]:
    """Estimates ``(lambda_min, lambda_max)`` of a symmetric operator by Lanczos with full reorthogonalisation.

    Args:
        matvec: ``V [1, P] -> A V`` row-wise.
        like: a tensor ``[P]`` (or ``[Q, P]``) giving the size, dtype and device.
        iters: Krylov dimension (most products).
        seed: seed of the start vector.
        tol: stop early when the Krylov space becomes invariant.
        settle: stop early (after at least 5 products) once ``auto_damping(lambda_min, lambda_max)`` of the Ritz
            values has changed by less than this fraction for two products in a row; None: run all ``iters``.

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
    history: list[float] = []
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
        if settle:
            lo, hi = _ritz_extremes(alphas, betas)
            history.append(auto_damping(lo, hi))
            if len(history) >= 5 and all(
                abs(history[-1] - h) <= settle * abs(history[-1]) for h in history[-3:-1]
            ):
                break
        betas.append(b)
        basis.append(w / b)
    return _ritz_extremes(alphas, betas)


def _ritz_extremes(alphas: list[float], betas: list[float]) -> tuple[float, float]:
    """Extreme eigenvalues of the Lanczos tridiagonal matrix ``T`` (diagonal ``alphas``, off-diagonal ``betas``)."""
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


def per_query_residual(matvec: MatVec, x: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """``||(A + damping I) x_q - v_q|| / ||v_q||`` for every query ``q`` -> ``[Q]``, with one batched product."""
    if rhs.numel() == 0:
        return rhs.new_zeros(rhs.shape[0])
    r = matvec(x) + damping * x - rhs
    return r.norm(dim=-1) / rhs.norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)


def relative_error_bound(residual: Tensor, rhs: Tensor, x: Tensor, damping: float) -> float:
    """The largest relative error of ``x`` that the relative residuals ``[Q]`` allow on a positive semi-definite
    curvature: ``||e_q|| <= ||r_q|| / damping``, so ``||e_q|| / ||x_q|| <= residual_q ||v_q|| / (damping ||x_q||)``.

    A score ``-g . x_q`` is then off by at most this fraction of ``||g|| ||x_q||`` (Cauchy-Schwarz); inf when
    ``damping`` is 0.
    """
    if residual.numel() == 0:
        return 0.0
    if damping <= 0:
        return float("inf")
    xnorm = x.norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)
    return float((residual * rhs.norm(dim=-1) / (damping * xnorm)).max())


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
