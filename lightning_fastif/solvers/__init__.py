"""Stateful solvers beyond the pure core: ``AutoSolver`` (picks Exact, CG or EK-FAC by cost) and the Kronecker
solvers (EK-FAC, K-FAC) with their factor folders. The numbers come from :mod:`lightning_fastif.functional`."""

from lightning_fastif.solvers.auto import AutoSolver
from lightning_fastif.solvers.kronecker import EKFACSolver, KFACSolver

__all__ = ["AutoSolver", "EKFACSolver", "KFACSolver"]
