"""Private helpers of :class:`~lightning_fastif.trainer.strategy.InfluenceStrategy`: timeouts, batch fingerprints, the
errors of failed collectives, and the stop handling that keeps no rank alive after a failure (DESIGN section 5: every
collective lives in the strategy and this module).

- A collective that raises (another rank failed, exited or stalled past ``timeout``) becomes a
  :class:`~lightning_fastif.errors.DistributedError` that says which and what to change (:func:`collective_errors`).
- A rank other than 0 raises a ``DistributedError`` on :data:`STOP_SIGNAL` (sent by rank 0 when it fails;
  :func:`stop_handler`), and a watchdog thread stops it when its launcher is gone (:func:`start_launcher_watchdog`).
- Rank 0 of a ``popen`` launch stops the ranks it started when it fails (:func:`stop_processes`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_fastif.errors import ConfigurationError, DistributedError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STOP_GRACE_S",
    "STOP_SIGNAL",
    "TopK",
    "collective_errors",
    "rendezvous_error",
    "start_launcher_watchdog",
    "stop_handler",
    "stop_processes",
]

DEFAULT_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
"""Seconds a rank stopped by rank 0's failure gets to raise its ``DistributedError`` and exit before ``SIGKILL``."""
STOP_SIGNAL = signal.SIGUSR2

TopK = tuple[Tensor, Tensor, Tensor, Tensor]


# ----------------------------------------------------------------------------------------------- settings and data
def _as_timeout(timeout: Any, name: str = "timeout") -> timedelta:
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(
            f"Expected `{name}` to be a positive number of seconds or a timedelta, but got {timeout!r}."
        )
    return timedelta(seconds=seconds)


def _tensor_leaves(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensor_leaves(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensor_leaves(item)


def _fingerprint(batch: Any, batch_idx: int) -> Tensor:
    """``[4]`` float64 summary of a batch (index, element count, sum, position-weighted sum) to compare ranks."""
    numel, total, weighted = 0, 0.0, 0.0
    for t in _tensor_leaves(batch):
        flat = torch.nan_to_num(t.detach().flatten().to(torch.float64), nan=0.0, posinf=1.0, neginf=-1.0)
        numel += flat.numel()
        total += float(flat.sum())
        weighted += float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()) / max(
            1, flat.numel()
        )
    return torch.tensor([float(batch_idx), float(numel), total, weighted], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- errors
def rendezvous_error(
    err: RuntimeError, world_size: int, rank: int, connect_timeout_s: float
) -> DistributedError:
    """The ``DistributedError`` of a rendezvous that failed with ``err`` (a ``DistStoreError`` / ``DistNetworkError``)."""
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return DistributedError(
        f"InfluenceStrategy: the {world_size} processes did not all meet at the rendezvous "
        f"({address}) within `connect_timeout` = {connect_timeout_s:g} s (rank {rank}, "
        f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}). A rank "
        "did not start or is still importing, or MASTER_ADDR/MASTER_PORT differ between ranks; raise it "
        "with InfluenceStrategy(connect_timeout=...) if start-up is just slow."
    )


@contextlib.contextmanager
def collective_errors(what: str, rank: int, world_size: int, timeout_s: float) -> Iterator[None]:
    """Turn a backend error of the collective ``what`` (gloo / NCCL, store) into a ``DistributedError``."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:  # gloo / NCCL errors (DistBackendError, DistStoreError are RuntimeErrors)
        if isinstance(err, getattr(dist, "DistStoreError", ())):
            raise DistributedError(
                f"InfluenceStrategy: {what} failed on rank {rank} of {world_size}: the ranks' "
                f"shared store timed out or its host (MASTER_ADDR {os.environ.get('MASTER_ADDR', '?')}:"
                f"{os.environ.get('MASTER_PORT', '?')}, rank 0) is gone; another rank failed or exited "
                f"(see its traceback). Store error: {err}"
            ) from err
        raise DistributedError(
            f"InfluenceStrategy: {what} failed on rank {rank} of {world_size}. Another rank "
            "raised or exited (see its traceback), or did not reach this collective within `timeout` = "
            f"{timeout_s:g} s (raise it with InfluenceStrategy(timeout=...) if ranks are just slow). "
            f"Backend error: {err}"
        ) from err


# ----------------------------------------------------------------------------------------------- stopping ranks
def stop_handler(rank: int, timeout_s: float) -> Callable[[int, Any], None]:
    """The ``STOP_SIGNAL`` handler of a rank other than 0: raise a ``DistributedError`` that says why."""

    def stop(signum: int, frame: Any) -> None:
        raise DistributedError(
            f"InfluenceStrategy: rank {rank} was stopped because rank 0 failed or its launcher exited (a rank "
            f"that does not reach a collective within `timeout` = {timeout_s:g} s fails them all; see rank 0's "
            "error)."
        )

    return stop


def start_launcher_watchdog() -> threading.Event:
    """Start a daemon thread that stops this process when its launcher is gone (``SIGKILL``-ed rank 0, a dead
    ``torchrun``): ``STOP_SIGNAL`` first, ``os._exit(1)`` after :data:`STOP_GRACE_S`. Set the returned event to
    end it."""
    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            if os.getppid() != parent:  # re-parented: the launcher died
                os.kill(os.getpid(), STOP_SIGNAL)
                if not done.wait(STOP_GRACE_S):
                    os._exit(1)
                return

    threading.Thread(target=watch, name="lightning_fastif-launcher-watchdog", daemon=True).start()
    return done


def stop_processes(launched: Any) -> None:
    """Stop the still-running ``subprocess.Popen`` ranks in ``launched`` (``STOP_SIGNAL`` now, ``SIGKILL`` for those
    still running after :data:`STOP_GRACE_S`). The caller's own error is not held up: the reaper is a non-daemon
    thread, so this process exits only once it is done."""
    procs = [p for p in launched or [] if isinstance(p, subprocess.Popen) and p.poll() is None]
    if not procs:
        return
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.send_signal(STOP_SIGNAL)
    deadline = time.monotonic() + STOP_GRACE_S

    def reap() -> None:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()

    threading.Thread(target=reap, name="lightning_fastif-stop-ranks", daemon=False).start()
