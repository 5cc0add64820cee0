"""``solver="auto"``: pick the solver that gives the right answer on this model at a cost it can afford.

The rule (issue 10), decided on the first solve for a model state and printed once:

1. :class:`~lightning_fastif.ExactSolver` when the dense ``P x P`` system fits (and ``P <= exact_max_params``): its measured build peak and its
   factorisation (two ``P x P`` matrices) stay under ``max_memory_gb`` (and half the memory available now).
2. else CG when it is affordable: ``50 x N x P <= cg_budget`` (about 50 full-data products per query: at the default
   1e11, up to ~1 minute per query on a CPU core), because CG is exact for its curvature and EK-FAC is not
   (measured on MNIST MLPs with 100k parameters at damping 1% of lambda_max: EK-FAC's relative residual ~5,
   Spearman 0.50 against the exact Gauss-Newton answer; CG 1.000; ``benchmarks/solver_accuracy.py``);
3. else :class:`~lightning_fastif.EKFACSolver` when every selected parameter sits in a layer it supports
   (``nn.Linear``, ``nn.Conv2d``) and the curvature was not fixed to ``"hessian"``;
4. else :class:`~lightning_fastif.CGSolver` on the Gauss-Newton curvature (positive semi-definite for a convex loss
   of the outputs), or on the Hessian when ``curvature="hessian"`` was asked or the loss cannot be split.

``damping="auto"`` (the default) is ``max(1e-2 lambda_max, 2 (-lambda_min))`` of the chosen curvature, from Lanczos
estimates (on the dense matrix for Exact, by full-data products otherwise), raised if the damped system still
turns out indefinite: it works on indefinite networks, where a fixed small damping makes CG and LiSSA fail.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.solvers.algorithms import auto_damping, lanczos_extremes
from lightning_fastif.functional.solvers.base import Solver, SolverDiagnostics, _check_number
from lightning_fastif.functional.solvers.exact_cg import CGSolver, ExactSolver

__all__ = ["AutoSolver", "reference_solver_for", "solver_record"]

try:  # EK-FAC is optional here: without it, the rule falls through to CG on Gauss-Newton
    from lightning_fastif.solvers.kronecker import EKFACSolver as _EKFAC
except ImportError:  # pragma: no cover - depends on the tree
    _EKFAC = None


def _available_bytes() -> float:
    """Memory available now (``MemAvailable`` of /proc/meminfo), or infinity where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


