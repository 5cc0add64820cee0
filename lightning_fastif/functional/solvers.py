"""Solvers of ``(H + damping * I) x = v``: dense exact (cached factorisation), conjugate gradient, and LiSSA.

Each solver class is a small settings object with a cache; the numbers come from the functions
:func:`conjugate_gradient` and :func:`lissa`, which take a plain matrix-vector product so they are tested against
``torch.linalg.solve`` on known matrices.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.errors import (
    ConfigurationError,
    NonFiniteError,
    SolverDivergenceError,
    SolverMemoryError,
)
from lightning_fastif.functional.curvature import TrainingCurvature

__all__ = [
    "CGSolver",
    "ExactSolver",
    "LiSSASolver",
    "Solver",
    "SolverDiagnostics",
    "conjugate_gradient",
    "lissa",
]

MatVec = Callable[[Tensor], Tensor]

LISSA_SETTLED = 1e-2
"""LiSSA's diagnostics call a chain settled when its last step changed the estimate by less than this fraction."""


@dataclass
class SolverDiagnostics:
    """What a solve did, as data: iterations, residual or estimate norms, time, convergence."""

    solver: str
    iterations: int = 0
    residual_norm: float | None = None
    estimate_norm: float | None = None
    converged: bool = True
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _check_number(name: str, value: Any, *, low: float, strict: bool = False, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if (
        isinstance(value, bool)
        or not ok_type
        or not math.isfinite(value)
        or value < low
        or (strict and value == low)
    ):
        kind = "an int" if integer else "a finite number"
        cmp = ">" if strict else ">="
        raise ConfigurationError(f"Expected `{name}` to be {kind} {cmp} {low:g}, but got {value!r}.")


# ---------------------------------------------------------------------------------------------- pure algorithms
def conjugate_gradient(
    matvec: MatVec, rhs: Tensor, damping: float = 0.0, max_iter: int = 100, tol: float = 1e-6
) -> tuple[Tensor, SolverDiagnostics]:
    """Solve ``(A + damping I) x = rhs`` for every row of ``rhs [Q, P]`` by conjugate gradient.

    Args:
        matvec: ``V [Q, P] -> A V`` row-wise, ``A`` symmetric positive (semi)definite.
        rhs: right-hand sides ``[Q, P]``.
        damping: added to the diagonal.
        max_iter: most iterations.
        tol: stop when every ``||r|| <= tol * ||rhs||``.

    Returns:
        ``x [Q, P]`` and diagnostics (iterations, largest relative residual, converged).
    """
    start = time.perf_counter()
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(-1)
    bnorm = rhs.norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    it = 0
    for _ in range(max_iter):
        active = rs.sqrt() > tol * bnorm
        if not bool(active.any()):
            break
        it += 1
        ap = matvec(p) + damping * p
        pap = (p * ap).sum(-1)
        if bool((pap[active] <= 0).any()):
            raise SolverDivergenceError(
                "CG met a direction of non-positive curvature: H + damping*I is not positive definite. "
                "Increase `damping` (for a network: 1e-3 to 1e-2 of the Hessian's scale) or use LiSSASolver."
            )
        alpha = torch.where(active, rs / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(-1)
        beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), torch.zeros_like(rs))
        p = r + beta[:, None] * p
        rs = rs_new
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(
                "Expected finite CG iterates, but got NaN or inf: check `damping` and the model."
            )
    rel = float((rs.sqrt() / bnorm).max())
    diag = SolverDiagnostics(
        "cg",
        iterations=it,
        residual_norm=rel,
        estimate_norm=float(x.norm(dim=-1).max()),
        converged=rel <= tol,
    )
    diag.seconds = time.perf_counter() - start
    return x, diag


