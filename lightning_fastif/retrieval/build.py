"""Building a candidate index from a model and its training set (the feature pass plus the index)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import ForwardFn
from lightning_fastif.functional.params import dataset_fingerprint, fingerprint
from lightning_fastif.retrieval.factory import make_index
from lightning_fastif.retrieval.features import (
    check_pooling,
    extract_features_and_outputs,
    find_feature_layer,
    ordered_loader,
)
from lightning_fastif.retrieval.index import CandidateIndex

__all__ = ["BuiltIndex", "build_index", "extract_shard"]


@dataclass
class BuiltIndex:
    """An index with what it was built from: ``meta`` for ``save_index`` and the cached arrays."""

    index: CandidateIndex
    meta: dict[str, Any]
    features: Tensor
    logits: Tensor | None


def extract_shard(
    model: nn.Module,
    dataset: Dataset,
    ids: list[int] | None = None,
    feature_layer: str | nn.Module | None = None,
    batch_size: int = 256,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    progress: bool = False,
    forward_fn: ForwardFn | None = None,
    pooling: str = "mean",
) -> tuple[str, Tensor, Tensor | None]:
    """Features ``[n, d]`` (and logits when the model gives them) of ``dataset`` rows ``ids`` (all if None), in order.

    A sequence input ``[B, T, d]`` of the feature layer is pooled to one row by ``pooling`` (``"mean"`` over the
    unmasked positions, ``"last"`` unmasked position, or ``"flatten"``; see ``retrieval.features.pool_features``).

    Returns:
        ``(feature_layer_name, features, logits or None)``.
    """
    part = dataset if ids is None else Subset(dataset, ids)
    loader = ordered_loader(part, batch_size=batch_size, collate_fn=collate_fn)
    if not isinstance(feature_layer, (str, nn.Module)):
        first = next(iter(ordered_loader(dataset, batch_size=min(2, len(dataset)), collate_fn=collate_fn)))  # type: ignore[arg-type]
        from lightning_fastif.functional.batch import move_to

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        feature_layer = find_feature_layer(model, move_to(first, device), None, forward_fn)[0]
    name = (
        feature_layer if isinstance(feature_layer, str) else find_feature_layer(model, None, feature_layer)[0]
    )
    try:
        feats, logits = extract_features_and_outputs(
            model, loader, name, progress=progress, forward_fn=forward_fn, pooling=pooling
        )
    except ConfigurationError as err:  # a model whose output has no logits: features alone still index
        if "logits" not in str(err):
            raise
        from lightning_fastif.retrieval.features import extract_features

        feats = extract_features(
            model, loader, name, progress=progress, forward_fn=forward_fn, pooling=pooling
        )
        logits = None
    return name, feats, logits


def build_index(
    model: nn.Module,
    dataset: Dataset,
    feature_layer: str | nn.Module | None = None,
    factory: str = "Flat",
    backend: str = "faiss",
    batch_size: int = 256,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    progress: bool = False,
    features: tuple[str, Tensor, Tensor | None] | None = None,
    forward_fn: ForwardFn | None = None,
    feature_pooling: str = "mean",
    **index_kwargs: Any,
) -> BuiltIndex:
    """Extract the training features (or take ``features`` already extracted) and index them by training id.

    Args:
        model: the trained network (not changed).
        dataset: the training set; row i gets id i.
        feature_layer: module name or module whose input is the feature (default: the last ``nn.Linear`` called).
        factory, backend, **index_kwargs: see :func:`lightning_fastif.retrieval.factory.make_index`.
        batch_size, collate_fn: how the dataset is read (in order, no shuffling).
        progress: show a progress bar over the feature pass.
        features: ``(layer name, features [N, d], logits [N, C] or None)`` from :func:`extract_shard`.
        forward_fn: ``callable(model, batch) -> outputs``, how the model is called on a batch (default: ``model(x)``
            for ``(x, y)`` batches, ``model(**inputs)`` for dict batches).
        feature_pooling: how a sequence feature ``[B, T, d]`` becomes one row: ``"mean"`` over the unmasked
            positions (default), ``"last"`` unmasked position (a causal LM), or ``"flatten"`` (``T x d`` columns:
            queries must then have the training length). Recorded in ``meta`` so queries are pooled the same way.
    """
    feature_pooling = check_pooling(feature_pooling)
    name, feats, logits = features or extract_shard(
        model, dataset, None, feature_layer, batch_size, collate_fn, progress, forward_fn, feature_pooling
    )
    index = make_index(factory, backend, **index_kwargs)
    index.add(feats, torch.arange(len(feats), dtype=torch.long))
    meta = {
        "feature_layer": name,
        "dataset_length": len(dataset),  # type: ignore[arg-type]
        "model_fingerprint": fingerprint(model),
        "dataset_fingerprint": dataset_fingerprint(dataset, read_all=True),
        "feature_pooling": feature_pooling,
    }
    return BuiltIndex(index, meta, feats, logits)
