"""A candidate pool that is not the training set (FastIF's "data the model never saw" experiment).

The curvature (the Hessian of the training objective) still comes from the training set, but the examples that are
searched and scored are those of another dataset, read with the same model: the kNN index is built over the pool's
features and every returned id is a position in the pool. Records carry ``extra["pool"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from lightning_fastif.applications._rebind import rebind
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.influence.checks import check_dataset_length
from lightning_fastif.influence.module import InfluenceModule
from lightning_fastif.results import InfluenceResult

__all__ = ["PoolInfluenceModule", "with_pool"]


class PoolInfluenceModule(InfluenceModule):
    """An ``InfluenceModule`` whose candidates come from ``pool`` while its curvature comes from the training set.

    ``train_dataset`` of this module is the pool (so ids, reports and ``candidate_loader`` refer to it); the
    training set the model was fit on is ``fit_dataset`` and is used for every Hessian-vector product.
    Build one with :func:`with_pool`.
    """

    fit_dataset: Any = None
    pool_name: str = "pool"
    dataset_argument = "pool"

    def curvature(self, *args: Any, **kwargs: Any) -> Any:
        """The training set's curvature (not the pool's): the model was fit on ``fit_dataset``."""
        pool = self.train_dataset
        self.train_dataset = self.fit_dataset
        try:
            return super().curvature(*args, **kwargs)
        finally:
            self.train_dataset = pool

    def explain(self, batch: Any, query_ids: Sequence[int] | None = None) -> list[InfluenceResult]:
        results = super().explain(batch, query_ids)
        for r in results:
            r.extra["pool"] = self.pool_name
        return results


def with_pool(
    im: InfluenceModule, pool: Any, name: str = "pool", *, index: Any = None, model: Any = None
) -> PoolInfluenceModule:
    """``im``'s settings, but searching and scoring the examples of ``pool`` (a map-style dataset).

    Args:
        im: the template module (its training set supplies the curvature); not changed.
        pool: map-style dataset of candidate examples, with the training set's format; ids are positions in it.
        name: what records call the pool (``extra["pool"]``), e.g. ``"val"`` or ``"hans_train"``.
        index: a ``CandidateIndex`` over the pool's features (default: an exact one, built on demand).
        model: the model (default: ``im.model``).

    Example:
        >>> pim = with_pool(im, unseen_ds, "unseen")
        >>> scores = pim.influence(test_batch)     # [B, len(unseen_ds)]
    """
    if not (hasattr(pool, "__getitem__") and hasattr(pool, "__len__")):
        raise ConfigurationError(
            f"Expected `pool` to be a map-style Dataset (with __len__ and __getitem__), but got {type(pool).__name__}."
        )
    if not isinstance(name, str) or not name:
        raise ConfigurationError(
            f"Expected `name` to be a non-empty str (what records call the pool, e.g. 'val'), but got {name!r}."
        )
    if len(pool) == 0:
        raise ConfigurationError("Expected `pool` to hold at least one example, but got an empty dataset.")
    fit = getattr(im, "fit_dataset", None) or im.train_dataset
    check_dataset_length(pool, "pool")
    check_same_format(pool[0], fit[0])
    k = im.num_candidates
    overrides = {} if k is None else {"num_candidates": min(k, len(pool))}
    out = rebind(im, model, pool, index=index, cls=PoolInfluenceModule, **overrides)
    out.fit_dataset = fit
    out.pool_name = str(name)
    return out


def check_same_format(example: Any, reference: Any) -> None:
    """A pool example must have the training set's format (checked on the first example of each): every
    floating-point tensor (features, pixels) at the same place has the same shape; integer tensors (token ids) may
    differ in length but not in number of dimensions."""

    def leaves(item: Any, at: str) -> dict[str, Any]:
        if isinstance(item, Tensor):
            return {at: item}
        if isinstance(item, dict):
            return {k: v for key, x in item.items() for k, v in leaves(x, f"{at}[{key!r}]").items()}
        if isinstance(item, (tuple, list)):
            return {k: v for i, x in enumerate(item) for k, v in leaves(x, f"{at}[{i}]").items()}
        return {}

    got, want = leaves(example, "[0]"), leaves(reference, "[0]")
    for key, ref in want.items():
        x = got.get(key)
        if x is None:  # an int label where the training set has a 0-d tensor...: compared later, by the loss
            continue
        fixed = ref.is_floating_point() or x.is_floating_point()
        if x.dim() != ref.dim() or (fixed and x.shape != ref.shape):
            raise ConfigurationError(
                f"Expected `pool` examples to have the training set's format (train_dataset{key} has shape "
                f"{list(ref.shape)}), but got pool{key} of shape {list(x.shape)}."
            )
