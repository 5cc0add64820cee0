"""The curvature's extreme eigenvalues, estimated once per model state and shared by every solver of a run.

``damping="auto"`` needs ``(lambda_min, lambda_max)`` of the curvature. Each estimate costs Lanczos products over
the whole training set (measured: 8-12% of a default solve on an MNIST MLP), so it is cached here, keyed by
:func:`spectrum_key`: every module, solver and query batch on the same model state, parameters, curvature, loss
and data reuses it. Pure torch; the cache is a small in-process dictionary (least recently used entries leave).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from lightning_fastif.functional.solvers.algorithms import auto_damping, lanczos_extremes

__all__ = ["Spectrum", "clear_spectrum_cache", "curvature_spectrum", "spectrum_key"]

_CACHE: OrderedDict[str, Spectrum] = OrderedDict()
_CACHE_SIZE = 32


@dataclass(frozen=True)
class Spectrum:
    """Lanczos estimates of a curvature's extreme eigenvalues.

    Attributes:
        lambda_min: smallest Ritz value (from inside the spectrum: at or above the true one).
        lambda_max: largest Ritz value (at or below the true one).
        products: curvature products the estimate cost (0 when it came from the cache).
        seconds: wall time of the estimate (0 from the cache).
        cached: whether it was reused.
    """

    lambda_min: float
    lambda_max: float
    products: int
    seconds: float
    cached: bool = False

    @property
    def damping(self) -> float:
        """``damping="auto"`` for this spectrum (:func:`auto_damping`)."""
        return auto_damping(self.lambda_min, self.lambda_max)


def spectrum_key(curvature: Any) -> str:
    """What the spectrum depends on, as one string: the curvature's own key (weights, selected names, data set,
    shard layout, Hessian or Gauss-Newton) plus the loss (its description and the model's class).

    The one place to extend when more of the problem must be told apart (a loss's settings, a data fingerprint).
    """
    loss = getattr(curvature, "loss", None)
    model = getattr(loss, "model", None)
    what = getattr(loss, "description", type(loss).__name__)
    return f"{curvature.key}|{what}|{type(model).__qualname__}"


def curvature_spectrum(curvature: Any, iters: int = 30, rtol: float = 1e-2) -> Spectrum:
    """``(lambda_min, lambda_max)`` of ``curvature`` (a :class:`TrainingCurvature`), from the cache when the same
    problem was estimated before in this process.

    Lanczos stops early once the damping it implies (:func:`auto_damping`) has changed by less than ``rtol``
    (relative) for two iterations in a row: the largest eigenvalue, which sets it on a positive semi-definite
    curvature, is found in a handful of products.

    Args:
        curvature: has ``hvp(V [k, P]) -> [k, P]``, ``theta [P]`` and ``key``.
        iters: most Lanczos products.
        rtol: relative change of the implied damping at which to stop (None or 0: run all ``iters``).
    """
    key = f"{spectrum_key(curvature)}|{iters}|{rtol}"
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return Spectrum(hit.lambda_min, hit.lambda_max, 0, 0.0, cached=True)
    start = time.perf_counter()
    count = [0]

    def matvec(v: Any) -> Any:
        count[0] += v.shape[0]
        return curvature.hvp(v)

    lo, hi = lanczos_extremes(matvec, curvature.theta, iters=iters, settle=rtol)
    out = Spectrum(lo, hi, count[0], time.perf_counter() - start)
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def clear_spectrum_cache() -> None:
    """Forget every cached estimate (tests; or after changing weights in place without a new state)."""
    _CACHE.clear()
