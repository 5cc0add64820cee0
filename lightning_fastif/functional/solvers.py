"""Solvers of ``(C + damping * I) x = v``: dense exact (cached factorisation), conjugate gradient, and LiSSA.

``C`` is the curvature of the :class:`TrainingCurvature` handed to ``solve`` (the Hessian or the Gauss-Newton
matrix, by its ``mode``). Each solver class is a small settings object with a cache; the numbers come from the
functions :func:`conjugate_gradient`, :func:`lissa` and :func:`lanczos_extremes`, which take a plain
matrix-vector product so they are tested against ``torch.linalg`` on known matrices.

Convergence is never silent: every solve fills ``solver.diagnostics`` with a convergence ``measure``, its
``value`` and ``tolerance`` and ``converged = value <= tolerance`` (Exact and CG: the relative residual
``||(C + damping I) x - v|| / ||v||`` measured by one more pass over the data on the same curvature; LiSSA:
``(1 - damping/scale)^depth``, with the last step's relative change beside it). An unconverged solve warns
(:class:`SolverConvergenceWarning`), or raises :class:`SolverConvergenceError` with ``strict=True``.
"""

from __future__ import annotations

import abc
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.errors import (
    ConfigurationError,
    NonFiniteError,
    SolverConvergenceError,
    SolverConvergenceWarning,
    SolverDivergenceError,
    SolverMemoryError,
)
from lightning_fastif.functional.curvature import TrainingCurvature

__all__ = [
    "CGSolver",
    "ExactSolver",
    "LiSSASolver",
    "Solver",
    "SolverDiagnostics",
    "auto_damping",
    "conjugate_gradient",
    "lanczos_extremes",
    "lissa",
    "relative_residual",
]

MatVec = Callable[[Tensor], Tensor]

LISSA_SETTLED = 1e-2
"""LiSSA's diagnostics call a chain settled when its last step changed the estimate by less than this fraction."""


EXACT_TOL = 1e-3
"""Relative residual below which a dense solve counts as converged (float32 round-off on a damped system)."""

AUTO_DAMPING_FRACTION = 1e-2
"""``damping="auto"`` is this fraction of the curvature's largest eigenvalue (at least)."""

AUTO_DAMPING_MARGIN = 2.0
"""...and at least this many times ``-lambda_min`` when the curvature is indefinite."""


@dataclass
class SolverDiagnostics:
    """What a solve did, as data: iterations, residual or estimate norms, time, convergence.

    Attributes:
        solver: the solver's name.
        iterations: products or steps used.
        residual_norm: the solver's own residual (CG: relative residual; LiSSA: last step's relative change).
        estimate_norm: largest ``||x||`` over queries.
        converged: ``value <= tolerance``.
        seconds: wall time of the solve.
        measure: name of the convergence measure (``"relative_residual"``, ``"damped_mode_remaining"``...).
        value: the measure's value (worst query).
        tolerance: the bound ``value`` is held to.
        extra: free-form details (curvature, damping used, chosen settings...).
    """

    solver: str
    iterations: int = 0
    residual_norm: float | None = None
    estimate_norm: float | None = None
    converged: bool = True
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    measure: str = "not_measured"
    value: float | None = None
    tolerance: float | None = None

    def summary(self) -> dict[str, Any]:
        """The fields every result record carries: converged and the convergence measure."""
        return {
            "converged": bool(self.converged),
            "measure": self.measure,
            "value": self.value,
            "tolerance": self.tolerance,
        }


