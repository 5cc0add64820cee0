"""The full-data solvers: :class:`ExactSolver` (dense ``C + damping I`` factorised once, cached per model state) and
:class:`CGSolver` (conjugate gradient on full-training-set curvature products).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.errors import (
    ConfigurationError,
    SolverConvergenceWarning,
    SolverDivergenceError,
    SolverMemoryError,
)
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.solvers.algorithms import (
    auto_damping,
    block_conjugate_gradient,
    conjugate_gradient,
    lanczos_extremes,
    per_query_residual,
    relative_error_bound,
    relative_residual,
)
from lightning_fastif.functional.solvers.base import (
    EXACT_TOL,
    Solver,
    SolverDiagnostics,
    _check_number,
    check_factorisable,
    lu_factor_or_explain,
)
from lightning_fastif.functional.solvers.spectrum import curvature_spectrum


class ExactSolver(Solver):
    """Dense ``(C + damping I)``, built over the whole training set and factorised once, cached per
    :attr:`TrainingCurvature.key` (the weights, the whole model state, the training data, the loss and its
    ``forward_fn``, the curvature kind): one solver shared by several modules never reuses another's factorisation.

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
        check_factorisable(h, type(self).__name__)
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
            lu, pivots = lu_factor_or_explain(h, lam, curv.kind)
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

    A batch of queries is solved by block CG (:func:`block_conjugate_gradient`): one Krylov space shared by all the
    queries, one batched product per iteration; each query still has its own convergence (``diagnostics.extra``:
    ``per_query_residual``, the relative residual of each query measured by one more pass, and
    ``per_query_converged``).

    Args:
        damping: lambda >= 0, or ``"auto"`` (from Lanczos estimates of the curvature's extreme eigenvalues, cached
            per model state and shared across solvers, see :func:`curvature_spectrum`; raised if CG still meets
            non-positive curvature).
        max_iter: most iterations.
        tol: relative residual at which to stop; the solve counts as converged when the residual measured
            afterwards by one more pass is at most ``10 * tol``.
        strict: raise instead of warning when not converged.
        curvature: override the problem's curvature (see :class:`Solver`).
        block: solve the queries of a batch by block CG (default) instead of one CG per query.
        recycle_mb: keep up to this many MiB of search directions (and their products) from earlier block solves
            on the same curvature, damping and model state, and start each later batch from the Galerkin solution
            in their span (no extra product): measured 9-24% fewer products per batch from the second batch on
            (``benchmarks/krylov_recycling.py``). 0 turns it off.
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
        block: bool = True,
        recycle_mb: float = 256.0,
    ) -> None:
        super().__init__(damping, strict=strict, curvature=curvature)
        _check_number("max_iter", max_iter, low=1, integer=True)
        _check_number("tol", tol, low=0.0, strict=True)
        _check_number("recycle_mb", recycle_mb, low=0.0)
        if not isinstance(block, bool):
            raise ConfigurationError(f"Expected `block` to be a bool, but got {block!r}.")
        self.max_iter, self.tol, self.block = int(max_iter), float(tol), block
        self.recycle_mb = float(recycle_mb)
        self._krylov: tuple[str, float, Tensor, Tensor] | None = (
            None  # (key, damping, W [m, P], (A + lam I) W)
        )

    def config(self) -> dict[str, Any]:
        return self._common(
            {"max_iter": self.max_iter, "tol": self.tol, "block": self.block, "recycle_mb": self.recycle_mb}
        )

    def extremes(self, curvature: TrainingCurvature, iters: int = 30) -> tuple[float, float]:
        """Lanczos estimates ``(lambda_min, lambda_max)`` of the curvature (cached per model state, shared)."""
        spec = curvature_spectrum(self._on(curvature), iters=iters)
        return spec.lambda_min, spec.lambda_max

    def _cg(self, curv: TrainingCurvature, vectors: Tensor, lam: float) -> tuple[Tensor, SolverDiagnostics]:
        if not (self.block and vectors.shape[0] > 1):
            return conjugate_gradient(curv.hvp, vectors, lam, self.max_iter, self.tol)
        cap = int(self.recycle_mb * 2**20) // max(1, 2 * vectors.shape[-1] * vectors.element_size())
        old = self._krylov
        if old is not None and (old[0] != curv.key or old[1] != lam or old[2].dtype != vectors.dtype):
            old = self._krylov = None
        keep: list[tuple[Tensor, Tensor]] | None = [] if cap > 0 else None
        recycle = None if old is None else (old[2], old[3])
        x, diag = block_conjugate_gradient(
            curv.hvp, vectors, lam, self.max_iter, self.tol, recycle=recycle, keep=keep
        )
        diag.extra["recycled_directions"] = 0 if old is None else int(old[2].shape[0])
        if keep:
            w = (
                torch.cat([old[2], *(k[0] for k in keep)])
                if old is not None
                else torch.cat([k[0] for k in keep])
            )
            aw = (
                torch.cat([old[3], *(k[1] for k in keep)])
                if old is not None
                else torch.cat([k[1] for k in keep])
            )
            self._krylov = (
                curv.key,
                lam,
                w[:cap].detach(),
                aw[:cap].detach(),
            )  # the earliest: the dominant ones
        return x, diag

    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        start = time.perf_counter()
        curv = self._on(curvature)
        extra: dict[str, Any] = {"curvature": curv.kind}
        if self.damping == "auto":
            spec = curvature_spectrum(curv)
            lam = spec.damping
            extra.update(
                {
                    "lambda_min_estimate": spec.lambda_min,
                    "lambda_max_estimate": spec.lambda_max,
                    "spectrum_products": spec.products,
                    "spectrum_cached": spec.cached,
                    "spectrum_seconds": spec.seconds,
                }
            )
        else:
            lam = float(self.damping)
        tries = 0
        while True:
            try:
                x, diag = self._cg(curv, vectors, lam)
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
        per_query = per_query_residual(curv.hvp, x, vectors, lam)
        rel = float(per_query.max()) if per_query.numel() else 0.0
        self.damping_used = lam
        bound = tolerance = 10 * self.tol
        extra.update(
            {
                "damping": lam,
                "cg_recursive_residual": diag.residual_norm,
                "auto_damping_doublings": tries,
                "per_query_residual": per_query.tolist(),
                "per_query_converged": (per_query <= bound).tolist(),
                "relative_error_bound": relative_error_bound(per_query, vectors, x, lam),
            }
        )
        extra["algorithm"] = diag.solver  # "block_cg" or "cg"
        diag.solver, diag.residual_norm = "cg", rel
        diag.measure, diag.value, diag.tolerance = "relative_residual", rel, tolerance
        diag.converged = rel <= tolerance
        diag.extra.update(extra)
        diag.seconds = time.perf_counter() - start
        self.diagnostics = diag
        self._report(f"Raise `max_iter` (now {self.max_iter}) or `damping` (now {lam:g}).")
        return x
