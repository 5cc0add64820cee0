"""Building, saving and loading a gradient index folder (``space = "gradients"``, sketch settings in ``meta``).

The folder has the format of the feature index (``retrieval.store``); it is read with the stored vectors
memory-mapped (FAISS ``IO_FLAG_MMAP_IFC``) and checked against the sketcher it is used with. Part of
``retrieval.gradient_index``; imports torch, numpy and (lazily) faiss only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_fastif.errors import ConfigurationError, IndexCorruptError, IndexMismatchError
from lightning_fastif.functional.batch import fetch
from lightning_fastif.functional.params import dataset_fingerprint, fingerprint
from lightning_fastif.retrieval.factory import make_index
from lightning_fastif.retrieval.gradients.search import BuiltGradientIndex, GradientIndex
from lightning_fastif.retrieval.gradients.sketcher import DEFAULT_DIM, GradientSketcher
from lightning_fastif.retrieval.index import CandidateIndex

__all__ = ["build_gradient_index", "load_gradient_index", "save_gradient_index"]


def _fp16_factory(factory: str) -> str:
    """The FAISS factory storing the same index's vectors as float16 (scalar quantiser ``SQfp16``)."""
    if factory == "Flat":
        return "SQfp16"
    if factory.endswith(",Flat"):
        return factory[: -len("Flat")] + "SQfp16"
    if re.fullmatch(r"HNSW\d+", factory):
        return factory + "_SQfp16"
    if "SQfp16" in factory:
        return factory
    raise ConfigurationError(
        f"Expected `index_factory` to be Flat, IVF<n>,Flat or HNSW<m> with float16=True (stored as SQfp16), but got "
        f"{factory!r}. Pass a FAISS factory string with its own encoding and float16=False."
    )


def build_gradient_index(
    model: nn.Module,
    dataset: Any,
    loss: Any,
    params: list[str] | None = None,
    method: str = "auto",
    dim: int = DEFAULT_DIM,
    seed: int = 0,
    kind: str = "gaussian",
    float16: bool = False,
    factory: str = "Flat",
    backend: str = "faiss",
    batch_size: int = 256,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    feature_layer: str | None = None,
    progress: bool = False,
    sketches: tuple[Tensor, Tensor | None, Tensor | None] | None = None,
    sketcher: GradientSketcher | None = None,
    **index_kwargs: Any,
) -> BuiltGradientIndex:
    """Sketch every training example's gradient (or take ``sketches`` already made) and index them by training id.

    Args:
        model, dataset, loss, params: the network, its training set (row i = id i), the per-example loss and the
            selected parameters, as ``InfluenceModule`` uses them.
        method, dim, seed, kind, feature_layer: see :class:`GradientSketcher`.
        float16: store the sketches as float16 (FAISS ``SQfp16``: half the size, inner products to ~1e-3).
        factory: FAISS factory string (``"Flat"`` exact MIPS, ``"IVF1024,Flat"``, ``"HNSW32"``), metric inner product.
        backend: ``"faiss"`` or ``"torch"`` (exact, float32 only).
        batch_size, collate_fn: how the training set is read.
        sketches: ``(sketches [N, D], head features or None, logits or None)`` computed already (under DDP).
        sketcher: a :class:`GradientSketcher` to use instead of making one.
        **index_kwargs: ``nprobe``, ``ef_search``... (see ``retrieval.make_index``).

    Example:
        >>> from lightning_fastif.functional.losses import resolve_loss
        >>> built = build_gradient_index(net, train_ds, resolve_loss(net), dim=256)
        >>> built.candidates(s_test, k=100)[1].shape        # [Q, 100]
    """
    n = len(dataset)
    if n == 0:
        raise ConfigurationError("Expected `train_dataset` to hold at least one example, but it is empty.")
    if sketcher is None:
        first = fetch(dataset, list(range(min(2, n))), collate_fn)
        sketcher = GradientSketcher(model, loss, params, method, dim, seed, kind, feature_layer, first)
    x, feats, logits = sketches or sketcher.sketch_rows(dataset, None, batch_size, collate_fn, progress)
    if float16 and backend != "faiss":
        raise ConfigurationError(
            "Expected backend='faiss' with float16=True (SQfp16 codes), but got backend='torch'."
        )
    index = make_index(_fp16_factory(factory) if float16 else factory, backend, metric="ip", **index_kwargs)
    index.add(x, torch.arange(n, dtype=torch.long))
    meta = {
        "feature_layer": sketcher.layer,
        "dataset_length": n,
        "model_fingerprint": fingerprint(model),
        "dataset_fingerprint": dataset_fingerprint(dataset, read_all=True),
        "space": "gradients",
        "sketch": {**sketcher.settings(), "float16": bool(float16)},
    }
    head_grads = None
    if sketcher.method == "head" and f"{sketcher.layer}.bias" in sketcher.spec.names:
        head_grads = (
            x[:, -int(logits.shape[1]) :].clone() if logits is not None else None
        )  # the bias block is g
    return BuiltGradientIndex(index, sketcher, meta, feats, logits, head_grads, x)


