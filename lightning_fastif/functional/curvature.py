"""The training objective's curvature: HVPs and Hessians of R(theta) = (1/N) sum_i L(z_i, theta) over a dataset.

``TrainingCurvature`` is what the solvers consume. It reads the training set in batches (full passes for Exact and
CG, random batches for LiSSA), optionally only a shard of it, and combines the shards with an injected
``all_reduce`` (identity in one process; the strategy supplies a real one under DDP). It imports torch only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.dataloader import default_collate

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import fetch, move_to
from lightning_fastif.functional.grads import Loss
from lightning_fastif.functional.hvp import batch_hessian, batch_hvp
from lightning_fastif.functional.params import ParamSpec

__all__ = ["TrainingCurvature"]

Progress = Callable[[str, int, int], None]


def _identity(t: Tensor) -> Tensor:
    return t


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
    ) -> None:
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
        self._key: str | None = None

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

    @property
    def key(self) -> str:
        """Identifies (theta, dataset length, selected names): a cache key for factorisations."""
        if self._key is None:
            h = hashlib.sha256(self.theta.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            h.update(repr((self.spec.names, self.num_examples, id(self.dataset), self.world_size)).encode())
            self._key = h.hexdigest()
        return self._key

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

    def hvp(self, vectors: Tensor) -> Tensor:
        """``H v`` over the whole training set for each row of ``vectors [Q, P]`` -> ``[Q, P]``."""
        out = torch.zeros_like(vectors)
        if self.rank < self.num_examples:
            out = self._full_pass(
                "hvp", lambda b: batch_hvp(self.loss, self.theta, self.spec, b, vectors, reduction="sum")
            )
        out = self.all_reduce(out)
        return out / self.num_examples

    def hessian(self) -> Tensor:
        """Dense ``H [P, P]`` of the mean training loss."""
        p = self.spec.numel
        out = torch.zeros(p, p, dtype=self.theta.dtype, device=self.theta.device)
        if self.rank < self.num_examples:
            out = self._full_pass(
                "hessian", lambda b: batch_hessian(self.loss, self.theta, self.spec, b, reduction="sum")
            )
        out = self.all_reduce(out)
        return out / self.num_examples

    def batch_hvp(self, batch: Any, vectors: Tensor) -> Tensor:
        """``H_b v`` for one batch's mean loss."""
        return batch_hvp(self.loss, self.theta, self.spec, batch, vectors, reduction="mean")