class AutoSolver(Solver):
    """Picks Exact, EK-FAC or CG (Gauss-Newton) for the model at hand; the default solver of ``InfluenceModule``.

    Args:
        damping: ``"auto"`` (default; see the module docstring) or a number used as is by the chosen solver.
        max_memory_gb: the most memory the Exact solver's dense build may take at its peak.
        exact_max_params: above this many selected parameters, Exact is not chosen even when it fits: a dense
            build costs ``P`` products per training example, CG about 50 per example and query, so past a few
            thousand parameters CG (or EK-FAC) answers a few queries sooner.
        cg_budget: CG is preferred to EK-FAC when ``50 * N * P`` (its expected work per query, in
            parameter-example products) is at most this.
        max_iter: CG's most iterations when CG is chosen.
        tol: CG's relative-residual target when CG is chosen.
        strict: raise instead of warning when the chosen solver does not converge.
        curvature: ``"hessian"`` or ``"gauss_newton"`` to fix the curvature (default: the module's ``curvature``;
            when that is unset too, Exact uses the Hessian and the others Gauss-Newton).

    Attributes:
        chosen: the solver picked on the last solve (None before the first).
        choice: one line saying what was picked and why.

    Example:
        >>> im = lf.InfluenceModule(model, train_ds, solver=lf.AutoSolver(), num_candidates=None)
        >>> im.s_test(batch); im.solver.choice
        'exact (hessian): 8,970 parameters, dense build peak 0.62 GiB <= 2 GiB; damping auto = 0.0123'
    """

    name = "auto"
    supports_auto_damping = True

    def __init__(
        self,
        damping: float | str = "auto",
        max_memory_gb: float = 2.0,
        exact_max_params: int = 5000,
        cg_budget: float = 1e11,
        max_iter: int = 200,
        tol: float = 1e-6,
        *,
        strict: bool = False,
        curvature: str | None = None,
    ) -> None:
        super().__init__(damping, strict=strict, curvature=curvature)
        _check_number("max_memory_gb", max_memory_gb, low=0.0, strict=True)
        _check_number("max_iter", max_iter, low=1, integer=True)
        _check_number("tol", tol, low=0.0, strict=True)
        _check_number("exact_max_params", exact_max_params, low=0, integer=True)
        self.exact_max_params = int(exact_max_params)
        _check_number("cg_budget", cg_budget, low=0.0)
        self.cg_budget = float(cg_budget)
        self.max_memory_gb, self.max_iter, self.tol = float(max_memory_gb), int(max_iter), float(tol)
        self.chosen: Solver | None = None
        self.choice: str | None = None
        self._picked: tuple[str, Solver, str, str] | None = None  # (key, solver, mode, choice)

    def config(self) -> dict[str, Any]:
        return self._common(
            {
                "max_memory_gb": self.max_memory_gb,
                "exact_max_params": self.exact_max_params,
                "cg_budget": self.cg_budget,
                "max_iter": self.max_iter,
                "tol": self.tol,
            }
        )

    def _requested(self, curvature: TrainingCurvature) -> str | None:
        if self.curvature is not None:
            return self.curvature
        return None if curvature.mode == "auto" else curvature.mode

    def _ekfac_supports(self, curvature: TrainingCurvature) -> bool:
        if _EKFAC is None or curvature.model is None:
            return False
        return bool(_EKFAC.supports(curvature.model, list(curvature.spec.names)))

    def _gn_damping(self, curv: TrainingCurvature) -> tuple[float, str]:
        if self.damping != "auto":
            return float(self.damping), f"damping {float(self.damping):g}"
        lo, hi = lanczos_extremes(curv.hvp, curv.theta, iters=30)
        lam = auto_damping(lo, hi)
        return lam, f"damping auto = {lam:.3g} (Lanczos: lambda_min ~ {lo:.3g}, lambda_max ~ {hi:.3g})"

    def choose(self, curvature: TrainingCurvature) -> tuple[Solver, TrainingCurvature, str]:
        """The solver, the curvature it works on, and the one-line reason (decided once per model state)."""
        requested = self._requested(curvature)
        key = f"{curvature.key}:{requested}"
        if self._picked is not None and self._picked[0] == key:
            _, solver, mode, choice = self._picked
            return solver, curvature.with_mode(mode), choice
        p = curvature.spec.numel
        limit_gb = min(self.max_memory_gb, 0.5 * _available_bytes() / 2**30)
        mode = requested or "hessian"
        exact = ExactSolver(self.damping, max_memory_gb=max(limit_gb, 1e-6), strict=self.strict)
        exact_curv = curvature.with_mode(mode)
        dense_gib = 3 * p * p * exact_curv.theta.element_size() / 2**30
        peak_gib = dense_gib
        if dense_gib <= limit_gb and p <= self.exact_max_params:
            peak_gib = exact.plan(exact_curv).peak_bytes / 2**30
        if peak_gib <= limit_gb and p <= self.exact_max_params:
            solver: Solver = exact
            choice = (
                f"exact ({mode}): {p:,} parameters, dense build peak {peak_gib:.2f} GiB <= {limit_gb:.3g} GiB"
            )
        else:
            too_big = (
                f"{p:,} parameters > exact_max_params {self.exact_max_params:,}"
                if p > self.exact_max_params
                else f"{p:,} parameters: dense peak {peak_gib:.3g} GiB > {limit_gb:.3g} GiB"
            )
            cg_work = 50.0 * curvature.num_examples * p
            cheap = cg_work <= self.cg_budget
            if cheap:
                too_big += (
                    f"; CG is affordable here (50 N P = {cg_work:.2g} <= cg_budget {self.cg_budget:.2g})"
                )
            if not cheap and requested != "hessian" and self._ekfac_supports(curvature):
                mode = "gauss_newton" if curvature.can_split() else (requested or "hessian")
                lam, lam_txt = self._gn_damping(curvature.with_mode(mode))
                solver = _EKFAC(damping=lam)  # type: ignore[misc]
                choice = f"ekfac ({too_big}; every selected parameter in nn.Linear/nn.Conv2d); {lam_txt}"
            else:
                if requested is None:
                    mode = "gauss_newton" if curvature.can_split() else "hessian"
                why = (
                    "" if mode == "gauss_newton" or requested == "hessian" else " (the loss cannot be split)"
                )
                solver = CGSolver(self.damping, self.max_iter, self.tol, strict=self.strict)
                choice = f"cg ({mode}{why}): {too_big}"
        self._picked = (key, solver, mode, choice)
        return solver, curvature.with_mode(mode), choice

    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        start = time.perf_counter()
        solver, curv, choice = self.choose(curvature)
        x = solver.solve(curv, vectors)
        lam = getattr(solver, "damping_used", None)
        if lam is None:
            lam = getattr(solver, "damping", None)
        self.damping_used = None if lam is None or isinstance(lam, str) else float(lam)
        if "damping auto" not in choice and self.damping == "auto" and self.damping_used is not None:
            choice = f"{choice}; damping auto = {self.damping_used:.3g}"
        if choice != self.choice:
            rank_zero_info(f"lightning_fastif: solver='auto' chose {choice}")
        self.chosen, self.choice = solver, choice
        inner = solver.diagnostics or SolverDiagnostics(solver.name)
        self.diagnostics = SolverDiagnostics(
            f"auto:{inner.solver}",
            iterations=inner.iterations,
            residual_norm=inner.residual_norm,
            estimate_norm=inner.estimate_norm,
            converged=inner.converged,
            seconds=time.perf_counter() - start,
            extra={**inner.extra, "choice": choice, "chosen": repr(solver)},
            measure=getattr(inner, "measure", "not_measured"),
            value=getattr(inner, "value", None),
            tolerance=getattr(inner, "tolerance", None),
        )
        self.diagnostics.extra.setdefault("curvature", curv.kind)
        return x

    def reference(self, max_memory_gb: float | None = None) -> Solver:
        """A tight reference for the last choice: the same curvature and damping, Exact if it fits else CG at 1e-8.

        Raises:
            ConfigurationError: before the first solve (nothing has been chosen yet).
        """
        if self._picked is None or self.damping_used is None:
            raise ConfigurationError(
                "Expected a solve before `AutoSolver.reference()`, but none has run yet."
            )
        mode = self._picked[2]
        if isinstance(self.chosen, ExactSolver):
            return ExactSolver(self.damping_used, max_memory_gb or self.max_memory_gb, curvature=mode)
        return CGSolver(self.damping_used, max_iter=1000, tol=1e-8, curvature=mode)


