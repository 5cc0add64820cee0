"""``InfluenceModule``: wraps a trained model for influence (s_test, candidate search, scoring, ranked results).

``module`` orchestrates; ``checks`` validates its arguments, ``head`` is the cached-feature fast path for a final
``Linear``, ``candidates`` resolves the candidate index, ``predict`` assembles the results of a batch, ``group`` explains a set of queries as one (one s_test for
their mean loss)."""

from lightning_fastif.influence.module import InfluenceModule

__all__ = ["InfluenceModule"]
