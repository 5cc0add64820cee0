"""The candidate index: k nearest training examples of a query in feature space (squared L2).

Shape contract, for every implementation:

- ``add(features [N, d] float32, ids [N] int64)``: ids are non-negative and unique (positions in the training
  set); ``None`` numbers the rows after the largest id so far (``0 .. N-1`` for a fresh index).
- ``search(queries [Q, d], k) -> (distances [Q, k] float32, ids [Q, k] int64)``, torch tensors on the CPU, nearest
  first; distances are squared L2 and every id is a real one (an approximate index that finds fewer than ``k``
  neighbours for a query searches that query again exhaustively).
- Inputs may be tensors or numpy arrays of any real dtype; they are converted to float32 on the CPU. Non-2-D
  inputs, a wrong ``d``, NaN or infinite values, empty queries and ``k`` outside ``[1, ntotal]`` are
  :class:`~lightning_fastif.errors.ConfigurationError`.

:class:`TorchIndex` is exact brute force in torch (the test oracle and the fallback without FAISS);
:class:`~lightning_fastif.retrieval.faiss_index.FaissIndex` is configured by a FAISS factory string.
"""

from __future__ import annotations

import abc
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fastif.errors import ConfigurationError

__all__ = ["BACKENDS", "CandidateIndex", "TorchIndex"]

BACKENDS = ("faiss", "torch")
ArrayLike = Tensor | np.ndarray


