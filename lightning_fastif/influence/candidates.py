"""The candidate index of :class:`~lightning_fastif.InfluenceModule`: loaded from an index folder (checked against the
model and training set), taken as given, built in memory, or the gradient-sketch index; the cached features and
logits of the head fast path come with it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_fastif.errors import ConfigurationError


def resolve_candidate_index(module: Any) -> Any:
    """Load or build ``module``'s candidate index (and its feature/logit cache); sets ``module._candidates``."""
    if (
        module.candidates == "gradients"
    ):  # gradient sketches (retrieval.gradient_index); a head gives its cache
        from lightning_fastif.retrieval.gradients.settings import module_gradient_index

        module._candidates = gi = module_gradient_index(module)
        if gi.features is not None and gi.logits is not None:
            module._cache = {"features": gi.features, "logits": gi.logits}
            module._feature_layer_name = gi.meta.get("feature_layer")
        return gi
    from lightning_fastif.retrieval.index import CandidateIndex

    n = len(module.train_dataset)  # type: ignore[arg-type]
    if isinstance(module.index, (str, os.PathLike)):
        from lightning_fastif.functional.params import dataset_fingerprint
        from lightning_fastif.influence.trust import current_state
        from lightning_fastif.retrieval.store import load_index

        state = current_state(module)  # fingerprinted once per call: the caches are checked against the same
        expected = {
            "dataset_length": n,
            "model_fingerprint": state["model"],
            "space": "features",
            # an index caches something of every row: a dataset without in-memory arrays is read in full here
            "dataset_fingerprint": state["data"]
            if state["data"].get("content")
            else dataset_fingerprint(module.train_dataset, read_all=True),
        }
        if module.feature_layer is not None:
            expected["feature_layer"] = module.feature_layer
        index, meta = load_index(module.index, expected=expected)
        module._feature_layer_name = meta.feature_layer
        _use_pooling(module, meta.extra.get("feature_pooling", "flatten"), str(module.index))
        if {"features", "logits"} <= set(meta.arrays):
            from lightning_fastif.retrieval.store import load_arrays

            arrays = load_arrays(module.index, ["features", "logits"])
            module._cache = {k: torch.as_tensor(v) for k, v in arrays.items()}
    elif isinstance(module.index, CandidateIndex):
        index = module.index
        if index.ntotal != n:
            raise ConfigurationError(
                f"Expected `index` to hold every training example ({n}), but it holds {index.ntotal}: "
                "the training set changed since indexing; rebuild the index."
            )
        module._feature_layer_name = module.feature_layer
        module._feature_pooling = module.feature_pooling or "mean"
    elif module.index is None:
        from lightning_fastif.retrieval.build import build_index

        rank_zero_info(
            f"lightning_fastif: no `index` given, building an exact index of {n} training examples"
        )
        built = build_index(
            module.model,
            module.train_dataset,
            module.feature_layer,
            collate_fn=module.collate_fn,
            batch_size=module.score_batch_size,
            forward_fn=module.forward_fn,
            feature_pooling=module.feature_pooling or "mean",
        )
        index, module._feature_layer_name = built.index, built.meta["feature_layer"]
        module._feature_pooling = built.meta["feature_pooling"]
        if built.logits is not None:
            module._cache = {"features": built.features, "logits": built.logits}
    else:
        raise ConfigurationError(
            f"Expected `index` to be a CandidateIndex, an index folder path or None, but got {type(module.index).__name__}."
        )
    module._candidates = index
    return index


def _use_pooling(module: Any, saved: str, where: str) -> None:
    """Pool query features as the index folder's were (an older folder without the key: ``"flatten"``)."""
    if module.feature_pooling is not None and module.feature_pooling != saved:
        raise ConfigurationError(
            f"Expected `feature_pooling` to match the index at {where!r}, which pooled its features with {saved!r}, "
            f"but got {module.feature_pooling!r}. Leave `feature_pooling` unset to use the index's, or rebuild the "
            "index (FeatureIndexCallback(feature_pooling=...))."
        )
    module._feature_pooling = saved