def _check_number(name: str, value: Any, *, low: float, strict: bool = False, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if (
        isinstance(value, bool)
        or not ok_type
        or not math.isfinite(value)
        or value < low
        or (strict and value == low)
    ):
        kind = "an int" if integer else "a finite number"
        cmp = ">" if strict else ">="
        raise ConfigurationError(f"Expected `{name}` to be {kind} {cmp} {low:g}, but got {value!r}.")


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


# ---------------------------------------------------------------------------------------------- solver classes
def _check_damping(damping: Any, allow_auto: bool) -> None:
    if allow_auto and damping == "auto":
        return
    if isinstance(damping, str):
        what = "a finite number >= 0 or 'auto'" if allow_auto else "a finite number >= 0"
        raise ConfigurationError(f"Expected `damping` to be {what}, but got {damping!r}.")
    _check_number("damping", damping, low=0.0)


def _check_curvature(curvature: Any) -> None:
    if curvature is not None and curvature not in ("hessian", "gauss_newton"):
        raise ConfigurationError(
            f"Expected `curvature` to be 'hessian', 'gauss_newton' or None (the problem's), but got {curvature!r}."
        )


class Solver(abc.ABC):
    """Base class: solve ``(C + damping I) x = v`` on a :class:`TrainingCurvature`.

    ``solve(curvature, vectors [Q, P]) -> [Q, P]``; ``diagnostics`` holds the last solve's :class:`SolverDiagnostics`
    (with ``converged`` and the convergence ``measure``/``value``/``tolerance``).

    Args:
        damping: lambda >= 0, or ``"auto"`` where the solver supports it (estimated from the curvature's extreme
            eigenvalues, see :func:`auto_damping`).
        strict: raise :class:`SolverConvergenceError` instead of warning when a solve is not converged.
        curvature: ``"hessian"`` or ``"gauss_newton"`` to override the problem's curvature for this solver, or
            None (default) to use the one ``InfluenceModule(curvature=...)`` chose.

    Subclasses set ``self.diagnostics`` and call ``self._report()`` at the end of ``solve``.
    """

    name = "solver"
    supports_auto_damping = False

    def __init__(
        self, damping: float | str = 0.0, *, strict: bool = False, curvature: str | None = None
    ) -> None:
        _check_damping(damping, self.supports_auto_damping)
        _check_curvature(curvature)
        if not isinstance(strict, bool):
            raise ConfigurationError(f"Expected `strict` to be a bool, but got {strict!r}.")
        self.damping: float | str = damping if damping == "auto" else float(damping)
        self.strict = strict
        self.curvature = curvature
        self.diagnostics: SolverDiagnostics | None = None
        self.damping_used: float | None = None if damping == "auto" else float(damping)

    @abc.abstractmethod
    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        """``(C + damping I)^{-1} v`` for each row of ``vectors [Q, P]`` -> ``[Q, P]``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def config(self) -> dict[str, Any]:
        """The constructor arguments, for records and reports."""
        return self._common({})

    def _common(self, cfg: dict[str, Any]) -> dict[str, Any]:
        out = {"damping": self.damping, **cfg}
        if self.strict:
            out["strict"] = True
        if self.curvature is not None:
            out["curvature"] = self.curvature
        return out

    def _on(self, curvature: TrainingCurvature) -> TrainingCurvature:
        """The curvature this solver works on (the problem's, or its own ``curvature`` override)."""
        if self.curvature is not None and self.curvature != curvature.kind:
            return curvature.with_mode(self.curvature)
        return curvature

    def _report(self, advice: str = "", reason: str | None = None) -> None:
        """Warn (or raise, with ``strict``) when the last solve is not converged.

        Args:
            advice: what to change (names the setting).
            reason: why it is not converged (default: ``measure = value > tolerance``).
        """
        d = self.diagnostics
        if d is None or d.converged:
            return
        value = "n/a" if d.value is None else f"{d.value:.3g}"
        tol = "n/a" if d.tolerance is None else f"{d.tolerance:.3g}"
        reason = reason or f"{d.measure} = {value} > tolerance {tol}"
        msg = (
            f"{type(self).__name__} did not converge: {reason}. "
            f"s_test is not the solution of the damped system, so influence values are of unknown quality. {advice}"
        ).strip()
        if self.strict:
            raise SolverConvergenceError(msg)
        warnings.warn(msg, SolverConvergenceWarning, stacklevel=3)


class ExactSolver(Solver):
    """Dense ``(C + damping I)``, built over the whole training set and factorised once, cached per model state.

    The dense matrix is built in tangent chunks into one preallocated ``P x P`` matrix; the memory guard counts
    the build's measured peak (matrix + autograd graph + one chunk) and the factorisation's (two ``P x P``
    matrices), see :meth:`plan`. Each solve measures its relative residual against the kept dense matrix (one
    more matrix product; the matrix was built from the same curvature's products over the whole training set).

    Args:
        damping: lambda >= 0 (plays the role of L2 regularisation / weight decay), or ``"auto"``: from the
            dense matrix's extreme eigenvalues (Lanczos), raised until the damped matrix is positive definite.
        max_memory_gb: refuse (with a clear error) when the build or factorisation peak would exceed this.
        strict: raise instead of warning when the residual exceeds ``EXACT_TOL``.
        curvature: override the problem's curvature (see :class:`Solver`).
    """

    name = "exact"
    supports_auto_damping = True

    def __init__(
        self,
        damping: float | str = 0.0,
        max_memory_gb: float = 2.0,
        *,
        strict: bool = False,
        curvature: str | None = None,
    ) -> None:
        super().__init__(damping, strict=strict, curvature=curvature)
        _check_number("max_memory_gb", max_memory_gb, low=0.0, strict=True)
        self.max_memory_gb = float(max_memory_gb)
        self._cache: tuple[str, str, tuple[Tensor, ...], float, dict[str, Any]] | None = None

    def config(self) -> dict[str, Any]:
        return self._common({"max_memory_gb": self.max_memory_gb})

    def plan(self, curvature: TrainingCurvature) -> Any:
        """The :class:`~lightning_fastif.functional.curvature.DensePlan` of the dense build (chunk size, peak)."""
        from lightning_fastif.functional.curvature import DENSE_CHUNK_BUDGET

        limit = int(self.max_memory_gb * 2**30)
        p, e = curvature.spec.numel, curvature.theta.element_size()
        budget = max(DENSE_CHUNK_BUDGET // 8, min(DENSE_CHUNK_BUDGET, limit - 3 * p * p * e))
        return self._on(curvature).dense_plan(budget_bytes=budget)

    def fits(self, curvature: TrainingCurvature) -> bool:
        """Whether the dense build and factorisation stay under ``max_memory_gb``."""
        p, e = curvature.spec.numel, curvature.theta.element_size()
        if 3 * p * p * e > self.max_memory_gb * 2**30:  # no need to measure the graph
            return False
        return self.plan(curvature).peak_bytes <= self.max_memory_gb * 2**30

    def _key(self, curvature: TrainingCurvature) -> str:
        return f"{self._on(curvature).key}:{self.damping}"

    def factorise(self, curvature: TrainingCurvature) -> tuple[Tensor, bool]:
        """The (cached) inverse of ``C + damping I`` (from its Cholesky factor), or an LU factorisation (stacked
        with its pivots) when it is not positive definite."""
        kind, parts, _, _ = self._factorise(curvature)
        if kind == "cholesky":
            return parts[0], True
        return torch.cat([parts[0], parts[1].to(parts[0].dtype)[None]], 0), False

    def _factorise(
        self, curvature: TrainingCurvature
    ) -> tuple[str, tuple[Tensor, ...], float, dict[str, Any]]:
        key = self._key(curvature)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2], self._cache[3], self._cache[4]
        curv = self._on(curvature)
        p, e = curv.spec.numel, curv.theta.element_size()
        limit = self.max_memory_gb * 2**30
        if 3 * p * p * e > limit:
            raise SolverMemoryError(
                f"ExactSolver needs at least {3 * p * p * e / 2**30:.1f} GiB for {p:,} selected parameters (the "
                f"P x P matrix, its factor and inverse; limit `max_memory_gb` = {self.max_memory_gb:g}). Use CGSolver or "
                "LiSSASolver (or solver='auto'), or select fewer parameters with `params`."
            )
        plan = self.plan(curv)
        if plan.peak_bytes > limit:
            raise SolverMemoryError(
                f"ExactSolver needs about {plan.peak_bytes / 2**30:.2f} GiB at its peak for {p:,} selected "
                f"parameters ({plan!r}; limit `max_memory_gb` = {self.max_memory_gb:g}). Use CGSolver or "
                "LiSSASolver (or solver='auto'), or select fewer parameters with `params`."
            )
        h = curv.matrix(chunk_size=plan.chunk_size)
        _symmetrise_(h)
        info: dict[str, Any] = {"plan_peak_gib": plan.peak_bytes / 2**30, "chunk_size": plan.chunk_size}
        if self.damping == "auto":
            lo, hi = lanczos_extremes(lambda v: v @ h, h[0], iters=min(p, 60))
            lam = auto_damping(lo, hi)
            info.update({"lambda_min_estimate": lo, "lambda_max_estimate": hi})
        else:
            lam = float(self.damping)
        diag_h = h.diagonal()
        diag_h += lam
        factor, chol_info = torch.linalg.cholesky_ex(h)
        tries = 0
        while (
            int(chol_info) != 0 and self.damping == "auto" and tries < 8
        ):  # the estimate of lambda_min was short
            diag_h += lam  # doubles the damping
            lam, tries = 2 * lam, tries + 1
            factor, chol_info = torch.linalg.cholesky_ex(h)
        # the damped matrix is kept beside its factorisation (2 P x P at rest, under the 3 P x P peak counted
        # above): each solve's residual is then one more matrix product, not a pass over the training set
        del diag_h
        if int(chol_info) == 0:
            # keep the explicit inverse: a solve is then one matrix product, several times faster per query than
            # two triangular solves
            parts: tuple[Tensor, ...] = (torch.cholesky_inverse(factor), h)
            del factor
            kind = "cholesky"
        else:
            del factor
            lu, pivots = torch.linalg.lu_factor(h)
            parts, kind = (lu, pivots, h), "lu"
        info["auto_damping_doublings"] = tries
        self._cache = (key, kind, parts, lam, info)
        return kind, parts, lam, info

    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        start = time.perf_counter()
        cached = self._cache is not None and self._cache[0] == self._key(curvature)
        kind, parts, lam, info = self._factorise(curvature)
        self.damping_used = lam
        if kind == "cholesky":
            x = vectors @ parts[0]  # (C + damping I)^-1, symmetric
        else:
            x = torch.linalg.lu_solve(parts[0], parts[1], vectors.T).T
        curv = self._on(curvature)
        damped = parts[-1]  # C + damping I, dense: the residual on the same curvature, without a data pass
        rel = relative_residual(lambda v: v @ damped, x, vectors, 0.0)
        self.diagnostics = SolverDiagnostics(
            "exact",
            iterations=1,
            residual_norm=rel,
            estimate_norm=float(x.norm(dim=-1).max()) if x.numel() else 0.0,
            converged=rel <= EXACT_TOL,
            seconds=time.perf_counter() - start,
            measure="relative_residual",
            value=rel,
            tolerance=EXACT_TOL,
            extra={
                "positive_definite": kind == "cholesky",
                "cached_factorisation": cached,
                "curvature": curv.kind,
                "damping": lam,
                **info,
            },
        )
        if kind != "cholesky":
            warnings.warn(
                f"ExactSolver: C + damping I ({curv.kind}, damping {lam:g}) is not positive definite, so the "
                "influence is that of a saddle point, not a minimum. Use `damping='auto'` (or a damping above the "
                "curvature's most negative eigenvalue) or `curvature='gauss_newton'`.",
                SolverConvergenceWarning,
                stacklevel=2,
            )
        self._report(
            "The dense system is ill-conditioned at this damping and precision: use float64 or a larger `damping`."
        )
        return x


def _symmetrise_(h: Tensor, block: int = 1024) -> None:
    """``h = (h + h^T) / 2`` in place, a block of rows at a time (no second ``P x P`` matrix)."""
    p = h.shape[0]
    for a in range(0, p, block):
        b = min(p, a + block)
        lower = h[a:b, :b]
        upper = h[:b, a:b].T
        avg = 0.5 * (lower + upper)
        h[a:b, :b] = avg
        h[:b, a:b] = avg.T


class CGSolver(Solver):
    """Conjugate gradient on full-training-set products of the curvature (one pass over the data per iteration).

    Args:
        damping: lambda >= 0, or ``"auto"`` (from Lanczos estimates of the curvature's extreme eigenvalues, raised
            if CG still meets non-positive curvature).
        max_iter: most iterations.
        tol: relative residual at which to stop; the solve counts as converged when the residual measured
            afterwards by one more pass is at most ``10 * tol``.
        strict: raise instead of warning when not converged.
        curvature: override the problem's curvature (see :class:`Solver`).
    """

    name = "cg"
    supports_auto_damping = True

    def __init__(
        self,
        damping: float | str = 0.0,
        max_iter: int = 100,
        tol: float = 1e-6,
        *,
        strict: bool = False,
        curvature: str | None = None,
    ) -> None:
        super().__init__(damping, strict=strict, curvature=curvature)
        _check_number("max_iter", max_iter, low=1, integer=True)
        _check_number("tol", tol, low=0.0, strict=True)
        self.max_iter, self.tol = int(max_iter), float(tol)
        self._eig_cache: tuple[str, float, float] | None = None

    def config(self) -> dict[str, Any]:
        return self._common({"max_iter": self.max_iter, "tol": self.tol})

    def extremes(self, curvature: TrainingCurvature, iters: int = 30) -> tuple[float, float]:
        """Lanczos estimates ``(lambda_min, lambda_max)`` of the curvature (cached per model state)."""
        curv = self._on(curvature)
        if self._eig_cache is None or self._eig_cache[0] != curv.key:
            lo, hi = lanczos_extremes(curv.hvp, curv.theta, iters=iters)
            self._eig_cache = (curv.key, lo, hi)
        return self._eig_cache[1], self._eig_cache[2]

    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        start = time.perf_counter()
        curv = self._on(curvature)
        extra: dict[str, Any] = {"curvature": curv.kind}
        if self.damping == "auto":
            lo, hi = self.extremes(curv)
            lam = auto_damping(lo, hi)
            extra.update({"lambda_min_estimate": lo, "lambda_max_estimate": hi})
        else:
            lam = float(self.damping)
        tries = 0
        while True:
            try:
                x, diag = conjugate_gradient(curv.hvp, vectors, lam, self.max_iter, self.tol)
                break
            except SolverDivergenceError as err:
                if self.damping == "auto" and tries < 4:
                    lam, tries = 2 * lam, tries + 1
                    continue
                lo, hi = self.extremes(curv)
                need = max(0.0, -lo)
                raise SolverDivergenceError(
                    f"{err} The {curv.kind} here is indefinite or too weakly damped: Lanczos estimates lambda_min "
                    f"~ {lo:.3g} and lambda_max ~ {hi:.3g}, so `damping` must exceed {need:.3g} (-lambda_min; the "
                    f"estimate is from inside the spectrum: use at least {max(2 * need, 1e-2 * hi):.3g}, or "
                    "damping='auto'), got "
                    f"{lam:g}. Or use `curvature='gauss_newton'` (positive semi-definite for convex losses)."
                ) from err
        rel = relative_residual(curv.hvp, x, vectors, lam)
        self.damping_used = lam
        extra.update(
            {"damping": lam, "cg_recursive_residual": diag.residual_norm, "auto_damping_doublings": tries}
        )
        diag.residual_norm = rel
        diag.measure, diag.value, diag.tolerance = "relative_residual", rel, 10 * self.tol
        diag.converged = rel <= 10 * self.tol
        diag.extra.update(extra)
        diag.seconds = time.perf_counter() - start
        self.diagnostics = diag
        self._report(f"Raise `max_iter` (now {self.max_iter}) or `damping` (now {lam:g}).")
        return x


class LiSSASolver(Solver):
    """FastIF's stochastic LiSSA recursion (DESIGN section 2), averaged over ``repeats`` independent chains.

    Args:
        damping: lambda > 0 for ``depth="auto"`` (>= 0 otherwise); the recursion uses ``d = damping / scale``.
        scale: s, must exceed the curvature's largest eigenvalue on every batch (else a
            :class:`SolverDivergenceError`), or ``"auto"``: power iteration on ``calibration_batches`` random
            batches of ``batch_size`` examples, the largest eigenvalue found times ``safety``, plus ``damping``.
        depth: recursion steps per chain, or ``"auto"``: the fewest steps with ``(1 - damping/scale)^depth <= 0.01``,
            at most ``max_depth`` (past it a clear error says to raise ``damping`` or ``max_depth``).
        repeats: independent chains; chain c draws its batches from a generator seeded by ``(seed, c)`` alone,
            so the result does not depend on how chains are spread over processes.
        batch_size: training examples per HVP batch.
        seed: base seed.
        max_depth: cap of ``depth="auto"``.
        safety: factor on the largest batch eigenvalue for ``scale="auto"``.
        calibration_batches: batches of ``scale="auto"``'s power iteration.
        strict: raise instead of warning when not converged.
        curvature: override the problem's curvature (see :class:`Solver`).

    FastIF's settings are :meth:`fastif_original` (``batch_size=128, depth=1000, repeats=1``) and
    :meth:`fastif_fast` (``batch_size=1, depth=1000, repeats=4``), both with "damp 5e-3, scale 1e4", i.e.
    ``damping=50, scale=1e4``.
    """

    name = "lissa"
    settled = LISSA_SETTLED

    def __init__(
        self,
        damping: float = 0.0,
        scale: float | str = 10.0,
        depth: int | str = 1000,
        repeats: int = 1,
        batch_size: int = 8,
        seed: int = 0,
        *,
        max_depth: int = 20_000,
        safety: float = 2.0,
        calibration_batches: int = 5,
        strict: bool = False,
        curvature: str | None = None,
    ) -> None:
        super().__init__(damping, strict=strict, curvature=curvature)
        if scale != "auto":
            _check_number("scale", scale, low=0.0, strict=True)
        if depth != "auto":
            _check_number("depth", depth, low=1, integer=True)
        _check_number("repeats", repeats, low=1, integer=True)
        _check_number("batch_size", batch_size, low=1, integer=True)
        _check_number("seed", seed, low=0, integer=True)
        _check_number("max_depth", max_depth, low=1, integer=True)
        _check_number("safety", safety, low=1.0)
        _check_number("calibration_batches", calibration_batches, low=1, integer=True)
        if depth == "auto" and not float(damping) > 0:
            raise ConfigurationError(
                f"Expected `damping` > 0 with depth='auto' (the recursion's slowest mode decays as "
                f"(1 - damping/scale)^depth), but got {damping!r}."
            )
        self.scale: float | str = scale if scale == "auto" else float(scale)
        self.depth: int | str = depth if depth == "auto" else int(depth)
        self.repeats, self.batch_size, self.seed = int(repeats), int(batch_size), int(seed)
        self.max_depth, self.safety, self.calibration_batches = (
            int(max_depth),
            float(safety),
            int(calibration_batches),
        )
        self._tuned: tuple[str, float, int, dict[str, Any]] | None = None

    @classmethod
    def fastif_original(cls, **overrides: Any) -> LiSSASolver:
        """FastIF's original s_test setting: damp 5e-3, scale 1e4 (``damping=50``), batch 128, depth 1000, 1 repeat.

        With ``damping = 50`` far above a trained network's largest eigenvalue, ``(H + 50 I)^-1 v ~ v / 50``: the
        ranking is nearly that of plain gradient similarity. Kept to reproduce the paper.
        """
        cfg: dict[str, Any] = {"damping": 50.0, "scale": 1e4, "depth": 1000, "repeats": 1, "batch_size": 128}
        return cls(**{**cfg, **overrides})

    @classmethod
    def fastif_fast(cls, **overrides: Any) -> LiSSASolver:
        """FastIF's fast s_test setting: damp 5e-3, scale 1e4 (``damping=50``), batch 1, depth 1000, 4 repeats."""
        cfg: dict[str, Any] = {"damping": 50.0, "scale": 1e4, "depth": 1000, "repeats": 4, "batch_size": 1}
        return cls(**{**cfg, **overrides})

    def config(self) -> dict[str, Any]:
        cfg = {
            "scale": self.scale,
            "depth": self.depth,
            "repeats": self.repeats,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }
        if self.depth == "auto":
            cfg["max_depth"] = self.max_depth
        return self._common(cfg)

    def chain_seed(self, chain: int) -> int:
        """The seed of chain ``chain``: a function of ``(seed, chain)`` only."""
        return (self.seed * 1_000_003 + 7919 * (chain + 1)) % (2**63 - 1)

    def tune(self, curvature: TrainingCurvature) -> tuple[float, int, dict[str, Any]]:
        """``(scale, depth, details)``: the settings used, resolving ``"auto"`` ones (cached per model state).

        ``scale="auto"``: 20 power-iteration steps on each of ``calibration_batches`` random batches of
        ``batch_size`` examples (drawn with a generator of their own, so the chains' batches are unchanged), the
        largest ``|eigenvalue|`` found times ``safety``, plus ``damping``. ``depth="auto"``: the fewest steps with
        ``(1 - damping/scale)^depth <= 0.01``.
        """
        curv = self._on(curvature)
        key = f"{curv.key}:{self.damping}:{self.scale}:{self.depth}:{self.batch_size}"
        if self._tuned is not None and self._tuned[0] == key:
            return self._tuned[1], self._tuned[2], self._tuned[3]
        details: dict[str, Any] = {}
        lam = float(self.damping)
        if self.scale == "auto":
            gen = torch.Generator().manual_seed(self.chain_seed(-7))
            tops = []
            for b in range(self.calibration_batches):
                batch = curv.random_batch(gen, self.batch_size)
                tops.append(_power_iteration(partial(curv.batch_hvp, batch), curv.theta, seed=b))
            # every rank draws the same calibration batches (same generator), so every rank gets the same scale
            top = max(tops)
            scale = self.safety * top + lam
            details.update({"batch_lambda_max": tops, "scale_chosen": scale})
        else:
            scale = float(self.scale)
        if self.depth == "auto":
            d = lam / scale
            need = math.ceil(math.log(LISSA_SETTLED) / math.log1p(-d)) if d < 1 else 1
            if need > self.max_depth:
                lam_needed = scale * (1 - LISSA_SETTLED ** (1 / self.max_depth))
                raise ConfigurationError(
                    f"LiSSA with depth='auto' needs {need:,} steps for (1 - damping/scale)^depth <= 0.01 "
                    f"(damping {lam:g}, scale {scale:.4g}), more than `max_depth` = {self.max_depth:,}. Raise "
                    f"`damping` to at least {lam_needed:.3g}, or raise `max_depth` to {need:,}, or use CGSolver / "
                    "solver='auto'."
                )
            depth = max(1, need)
            details["depth_chosen"] = depth
        else:
            depth = int(self.depth)
        self._tuned = (key, scale, depth, details)
        return scale, depth, details

    def _divergence_advice(self, curv: TrainingCurvature, scale: float) -> str:
        """Why LiSSA diverged: an indefinite damped curvature (no scale fixes it) or too small a ``scale``."""
        lo, hi = lanczos_extremes(curv.hvp, curv.theta, iters=30)
        return _lissa_advice(lo, hi, float(self.damping), scale, curv.kind)

    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        curv = self._on(curvature)
        scale, depth, details = self.tune(curv)
        chains = list(range(curv.rank, self.repeats, curv.world_size))
        gens: dict[int, torch.Generator] = {}

        def sample_hvp(chain: int, _step: int) -> MatVec:
            if chain not in gens:
                gens[chain] = torch.Generator().manual_seed(self.chain_seed(chain))
            batch = curv.random_batch(gens[chain], self.batch_size)
            return lambda v: curv.batch_hvp(batch, v)

        progress = None
        if curv.progress is not None:
            report = curv.progress

            def progress(done: int, total: int) -> None:
                report("lissa", done, total)

        try:
            total, diag = lissa(sample_hvp, vectors, float(self.damping), scale, depth, chains, progress)
        except SolverDivergenceError as err:
            raise SolverDivergenceError(f"{err} {self._divergence_advice(curv, scale)}") from err
        total = curv.all_reduce(total)
        sumsq = curv.all_reduce(diag.extra.pop("_sumsq"))
        diag.extra.update(
            {"curvature": curv.kind, "damping": float(self.damping), "scale": scale, "depth": depth}
        )
        diag.extra.update(details)
        spread = _chain_spread(total, sumsq, self.repeats)
        diag.extra["chain_spread"] = spread if spread is not None else "not measured (repeats=1)"
        if spread is not None and spread >= LISSA_SETTLED:
            diag.converged = False
        self.damping_used = float(self.damping)
        self.diagnostics = diag
        remaining, step = diag.extra["damped_mode_remaining"], diag.extra["last_step_change"]
        if spread is not None and spread >= LISSA_SETTLED and remaining < LISSA_SETTLED:
            reason = (
                f"the {self.repeats} chains disagree: the standard error of their mean is {spread:.3g} of |s_test| "
                f"(>= {LISSA_SETTLED:g}; minibatch noise)"
            )
            advice = (
                f"Raise `batch_size` (now {self.batch_size}) or `repeats` (now {self.repeats}), or use CGSolver / "
                "solver='auto'."
            )
        elif remaining >= LISSA_SETTLED:
            reason = f"(1 - damping/scale)^depth = {remaining:.3g} >= {LISSA_SETTLED:g} of the slowest mode remains"
            advice = (
                f"Raise `depth` (now {depth}; or depth='auto') or `damping`, or use CGSolver / solver='auto'."
            )
        else:
            reason = (
                f"the last step changed the estimate by {step:.3g} >= {LISSA_SETTLED:g} (minibatch noise)"
            )
            advice = (
                f"Raise `batch_size` (now {self.batch_size}) or `repeats` (now {self.repeats}), or use CGSolver / "
                "solver='auto'."
            )
        self._report(advice, reason)
        return total / self.repeats


def _chain_spread(total: Tensor, sumsq: Tensor, repeats: int) -> float | None:
    """Largest relative standard error ``sqrt(var_c / R) / |mean|`` of the mean of ``R >= 2`` chains, or None."""
    if repeats < 2:
        return None
    mean = total / repeats
    mnorm2 = mean.pow(2).sum(-1)
    var = (sumsq / repeats - mnorm2).clamp_min(0) * repeats / (repeats - 1)  # sample variance (summed over P)
    se = (var / repeats).sqrt() / mnorm2.sqrt().clamp_min(torch.finfo(total.dtype).tiny)
    return float(se.max()) if se.numel() else 0.0


def _lissa_advice(lo: float, hi: float, damping: float, scale: float, kind: str) -> str:
    if damping + lo <= 0:
        need = -lo
        return (
            f"But the cause here is not `scale`: the {kind} is indefinite (Lanczos: lambda_min ~ {lo:.3g}, "
            f"lambda_max ~ {hi:.3g}) and `damping` = {damping:g} does not exceed -lambda_min, so the recursion has a "
            f"growing mode whatever the scale. Use `damping` > {need:.3g} (e.g. {max(2 * need, 1e-2 * hi):.3g}) or "
            "`curvature='gauss_newton'`; raising `scale` only slows the growth and leaves s_test wrong."
        )
    return (
        f"The damped {kind} is positive definite (Lanczos: lambda_min ~ {lo:.3g}, lambda_max ~ {hi:.3g}), so `scale` "
        f"= {scale:g} is below the largest eigenvalue of some minibatch: use scale='auto' or a larger `batch_size`."
    )


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
