"""The solver contract: :class:`Solver` (settings, curvature override, convergence reports), its
:class:`SolverDiagnostics`, the argument checks and the convergence constants the solvers share.

Pure torch. The concrete solvers live in ``solver_exact_cg`` and ``solver_lissa``; the numbers in
``solver_algorithms``; ``solvers`` re-exports every name.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.errors import (
    ConfigurationError,
    SolverConvergenceError,
    SolverConvergenceWarning,
    check_keywords,
)
from lightning_fastif.functional.curvature import TrainingCurvature

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # an unknown keyword (`dampnig=`) says which argument was meant
            cls.__init__ = check_keywords(cls.__dict__["__init__"])  # type: ignore[method-assign]

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


Solver.__init__ = check_keywords(Solver.__init__)  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------- factorisation errors
def check_factorisable(matrix: Tensor, solver: str) -> None:
    """A dense factorisation needs float32 or float64: name the model's dtype instead of torch's "cholesky_cpu not
    implemented for 'BFloat16'"."""
    if matrix.dtype in (torch.float16, torch.bfloat16):
        raise ConfigurationError(
            f"Expected the selected parameters to be float32 or float64 for {solver}'s dense factorisation, but got "
            f"{matrix.dtype} (a half-precision model). Cast the model for influence (`model.float()`), or use "
            "CGSolver/LiSSASolver, which need no factorisation."
        )


def lu_factor_or_explain(matrix: Tensor, damping: float, curvature: str) -> tuple[Tensor, Tensor]:
    """``torch.linalg.lu_factor(matrix)``, or a :class:`ConfigurationError` naming `damping` when the damped
    curvature is singular (``damping=0`` on a curvature with a zero eigenvalue: dead units, unused inputs...)."""
    lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
    if int(info) != 0:
        raise ConfigurationError(
            f"Expected the damped curvature ({curvature} + `damping` I) to be invertible, but with `damping` = "
            f"{damping:g} it is singular (pivot {int(info)} of {matrix.shape[0]} is zero: a parameter the loss does "
            "not depend on, e.g. a dead unit). Pass `damping` > 0 (e.g. 1e-3 or 'auto' with AutoSolver), or "
            "select other `params`."
        )
    return lu, pivots
