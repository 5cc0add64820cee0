"""FastIF's error correction: fix a failing slice by fine-tuning on its most helpful training examples.

The loop (FastIF section 6, its HANS experiment), on the module's selected parameters:

1. the slice (test examples the model gets wrong) is split into an anchor pool and a held-out slice;
2. each step samples ``anchors_per_step`` anchors, computes the group s_test of their mean loss, scores the union
   of the anchors' ``num_candidates`` nearest candidates (the whole pool for a full scan) and takes the
   ``examples_per_step`` most helpful ones;
3. one plain SGD step (``lr``) on their mean loss; repeat ``steps`` times.

Baselines under the same seeds (the same anchors at every step): ``random`` (uniform examples of the pool),
``harmful`` (the most harmful candidates) and ``anchors`` (a step on the anchors themselves). After every step the
model is evaluated on the held-out slice and on the whole test set, so a fix that breaks the rest shows.

Every run fine-tunes its own deep copy of the model: the user's model is never changed. The SGD step runs with the
model in ``eval()`` mode (dropout off, BatchNorm on its running statistics), like the influence computation.
"""

from lightning_fastif.applications.correct.loop import METHODS, CorrectionSettings, correct, sgd_step
from lightning_fastif.applications.correct.report import write_correction_report
from lightning_fastif.applications.correct.result import CorrectionResult
from lightning_fastif.applications.correct.slice import SliceSpec, predictions, select_slice

__all__ = [
    "METHODS",
    "CorrectionResult",
    "CorrectionSettings",
    "SliceSpec",
    "correct",
    "predictions",
    "select_slice",
    "sgd_step",
    "write_correction_report",
]
