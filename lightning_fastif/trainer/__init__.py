"""What plugs into a Lightning ``Trainer`` to build and serve influence: the index callbacks (feature and gradient
candidates) and the ``InfluenceStrategy`` (DDP sharding of s_test and scoring; its process plumbing in ``_dist``).
The writers of results (``InfluenceWriter``, ``InfluenceReport``) are callbacks too, but live with the formats they
write in :mod:`lightning_fastif.reporting`."""

from lightning_fastif.trainer.gradient_callback import GradientIndexCallback
from lightning_fastif.trainer.index_callback import FeatureIndexCallback
from lightning_fastif.trainer.strategy import InfluenceStrategy

__all__ = ["FeatureIndexCallback", "GradientIndexCallback", "InfluenceStrategy"]
