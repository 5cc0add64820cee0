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

from lightning_fastif.functional.solvers.algorithms import (
    auto_damping,
    block_conjugate_gradient,
    conjugate_gradient,
    lanczos_extremes,
    lissa,
    relative_residual,
)
from lightning_fastif.functional.solvers.base import Solver, SolverDiagnostics
from lightning_fastif.functional.solvers.exact_cg import CGSolver, ExactSolver
from lightning_fastif.functional.solvers.lissa import LiSSASolver
from lightning_fastif.functional.solvers.spectrum import Spectrum, curvature_spectrum, spectrum_key

__all__ = [
    "CGSolver",
    "ExactSolver",
    "LiSSASolver",
    "Solver",
    "SolverDiagnostics",
    "Spectrum",
    "auto_damping",
    "block_conjugate_gradient",
    "conjugate_gradient",
    "curvature_spectrum",
    "lanczos_extremes",
    "lissa",
    "relative_residual",
    "spectrum_key",
]
