"""``GradientIndexCallback``: build and save the gradient-space candidate index at the end of ``fit``.

The sibling of :class:`~lightning_fastif.trainer.index_callback.FeatureIndexCallback` (same folder format, same DDP sharding):
the vectors indexed are per-example gradient sketches (``retrieval.gradient_index``), searched by inner product
with the projected s_test of a query (``InfluenceModule(candidates="gradients")``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import Dataset

from lightning_fastif._runtime import check_bool
from lightning_fastif.errors import ConfigurationError, check_keywords
from lightning_fastif.functional.batch import fetch
from lightning_fastif.functional.losses import resolve_loss
from lightning_fastif.retrieval.gradients.folder import build_gradient_index, save_gradient_index
from lightning_fastif.retrieval.gradients.sketcher import DEFAULT_DIM, METHODS, GradientSketcher
from lightning_fastif.trainer.index_callback import FeatureIndexCallback

__all__ = ["GradientIndexCallback"]


class GradientIndexCallback(FeatureIndexCallback):
    """Sketch every training example's gradient and save the inner-product index folder at the end of ``fit``.

    Args:
        dirpath: the index folder (atomic, fingerprinted; ``meta.json`` says ``space: "gradients"``).
        train_dataset: the dataset to index; ``None`` = the fit's training dataset, read in order.
        params: glob patterns of the parameters differentiated; must be those of the ``InfluenceModule`` using it.
        loss_fn: ``callable(outputs, batch) -> [B]`` (default: as ``InfluenceModule`` resolves it).
        sketch: ``"auto"``, ``"head"`` (exact, a final cross-entropy Linear), ``"kronecker"`` (LoGra, Linear
            layers), ``"dense"`` (projected per-example gradients, any parameters).
        sketch_dim: dimension of the random projections (about this many numbers per example).
        seed, kind: the projections' seed and ``"gaussian"`` / ``"rademacher"`` entries.
        float16: store the sketches as float16 (FAISS ``SQfp16``).
        index_factory, backend, batch_size, nprobe, ef_search, progress, collate_fn, feature_layer, forward_fn: as
            :class:`~lightning_fastif.trainer.index_callback.FeatureIndexCallback`.

    Example:
        >>> trainer = pl.Trainer(callbacks=[GradientIndexCallback("outputs/grad-index", params=["head.*"])])
        >>> trainer.fit(model, datamodule=dm)
    """

    @check_keywords
    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        train_dataset: Dataset | None = None,
        params: list[str] | None = None,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        sketch: str = "auto",
        sketch_dim: int = DEFAULT_DIM,
        seed: int = 0,
        kind: str = "gaussian",
        float16: bool = False,
        index_factory: str = "Flat",
        backend: str = "faiss",
        batch_size: int = 256,
        nprobe: int | None = None,
        ef_search: int | None = None,
        progress: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        feature_layer: str | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        super().__init__(
            dirpath,
            train_dataset=train_dataset,
            feature_layer=feature_layer,
            index_factory=index_factory,
            backend=backend,
            batch_size=batch_size,
            nprobe=nprobe,
            ef_search=ef_search,
            progress=progress,
            collate_fn=collate_fn,
            forward_fn=forward_fn,
        )
        if sketch not in METHODS:
            raise ConfigurationError(f"Expected `sketch` to be one of {METHODS}, but got {sketch!r}.")
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim < 1:
            raise ConfigurationError(f"Expected `sketch_dim` to be a positive int, but got {sketch_dim!r}.")
        check_bool("float16", float16)
        self.params, self.loss_fn = params, loss_fn
        self.sketch, self.sketch_dim, self.seed, self.kind, self.float16 = (
            sketch,
            sketch_dim,
            seed,
            kind,
            float16,
        )

    def sketcher(self, model: nn.Module, dataset: Dataset, collate_fn: Any = None) -> GradientSketcher:
        """The :class:`GradientSketcher` of ``model`` with this callback's settings."""
        first = fetch(dataset, list(range(min(2, len(dataset)))), collate_fn)  # type: ignore[arg-type]
        return GradientSketcher(
            model,
            resolve_loss(model, self.loss_fn, self.forward_fn),
            self.params,
            self.sketch,
            self.sketch_dim,
            self.seed,
            self.kind,
            self.feature_layer,
            first,
        )

    def build(
        self,
        model: nn.Module,
        train_dataset: Dataset | None = None,
        trainer: pl.Trainer | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> Path:
        """Sketch the training set, index the sketches and save them to ``dirpath``; returns the folder.

        Under DDP every rank must call it (``on_fit_end`` does): with an ``InfluenceStrategy`` each rank sketches
        the rows ``rank::world`` and rank 0 gathers them (equal to one process); with another DDP strategy rank 0
        sketches them all. Every rank returns once the folder is written.
        """
        model, train_dataset, collate_fn, strategy, world, rank, show = self._build_context(
            model, train_dataset, trainer, collate_fn
        )
        n = len(train_dataset)  # type: ignore[arg-type]
        sketcher = self.sketcher(model, train_dataset, collate_fn)
        sketches = None
        if world > 1 and hasattr(strategy, "gather_features") and n >= world:
            ids = list(range(rank, n, world))
            x, feats, logits = sketcher.sketch_rows(train_dataset, ids, self.batch_size, collate_fn, show)
            gathered = strategy.gather_features(x, None, n)  # type: ignore[union-attr]
            head = strategy.gather_features(feats, logits, n) if feats is not None else None  # type: ignore[union-attr]
            if rank == 0 and gathered is not None:
                sketches = (gathered[0], *(head if head is not None else (None, None)))
        if rank == 0:
            if sketches is None:
                sketches = sketcher.sketch_rows(train_dataset, None, self.batch_size, collate_fn, show)
            built = build_gradient_index(
                model,
                train_dataset,
                sketcher.loss,
                float16=self.float16,
                factory=self.index_factory,
                backend=self.backend,
                sketches=sketches,
                sketcher=sketcher,
                **self.index_kwargs,
            )
            meta = save_gradient_index(built, self.dirpath, overwrite=True)
            self.built_meta = meta.to_dict()
            rank_zero_info(
                f"lightning_fastif: indexed the gradients of {meta.ntotal} training examples ({meta.dim}-d "
                f"{meta.sketch['method']} sketches, {meta.factory}) in {self.dirpath}"
            )
        if world > 1 and strategy is not None:
            strategy.barrier("lightning_fastif.gradient_index_written")
            self.built_meta = strategy.broadcast(self.built_meta, src=0)
        return self.dirpath
