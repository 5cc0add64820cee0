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

# Constants and private helpers stay importable from here (kfac_solver and solver_choice use some).
from lightning_fastif.functional.solver_algorithms import (
    _power_iteration as _power_iteration,
)
from lightning_fastif.functional.solver_algorithms import (
    auto_damping,
    conjugate_gradient,
    lanczos_extremes,
    lissa,
    relative_residual,
)
from lightning_fastif.functional.solver_base import (
    AUTO_DAMPING_FRACTION as AUTO_DAMPING_FRACTION,
)
from lightning_fastif.functional.solver_base import (
    AUTO_DAMPING_MARGIN as AUTO_DAMPING_MARGIN,
)
from lightning_fastif.functional.solver_base import (
    EXACT_TOL as EXACT_TOL,
)
from lightning_fastif.functional.solver_base import (
    LISSA_SETTLED as LISSA_SETTLED,
)
from lightning_fastif.functional.solver_base import (
    MatVec as MatVec,
)
from lightning_fastif.functional.solver_base import (
    Solver,
    SolverDiagnostics,
)
from lightning_fastif.functional.solver_base import (
    _check_curvature as _check_curvature,
)
from lightning_fastif.functional.solver_base import (
    _check_damping as _check_damping,
)
from lightning_fastif.functional.solver_base import (
    _check_number as _check_number,
)
from lightning_fastif.functional.solver_exact_cg import CGSolver, ExactSolver
from lightning_fastif.functional.solver_exact_cg import _symmetrise_ as _symmetrise_
from lightning_fastif.functional.solver_lissa import LiSSASolver
from lightning_fastif.functional.solver_lissa import _chain_spread as _chain_spread
from lightning_fastif.functional.solver_lissa import _lissa_advice as _lissa_advice

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
