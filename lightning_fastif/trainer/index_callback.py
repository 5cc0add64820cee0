"""Lightning callbacks: ``FeatureIndexCallback`` builds the candidate index; ``InfluenceWriter`` (in
:mod:`lightning_fastif.reporting.writer`) writes results."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import Dataset

from lightning_fastif._runtime import check_bool
from lightning_fastif.errors import ConfigurationError, check_keywords
from lightning_fastif.retrieval.build import build_index, extract_shard
from lightning_fastif.retrieval.store import save_index

__all__ = ["FeatureIndexCallback"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside an ``InfluenceModule`` (its index is built on the wrapped model)."""
    from lightning_fastif.influence.module import InfluenceModule

    return model.model if isinstance(model, InfluenceModule) else model


class FeatureIndexCallback(pl.Callback):
    """Build and save the FastIF candidate index (penultimate-layer features, L2) at the end of ``fit``.

    Args:
        dirpath: the index folder (written atomically; replaced when it holds an older index).
        train_dataset: the dataset to index; ``None`` = the fit's training dataset, read in order, unshuffled.
        feature_layer: module whose input is the feature (default: the last ``nn.Linear`` called).
        index_factory: FAISS factory string: ``"Flat"`` (exact, as in the paper), ``"IVF1024,Flat"``, ``"HNSW32"``.
        backend: ``"faiss"`` or ``"torch"`` (exact, no FAISS).
        batch_size: batch size of the feature pass.
        nprobe, ef_search: search settings of IVF and HNSW indexes.
        progress: show a progress bar over the feature pass (on rank 0).
        collate_fn: how to batch ``train_dataset`` items (default: the fit loader's, else torch's default).
        forward_fn: ``callable(model, batch) -> outputs``: how the model is called on a batch (default: ``model(x)``
            for ``(x, y)`` batches, ``model(**inputs)`` for dict batches); pass the same one to ``InfluenceModule``.
        feature_pooling: how a sequence feature ``[B, T, d]`` (a transformer's last hidden states) becomes one row:
            ``"mean"`` over the positions the batch's ``attention_mask`` keeps (default), ``"last"`` unmasked position
            (a causal LM), or ``"flatten"`` (``T x d`` columns, queries of the training length only). Saved in the
            folder's ``meta.json``; ``InfluenceModule`` pools queries the same way, so queries of any length search it.

    The index folder records a fingerprint of the model's weights and of the training set (its labels and a sample
    of its inputs): loading it with another model or other training data of the same length is refused.

    Call :meth:`build` to index an already trained model without fitting.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FeatureIndexCallback("outputs/index")])
        >>> trainer.fit(model, datamodule=dm)          # writes outputs/index/{index.faiss, ids.npy, meta.json}
    """

    @check_keywords
    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        train_dataset: Dataset | None = None,
        feature_layer: str | None = None,
        index_factory: str = "Flat",
        backend: str = "faiss",
        batch_size: int = 256,
        nprobe: int | None = None,
        ef_search: int | None = None,
        progress: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        feature_pooling: str = "mean",
    ) -> None:
        from lightning_fastif.functional.batch import check_forward_fn
        from lightning_fastif.retrieval.features import check_pooling

        self.feature_pooling = check_pooling(feature_pooling)
        self.forward_fn = check_forward_fn(forward_fn)
        if not isinstance(dirpath, (str, os.PathLike)) or not str(dirpath):
            raise ConfigurationError(f"Expected `dirpath` to be a folder path, but got {dirpath!r}.")
        if train_dataset is not None and not (
            hasattr(train_dataset, "__getitem__") and hasattr(train_dataset, "__len__")
        ):
            raise ConfigurationError(
                f"Expected `train_dataset` to be a map-style Dataset or None, but got {type(train_dataset).__name__}."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
        check_bool("progress", progress)
        self.dirpath = Path(dirpath)
        self.train_dataset = train_dataset
        self.feature_layer = feature_layer
        self.index_factory = index_factory
        self.backend = backend
        self.batch_size = batch_size
        self.index_kwargs = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
        self.progress = progress
        self.collate_fn = collate_fn
        self.built_meta: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.build(pl_module, trainer=trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": str(self.dirpath), "built_meta": self.built_meta}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dirpath = Path(state_dict.get("dirpath", self.dirpath))
        self.built_meta = state_dict.get("built_meta")

    # ------------------------------------------------------------------------------------------------ building
    def _fit_dataset(self, trainer: pl.Trainer | None) -> tuple[Dataset, Callable[[list[Any]], Any] | None]:
        if self.train_dataset is not None:
            return self.train_dataset, None
        loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
        if isinstance(loader, Sequence) and len(loader) == 1:
            loader = loader[0]
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__"):
            raise ConfigurationError(
                "Expected `train_dataset` to be given, or a fit with one map-style training dataloader, but got "
                f"{type(loader).__name__ if loader is not None else 'no trainer dataloader'}."
            )
        return dataset, getattr(loader, "collate_fn", None)

    def _build_context(
        self,
        model: nn.Module,
        train_dataset: Dataset | None,
        trainer: pl.Trainer | None,
        collate_fn: Callable[[list[Any]], Any] | None,
    ) -> tuple[nn.Module, Dataset, Callable[[list[Any]], Any] | None, Any, int, int, bool]:
        """What every build starts from: ``(model, training set, collate_fn, strategy, world, rank, show
        progress)``; the training set defaults to the fit's (read in order, unshuffled)."""
        model = _unwrap(model)
        collate_fn = collate_fn or self.collate_fn
        if train_dataset is None:
            train_dataset, loader_collate = self._fit_dataset(trainer)
            collate_fn = collate_fn or loader_collate
        strategy = getattr(trainer, "strategy", None)
        world = getattr(strategy, "world_size", 1) if strategy is not None else 1
        rank = getattr(strategy, "global_rank", 0) if strategy is not None else 0
        show = self.progress and rank == 0 and (trainer is None or trainer.progress_bar_callback is not None)
        return model, train_dataset, collate_fn, strategy, world, rank, show

    def build(
        self,
        model: nn.Module,
        train_dataset: Dataset | None = None,
        trainer: pl.Trainer | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> Path:
        """Extract features of the training set, build the index and save it to ``dirpath``; returns the folder.

        Under DDP every rank must call it (``on_fit_end`` does): with an ``InfluenceStrategy`` each rank extracts the
        features of a disjoint shard (rows ``rank::world``) and rank 0 gathers them; with another DDP strategy rank 0
        extracts them all. Rank 0 builds and writes one index holding every training id once; every rank returns
        once the folder is written, so all of them can load it.
        """
        model, train_dataset, collate_fn, strategy, world, rank, show = self._build_context(
            model, train_dataset, trainer, collate_fn
        )
        n = len(train_dataset)  # type: ignore[arg-type]
        if world > 1:  # under DDP: build once on rank 0, every rank waits until the folder is written
            # InfluenceStrategy: each rank extracts the rows rank::world (fewer rows than ranks: rank 0 alone)
            if hasattr(strategy, "gather_features") and n >= world:
                ids = list(range(rank, n, world))
                name, feats, logits = extract_shard(
                    model,
                    train_dataset,
                    ids,
                    self.feature_layer,
                    self.batch_size,
                    collate_fn,
                    show,
                    self.forward_fn,
                    self.feature_pooling,
                )
                gathered = strategy.gather_features(feats, logits, n)
                features = (name, *gathered) if rank == 0 else None
            else:  # another DDP strategy: rank 0 reads the whole training set alone
                features = None
            if rank == 0:
                self._build_and_save(model, train_dataset, collate_fn, show, features)
            strategy.barrier("lightning_fastif.index_written")
            self.built_meta = strategy.broadcast(self.built_meta, src=0)
            return self.dirpath
        self._build_and_save(model, train_dataset, collate_fn, show)
        return self.dirpath

    def _build_and_save(
        self, model: nn.Module, dataset: Dataset, collate_fn: Any, show: bool, features: Any = None
    ) -> None:
        built = build_index(
            model,
            dataset,
            self.feature_layer,
            self.index_factory,
            self.backend,
            self.batch_size,
            collate_fn,
            show,
            features=features,
            forward_fn=self.forward_fn,
            feature_pooling=self.feature_pooling,
            **self.index_kwargs,
        )
        self._save(built)

    def _save(self, built: Any) -> None:
        arrays = {"features": built.features}
        if built.logits is not None:
            arrays["logits"] = built.logits
        meta = save_index(built.index, self.dirpath, built.meta, overwrite=True, arrays=arrays)
        self.built_meta = meta.to_dict()
        rank_zero_info(
            f"lightning_fastif: indexed {meta.ntotal} training examples ({meta.dim}-d features of "
            f"`{meta.feature_layer}`, {meta.factory}) in {self.dirpath}"
        )
