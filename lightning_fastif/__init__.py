"""lightning_fastif: FastIF influence functions for PyTorch Lightning.

Public names are imported lazily, so ``import lightning_fastif.functional`` does not import Lightning, FAISS or
W&B (importing ``lightning.pytorch`` alone takes seconds).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AutoSolver": "lightning_fastif.solver_choice",
    "ExactSolver": "lightning_fastif.functional.solvers",
    "CGSolver": "lightning_fastif.functional.solvers",
    "LiSSASolver": "lightning_fastif.functional.solvers",
    "EKFACSolver": "lightning_fastif.kfac_solver",
    "KFACSolver": "lightning_fastif.kfac_solver",
    "InfluenceModule": "lightning_fastif.module",
    "InfluenceResult": "lightning_fastif.results",
    "FeatureIndexCallback": "lightning_fastif.callbacks",
    "GradientIndexCallback": "lightning_fastif.gradient_callback",
    "InfluenceWriter": "lightning_fastif.callbacks",
    "InfluenceReport": "lightning_fastif.reporting.callback",
    "InfluenceStrategy": "lightning_fastif.strategy",
    "approximation_diagnostics": "lightning_fastif.diagnostics",
    "compare_candidate_spaces": "lightning_fastif.diagnostics",
    "CorrectionSettings": "lightning_fastif.applications.correct",
    "SliceSpec": "lightning_fastif.applications.correct",
    "PoolInfluenceModule": "lightning_fastif.applications.pool",
    "group_influence": "lightning_fastif.applications.group",
    "group_s_test": "lightning_fastif.applications.group",
    "with_pool": "lightning_fastif.applications.pool",
    "set_num_threads": "lightning_fastif.threads",
    "self_influence": "lightning_fastif.self_influence",
    "IdentitySolver": "lightning_fastif.lds",
    "LDSSettings": "lightning_fastif.lds",
    "lds_check": "lightning_fastif.lds",
}

__all__ = [
    "AutoSolver",
    "CGSolver",
    "CorrectionSettings",
    "EKFACSolver",
    "ExactSolver",
    "FeatureIndexCallback",
    "GradientIndexCallback",
    "IdentitySolver",
    "InfluenceModule",
    "InfluenceReport",
    "InfluenceResult",
    "InfluenceStrategy",
    "InfluenceWriter",
    "KFACSolver",
    "LDSSettings",
    "LiSSASolver",
    "PoolInfluenceModule",
    "SliceSpec",
    "__version__",
    "approximation_diagnostics",
    "compare_candidate_spaces",
    "group_influence",
    "group_s_test",
    "lds_check",
    "self_influence",
    "set_num_threads",
    "with_pool",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_fastif' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from lightning_fastif.callbacks import FeatureIndexCallback, InfluenceWriter
    from lightning_fastif.diagnostics import approximation_diagnostics, compare_candidate_spaces
    from lightning_fastif.functional.solvers import CGSolver, ExactSolver, LiSSASolver
    from lightning_fastif.gradient_callback import GradientIndexCallback
    from lightning_fastif.kfac_solver import EKFACSolver, KFACSolver
    from lightning_fastif.module import InfluenceModule
    from lightning_fastif.reporting.callback import InfluenceReport
    from lightning_fastif.results import InfluenceResult
    from lightning_fastif.solver_choice import AutoSolver
    from lightning_fastif.strategy import InfluenceStrategy