def lissa(
    sample_hvp: Callable[[int, int], MatVec],
    rhs: Tensor,
    damping: float,
    scale: float,
    depth: int,
    chains: list[int],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, SolverDiagnostics]:
    """FastIF's LiSSA recursion, summed over the given chains (divide by the number of repeats afterwards).

    For each chain ``c``: ``h_0 = v``; ``h_j = v + (1 - d) h_{j-1} - H_j h_{j-1} / s`` with ``d = damping / s``
    and ``H_j = sample_hvp(c, j)`` the HVP of a fresh random batch; the chain's estimate is ``h_J / s``, which
    tends to ``(H + damping I)^{-1} v`` when ``s`` exceeds H's largest eigenvalue.

    Diagnostics: ``residual_norm`` is the largest relative change of the last step, ``||h_J - h_{J-1}|| / ||h_J||``;
    ``extra["damped_mode_remaining"]`` is ``(1 - d)^J``, the factor by which the slowest direction (a zero
    eigenvalue of H) has not yet converged. ``converged`` needs both below 1e-2: otherwise increase ``depth`` (to
    about ``5 scale / damping``) or ``damping``.

    Raises:
        SolverDivergenceError: the iterates become non-finite or grow past ``2 (j + 1) ||v||``, which a
            recursion of non-expansive steps cannot reach (each step adds at most ``|v|``); the message names
            `scale`.
    """
    start = time.perf_counter()
    d = damping / scale
    vnorm = rhs.norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    total = torch.zeros_like(rhs)
    done = 0
    last_step = 0.0
    for c in chains:
        h = rhs.clone()
        for j in range(1, depth + 1):
            h_prev = h
            h = rhs + (1.0 - d) * h - sample_hvp(c, j)(h) / scale
            hnorm = h.norm(dim=-1)
            if not bool(torch.isfinite(hnorm).all()) or bool((hnorm > 2.0 * (j + 1) * vnorm).any()):
                raise SolverDivergenceError(
                    f"LiSSA diverged at iteration {j} of chain {c} (|h| = {float(hnorm.max()):.3g} for |v| = "
                    f"{float(vnorm.max()):.3g}): `scale` = {scale:g} is smaller than the Hessian's largest "
                    "eigenvalue on some batches. Increase `scale` (try 10x), or use a larger `batch_size`."
                )
            done += 1
            if progress is not None:
                progress(done, depth * len(chains))
        total = total + h / scale
        # the last step's relative change: near 0 once the recursion has settled (minibatch noise keeps it above 0)
        last_step = max(last_step, float(((h - h_prev).norm(dim=-1) / hnorm.clamp_min(1e-30)).max()))
    diag = SolverDiagnostics(
        "lissa",
        iterations=depth * len(chains),
        residual_norm=last_step,
        # settled, and the slowest (damped) mode's remaining factor (1 - d)^J small: otherwise depth is too short
        converged=last_step < LISSA_SETTLED and (1.0 - d) ** depth < LISSA_SETTLED,
        estimate_norm=float((total / max(1, len(chains))).norm(dim=-1).max()) if chains else 0.0,
        extra={"chains": list(chains), "d": d, "damped_mode_remaining": (1.0 - d) ** depth},
    )
    diag.seconds = time.perf_counter() - start
    return total, diag


