"""Make a candidate index by backend and FAISS factory string, or rebuild one from its bytes.

Kept apart from :mod:`~lightning_fastif.retrieval.index` (the contract and the exact torch index) so that the FAISS
implementation can build on the contract without an import circle.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.retrieval.faiss_index import FaissIndex
from lightning_fastif.retrieval.index import BACKENDS, ArrayLike, CandidateIndex, TorchIndex, _import_faiss

__all__ = ["index_from_bytes", "make_index"]


def make_index(factory: str = "Flat", backend: str = "faiss", **kwargs: Any) -> CandidateIndex:
    """A new empty candidate index.

    Args:
        factory: a FAISS index factory string (``"Flat"``, ``"IVF256,Flat"``, ``"HNSW32"``...). The torch
            backend is exact and takes only ``"Flat"``.
        backend: ``"faiss"`` (falls back to :class:`TorchIndex`, with a warning, when FAISS cannot be imported)
            or ``"torch"``.
        **kwargs: passed to the index class (``nprobe``, ``ef_search``, ``train_sample``, ``num_threads`` for
            FAISS; ``compute_dtype``, ``max_block`` for torch; ``dim`` for both).

    Raises:
        ConfigurationError: an unknown backend, or a factory the torch backend cannot do.

    Example:
        >>> make_index("Flat", backend="torch").factory
        'Flat'
    """
    if backend not in BACKENDS:
        raise ConfigurationError(f"Expected `backend` to be one of {BACKENDS}, but got {backend!r}.")
    if not isinstance(factory, str) or not factory.strip():
        raise ConfigurationError(
            f"Expected `factory` to be a FAISS index factory string, but got {factory!r}."
        )
    torch_kwargs = {k: v for k, v in kwargs.items() if k in ("dim", "compute_dtype", "max_block", "metric")}
    if backend == "torch":
        if factory != "Flat":
            raise ConfigurationError(
                f"Expected `factory` to be 'Flat' with backend='torch' (exact search), but got {factory!r}. "
                "Use backend='faiss' for approximate indexes."
            )
        return TorchIndex(**torch_kwargs)
    try:
        _import_faiss()
    except ImportError as err:
        warnings.warn(
            f"FAISS cannot be imported ({err}); using the exact torch index instead of {factory!r}. "
            "Install faiss-cpu for fast search.",
            stacklevel=2,
        )
        return TorchIndex(**torch_kwargs)
    return FaissIndex(factory, **kwargs)


def index_from_bytes(
    data: bytes,
    backend: str,
    factory: str = "Flat",
    ids: ArrayLike | None = None,
    config: dict[str, Any] | None = None,
) -> CandidateIndex:
    """Rebuild an index from :meth:`CandidateIndex.to_bytes`, its backend, factory string and :meth:`config`."""
    config = dict(config or {})
    if backend == "torch":
        return TorchIndex.from_bytes(data, ids, **config)
    if backend == "faiss":
        return FaissIndex.from_bytes(data, ids, factory=factory, **config)
    raise ConfigurationError(f"Expected `backend` to be one of {BACKENDS}, but got {backend!r}.")
