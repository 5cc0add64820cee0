"""The training objective's curvature: HVPs and Hessians of R(theta) = (1/N) sum_i L(z_i, theta) over a dataset.

``TrainingCurvature`` is what the solvers consume. It reads the training set in batches (full passes for Exact and
CG, random batches for LiSSA), optionally only a shard of it, and combines the shards with an injected
``all_reduce`` (identity in one process; the strategy supplies a real one under DDP). It imports torch only.

Its ``mode`` is the curvature C every solver inverts: ``"hessian"`` (the Hessian of the mean loss) or
``"gauss_newton"`` (``J^T (d^2 l/d o^2) J`` through the model's outputs, positive semi-definite for a convex loss
of the outputs, see :mod:`~lightning_fastif.functional.ggn`). ``"auto"`` computes like ``"hessian"`` and lets the
``auto`` solver pick. Dense matrices are built in tangent chunks so that their memory peak is bounded and known
in advance (:meth:`TrainingCurvature.dense_plan`).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.dataloader import default_collate

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import fetch, move_to
from lightning_fastif.functional.ggn import basis_rows, batch_ggn_vp
from lightning_fastif.functional.grads import Loss
from lightning_fastif.functional.hvp import add_batch_hessian, batch_hvp, saved_graph_bytes
from lightning_fastif.functional.params import ParamSpec

__all__ = ["CURVATURES", "DensePlan", "TrainingCurvature"]

CURVATURES = ("hessian", "gauss_newton", "auto")

DENSE_CHUNK_BUDGET = 256 * 2**20
"""Bytes of working memory a dense build may use for its tangent chunk (beyond the P x P matrix itself)."""

Progress = Callable[[str, int, int], None]


def _identity(t: Tensor) -> Tensor:
    return t


def _callable_name(fn: Any) -> str:
    from lightning_fastif.functional.params import callable_identity

    return callable_identity(fn)


class DensePlan:
    """How a dense ``[P, P]`` curvature will be built and what it will cost at its peak.

    Attributes:
        chunk_size: tangent columns per batched product.
        matrix_bytes: the ``P x P`` matrix.
        graph_bytes: the measured autograd graph of one batch (tensors saved for backward).
        build_peak_bytes: matrix + graph + one chunk's working memory.
        factor_peak_bytes: the factorisation's peak (three ``P x P`` matrices: the matrix, its factor, the inverse).
        peak_bytes: the larger of the two: what the guard compares with the limit.
    """

    def __init__(self, chunk_size: int, matrix_bytes: int, graph_bytes: int, per_vector_bytes: int) -> None:
        self.chunk_size = chunk_size
        self.matrix_bytes = matrix_bytes
        self.graph_bytes = graph_bytes
        self.per_vector_bytes = per_vector_bytes
        self.build_peak_bytes = matrix_bytes + graph_bytes + chunk_size * per_vector_bytes
        # measured: the matrix, the Cholesky factor, and cholesky_inverse's working copy (LU: matrix, LU, pivots)
        self.factor_peak_bytes = 3 * matrix_bytes
        self.peak_bytes = max(self.build_peak_bytes, self.factor_peak_bytes)

    def __repr__(self) -> str:
        return (
            f"DensePlan(chunk_size={self.chunk_size}, peak={self.peak_bytes / 2**30:.2f} GiB: matrix "
            f"{self.matrix_bytes / 2**30:.2f} GiB, graph {self.graph_bytes / 2**20:.1f} MiB, "
            f"{self.per_vector_bytes / 2**20:.2f} MiB per tangent)"
        )


class TrainingCurvature:
    """Curvature of the mean training loss at ``theta`` over ``dataset``.

    Args:
        loss: ``(params, batch) -> [B]`` per-example losses.
        theta: flat selected parameters ``[P]``.
        spec: how ``theta`` maps to named parameters.
        dataset: the map-style training dataset (position i = example i).
        batch_size: batch size of full passes.
        collate_fn: collate function (default: torch's ``default_collate``).
        rank, world_size: this process's shard of full passes (examples ``rank::world_size``).
        all_reduce: sums a tensor over processes (in place or returned); identity by default.
        progress: optional ``callback(stage, done, total)``.
        mode: ``"hessian"``, ``"gauss_newton"`` or ``"auto"`` (computes as ``"hessian"``; the auto solver may
            switch it with :meth:`with_mode`).
        state: the fingerprints of the model state and training data already computed by the caller
            (``{"model": fingerprint(model), "data": dataset_fingerprint(dataset)}``); computed when needed if not
            given. They enter :attr:`key`.
    """

    def __init__(
        self,
        loss: Loss,
        theta: Tensor,
        spec: ParamSpec,
        dataset: Dataset,
        batch_size: int = 256,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        progress: Progress | None = None,
        mode: str = "hessian",
        state: dict[str, Any] | None = None,
    ) -> None:
        if mode not in CURVATURES:
            raise ConfigurationError(
                f"Expected `curvature` to be 'hessian', 'gauss_newton' or 'auto', but got {mode!r}."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
        self.loss, self.theta, self.spec, self.dataset = loss, theta, spec, dataset
        self.num_examples = len(dataset)  # type: ignore[arg-type]
        if self.num_examples == 0:
            raise ConfigurationError(
                "Expected `train_dataset` to hold at least one example, but got an empty one."
            )
        self.batch_size = batch_size
        self._user_collate = collate_fn
        self.collate_fn = collate_fn or default_collate
        self.rank, self.world_size = rank, world_size
        self.all_reduce = all_reduce or _identity
        self.progress = progress
        self.mode = mode
        self._state = dict(state or {})
        self._key_box: dict[str, Any] = {}  # shared by with_mode copies: the state is hashed once
        self._split: Any = None
        if mode == "gauss_newton":
            self._split = self._loss_split()

    # ------------------------------------------------------------------ mode
    @property
    def kind(self) -> str:
        """The curvature actually computed: ``"hessian"`` or ``"gauss_newton"``."""
        return "gauss_newton" if self.mode == "gauss_newton" else "hessian"

    @property
    def model(self) -> Any:
        """The wrapped ``nn.Module`` (from the loss), or None."""
        return getattr(self.loss, "model", None)

    def can_split(self) -> bool:
        """Whether the loss can be written as a loss of the model's outputs (needed for Gauss-Newton)."""
        split = getattr(self.loss, "split", None)
        return callable(split) and split() is not None

    def _loss_split(self) -> Any:
        split = getattr(self.loss, "split", None)
        parts = split() if callable(split) else None
        if parts is None:
            source = getattr(self.loss, "source", type(self.loss).__name__)
            raise ConfigurationError(
                f"Expected a loss that is a function of the model's outputs for `curvature`='gauss_newton', but "
                f"got the {source} loss, which cannot be split into outputs and a loss of the outputs. Pass "
                "`loss_fn=callable(outputs, batch) -> [B]` (instead of a `per_example_loss` method), or use "
                "`curvature='hessian'`."
            )
        return parts

    def with_mode(self, mode: str) -> TrainingCurvature:
        """The same data and weights with another curvature ``mode`` (a shallow copy)."""
        other = copy.copy(self)
        if mode not in CURVATURES:
            raise ConfigurationError(
                f"Expected `curvature` to be 'hessian', 'gauss_newton' or 'auto', but got {mode!r}."
            )
        other.mode = mode
        other._split = other._loss_split() if mode == "gauss_newton" else None
        return other

    # ------------------------------------------------------------------ data
    def _to_device(self, batch: Any) -> Any:
        return move_to(batch, self.theta.device, self.theta.dtype)

    def shard_batches(self) -> Iterator[Any]:
        """This rank's share of one pass over the training set, in order."""
        ids = list(range(self.rank, self.num_examples, self.world_size))
        loader = DataLoader(Subset(self.dataset, ids), batch_size=self.batch_size, collate_fn=self.collate_fn)
        for batch in loader:
            yield self._to_device(batch)

    def random_batch(self, generator: torch.Generator, size: int) -> Any:
        """A batch of ``size`` examples drawn uniformly (with replacement) with ``generator``; all of them when
        ``size >= N``."""
        if size >= self.num_examples:  # a "batch" as large as the data set is the whole data set
            ids = list(range(self.num_examples))
        else:
            ids = torch.randint(self.num_examples, (size,), generator=generator).tolist()
        return self._to_device(fetch(self.dataset, ids, self._user_collate))

    def key_parts(self) -> dict[str, str]:
        """What the curvature depends on, one digest each: the selected weights, the whole model state (every
        parameter and buffer: frozen layers and BatchNorm statistics shape the curvature too), the training data
        (every in-memory byte, see :func:`~lightning_fastif.functional.params.dataset_fingerprint`), the loss
        (its source, ``loss_fn``, ``forward_fn`` and model object) and the selection (names, N, dataset object,
        world size)."""
        box = self._key_box
        if "parts" not in box:
            from lightning_fastif.functional.params import dataset_fingerprint, fingerprint

            theta = hashlib.sha256()
            theta.update(f"{self.theta.dtype}".encode())
            theta.update(
                memoryview(self.theta.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
            )
            model = self._state.get("model")
            if model is None and isinstance(self.model, torch.nn.Module):
                model = fingerprint(self.model)
            data = self._state.get("data")
            if data is None:
                data = dataset_fingerprint(self.dataset)
            identity = getattr(self.loss, "identity", None)
            loss = identity() if callable(identity) else _callable_name(self.loss)
            box["parts"] = {
                "weights": theta.hexdigest(),
                "model": str(model),
                "data": hashlib.sha256(repr(sorted(dict(data).items())).encode()).hexdigest(),
                "loss": loss,
                "selection": repr((self.spec.names, self.num_examples, id(self.dataset), self.world_size)),
            }
        return dict(box["parts"])

    @property
    def key(self) -> str:
        """Identifies everything a solver's cache depends on (:meth:`key_parts`) and the curvature kind: a cache key
        for factorisations, factors and eigenvalue estimates. A hex digest, with ``":gn"`` for Gauss-Newton."""
        box = self._key_box
        if "key" not in box:
            box["key"] = hashlib.sha256(repr(sorted(self.key_parts().items())).encode()).hexdigest()
        return box["key"] if self.kind == "hessian" else box["key"] + ":gn"

    # ------------------------------------------------------------------ curvature
    def _full_pass(self, stage: str, fn: Callable[[Any], Tensor]) -> Tensor:
        total: Tensor | None = None
        n_batches = -(-len(range(self.rank, self.num_examples, self.world_size)) // self.batch_size)
        for i, batch in enumerate(self.shard_batches()):
            part = fn(batch)
            total = part if total is None else total + part
            if self.progress is not None:
                self.progress(stage, i + 1, n_batches)
        if total is None:  # an empty shard still joins the collective
            raise RuntimeError("internal: empty shard must be handled by the caller")
        return total

    def _batch_product(self, batch: Any, vectors: Tensor, reduction: str) -> Tensor:
        if self.kind == "gauss_newton":
            outputs_fn, loss_of_outputs = self._split
            return batch_ggn_vp(outputs_fn, loss_of_outputs, self.theta, self.spec, batch, vectors, reduction)
        return batch_hvp(self.loss, self.theta, self.spec, batch, vectors, reduction=reduction)

    def hvp(self, vectors: Tensor) -> Tensor:
        """``C v`` over the whole training set for each row of ``vectors [Q, P]`` -> ``[Q, P]``."""
        out = torch.zeros_like(vectors)
        if self.rank < self.num_examples:
            out = self._full_pass("hvp", lambda b: self._batch_product(b, vectors, "sum"))
        out = self.all_reduce(out)
        return out / self.num_examples

    def batch_hvp(self, batch: Any, vectors: Tensor) -> Tensor:
        """``C_b v`` for one batch's mean loss."""
        return self._batch_product(batch, vectors, "mean")

    # ------------------------------------------------------------------ dense
    def _graph_bytes(self) -> int:
        """Measured bytes of the autograd graph of one full-size batch (what each tangent's product re-traverses)."""
        ids = list(range(min(self.batch_size, self.num_examples)))
        batch = self._to_device(fetch(self.dataset, ids, self._user_collate))
        with torch.enable_grad():
            t = self.theta.detach().requires_grad_(True)
            if self.kind == "gauss_newton":
                outputs_fn, _ = self._split
                _, nbytes = saved_graph_bytes(lambda: outputs_fn(self.spec.unflatten(t), batch))
                return 3 * nbytes  # the vjp's graph, a jvp's dual forward, and the pullback's intermediates

            def build() -> Tensor:
                (g,) = torch.autograd.grad(
                    self.loss(self.spec.unflatten(t), batch).sum(), t, create_graph=True
                )
                return g

            _, nbytes = saved_graph_bytes(build)
            return nbytes

    def dense_plan(self, budget_bytes: int = DENSE_CHUNK_BUDGET) -> DensePlan:
        """The chunk size and memory peak of :meth:`matrix`, measured on one batch (see :class:`DensePlan`).

        Each tangent of a chunk costs its row of the result, its input row, and one re-traversal of the batch's
        graph (counted at twice the graph's measured size). The chunk is the largest that fits ``budget_bytes``.
        """
        p, e = self.spec.numel, self.theta.element_size()
        graph = self._graph_bytes()
        per_vector = 2 * graph + 3 * p * e
        chunk = int(max(1, min(p, budget_bytes // max(1, per_vector))))
        return DensePlan(chunk, p * p * e, graph, per_vector)

    def matrix(self, chunk_size: int | None = None) -> Tensor:
        """Dense ``C [P, P]`` of the mean training loss (Hessian or Gauss-Newton, by ``mode``).

        Built into one preallocated matrix, ``chunk_size`` tangent columns at a time (default: the
        :meth:`dense_plan`'s), so the peak is the matrix plus one chunk's working memory.
        """
        p = self.spec.numel
        k = self.dense_plan().chunk_size if chunk_size is None else int(chunk_size)
        out = torch.zeros(p, p, dtype=self.theta.dtype, device=self.theta.device)
        if self.rank < self.num_examples:
            n_batches = -(-len(range(self.rank, self.num_examples, self.world_size)) // self.batch_size)
            for i, batch in enumerate(self.shard_batches()):
                if self.kind == "gauss_newton":
                    outputs_fn, loss_of_outputs = self._split
                    for at in range(0, p, k):
                        rows = basis_rows(at, min(k, p - at), p, self.theta)
                        out[at : at + rows.shape[0]] += batch_ggn_vp(
                            outputs_fn, loss_of_outputs, self.theta, self.spec, batch, rows, "sum"
                        )
                        del rows
                else:
                    add_batch_hessian(self.loss, self.theta, self.spec, batch, out, k, reduction="sum")
                if self.progress is not None:
                    self.progress("hessian" if self.kind == "hessian" else "gauss-newton", i + 1, n_batches)
        out = self.all_reduce(out)
        out /= self.num_examples
        return out

    def hessian(self) -> Tensor:
        """Dense ``C [P, P]`` (kept for callers of the first API; same as :meth:`matrix`)."""
        return self.matrix()