def check_matrix(x: Any, name: str, dim: int | None = None, allow_empty: bool = False) -> Tensor:
    """``x`` as a contiguous float32 CPU tensor ``[n, d]``, or a ConfigurationError naming ``name``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x if x.flags.writeable else x.copy())
    if not isinstance(x, Tensor):
        raise ConfigurationError(
            f"Expected `{name}` to be a tensor or numpy array [n, d], but got {type(x).__name__}."
        )
    if x.is_complex() or x.dtype == torch.bool:
        raise ConfigurationError(f"Expected `{name}` to hold real numbers, but got dtype {x.dtype}.")
    if x.dim() != 2:
        raise ConfigurationError(f"Expected `{name}` to have shape [n, d], but got shape {tuple(x.shape)}.")
    if x.shape[0] == 0 and not allow_empty:
        raise ConfigurationError(
            f"Expected `{name}` to have at least one row, but got shape {tuple(x.shape)}."
        )
    if dim is not None and x.shape[1] != dim:
        raise ConfigurationError(
            f"Expected `{name}` to have {dim} columns (the index dimension), but got shape {tuple(x.shape)}."
        )
    x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ConfigurationError(
            f"Expected `{name}` to be finite, but got NaN or infinite values in {bad.numel()} rows "
            f"(first: {bad[:5].tolist()})."
        )
    return x


def check_ids(ids: Any, n: int, start: int) -> np.ndarray:
    """``ids`` as an int64 numpy array ``[n]`` of unique non-negative values (``None``: ``start .. start+n-1``)."""
    if ids is None:
        return np.arange(start, start + n, dtype=np.int64)
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigurationError(f"Expected `ids` to be integers, but got dtype {arr.dtype}.")
    if arr.shape != (n,):
        raise ConfigurationError(
            f"Expected `ids` to have shape ({n},) (one per feature row), but got {arr.shape}."
        )
    arr = arr.astype(np.int64, copy=True)
    if n and arr.min() < 0:
        raise ConfigurationError(f"Expected `ids` to be non-negative, but got {int(arr.min())}.")
    if np.unique(arr).size != n:
        raise ConfigurationError("Expected `ids` to be unique, but got repeated values.")
    return arr


class CandidateIndex(abc.ABC):
    """A k-nearest-neighbour index over feature rows, with the shape contract of this module.

    Subclasses implement ``_add``, ``_search``, ``ntotal``, ``to_bytes`` and ``from_bytes``; this base class
    validates inputs and keeps the ids in insertion order.
    """

    backend: str = ""

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
            raise ConfigurationError(f"Expected `dim` to be a positive int or None, but got {dim!r}.")
        self._dim = dim
        self._ids = np.zeros(0, dtype=np.int64)

    @property
    def dim(self) -> int | None:
        """d, the feature dimension (None until the first ``add`` when not given)."""
        return self._dim

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Number of indexed rows."""

    @property
    @abc.abstractmethod
    def factory(self) -> str:
        """The FAISS factory string describing the index (``"Flat"`` for exact search)."""

    @property
    def ids(self) -> Tensor:
        """The ids of the indexed rows ``[ntotal]`` int64, in insertion order."""
        return torch.from_numpy(self._ids.copy())

    def config(self) -> dict[str, Any]:
        """Search settings to rebuild an equal index with :func:`index_from_bytes` (JSON types)."""
        return {}

    def add(self, features: ArrayLike, ids: ArrayLike | Sequence[int] | None = None) -> None:
        """Add rows ``features [N, d]`` with ``ids [N]`` (default: numbered after the largest id so far).

        Raises:
            ConfigurationError: a shape, dtype, value or id that breaks the contract; an id already indexed.
        """
        x = check_matrix(features, "features", self._dim, allow_empty=True)
        new = check_ids(ids, x.shape[0], int(self._ids.max()) + 1 if self._ids.size else 0)
        if x.shape[0] == 0:
            self._dim = self._dim or (int(x.shape[1]) or None)
            return
        if self._ids.size and np.intersect1d(self._ids, new).size:
            raise ConfigurationError("Expected `ids` to be new to the index, but some are already indexed.")
        self._dim = int(x.shape[1])
        self._add(x, new)
        self._ids = np.concatenate([self._ids, new])

    def search(self, queries: ArrayLike, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest indexed rows of each query.

        Args:
            queries: ``[Q, d]``, Q >= 1.
            k: neighbours per query, ``1 <= k <= ntotal``.

        Returns:
            ``(distances [Q, k] float32 squared L2, ids [Q, k] int64)``, nearest first.

        Raises:
            ConfigurationError: ``k`` out of range, or queries that break the contract.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= self.ntotal:
            raise ConfigurationError(
                f"Expected `k` to be an int in [1, ntotal={self.ntotal}] (the number of indexed rows), but got {k!r}."
            )
        q = check_matrix(queries, "queries", self._dim)
        distances, ids = self._search(q, int(k))
        return distances.to(torch.float32).contiguous(), ids.to(torch.int64).contiguous()

    @abc.abstractmethod
    def _add(self, features: Tensor, ids: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]: ...

    @abc.abstractmethod
    def to_bytes(self) -> bytes:
        """The backend's own serialisation (a FAISS index file, or a torch.save of the features and ids)."""

    @classmethod
    @abc.abstractmethod
    def from_bytes(cls, data: bytes, ids: ArrayLike | None = None, **config: Any) -> CandidateIndex:
        """The index serialised by :meth:`to_bytes`, with the search settings of :meth:`config`."""

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_bytes` to the file ``path`` (not atomic: see ``retrieval.store`` for that)."""
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], ids: ArrayLike | None = None, **config: Any
    ) -> CandidateIndex:
        """Read a file written by :meth:`save`."""
        return cls.from_bytes(Path(path).read_bytes(), ids, **config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(factory={self.factory!r}, dim={self.dim}, ntotal={self.ntotal})"


class TorchIndex(CandidateIndex):
    """Exact brute-force squared-L2 search in torch, chunked over queries and database rows.

    Args:
        dim: feature dimension (default: taken from the first ``add``).
        compute_dtype: dtype of the distance computation; ``torch.float64`` makes it an oracle for tests.
        max_block: the most distance entries (query rows x database rows) held at once, bounding memory.
        metric: ``"l2"`` (squared L2, nearest first) or ``"ip"`` (inner product, largest first).

    Example:
        >>> index = TorchIndex()
        >>> index.add(torch.eye(3))
        >>> index.search(torch.eye(3)[:1], k=2)[1]
        tensor([[0, 1]])
    """

    backend = "torch"

    def __init__(
        self,
        dim: int | None = None,
        compute_dtype: torch.dtype = torch.float32,
        max_block: int = 1 << 22,
        metric: str = "l2",
    ) -> None:
        super().__init__(dim)
        if metric not in ("l2", "ip"):
            raise ConfigurationError(f"Expected `metric` to be 'l2' or 'ip', but got {metric!r}.")
        self.metric = metric
        if compute_dtype not in (torch.float32, torch.float64):
            raise ConfigurationError(
                f"Expected `compute_dtype` to be float32 or float64, but got {compute_dtype}."
            )
        if isinstance(max_block, bool) or not isinstance(max_block, int) or max_block <= 0:
            raise ConfigurationError(f"Expected `max_block` to be a positive int, but got {max_block!r}.")
        self.compute_dtype = compute_dtype
        self.max_block = max_block
        self._chunks: list[Tensor] = []
        self._features: Tensor | None = None

    @property
    def ntotal(self) -> int:
        return int(self._ids.size)

    @property
    def factory(self) -> str:
        return "Flat"

    @property
    def features(self) -> Tensor:
        """The indexed rows ``[ntotal, d]`` float32, in insertion order."""
        if self._chunks:
            parts = ([self._features] if self._features is not None else []) + self._chunks
            self._features, self._chunks = torch.cat(parts), []
        if self._features is None:
            return torch.zeros(0, self._dim or 0)
        return self._features

    def _add(self, features: Tensor, ids: np.ndarray) -> None:
        self._chunks.append(features.clone())

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        db = self.features.to(self.compute_dtype)
        db_sq = (db * db).sum(1)
        all_ids = torch.from_numpy(self._ids)
        q_block = max(1, min(queries.shape[0], self.max_block // max(k, 1)))
        d_block = max(k, self.max_block // q_block)
        out_d, out_i = [], []
        for qs in range(0, queries.shape[0], q_block):
            q = queries[qs : qs + q_block].to(self.compute_dtype)
            q_sq = (q * q).sum(1, keepdim=True)
            best_d = torch.empty(q.shape[0], 0, dtype=self.compute_dtype)
            best_p = torch.empty(q.shape[0], 0, dtype=torch.int64)
            for ds in range(0, db.shape[0], d_block):
                chunk = db[ds : ds + d_block]
                if self.metric == "ip":  # the negated inner product, so that smallest is best either way
                    dist = -(q @ chunk.T)
                else:
                    dist = (q_sq - 2.0 * (q @ chunk.T) + db_sq[ds : ds + d_block]).clamp_min_(0.0)
                pos = torch.arange(ds, ds + chunk.shape[0]).expand(q.shape[0], -1)
                cand_d, cand_p = torch.cat([best_d, dist], 1), torch.cat([best_p, pos], 1)
                best_d, sel = torch.topk(cand_d, min(k, cand_d.shape[1]), dim=1, largest=False, sorted=True)
                best_p = torch.gather(cand_p, 1, sel)
            out_d.append(-best_d if self.metric == "ip" else best_d)
            out_i.append(all_ids[best_p])
        return torch.cat(out_d), torch.cat(out_i)

    def config(self) -> dict[str, Any]:
        config = {
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "max_block": self.max_block,
        }
        return {**config, "metric": self.metric} if self.metric != "l2" else config

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"features": self.features, "ids": torch.from_numpy(self._ids)}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, ids: ArrayLike | None = None, **config: Any) -> TorchIndex:
        state = torch.load(io.BytesIO(data), weights_only=True)
        if "compute_dtype" in config and isinstance(config["compute_dtype"], str):
            config["compute_dtype"] = getattr(torch, config["compute_dtype"])
        index = cls(**config)
        index.add(state["features"], state["ids"] if ids is None else ids)
        return index


def _import_faiss() -> Any:
    import faiss

    return faiss