def solver_record(solver: Any) -> dict[str, Any]:
    """What every result record says about the solve: name, settings, curvature, damping, convergence, choice.

    Returns:
        ``{"solver", "solver_config", "curvature", "damping", "converged", "convergence", ["solver_choice"]}``
        with ``convergence = {"measure", "value", "tolerance"}``.
    """
    diag = getattr(solver, "diagnostics", None)
    extra = getattr(diag, "extra", {}) or {}
    out: dict[str, Any] = {
        "solver": getattr(solver, "name", type(solver).__name__),
        "solver_config": repr(solver),
        "curvature": extra.get("curvature"),
        "damping": getattr(solver, "damping_used", None),
        "converged": None if diag is None else bool(diag.converged),
        "convergence": None
        if diag is None
        else {
            "measure": getattr(diag, "measure", "not_measured"),
            "value": getattr(diag, "value", None),
            "tolerance": getattr(diag, "tolerance", None),
        },
    }
    choice = getattr(solver, "choice", None)
    if choice:
        out["solver_choice"] = choice
    return out


def reference_solver_for(module: Any, batch: Any, exact_max_params: int = 4000) -> Solver:
    """A tight reference for ``module.solver`` on the same curvature and damping, for solver-agreement checks.

    Runs one solve first when the damping or the choice is still to be made (``"auto"``), then returns Exact when
    ``P <= exact_max_params`` (and it fits), else CG to a relative residual of 1e-8.
    """
    from lightning_fastif.functional.batch import slice_batch

    solver = module.solver
    if getattr(solver, "damping_used", None) is None or (
        isinstance(solver, AutoSolver) and solver.chosen is None
    ):
        module.s_test(slice_batch(batch, slice(0, 1)))
    lam = float(solver.damping_used)
    extra = getattr(solver.diagnostics, "extra", {}) or {}
    mode = extra.get("curvature") if extra.get("curvature") in ("hessian", "gauss_newton") else None
    curv = module.curvature()
    if mode is not None:
        curv = curv.with_mode(mode)
    exact = ExactSolver(lam, curvature=mode)
    if curv.spec.numel <= exact_max_params and exact.fits(curv):
        return exact
    return CGSolver(lam, max_iter=1000, tol=1e-8, curvature=mode)
