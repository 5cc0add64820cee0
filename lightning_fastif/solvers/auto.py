"""``solver="auto"``: pick the solver that gives the right answer on this model at a cost it can afford.

The rule (issues 10 and 18), decided on the first solve for a model state and printed once, by cost measured on
this model: one batched curvature product on one training batch gives the seconds per vector and example, ``c``.

1. The curvature is Gauss-Newton whenever the loss is a function of the model's outputs (positive semi-definite for
   a convex loss of the outputs; on a network the Hessian is indefinite and needs a large damping, measured 0.376
   on a 4,554-parameter CNN), unless ``curvature="hessian"`` was asked or the loss cannot be split.
2. :class:`~lightning_fastif.ExactSolver` when the dense ``P x P`` system fits (its measured build peak and its
   factorisation stay under ``max_memory_gb`` and half the memory available now) and it pays: its build,
   ``P N c`` seconds, costs no more than CG for ``expected_queries`` queries, ``expected_queries x
   CG_EXPECTED_ITERATIONS x N c`` (a dense build is ``P`` products per example; block CG about 20).
3. else CG (block CG over the queries of a batch) when its predicted time per query, ``CG_EXPECTED_ITERATIONS x N
   c``, is at most ``cg_max_seconds``, because CG is exact for its curvature and EK-FAC is not (measured on MNIST
   MLPs with 100k parameters at damping 1% of lambda_max: EK-FAC's relative residual ~5, Spearman 0.50 against the
   exact Gauss-Newton answer; CG 1.000; ``benchmarks/kronfluence_vs_exact.py``);
4. else :class:`~lightning_fastif.EKFACSolver` when every selected parameter sits in a layer it supports
   (``nn.Linear``, ``nn.Conv2d``) and the curvature was not fixed to ``"hessian"``;
5. else CG anyway.

``damping="auto"`` (the default) is ``max(1e-2 lambda_max, 2 (-lambda_min))`` of the chosen curvature, from Lanczos
estimates (on the dense matrix for Exact, by full-data products otherwise, cached per model state and shared by
every solver: :func:`~lightning_fastif.functional.solvers.spectrum.curvature_spectrum`), raised if the damped system
still turns out indefinite. CG's default tolerance here is ``AUTO_CG_TOL`` (see :class:`AutoSolver`).
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.solvers.base import Solver, SolverDiagnostics, _check_number
from lightning_fastif.functional.solvers.exact_cg import CGSolver, ExactSolver
from lightning_fastif.functional.solvers.spectrum import curvature_spectrum

__all__ = ["AUTO_CG_TOL", "CG_EXPECTED_ITERATIONS", "AutoSolver", "measure_product_cost", "reference_solver_for",
           "solver_record"]  # fmt: skip

CG_EXPECTED_ITERATIONS = 20
"""Block-CG iterations the cost prediction assumes per query batch at ``damping="auto"`` (condition number <= ~100):
measured 4-7 to 1e-3 for 32-128 queries and 14-18 to 1e-6 for 8 queries on MNIST MLPs
(``benchmarks/kronfluence_vs_exact.py``): conservative for small batches, where block CG gains least."""

AUTO_CG_TOL = 1e-3
"""CG's relative-residual target under ``solver="auto"``: the loosest that kept min Spearman >= 0.995 against a
float64 reference on the MNIST MLP benchmarks (measured 0.9997-0.9998 and every top-10 equal; 1e-2 kept the top-10s
but dropped a query to 0.988: ``benchmarks/kronfluence_vs_exact.py --tol-sweep 1e-2 1e-4``)"""


def measure_product_cost(curvature: TrainingCurvature, vectors: int = 8, examples: int = 128) -> float:
    """Seconds of one curvature product per vector and per training example, measured on the first ``examples``
    training examples with ``vectors`` random tangents (the batched product CG uses), after one warm-up product;
    averaged over the processes of a distributed run (one all-reduce), so that every rank chooses alike.

    Example:
        >>> c = measure_product_cost(curv)  # predicted seconds of one full-data product per vector: c * N
    """
    import torch

    from lightning_fastif.functional.batch import batch_size as _batch_size
    from lightning_fastif.functional.batch import slice_batch

    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(vectors, curvature.spec.numel, generator=gen, dtype=torch.float64)
    v = v.to(device=curvature.theta.device, dtype=curvature.theta.dtype)
    measured = torch.zeros(2, dtype=torch.float64, device=curvature.theta.device)  # (seconds per unit, ranks)
    batch = next(iter(curvature.shard_batches()), None)
    if batch is not None:  # a rank past the end of a tiny data set has no shard: it only joins the sum
        batch = slice_batch(batch, slice(0, examples))
        size = max(1, _batch_size(batch))
        curvature.batch_hvp(batch, v[:1])  # warm-up: first-call overheads are not the product's cost
        start = time.perf_counter()
        curvature.batch_hvp(batch, v)
        measured[0], measured[1] = (time.perf_counter() - start) / (vectors * size), 1.0
    # every rank must take the same decision (their collectives differ by solver): average over the ranks
    reduced = curvature.all_reduce(measured)
    total = measured if reduced is None else reduced
    return float(total[0] / total[1].clamp_min(1.0))


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
        expected_queries: how many queries the run is expected to answer on this model state: Exact is chosen
            (when it fits) only if its dense build (``P`` products per example) costs no more than CG for that
            many queries (``CG_EXPECTED_ITERATIONS`` products per example and query); 0: never Exact.
        cg_max_seconds: CG is preferred to EK-FAC when its predicted time per query (measured product cost x
            ``CG_EXPECTED_ITERATIONS`` x N) is at most this many seconds.
        max_iter: CG's most iterations when CG is chosen.
        tol: CG's relative-residual target when CG is chosen (default ``AUTO_CG_TOL`` = 1e-3: the rankings and
            top-10 lists it gives equal the float64 reference's on the benchmarks; every record still carries the
            measured residual and ``converged``).
        strict: raise instead of warning when the chosen solver does not converge.
        curvature: ``"hessian"`` or ``"gauss_newton"`` to fix the curvature (default: the module's ``curvature``;
            when that is unset too, Exact uses the Hessian and the others Gauss-Newton).

    Attributes:
        chosen: the solver picked on the last solve (None before the first).
        choice: one line saying what was picked and why.

    Example:
        >>> im = lf.InfluenceModule(model, train_ds, solver=lf.AutoSolver(), num_candidates=None)
        >>> im.s_test(batch); im.solver.choice
        'exact (gauss_newton): 2,410 parameters, measured 0.0021 s per full-data product and vector: CG ~0.042 s per
        query, dense build ~5.1 s <= CG for 250 queries; dense peak 0.07 GiB <= 2 GiB'
    """

    name = "auto"
    supports_auto_damping = True

    def __init__(
        self,
        damping: float | str = "auto",
        max_memory_gb: float = 2.0,
        expected_queries: int = 250,
        cg_max_seconds: float = 120.0,
        max_iter: int = 200,
        tol: float = AUTO_CG_TOL,
        *,
        strict: bool = False,
        curvature: str | None = None,
    ) -> None:
        super().__init__(damping, strict=strict, curvature=curvature)
        _check_number("max_memory_gb", max_memory_gb, low=0.0, strict=True)
        _check_number("max_iter", max_iter, low=1, integer=True)
        _check_number("tol", tol, low=0.0, strict=True)
        _check_number("expected_queries", expected_queries, low=0, integer=True)
        self.expected_queries = int(expected_queries)
        _check_number("cg_max_seconds", cg_max_seconds, low=0.0)
        self.cg_max_seconds = float(cg_max_seconds)
        self.max_memory_gb, self.max_iter, self.tol = float(max_memory_gb), int(max_iter), float(tol)
        self.chosen: Solver | None = None
        self.choice: str | None = None
        self._picked: tuple[str, Solver, str, str] | None = None  # (key, solver, mode, choice)

    def config(self) -> dict[str, Any]:
        return self._common(
            {
                "max_memory_gb": self.max_memory_gb,
                "expected_queries": self.expected_queries,
                "cg_max_seconds": self.cg_max_seconds,
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
        spec = curvature_spectrum(curv)
        lam, lo, hi = spec.damping, spec.lambda_min, spec.lambda_max
        return lam, f"damping auto = {lam:.3g} (Lanczos: lambda_min ~ {lo:.3g}, lambda_max ~ {hi:.3g})"

    def choose(self, curvature: TrainingCurvature) -> tuple[Solver, TrainingCurvature, str]:
        """The solver, the curvature it works on, and the one-line reason (decided once per model state)."""
        requested = self._requested(curvature)
        key = f"{curvature.key}:{requested}"
        if self._picked is not None and self._picked[0] == key:
            _, solver, mode, choice = self._picked
            return solver, curvature.with_mode(mode), choice
        p, n = curvature.spec.numel, curvature.num_examples
        limit_gb = min(self.max_memory_gb, 0.5 * _available_bytes() / 2**30)
        mode = requested or ("gauss_newton" if curvature.can_split() else "hessian")
        why_mode = "" if mode == "gauss_newton" or requested == "hessian" else ", the loss cannot be split"
        curv = curvature.with_mode(mode)
        per = measure_product_cost(curv)  # seconds per vector and example
        cg_query = CG_EXPECTED_ITERATIONS * n * per
        exact_build = p * n * per
        exact_budget = self.expected_queries * cg_query
        costs = (
            f"measured {per * n:.3g} s per full-data product and vector: CG ~{cg_query:.3g} s per query, "
            f"dense build ~{exact_build:.3g} s"
        )
        dense_gib = 3 * p * p * curv.theta.element_size() / 2**30
        fits, peak_gib = False, dense_gib
        if dense_gib <= limit_gb and exact_build <= exact_budget:
            exact = ExactSolver(self.damping, max_memory_gb=max(limit_gb, 1e-6), strict=self.strict)
            peak_gib = exact.plan(curv).peak_bytes / 2**30
            fits = peak_gib <= limit_gb
        if fits:
            solver: Solver = exact
            choice = (
                f"exact ({mode}{why_mode}): {p:,} parameters, {costs} <= CG for {self.expected_queries} queries; "
                f"dense peak {peak_gib:.2f} GiB <= {limit_gb:.3g} GiB"
            )
        else:
            not_exact = (
                f"dense peak {peak_gib:.3g} GiB > {limit_gb:.3g} GiB"
                if dense_gib > limit_gb or exact_build <= exact_budget
                else f"the dense build costs more than CG for {self.expected_queries} queries"
            )
            cheap = cg_query <= self.cg_max_seconds
            if not cheap and requested != "hessian" and self._ekfac_supports(curvature):
                mode = "gauss_newton" if curvature.can_split() else (requested or "hessian")
                lam, lam_txt = self._gn_damping(curvature.with_mode(mode))
                solver = _EKFAC(damping=lam)  # type: ignore[misc]
                choice = (
                    f"ekfac ({p:,} parameters, {costs}: CG per query > cg_max_seconds {self.cg_max_seconds:g}; "
                    f"every selected parameter in nn.Linear/nn.Conv2d); {lam_txt}"
                )
            else:
                solver = CGSolver(self.damping, self.max_iter, self.tol, strict=self.strict)
                afford = (
                    f"CG is affordable here (<= cg_max_seconds {self.cg_max_seconds:g})"
                    if cheap
                    else f"CG over cg_max_seconds {self.cg_max_seconds:g}, but EK-FAC cannot take this model"
                )
                choice = f"cg ({mode}{why_mode}): {p:,} parameters, {costs}; {not_exact}; {afford}"
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


def solver_record(solver: Any, query: int | None = None) -> dict[str, Any]:
    """What every result record says about the solve: name, settings, curvature, damping, convergence, choice.

    Args:
        solver: the solver after its last solve.
        query: the query's row in that solve: adds its own ``query_residual`` and ``query_converged`` when the
            solver measured each query (CG does).

    Returns:
        ``{"solver", "solver_config", "curvature", "damping", "converged", "convergence", ["solver_choice"],
        ["query_residual", "query_converged"]}`` with ``convergence = {"measure", "value", "tolerance"}``
        (``converged`` and ``convergence`` are the batch's: its worst query).
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
    residuals, flags = extra.get("per_query_residual"), extra.get("per_query_converged")
    if (
        query is not None
        and isinstance(residuals, list)
        and isinstance(flags, list)
        and query < len(residuals)
    ):
        out["query_residual"] = float(residuals[query])
        out["query_converged"] = bool(flags[query])
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