def save_gradient_index(built: GradientIndex, dirpath: str | os.PathLike[str], overwrite: bool = True) -> Any:
    """Write a gradient index folder (atomic, fingerprinted: ``retrieval.store.save_index``); returns its IndexMeta."""
    from lightning_fastif.retrieval.store import save_index

    arrays = {}
    if built.features is not None and built.logits is not None:
        arrays = {"features": built.features, "logits": built.logits}
        if built.head_grads is not None:
            arrays["head_grads"] = built.head_grads
    return save_index(built.index, dirpath, built.meta, overwrite=overwrite, arrays=arrays)


def load_gradient_index(
    dirpath: str | os.PathLike[str],
    expected: Mapping[str, Any] | None = None,
    sketcher: GradientSketcher | None = None,
    mmap: bool = True,
    ignore_mismatch: bool = False,
) -> GradientIndex:
    """Read a gradient index folder, its stored vectors memory-mapped (FAISS backend), checked against its use.

    Args:
        dirpath: the folder written by :func:`save_gradient_index`.
        expected: as ``retrieval.store.load_index`` (``dataset_length``, ``model_fingerprint``...).
        sketcher: the sketcher of the model it is used with; its settings must equal the folder's (method,
            dimension, seed, kind, parameter names), else IndexMismatchError.
        mmap: memory-map the FAISS file (``IO_FLAG_MMAP_IFC``) instead of reading it into memory.
        ignore_mismatch: warn instead of raising on a fingerprint or length mismatch (never on the space).

    Raises:
        IndexMismatchError: a feature-space folder, other sketch settings, or what ``load_index`` refuses.
        IndexCorruptError: a missing, truncated or unreadable folder.
    """
    from lightning_fastif.retrieval import store

    want = {**dict(expected or {}), "space": "gradients"}
    folder = store._resolve(Path(dirpath))
    meta, _ = store._read_meta_and_verify(folder)
    if meta.space != "gradients" or not mmap or meta.backend != "faiss":
        index, meta = store.load_index(folder, expected=want, ignore_mismatch=ignore_mismatch)
    else:
        index = _load_faiss_mmap(folder, meta)
        _check_expected(meta, want, folder, ignore_mismatch)
    if sketcher is not None:
        mine = sketcher.settings()
        keys = ("method", "dim", "seed", "kind", "params", "layers")
        diffs = [
            f"{k}: the index has {meta.sketch.get(k)!r}, expected {mine[k]!r}"
            for k in keys
            if meta.sketch.get(k) != mine[k]
        ]
        if diffs:
            raise IndexMismatchError(
                f"The gradient index at {str(dirpath)!r} was sketched differently: {'; '.join(diffs)}. Rebuild it "
                "with these settings (`lightning-fastif index --space gradients`) or pass the folder's settings."
            )
    feats = logits = None
    head_grads = None
    if {"features", "logits"} <= set(meta.arrays):
        names = ["features", "logits"] + (["head_grads"] if "head_grads" in meta.arrays else [])
        arrays = store.load_arrays(folder, names)
        feats, logits, head_grads = arrays["features"], arrays["logits"], arrays.get("head_grads")
    return GradientIndex(index, sketcher, meta.to_dict(), feats, logits, head_grads)


def _load_faiss_mmap(folder: Path, meta: Any) -> CandidateIndex:
    from lightning_fastif.retrieval.faiss_index import FaissIndex

    ids = np.load(folder / "ids.npy", mmap_mode="r")
    try:
        index = FaissIndex.load(
            folder / meta.index_file, np.asarray(ids), meta.factory, mmap=True, **meta.params
        )
    except (RuntimeError, ValueError) as err:
        raise IndexCorruptError(f"The index at {str(folder)!r} cannot be read ({err}).") from err
    if index.ntotal != meta.ntotal or index.dim != meta.dim:
        raise IndexCorruptError(
            f"The index at {str(folder)!r} holds {index.ntotal} rows of dimension {index.dim}, but its meta.json "
            f"says {meta.ntotal} of dimension {meta.dim}."
        )
    return index


def _check_expected(meta: Any, want: dict[str, Any], folder: Path, ignore_mismatch: bool) -> None:
    import warnings

    from lightning_fastif.retrieval import store

    if meta.space != want.get("space", meta.space):
        raise IndexMismatchError(f"The index at {str(folder)!r} holds {meta.space}-space candidates.")
    diffs = [
        f"{k}: the index has {getattr(meta, k)!r}, expected {v!r}"
        for k, v in want.items()
        if k not in ("space", "dataset_fingerprint") and v is not None and getattr(meta, k) != v
    ]
    diffs += store._dataset_diffs(meta.dataset_fingerprint, want.get("dataset_fingerprint"))
    if diffs:
        msg = f"The gradient index at {str(folder)!r} was built from something else: {'; '.join(diffs)}."
        if not ignore_mismatch:
            raise IndexMismatchError(msg + " Rebuild it, or pass ignore_mismatch=True to use it anyway.")
        warnings.warn(msg, stacklevel=3)
