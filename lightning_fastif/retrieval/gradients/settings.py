"""The gradient index of an ``InfluenceModule`` with ``candidates="gradients"``, from its ``sketch`` settings.

Part of ``retrieval.gradient_index``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import fetch
from lightning_fastif.functional.params import dataset_fingerprint, fingerprint
from lightning_fastif.retrieval.gradients.folder import build_gradient_index, load_gradient_index
from lightning_fastif.retrieval.gradients.search import GradientIndex
from lightning_fastif.retrieval.gradients.sketcher import DEFAULT_DIM, GradientSketcher

__all__ = ["SKETCH_KEYS", "check_sketch_settings", "module_gradient_index"]


SKETCH_KEYS = ("method", "dim", "seed", "kind", "float16", "factory", "backend", "nprobe", "ef_search")


def check_sketch_settings(sketch: Mapping[str, Any] | None) -> dict[str, Any]:
    """``InfluenceModule(sketch=...)``: a dict with keys among :data:`SKETCH_KEYS`, checked."""
    if sketch is None:
        return {}
    if not isinstance(sketch, Mapping):
        raise ConfigurationError(
            f"Expected `sketch` to be a dict of gradient-index settings, but got {sketch!r}."
        )
    unknown = sorted(set(sketch) - set(SKETCH_KEYS))
    if unknown:
        raise ConfigurationError(
            f"Expected the keys of `sketch` to be among {SKETCH_KEYS}, but got {unknown}."
        )
    if "float16" in sketch and not isinstance(sketch["float16"], bool):
        raise ConfigurationError(
            f"Expected `sketch['float16']` to be a bool (True or False), but got {sketch['float16']!r}."
        )
    return dict(sketch)


def module_gradient_index(module: Any) -> GradientIndex:
    """The gradient index of an ``InfluenceModule`` with ``candidates="gradients"``.

    ``module.index`` is a :class:`GradientIndex`, a gradient index folder (its sketch settings are read from the
    folder and must match the module's model, data and selected parameters), or None (built in memory from
    ``module.sketch``). A head index also gives the module the features and logits of its scoring fast path.
    """
    from lightning_fastif.retrieval import store

    n = len(module.train_dataset)
    settings = dict(getattr(module, "sketch", None) or {})
    first = fetch(module.train_dataset, list(range(min(2, n))), module._user_collate)

    def sketcher(s: Mapping[str, Any]) -> GradientSketcher:
        return GradientSketcher(
            module.model,
            module.loss,
            module.param_patterns,
            s.get("method", "auto"),
            s.get("dim", DEFAULT_DIM),
            s.get("seed", 0),
            s.get("kind", "gaussian"),
            s.get("head_layer") or module.feature_layer,
            first,
        )

    index = module.index
    if isinstance(index, (str, os.PathLike)):
        folder = store._resolve(Path(index))
        meta, _ = store._read_meta_and_verify(folder, names=[])
        found = meta.sketch if meta.space == "gradients" else {}
        gi = load_gradient_index(
            folder,
            expected={
                "dataset_length": n,
                "model_fingerprint": fingerprint(module.model),
                "dataset_fingerprint": dataset_fingerprint(module.train_dataset, read_all=True),
            },
            sketcher=sketcher({**found, "dim": found.get("requested_dim", DEFAULT_DIM)}) if found else None,
        )
    elif isinstance(index, GradientIndex):
        gi = index
        if gi.ntotal != n:
            raise ConfigurationError(
                f"Expected `index` to hold every training example ({n}), but it holds {gi.ntotal}: rebuild it."
            )
        if gi.sketcher is None:
            raise ConfigurationError("Expected the GradientIndex passed as `index` to carry its sketcher.")
    elif index is None:
        extra = {k: settings[k] for k in ("nprobe", "ef_search") if settings.get(k) is not None}
        gi = build_gradient_index(
            module.model,
            module.train_dataset,
            module.loss,
            sketcher=sketcher(settings),
            float16=bool(settings.get("float16", False)),
            factory=settings.get("factory", "Flat"),
            backend=settings.get("backend", "faiss"),
            batch_size=module.score_batch_size,
            collate_fn=module._user_collate,
            **extra,
        )
    else:
        raise ConfigurationError(
            "Expected `index` to be a GradientIndex, a gradient index folder or None with candidates='gradients', "
            f"but got {type(index).__name__}."
        )
    return gi
