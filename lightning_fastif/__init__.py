"""lightning_fastif: FastIF influence functions for PyTorch Lightning.

Public names are imported lazily, so ``import lightning_fastif.functional`` does not import Lightning, FAISS or
W&B (importing ``lightning.pytorch`` alone takes seconds).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_fastif._version import __version__

_EXPORTS: dict[str, str] = {
    "AutoSolver": "lightning_fastif.solvers.auto",
    "ExactSolver": "lightning_fastif.functional.solvers",
    "CGSolver": "lightning_fastif.functional.solvers",
    "LiSSASolver": "lightning_fastif.functional.solvers",
    "EKFACSolver": "lightning_fastif.solvers.kronecker",
    "KFACSolver": "lightning_fastif.solvers.kronecker",
    "InfluenceModule": "lightning_fastif.influence.module",
    "InfluenceResult": "lightning_fastif.results",
    "FeatureIndexCallback": "lightning_fastif.trainer.index_callback",
    "GradientIndexCallback": "lightning_fastif.trainer.gradient_callback",
    "InfluenceWriter": "lightning_fastif.reporting.writer",
    "InfluenceReport": "lightning_fastif.reporting.callback",
    "InfluenceStrategy": "lightning_fastif.trainer.strategy",
    "approximation_diagnostics": "lightning_fastif.evaluation.diagnostics",
    "compare_candidate_spaces": "lightning_fastif.evaluation.diagnostics",
    "CorrectionSettings": "lightning_fastif.applications.correct",
    "SliceSpec": "lightning_fastif.applications.correct",
    "PoolInfluenceModule": "lightning_fastif.applications.pool",
    "group_influence": "lightning_fastif.influence.group",
    "group_s_test": "lightning_fastif.influence.group",
    "with_pool": "lightning_fastif.applications.pool",
    "set_num_threads": "lightning_fastif.threads",
    "self_influence": "lightning_fastif.evaluation.self_influence",
    "IdentitySolver": "lightning_fastif.evaluation.lds",
    "LDSSettings": "lightning_fastif.evaluation.lds",
    "lds_check": "lightning_fastif.evaluation.lds",
    "SequenceCrossEntropy": "lightning_fastif.functional.sequence",
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
    "SequenceCrossEntropy",
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
    if not module.startswith(("lightning_fastif.functional", "lightning_fastif.results")):
        # Registers strategy="ddp_influence" with Lightning the first time a Lightning-level name is used, so that
        # `Trainer(strategy="ddp_influence")` works after `lf.InfluenceModule(...)` as the docs show.
        importlib.import_module("lightning_fastif.trainer.strategy")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from lightning_fastif.evaluation.diagnostics import approximation_diagnostics, compare_candidate_spaces
    from lightning_fastif.functional.sequence import SequenceCrossEntropy
    from lightning_fastif.functional.solvers.exact_cg import CGSolver, ExactSolver
    from lightning_fastif.functional.solvers.lissa import LiSSASolver
    from lightning_fastif.influence.module import InfluenceModule
    from lightning_fastif.reporting.callback import InfluenceReport
    from lightning_fastif.reporting.writer import InfluenceWriter
    from lightning_fastif.results import InfluenceResult
    from lightning_fastif.solvers.auto import AutoSolver
    from lightning_fastif.solvers.kronecker import EKFACSolver, KFACSolver
    from lightning_fastif.trainer.gradient_callback import GradientIndexCallback
    from lightning_fastif.trainer.index_callback import FeatureIndexCallback
    from lightning_fastif.trainer.strategy import InfluenceStrategy
