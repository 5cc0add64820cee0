"""A candidate index backed by FAISS, configured by an index factory string (metric: squared L2).

FAISS is imported when a :class:`FaissIndex` is made, not when this package is imported.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fastif.errors import ConfigurationError, IndexCorruptError
from lightning_fastif.retrieval.index import ArrayLike, CandidateIndex, _import_faiss, check_ids

__all__ = ["FaissIndex"]


def _positive_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigurationError(f"Expected `{name}` to be a positive int or None, but got {value!r}.")
    return int(value)


class FaissIndex(CandidateIndex):
    """A FAISS index made by ``faiss.index_factory(d, factory, METRIC_L2)``.

    Indexes that cannot take ids (``Flat``, ``HNSW``...) are wrapped in ``IndexIDMap``. Indexes that need
    training (IVF, PQ) are trained on the first ``add`` (or a random sample of it). The FAISS thread count is set
    before every call (``num_threads``, default ``torch.get_num_threads()``).

    Args:
        factory: FAISS factory string, e.g. ``"Flat"`` (exact), ``"IVF256,Flat"``, ``"HNSW32"``, ``"IVF256,PQ16"``.
        nprobe: inverted lists visited per query by IVF indexes; default ``max(1, nlist // 8)``. More is slower and
            more exact; ``nlist`` is exhaustive.
        ef_search: HNSW search breadth; default 64; at least ``k`` is always used.
        train_sample: most vectors used to train (random rows of the first ``add``); default: all of them, up to
            256 per IVF list.
        dim: feature dimension (default: taken from the first ``add``).
        num_threads: FAISS OpenMP threads.
        seed: seed of the training sample.
        metric: ``"l2"`` (squared L2, nearest first; the feature index) or ``"ip"`` (inner product, largest first:
            ``METRIC_INNER_PRODUCT``, the gradient-sketch index's maximum-inner-product search).

    Example:
        >>> index = FaissIndex("Flat")
        >>> index.add(torch.eye(3))
        >>> index.search(torch.eye(3)[:1], k=2)[1]
        tensor([[0, 1]])
    """

    backend = "faiss"

    def __init__(
        self,
        factory: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        train_sample: int | None = None,
        dim: int | None = None,
        num_threads: int | None = None,
        seed: int = 0,
        metric: str = "l2",
    ) -> None:
        super().__init__(dim)
        if metric not in ("l2", "ip"):
            raise ConfigurationError(f"Expected `metric` to be 'l2' or 'ip', but got {metric!r}.")
        self.metric = metric
        if not isinstance(factory, str) or not factory.strip():
            raise ConfigurationError(
                f"Expected `factory` to be a FAISS index factory string, but got {factory!r}."
            )
        try:
            self._faiss = _import_faiss()
        except ImportError as err:
            raise ImportError(f"FaissIndex needs FAISS: pip install faiss-cpu ({err}).") from err
        self._factory = factory
        self.nprobe = _positive_or_none(nprobe, "nprobe")
        self.ef_search = _positive_or_none(ef_search, "ef_search")
        self.train_sample = _positive_or_none(train_sample, "train_sample")
        self.num_threads = _positive_or_none(num_threads, "num_threads")
        self.seed = int(seed)
        self._index: Any = None
        if dim is not None:
            self._index = self._build(dim)

    # --- construction -----------------------------------------------------------------------------------------

    def _build(self, dim: int) -> Any:
        faiss = self._faiss
        try:
            metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
            index = faiss.index_factory(int(dim), self._factory, metric)
        except RuntimeError as err:
            raise ConfigurationError(
                f"Expected `factory` to be a FAISS index factory string, but got {self._factory!r} "
                f"(FAISS says: {str(err).strip().splitlines()[-1] if str(err).strip() else err})."
            ) from err
        if not self._takes_ids(index):
            index = faiss.IndexIDMap(index)
        return index

    def _takes_ids(self, index: Any) -> bool:
        faiss = self._faiss
        return (
            isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2))
            or faiss.try_extract_index_ivf(index) is not None
        )

    @property
    def faiss_index(self) -> Any:
        """The underlying FAISS index (None until the dimension is known)."""
        return self._index

    @property
    def factory(self) -> str:
        return self._factory

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def nlist(self) -> int | None:
        """Number of inverted lists of an IVF index, else None."""
        ivf = None if self._index is None else self._faiss.try_extract_index_ivf(self._index)
        return None if ivf is None else int(ivf.nlist)

    def _hnsw(self) -> Any:
        index = self._index
        while index is not None:
            index = self._faiss.downcast_index(index)
            if hasattr(index, "hnsw"):
                return index.hnsw
            index = getattr(index, "index", None)
        return None

    def _threads(self) -> None:
        self._faiss.omp_set_num_threads(self.num_threads or torch.get_num_threads())

    def config(self) -> dict[str, Any]:
        return {
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "train_sample": self.train_sample,
            "seed": self.seed,
            **({"metric": self.metric} if self.metric != "l2" else {}),
        }

    # --- add and search ---------------------------------------------------------------------------------------

    def _train(self, x: np.ndarray) -> None:
        nlist = self.nlist
        limit = self.train_sample or (256 * nlist if nlist else x.shape[0])
        if x.shape[0] > limit:
            rows = np.sort(np.random.default_rng(self.seed).choice(x.shape[0], limit, replace=False))
            x = x[rows]
        try:
            self._index.train(x)
        except RuntimeError as err:
            raise ConfigurationError(
                f"Expected enough vectors to train the FAISS index {self._factory!r}, but got {x.shape[0]} "
                f"(FAISS says: {str(err).strip().splitlines()[-1]}). Add more rows at once, or use fewer lists."
            ) from err

    def _add(self, features: Tensor, ids: np.ndarray) -> None:
        if self._index is None:
            self._index = self._build(int(features.shape[1]))
        self._threads()
        x = np.ascontiguousarray(features.numpy(), dtype=np.float32)
        if not self._index.is_trained:
            self._train(x)
        self._index.add_with_ids(x, ids)

    def _set_search_params(self, k: int, exhaustive: bool = False) -> None:
        nlist = self.nlist
        if nlist is not None:
            nprobe = nlist if exhaustive else min(nlist, self.nprobe or max(1, nlist // 8))
            self._faiss.ParameterSpace().set_index_parameter(self._index, "nprobe", nprobe)
        hnsw = self._hnsw()
        if hnsw is not None:
            hnsw.efSearch = max(self.ntotal if exhaustive else (self.ef_search or 64), k)

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        self._threads()
        q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
        self._set_search_params(k)
        distances, ids = self._index.search(q, k)
        missing = np.flatnonzero((ids < 0).any(axis=1))
        if missing.size:  # an approximate index found fewer than k: search those queries exhaustively
            try:
                self._set_search_params(k, exhaustive=True)
                distances[missing], ids[missing] = self._index.search(q[missing], k)
            finally:
                self._set_search_params(k)
            if (ids < 0).any():
                raise ConfigurationError(
                    f"Expected the FAISS index {self._factory!r} to find k={k} neighbours per query, but it found "
                    "fewer even searching exhaustively. Use a smaller `k` or an exact 'Flat' index."
                )
        return torch.from_numpy(distances), torch.from_numpy(ids)

    # --- serialisation ----------------------------------------------------------------------------------------

    def _built(self) -> Any:
        if self._index is None:
            raise ConfigurationError(
                "Expected the index to know its dimension before serialising (add rows or pass `dim`), but got an "
                "empty index without one."
            )
        return self._index

    def to_bytes(self) -> bytes:
        return self._faiss.serialize_index(self._built()).tobytes()

    def _stored_ids(self) -> np.ndarray:
        faiss, index = self._faiss, self._index
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return faiss.vector_to_array(index.id_map).astype(np.int64)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:
            return np.arange(index.ntotal, dtype=np.int64)
        inv = ivf.invlists
        parts = [
            faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).astype(np.int64)
            for i in range(ivf.nlist)
            if inv.list_size(i)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index with ``faiss.write_index`` (a file FAISS tools read; not atomic, see ``store``)."""
        self._faiss.write_index(self._built(), os.fspath(path))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        ids: ArrayLike | None = None,
        factory: str = "Flat",
        mmap: bool = False,
        **config: Any,
    ) -> FaissIndex:
        """Read a file written by :meth:`save` (or ``faiss.write_index``); arguments as :meth:`from_bytes`.

        ``mmap=True`` memory-maps the stored vectors of flat-code indexes (``IO_FLAG_MMAP_IFC``: ``Flat``,
        ``SQfp16``, the storage of ``HNSW``) instead of reading them into memory (IVF lists are still read); the
        file must then stay in place while the index is used.
        """
        obj = cls(factory, **config)
        faiss = obj._faiss
        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
        try:
            index = faiss.read_index(os.fspath(path), flags)
        except RuntimeError as err:
            raise IndexCorruptError(f"Could not read a FAISS index from {os.fspath(path)!r}: {err}") from err
        return obj._adopt(index, ids)

    @classmethod
    def from_bytes(
        cls, data: bytes, ids: ArrayLike | None = None, factory: str = "Flat", **config: Any
    ) -> FaissIndex:
        """Read an index written by :meth:`to_bytes` (the bytes of a ``faiss.write_index`` file).

        Args:
            data: the serialised index.
            ids: the ids in insertion order; default: read from the index (in storage order for IVF).
            factory: the factory string it was built with.
            **config: search settings, as :meth:`config` returns them.

        Raises:
            IndexCorruptError: the bytes are not a FAISS index, or ``ids`` disagree with it.
        """
        obj = cls(factory, **config)
        try:
            index = obj._faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as err:
            raise IndexCorruptError(f"Could not read a FAISS index from {len(data)} bytes: {err}") from err
        return obj._adopt(index, ids)

    def _adopt(self, index: Any, ids: ArrayLike | None) -> FaissIndex:
        self._index, self._dim = index, int(index.d)
        if not self._takes_ids(index):
            raise IndexCorruptError(
                f"Expected a FAISS index that stores ids, but got {type(index).__name__}."
            )
        stored = self._stored_ids()
        if ids is not None:
            given = check_ids(ids, len(ids), 0)
            if given.size != stored.size or not np.array_equal(np.sort(given), np.sort(stored)):
                raise IndexCorruptError(
                    f"Expected the ids file to list the {stored.size} ids stored in the FAISS index, but it lists "
                    f"{given.size} ids that differ."
                )
            stored = given
        self._ids = stored
        return self
