"""The linear datamodeling score (LDS; Park et al. 2023, TRAK): how well summed influences predict retraining.

Draw M random subsets S_1..S_M of the training set, each of ``round(fraction * N)`` examples (seeded). Retrain
the model on each subset through Lightning (the module's own ``training_step`` and ``configure_optimizers``, a
``pl.Trainer`` fit on a ``Subset``), every time from the same initialisation, and record each query's loss. The
attribution predicts the **change of the query loss from training on S_m instead of the full set**, to first
order in the library's convention (DESIGN section 2: removing z changes the test loss by about ``-I(z) / N``):

    predicted[q, m] = -(1/N) * sum_{i not in S_m} I(z_i, q) = (1/N) * (sum_{i in S_m} I(z_i, q) - sum_i I(z_i, q))

The LDS of a query is the Spearman correlation over the M subsets between ``predicted[q, :]`` and the actual loss
of the M retrained models; the reported LDS is the mean over queries, with a bootstrap confidence interval over
queries. (Spearman is invariant to the constant term and to the positive 1/N, so this is the same number TRAK,
dattri and kronfluence publish from "sum of the subset's attributions".)

Retraining is resumable: each subset's query losses go to ``<output_dir>/lds-<fingerprint>/subset_<m>.json`` as it
finishes (the fingerprint covers the subsets, the settings, the initial weights and the queries), and a rerun
loads finished subsets instead of retraining them. ``rank``/``world_size`` spread the subsets over processes
(rank r retrains subsets ``r::W``).
"""

from lightning_fastif.evaluation.lds.core import (
    lds_subsets,
    linear_datamodeling_score,
    predicted_group_effects,
    shard_subsets,
)
from lightning_fastif.evaluation.lds.retrain import retrain_subsets
from lightning_fastif.evaluation.lds.settings import IdentitySolver, LDSReport, LDSSettings
from lightning_fastif.evaluation.lds.task import LDSTask, evaluate_lds, first_queries, lds_check, run_lds

__all__ = [
    "IdentitySolver",
    "LDSReport",
    "LDSSettings",
    "LDSTask",
    "evaluate_lds",
    "first_queries",
    "lds_check",
    "lds_subsets",
    "linear_datamodeling_score",
    "predicted_group_effects",
    "retrain_subsets",
    "run_lds",
    "shard_subsets",
]
