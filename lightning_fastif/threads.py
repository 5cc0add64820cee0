"""CPU threads for torch and FAISS, chosen so that a run does not depend on ``OMP_NUM_THREADS``.

torch starts one OpenMP thread per physical core. On a machine whose cores are already busy (other jobs, other
ranks) those threads spin-wait on each other: measured on a loaded 2-core machine, ``examples/python_api.py`` took
591 s with torch's default against 74 s with one thread. ``"auto"`` takes the cores this process may use
(``os.sched_getaffinity``) minus the ones already busy (the 1-minute load average), at least 1 and at most 4 (past 4
threads the small matrix products of influence scoring stop getting faster).

The CLI sets threads itself (``--threads auto``). From Python, :func:`guard_oversubscription` (called when an
``InfluenceModule`` is built) does the same once per process when nobody chose: if torch would use more threads than
there are free cores and neither ``OMP_NUM_THREADS`` nor :func:`set_num_threads` said otherwise, it lowers torch's
threads to :func:`default_threads` and says so in one line, with how to choose another count.
"""

from __future__ import annotations

import math
import os

from lightning_fastif.errors import ConfigurationError

__all__ = ["MAX_AUTO_THREADS", "default_threads", "guard_oversubscription", "set_num_threads"]

MAX_AUTO_THREADS = 4
_GUARDED = False  # guard_oversubscription acts at most once per process


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Cores not already busy, between 1 and :data:`MAX_AUTO_THREADS`.

    ``OMP_NUM_THREADS``, when set, wins (the user or a launcher chose).
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = _available_cores()
    busy = _load()
    free = math.floor(cores - busy + 0.5)
    return max(1, min(MAX_AUTO_THREADS, cores, free))


def set_num_threads(threads: int | str | None = "auto") -> int:
    """Set torch's and FAISS's CPU thread counts (and ``OMP_NUM_THREADS`` for processes started later).

    Args:
        threads: a positive int, or ``"auto"`` / ``None`` for :func:`default_threads`.

    Returns:
        The number of threads set.

    Example:
        >>> import lightning_fastif as lf
        >>> lf.set_num_threads()        # doctest: +SKIP
        2
    """
    if threads is None or threads == "auto":
        n = default_threads()
    elif isinstance(threads, str) and threads.strip().isdigit() and int(threads) > 0:
        n = int(threads)
    elif isinstance(threads, int) and not isinstance(threads, bool) and threads > 0:
        n = threads
    else:
        raise ConfigurationError(f"Expected `threads` to be a positive int or 'auto', but got {threads!r}.")
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:  # FAISS is optional for the torch backend
        pass
    os.environ["OMP_NUM_THREADS"] = str(n)  # DDP ranks started later (popen re-runs the script) inherit it
    return n


def guard_oversubscription() -> str | None:
    """Lower torch's CPU threads to :func:`default_threads` when they outnumber the free cores and nobody chose.

    Nobody chose means ``OMP_NUM_THREADS`` is unset (:func:`set_num_threads` and the CLI's ``--threads`` set it).
    Acts once per process; later calls do nothing.

    Returns:
        The one-line message that was logged when the thread count was lowered, else None.
    """
    global _GUARDED
    if _GUARDED:
        return None
    _GUARDED = True
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    import torch

    current, best = torch.get_num_threads(), default_threads()
    if current <= best:
        return None
    set_num_threads(best)
    message = (
        f"lightning_fastif: torch would use {current} CPU threads but only {best} of this machine's "
        f"{_available_cores()} cores are free (load {_load():.1f}): oversubscribed threads wait on each other "
        f"(measured 6x slower), so torch now uses {best}. To choose yourself, call lf.set_num_threads(n) or set "
        "OMP_NUM_THREADS before starting Python."
    )
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(message)
    return message


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