# ---------------------------------------------------------------------------------------------- solver classes
class Solver(abc.ABC):
    """Base class: solve ``(H + damping I) x = v`` on a :class:`TrainingCurvature`.

    ``solve(curvature, vectors [Q, P]) -> [Q, P]``; ``diagnostics`` holds the last solve's :class:`SolverDiagnostics`.
    """

    name = "solver"

    def __init__(self, damping: float = 0.0) -> None:
        _check_number("damping", damping, low=0.0)
        self.damping = float(damping)
        self.diagnostics: SolverDiagnostics | None = None

    @abc.abstractmethod
    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        """``(H + damping I)^{-1} v`` for each row of ``vectors [Q, P]`` -> ``[Q, P]``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def config(self) -> dict[str, Any]:
        """The constructor arguments, for records and reports."""
        return {"damping": self.damping}


class ExactSolver(Solver):
    """Dense ``(H + damping I)``, built over the whole training set and factorised once, cached per model state.

    Args:
        damping: lambda >= 0 (plays the role of L2 regularisation / weight decay).
        max_memory_gb: refuse (with a clear error) when the dense P x P matrix would exceed this.
    """

    name = "exact"

    def __init__(self, damping: float = 0.0, max_memory_gb: float = 2.0) -> None:
        super().__init__(damping)
        _check_number("max_memory_gb", max_memory_gb, low=0.0, strict=True)
        self.max_memory_gb = float(max_memory_gb)
        self._cache: tuple[str, Tensor, bool] | None = None  # (key, inverse or LU, positive definite)

    def config(self) -> dict[str, Any]:
        return {"damping": self.damping, "max_memory_gb": self.max_memory_gb}

    def factorise(self, curvature: TrainingCurvature) -> tuple[Tensor, bool]:
        """The (cached) inverse of ``H + damping I`` (from its Cholesky factor), or an LU factorisation when it is
        not positive definite."""
        key = f"{curvature.key}:{self.damping}"
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        p = curvature.spec.numel
        need_gb = 3 * p * p * curvature.theta.element_size() / 2**30
        if need_gb > self.max_memory_gb:
            raise SolverMemoryError(
                f"ExactSolver needs about {need_gb:.1f} GiB for {p:,} selected parameters (limit `max_memory_gb` = "
                f"{self.max_memory_gb:g}). Use CGSolver or LiSSASolver, or select fewer parameters with `params`."
            )
        h = curvature.hessian()
        h = 0.5 * (h + h.T) + self.damping * torch.eye(p, dtype=h.dtype, device=h.device)
        factor, info = torch.linalg.cholesky_ex(h)
        is_chol = int(info) == 0
        if is_chol:
            # keep the explicit inverse: a solve is then one matrix product, several times faster per query than
            # two triangular solves, at the same P x P memory
            factor = torch.cholesky_inverse(factor)
        else:
            lu, pivots = torch.linalg.lu_factor(h)
            factor = torch.cat([lu, pivots.to(lu.dtype)[None]], 0)
        self._cache = (key, factor, is_chol)
        return factor, is_chol

    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        start = time.perf_counter()
        cached = self._cache is not None and self._cache[0] == f"{curvature.key}:{self.damping}"
        factor, is_chol = self.factorise(curvature)
        if is_chol:
            x = vectors @ factor  # factor = (H + damping I)^-1, symmetric
        else:
            lu, pivots = factor[:-1], factor[-1].to(torch.int32)
            x = torch.linalg.lu_solve(lu, pivots, vectors.T).T
        self.diagnostics = SolverDiagnostics(
            "exact",
            iterations=1,
            estimate_norm=float(x.norm(dim=-1).max()) if x.numel() else 0.0,
            seconds=time.perf_counter() - start,
            extra={"positive_definite": is_chol, "cached_factorisation": cached},
        )
        return x


class CGSolver(Solver):
    """Conjugate gradient on full-training-set HVPs (one pass over the data per iteration).

    Args:
        damping: lambda >= 0.
        max_iter: most iterations.
        tol: relative residual at which to stop.
    """

    name = "cg"

    def __init__(self, damping: float = 0.0, max_iter: int = 100, tol: float = 1e-6) -> None:
        super().__init__(damping)
        _check_number("max_iter", max_iter, low=1, integer=True)
        _check_number("tol", tol, low=0.0, strict=True)
        self.max_iter, self.tol = int(max_iter), float(tol)

    def config(self) -> dict[str, Any]:
        return {"damping": self.damping, "max_iter": self.max_iter, "tol": self.tol}

    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        x, self.diagnostics = conjugate_gradient(
            curvature.hvp, vectors, self.damping, self.max_iter, self.tol
        )
        return x


class LiSSASolver(Solver):
    """FastIF's stochastic LiSSA recursion (DESIGN section 2), averaged over ``repeats`` independent chains.

    Args:
        damping: lambda >= 0; the recursion uses ``d = damping / scale``.
        scale: s, must exceed the Hessian's largest eigenvalue (else a :class:`SolverDivergenceError`).
        depth: recursion steps per chain.
        repeats: independent chains; chain c draws its batches from a generator seeded by ``(seed, c)`` alone,
            so the result does not depend on how chains are spread over processes.
        batch_size: training examples per HVP batch.
        seed: base seed.

    FastIF's settings: original = ``batch_size=128, depth=1000, repeats=1``; fast = ``batch_size=1, depth=1000,
    repeats=4``; their "damp 5e-3, scale 1e4" is ``damping=50, scale=1e4``.
    """

    name = "lissa"

    def __init__(
        self,
        damping: float = 0.0,
        scale: float = 10.0,
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(damping)
        _check_number("scale", scale, low=0.0, strict=True)
        _check_number("depth", depth, low=1, integer=True)
        _check_number("repeats", repeats, low=1, integer=True)
        _check_number("batch_size", batch_size, low=1, integer=True)
        _check_number("seed", seed, low=0, integer=True)
        self.scale, self.depth, self.repeats = float(scale), int(depth), int(repeats)
        self.batch_size, self.seed = int(batch_size), int(seed)

    def config(self) -> dict[str, Any]:
        return {
            "damping": self.damping,
            "scale": self.scale,
            "depth": self.depth,
            "repeats": self.repeats,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def chain_seed(self, chain: int) -> int:
        """The seed of chain ``chain``: a function of ``(seed, chain)`` only."""
        return (self.seed * 1_000_003 + 7919 * (chain + 1)) % (2**63 - 1)

    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        chains = list(range(curvature.rank, self.repeats, curvature.world_size))
        gens: dict[int, torch.Generator] = {}

        def sample_hvp(chain: int, _step: int) -> MatVec:
            if chain not in gens:
                gens[chain] = torch.Generator().manual_seed(self.chain_seed(chain))
            batch = curvature.random_batch(gens[chain], self.batch_size)
            return lambda v: curvature.batch_hvp(batch, v)

        progress = None
        if curvature.progress is not None:
            report = curvature.progress

            def progress(done: int, total: int) -> None:
                report("lissa", done, total)

        total, diag = lissa(sample_hvp, vectors, self.damping, self.scale, self.depth, chains, progress)
        total = curvature.all_reduce(total)
        self.diagnostics = diag
        return total / self.repeats
