"""``InfluenceStrategy``: Lightning's DDP with every collective lightning_fastif needs (DESIGN section 5).

Two ways to split the work of ``trainer.predict(InfluenceModule)`` over W processes:

- ``shard="candidates"`` (default, FastIF's design, right for a handful of queries): every rank receives the same
  query batch (the strategy hands Lightning's predict sampler one replica, so queries are not split); LiSSA chain c
  runs on rank c mod W, Exact and CG split their passes over the training set, and the partial sums are all-reduced,
  so s_test equals the one-process s_test up to float summation order; the candidates of each query are split
  across ranks, and the per-rank top-k lists are gathered and merged on every rank (rank 0 writes).
- ``shard="queries"`` (many queries): Lightning's usual non-repeating predict sampler gives each rank different
  queries; each rank runs the one-process math on its own, with no collective inside ``predict_step`` (ranks may get
  different numbers of batches).

A rank that raises tears its process group down, so ranks waiting in a collective fail at once with a
:class:`~lightning_fastif.errors.DistributedError` instead of hanging; a rank that stalls is caught by the collective
``timeout`` (120 s by default). No process outlives a failure by more than ``timeout`` plus a bound: when rank 0
fails it stops the ranks it launched (``SIGUSR2``, which raises a ``DistributedError`` in them, then ``SIGKILL``
after :data:`STOP_GRACE_S`), and a rank whose launcher died stops itself. A rendezvous that times out (a rank never
started, a wrong ``MASTER_ADDR``/``MASTER_PORT``) is a ``DistributedError`` too, bounded by ``connect_timeout``.
Those timeouts, error messages and stop handling are helpers in :mod:`lightning_fastif.trainer._dist`.

Example:
    >>> trainer = pl.Trainer(strategy="ddp_influence", devices=2, accelerator="cpu", inference_mode=False)
    >>> trainer = pl.Trainer(strategy=lf.InfluenceStrategy(shard="queries", timeout=300), devices=4, ...)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from lightning_fastif.errors import ConfigurationError, DistributedError
from lightning_fastif.trainer._dist import (
    DEFAULT_TIMEOUT_S,
    STOP_SIGNAL,
    TopK,
    _as_timeout,
    _fingerprint,
    collective_errors,
    rendezvous_error,
    start_launcher_watchdog,
    stop_handler,
    stop_processes,
)

__all__ = ["InfluenceStrategy"]

SHARD_MODES = ("candidates", "queries")


class InfluenceStrategy(DDPStrategy):
    """DDP for influence: shards each query's work (default) or the queries themselves over processes.

    Also available as ``Trainer(strategy="ddp_influence")`` (default settings). Holds every collective of the
    library; :class:`~lightning_fastif.InfluenceModule` and :class:`~lightning_fastif.FeatureIndexCallback` reach
    them through ``trainer.strategy``. With one process the same code runs without collectives.

    Args:
        shard: ``"candidates"`` (every rank gets the same queries; solver work and candidates are split; results
            equal one process) or ``"queries"`` (each rank explains different queries, with one-process math).
        timeout: seconds (or a ``timedelta``) any collective of the library may wait for the other ranks before
            raising a ``DistributedError``.
        connect_timeout: seconds the ranks may take to meet at start-up (the rendezvous, which waits for the other
            ranks' imports) and the timeout of Lightning's own collectives (fit); default: ``timeout``. With a
            different value the library's collectives run in a process group of their own with ``timeout``.
        start_method: ``"popen"`` (a script per rank, as ``torchrun`` does), ``"spawn"``, ``"fork"`` or
            ``"forkserver"``, as in ``DDPStrategy``.
        process_group_backend: ``"gloo"`` (default on CPU) or ``"nccl"`` (default on CUDA).
        **kwargs: anything else ``DDPStrategy`` takes (set by the Trainer: accelerator, devices, cluster env...).

    Example:
        >>> trainer = pl.Trainer(
        ...     strategy=InfluenceStrategy(shard="candidates", timeout=60), accelerator="cpu", devices=2,
        ...     inference_mode=False, callbacks=[lf.InfluenceWriter("outputs")],
        ... )
        >>> trainer.predict(im, DataLoader(queries, batch_size=8))
    """

    strategy_name = "ddp_influence"

    def __init__(
        self,
        shard: str = "candidates",
        timeout: float | timedelta = DEFAULT_TIMEOUT_S,
        start_method: str = "popen",
        connect_timeout: float | timedelta | None = None,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        if shard not in SHARD_MODES:
            raise ConfigurationError(f"Expected `shard` to be 'candidates' or 'queries', but got {shard!r}.")
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ConfigurationError(
                "Expected `start_method` to be 'popen', 'spawn', 'fork' or 'forkserver', but got "
                f"{start_method!r}."
            )
        collective = _as_timeout(timeout)
        connect = collective if connect_timeout is None else _as_timeout(connect_timeout, "connect_timeout")
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=connect,
            start_method=start_method,  # type: ignore[arg-type]
            **kwargs,
        )
        self.shard = shard
        self._collective_timeout = collective
        self._group: Any = None  # the library's process group (None: the default group)
        self._watchdog: threading.Event | None = None
        self._previous_handler: Any = None

    # ------------------------------------------------------------------------------------------- settings
    @property
    def timeout_s(self) -> float:
        """The collective timeout in seconds."""
        return self._collective_timeout.total_seconds()

    @property
    def connect_timeout_s(self) -> float:
        """The rendezvous timeout in seconds (also Lightning's own collectives')."""
        return self._timeout.total_seconds() if self._timeout is not None else float("inf")

    # ------------------------------------------------------------------------------------------- start and stop
    def setup_distributed(self) -> None:
        """Lightning's rendezvous, with a time-out that says what happened; then the library's process group and
        the stop handling of ranks other than 0."""
        try:
            super().setup_distributed()
        except RuntimeError as err:  # DistStoreError / DistNetworkError (both RuntimeErrors)
            raise rendezvous_error(err, self.world_size, self.global_rank, self.connect_timeout_s) from err
        if self.world_size < 2:
            return
        if self._collective_timeout != self._timeout:
            with self._collective("the creation of the library's process group"):
                self._group = dist.new_group(timeout=self._collective_timeout)
        if self.global_rank != 0:
            self._arm_stop()

    def _arm_stop(self) -> None:
        """On a rank other than 0: ``STOP_SIGNAL`` raises a ``DistributedError`` (sent by rank 0 when it fails),
        and a watchdog stops this process when its launcher is gone (``SIGKILL``-ed rank 0, a dead ``torchrun``)."""
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(
                STOP_SIGNAL, stop_handler(self.global_rank, self.timeout_s)
            )
        self._watchdog = start_launcher_watchdog()

    def _stop_launched_ranks(self) -> None:
        """Rank 0 of a ``popen`` launch: stop the ranks it started (``STOP_SIGNAL`` now, ``SIGKILL`` for those still
        running after :data:`STOP_GRACE_S`), so none outlives the failure. Rank 0's own error is not held up: the
        reaper is a non-daemon thread, so this process exits only once it is done."""
        stop_processes(getattr(self.launcher, "procs", None))

    def teardown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.set()
            self._watchdog = None
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(Exception):
                signal.signal(STOP_SIGNAL, self._previous_handler)
            self._previous_handler = None
        if self._group is not None and self._active():
            with contextlib.suppress(Exception):
                dist.destroy_process_group(self._group)
        self._group = None
        super().teardown()

    def _stage(self) -> TrainerFn | None:
        module = self._lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        return trainer.state.fn if trainer is not None else None

    @property
    def shards_candidates(self) -> bool:
        """Whether influence work is split within each query (several processes, ``shard="candidates"``)."""
        return self.shard == "candidates" and self.world_size > 1

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Lightning's sampler settings; predict in ``shard="candidates"`` mode gets one replica (no query split)."""
        if self.shard == "candidates" and self._stage() == TrainerFn.PREDICTING:
            return {"num_replicas": 1, "rank": 0}
        return super().distributed_sampler_kwargs

    def influence_collectives(self) -> tuple[int, int, Any]:
        """``(rank, world size, all_reduce_sum)`` for the influence math; ``(0, 1, None)`` when queries are split.

        ``InfluenceModule`` hands these to the solvers (``TrainingCurvature``) and to candidate sharding.
        """
        if not self.shards_candidates:
            return 0, 1, None
        return self.global_rank, self.world_size, self.influence_all_reduce

    # ------------------------------------------------------------------------------------------- predict guards
    def on_predict_start(self) -> None:
        super().on_predict_start()
        if self.world_size < 2:
            return
        trainer = self.lightning_module.trainer
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, Sequence) else [loaders]
        for i, loader in enumerate(loaders):
            # the sampler that picks the queries sits in the batch sampler (Lightning wraps it to record indices)
            sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
            sampler = sampler if sampler is not None else getattr(loader, "sampler", None)
            if sampler is None:  # not a DataLoader: Lightning does not split it
                continue
            replicas = int(getattr(sampler, "num_replicas", 1))
            if self.shard == "candidates" and replicas > 1:
                raise ConfigurationError(
                    "Expected every rank to receive the same queries under InfluenceStrategy(shard='candidates'), "
                    f"but predict dataloader {i} has a {type(sampler).__name__} over {replicas} replicas. Remove "
                    "it (the strategy keeps queries unsplit) or use InfluenceStrategy(shard='queries')."
                )
            if self.shard == "queries" and replicas != self.world_size:
                raise ConfigurationError(
                    "Expected predict dataloader "
                    f"{i} to be split over the {self.world_size} ranks under InfluenceStrategy(shard='queries'), "
                    f"but its sampler ({type(sampler).__name__}) is not: every rank would explain every query. "
                    "Keep `Trainer(use_distributed_sampler=True)` (the default) and a map-style query dataset "
                    "(Lightning does not split iterable ones), or use shard='candidates'."
                )

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        """Check that every rank holds the same query batch (``shard="candidates"``), then run the step."""
        if self.shards_candidates and args:
            batch_idx = args[1] if len(args) > 1 and isinstance(args[1], int) else -1
            mine = _fingerprint(args[0], batch_idx)
            every = self._all_gather(mine, "the check that all ranks hold the same query batch")
            if not torch.allclose(every, mine.expand_as(every), rtol=1e-9, atol=0.0):
                raise DistributedError(
                    "Expected every rank to hold the same query batch under InfluenceStrategy(shard='candidates'), "
                    f"but the batches differ (per rank [batch_idx, elements, sum, weighted sum]: {every.tolist()}). "
                    "The predict data must be deterministic and unsplit; or use shard='queries'."
                )
        return super().predict_step(*args, **kwargs)

    def on_exception(self, exception: BaseException) -> None:
        """Tear the process group down so that ranks blocked in a collective with this one fail at once."""
        super().on_exception(exception)
        if self.global_rank != 0 and self._previous_handler is not None:
            # this rank is failing already: rank 0's stop signal must not replace its own error
            with contextlib.suppress(Exception):
                signal.signal(STOP_SIGNAL, signal.SIG_IGN)
            self._previous_handler = None  # kept ignored after teardown too: rank 0's reaper kills a lingerer
        if self._watchdog is not None:
            self._watchdog.set()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            self._group = None
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        if self.world_size > 1 and self.global_rank == 0:
            self._stop_launched_ranks()

    # ------------------------------------------------------------------------------------------- collectives
    def _collective(self, what: str) -> contextlib.AbstractContextManager[None]:
        """A ``DistributedError`` that says what to change when the collective ``what`` fails."""
        return collective_errors(what, self.global_rank, self.world_size, self.timeout_s)

    def _active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _all_gather(self, tensor: Tensor, what: str) -> Tensor:
        """``[W, *shape]``: ``tensor`` of every rank (same shape and dtype on all ranks)."""
        if not self._active():
            return tensor[None]
        device = tensor.device
        local = tensor.detach().to(self.root_device).contiguous()
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        with self._collective(what):
            dist.all_gather(out, local, group=self._group)
        return torch.stack(out).to(device)

    def influence_all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` over ranks (a new tensor; the input is not changed). gloo has no AVG: divide yourself."""
        if not self._active():
            return tensor
        device = tensor.device
        out = tensor.detach().to(self.root_device).clone().contiguous()
        with self._collective(f"all-reduce of a {tuple(tensor.shape)} tensor (s_test / curvature)"):
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self._group)
        return out.to(device)

    def gather_topk(self, local: TopK, top_k: int) -> list[TopK]:
        """Every rank's ``(helpful_ids, helpful_scores, harmful_ids, harmful_scores)``, each ``[Q, k_r]``.

        ``k_r = min(top_k, local candidates)`` may differ by rank: lists are padded to a common width for the
        collective and the padding is stripped again, so ``merge_topk`` of the result equals one pass over all
        candidates. Ids travel as float64 (exact below 2**53), scores keep their dtype on return.
        """
        h_ids, h_sc, x_ids, x_sc = local
        q = h_ids.shape[0]
        header = torch.tensor([q, h_ids.shape[1], x_ids.shape[1]], dtype=torch.float64)
        headers = self._all_gather(header, "the gather of per-rank top-k sizes").to(torch.long)
        if bool((headers[:, 0] != q).any()):
            raise DistributedError(
                "Expected every rank to rank candidates for the same number of queries, but got "
                f"{headers[:, 0].tolist()} (by rank): under InfluenceStrategy(shard='candidates') all ranks must "
                "call rank_candidates together with the same s_test."
            )
        width = max(1, int(headers[:, 1:].max()))
        payload = torch.full((4, q, width), float("nan"), dtype=torch.float64)
        for row, t in enumerate((h_ids, h_sc, x_ids, x_sc)):
            payload[row, :, : t.shape[1]] = t.detach().to("cpu", torch.float64)
        every = self._all_gather(payload, f"the gather of per-rank top-{top_k} lists")
        parts = []
        for r in range(every.shape[0]):
            kh, kx = int(headers[r, 1]), int(headers[r, 2])
            g = every[r]
            parts.append(
                (
                    g[0, :, :kh].to(device=h_ids.device, dtype=h_ids.dtype),
                    g[1, :, :kh].to(device=h_sc.device, dtype=h_sc.dtype),
                    g[2, :, :kx].to(device=x_ids.device, dtype=x_ids.dtype),
                    g[3, :, :kx].to(device=x_sc.device, dtype=x_sc.dtype),
                )
            )
        return parts

    def gather_features(
        self, features: Tensor, logits: Tensor | None, n: int
    ) -> tuple[Tensor, Tensor | None] | None:
        """Collect the features ``[n, d]`` (and logits ``[n, C]``) of a training set split ``rank::world`` on rank 0.

        Args:
            features: this rank's rows ``rank, rank + W, ...`` of the training set, ``[len(range(rank, n, W)), d]``.
            logits: the same rows' logits, or None (then None on every rank).
            n: the training set size.

        Returns:
            On rank 0 ``(features [n, d], logits [n, C] or None)`` in dataset order; None on other ranks.
        """
        world, rank = self.world_size, self.global_rank
        mine = len(range(rank, n, world))
        if features.shape[0] != mine or (logits is not None and logits.shape[0] != mine):
            raise ConfigurationError(
                f"Expected rank {rank} to hold the {mine} rows {rank}::{world} of {n} training examples, but got "
                f"{features.shape[0]} feature rows"
                + ("" if logits is None else f" and {logits.shape[0]} logit rows")
                + "."
            )
        if not self._active():
            return features, logits
        rows = -(-n // world)
        arrays = [features] if logits is None else [features, logits]
        out: list[Tensor | None] = []
        for a in arrays:
            padded = a.new_zeros((rows, *a.shape[1:]))
            padded[:mine] = a
            local = padded.to(self.root_device).contiguous()
            bucket = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
            with self._collective(f"the gather of training features to rank 0 ({n} rows)"):
                dist.gather(local, bucket, dst=0, group=self._group)
            if rank == 0 and bucket is not None:
                full = a.new_empty((n, *a.shape[1:]))
                for r, part in enumerate(bucket):
                    full[r::world] = part[: len(range(r, n, world))].to(a.device)
                out.append(full)
        if rank != 0:
            return None
        return out[0], (out[1] if logits is not None else None)  # type: ignore[return-value]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order, on every rank (small payloads: result records)."""
        if not self._active():
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective("gather of result records"):
            dist.all_gather_object(out, obj, group=self._group)
        return out

    def barrier(self, name: str | None = None) -> None:
        """Wait for every rank (bounded by ``timeout``; a failed rank raises a ``DistributedError`` here)."""
        with self._collective(f"barrier {name!r}" if name else "barrier"):
            if self._group is not None and self._active():
                dist.barrier(group=self._group)
            else:
                super().barrier(name)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank (use tensor collectives for large tensors)."""
        with self._collective(f"broadcast from rank {src}"):
            if self._group is not None and self._active():
                box = [obj]
                dist.broadcast_object_list(box, src, group=self._group)
                return box[0]
            return super().broadcast(obj, src)


def _register() -> None:
    # override=True: re-importing (importlib.reload, a notebook) must not raise "already present"
    StrategyRegistry.register(
        InfluenceStrategy.strategy_name,
        InfluenceStrategy,
        description="DDP for influence: s_test and candidates split across ranks, results equal to one process",
        override=True,
    )


_register()
