"""The stochastic solver: :class:`LiSSASolver` (minibatch LiSSA with ``scale``/``depth`` tuning, presets, averaged
chains and advice when it does not converge).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.errors import ConfigurationError, SolverDivergenceError
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.solvers.algorithms import _power_iteration, lanczos_extremes, lissa
from lightning_fastif.functional.solvers.base import LISSA_SETTLED, MatVec, Solver, _check_number


class LiSSASolver(Solver):
    """FastIF's stochastic LiSSA recursion (DESIGN section 2), averaged over ``repeats`` independent chains.

    Args:
        damping: lambda > 0 for ``depth="auto"`` (>= 0 otherwise); the recursion uses ``d = damping / scale``.
        scale: s, must exceed the curvature's largest eigenvalue on every batch (else a
            :class:`SolverDivergenceError`), or ``"auto"``: power iteration on ``calibration_batches`` random
            batches of ``batch_size`` examples, the largest eigenvalue found times ``safety``, plus ``damping``.
        depth: recursion steps per chain, or ``"auto"``: the fewest steps with ``(1 - damping/scale)^depth <= 0.01``,
            at most ``max_depth`` (past it a clear error says to raise ``damping`` or ``max_depth``).
        repeats: independent chains; chain c draws its batches from a generator seeded by ``(seed, c)`` alone,
            so the result does not depend on how chains are spread over processes.
        batch_size: training examples per HVP batch.
        seed: base seed.
        max_depth: cap of ``depth="auto"``.
        safety: factor on the largest batch eigenvalue for ``scale="auto"``.
        calibration_batches: batches of ``scale="auto"``'s power iteration.
        strict: raise instead of warning when not converged.
        curvature: override the problem's curvature (see :class:`Solver`).

    FastIF's settings are :meth:`fastif_original` (``batch_size=128, depth=1000, repeats=1``) and
    :meth:`fastif_fast` (``batch_size=1, depth=1000, repeats=4``), both with "damp 5e-3, scale 1e4", i.e.
    ``damping=50, scale=1e4``.
    """

    name = "lissa"
    settled = LISSA_SETTLED

    def __init__(
        self,
        damping: float = 0.0,
        scale: float | str = 10.0,
        depth: int | str = 1000,
        repeats: int = 1,
        batch_size: int = 8,
        seed: int = 0,
        *,
        max_depth: int = 20_000,
        safety: float = 2.0,
        calibration_batches: int = 5,
        strict: bool = False,
        curvature: str | None = None,
    ) -> None:
        super().__init__(damping, strict=strict, curvature=curvature)
        if scale != "auto":
            _check_number("scale", scale, low=0.0, strict=True)
        if depth != "auto":
            _check_number("depth", depth, low=1, integer=True)
        _check_number("repeats", repeats, low=1, integer=True)
        _check_number("batch_size", batch_size, low=1, integer=True)
        _check_number("seed", seed, low=0, integer=True)
        _check_number("max_depth", max_depth, low=1, integer=True)
        _check_number("safety", safety, low=1.0)
        _check_number("calibration_batches", calibration_batches, low=1, integer=True)
        if depth == "auto" and not float(damping) > 0:
            raise ConfigurationError(
                f"Expected `damping` > 0 with depth='auto' (the recursion's slowest mode decays as "
                f"(1 - damping/scale)^depth), but got {damping!r}."
            )
        self.scale: float | str = scale if scale == "auto" else float(scale)
        self.depth: int | str = depth if depth == "auto" else int(depth)
        self.repeats, self.batch_size, self.seed = int(repeats), int(batch_size), int(seed)
        self.max_depth, self.safety, self.calibration_batches = (
            int(max_depth),
            float(safety),
            int(calibration_batches),
        )
        self._tuned: tuple[str, float, int, dict[str, Any]] | None = None

    @classmethod
    def fastif_original(cls, **overrides: Any) -> LiSSASolver:
        """FastIF's original s_test setting: damp 5e-3, scale 1e4 (``damping=50``), batch 128, depth 1000, 1 repeat.

        With ``damping = 50`` far above a trained network's largest eigenvalue, ``(H + 50 I)^-1 v ~ v / 50``: the
        ranking is nearly that of plain gradient similarity. Kept to reproduce the paper.
        """
        cfg: dict[str, Any] = {"damping": 50.0, "scale": 1e4, "depth": 1000, "repeats": 1, "batch_size": 128}
        return cls(**{**cfg, **overrides})

    @classmethod
    def fastif_fast(cls, **overrides: Any) -> LiSSASolver:
        """FastIF's fast s_test setting: damp 5e-3, scale 1e4 (``damping=50``), batch 1, depth 1000, 4 repeats."""
        cfg: dict[str, Any] = {"damping": 50.0, "scale": 1e4, "depth": 1000, "repeats": 4, "batch_size": 1}
        return cls(**{**cfg, **overrides})

    def config(self) -> dict[str, Any]:
        cfg = {
            "scale": self.scale,
            "depth": self.depth,
            "repeats": self.repeats,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }
        if self.depth == "auto":
            cfg["max_depth"] = self.max_depth
        return self._common(cfg)

    def chain_seed(self, chain: int) -> int:
        """The seed of chain ``chain``: a function of ``(seed, chain)`` only."""
        return (self.seed * 1_000_003 + 7919 * (chain + 1)) % (2**63 - 1)

    def tune(self, curvature: TrainingCurvature) -> tuple[float, int, dict[str, Any]]:
        """``(scale, depth, details)``: the settings used, resolving ``"auto"`` ones (cached per model state).

        ``scale="auto"``: 20 power-iteration steps on each of ``calibration_batches`` random batches of
        ``batch_size`` examples (drawn with a generator of their own, so the chains' batches are unchanged), the
        largest ``|eigenvalue|`` found times ``safety``, plus ``damping``. ``depth="auto"``: the fewest steps with
        ``(1 - damping/scale)^depth <= 0.01``.
        """
        curv = self._on(curvature)
        key = f"{curv.key}:{self.damping}:{self.scale}:{self.depth}:{self.batch_size}"
        if self._tuned is not None and self._tuned[0] == key:
            return self._tuned[1], self._tuned[2], self._tuned[3]
        details: dict[str, Any] = {}
        lam = float(self.damping)
        if self.scale == "auto":
            gen = torch.Generator().manual_seed(self.chain_seed(-7))
            tops = []
            for b in range(self.calibration_batches):
                batch = curv.random_batch(gen, self.batch_size)
                tops.append(_power_iteration(partial(curv.batch_hvp, batch), curv.theta, seed=b))
            # every rank draws the same calibration batches (same generator), so every rank gets the same scale
            top = max(tops)
            scale = self.safety * top + lam
            details.update({"batch_lambda_max": tops, "scale_chosen": scale})
        else:
            scale = float(self.scale)
        if self.depth == "auto":
            d = lam / scale
            need = math.ceil(math.log(LISSA_SETTLED) / math.log1p(-d)) if d < 1 else 1
            if need > self.max_depth:
                lam_needed = scale * (1 - LISSA_SETTLED ** (1 / self.max_depth))
                raise ConfigurationError(
                    f"LiSSA with depth='auto' needs {need:,} steps for (1 - damping/scale)^depth <= 0.01 "
                    f"(damping {lam:g}, scale {scale:.4g}), more than `max_depth` = {self.max_depth:,}. Raise "
                    f"`damping` to at least {lam_needed:.3g}, or raise `max_depth` to {need:,}, or use CGSolver / "
                    "solver='auto'."
                )
            depth = max(1, need)
            details["depth_chosen"] = depth
        else:
            depth = int(self.depth)
        self._tuned = (key, scale, depth, details)
        return scale, depth, details

    def _divergence_advice(self, curv: TrainingCurvature, scale: float) -> str:
        """Why LiSSA diverged: an indefinite damped curvature (no scale fixes it) or too small a ``scale``."""
        lo, hi = lanczos_extremes(curv.hvp, curv.theta, iters=30)
        return _lissa_advice(lo, hi, float(self.damping), scale, curv.kind)

    def solve(self, curvature: TrainingCurvature, vectors: Tensor) -> Tensor:
        curv = self._on(curvature)
        scale, depth, details = self.tune(curv)
        chains = list(range(curv.rank, self.repeats, curv.world_size))
        gens: dict[int, torch.Generator] = {}

        def sample_hvp(chain: int, _step: int) -> MatVec:
            if chain not in gens:
                gens[chain] = torch.Generator().manual_seed(self.chain_seed(chain))
            batch = curv.random_batch(gens[chain], self.batch_size)
            return lambda v: curv.batch_hvp(batch, v)

        progress = None
        if curv.progress is not None:
            report = curv.progress

            def progress(done: int, total: int) -> None:
                report("lissa", done, total)

        try:
            total, diag = lissa(sample_hvp, vectors, float(self.damping), scale, depth, chains, progress)
        except SolverDivergenceError as err:
            raise SolverDivergenceError(f"{err} {self._divergence_advice(curv, scale)}") from err
        total = curv.all_reduce(total)
        sumsq = curv.all_reduce(diag.extra.pop("_sumsq"))
        diag.extra.update(
            {"curvature": curv.kind, "damping": float(self.damping), "scale": scale, "depth": depth}
        )
        diag.extra.update(details)
        spread = _chain_spread(total, sumsq, self.repeats)
        diag.extra["chain_spread"] = spread if spread is not None else "not measured (repeats=1)"
        if spread is not None and spread >= LISSA_SETTLED:
            diag.converged = False
        self.damping_used = float(self.damping)
        self.diagnostics = diag
        remaining, step = diag.extra["damped_mode_remaining"], diag.extra["last_step_change"]
        if spread is not None and spread >= LISSA_SETTLED and remaining < LISSA_SETTLED:
            reason = (
                f"the {self.repeats} chains disagree: the standard error of their mean is {spread:.3g} of |s_test| "
                f"(>= {LISSA_SETTLED:g}; minibatch noise)"
            )
            advice = (
                f"Raise `batch_size` (now {self.batch_size}) or `repeats` (now {self.repeats}), or use CGSolver / "
                "solver='auto'."
            )
        elif remaining >= LISSA_SETTLED:
            reason = f"(1 - damping/scale)^depth = {remaining:.3g} >= {LISSA_SETTLED:g} of the slowest mode remains"
            advice = (
                f"Raise `depth` (now {depth}; or depth='auto') or `damping`, or use CGSolver / solver='auto'."
            )
        else:
            reason = (
                f"the last step changed the estimate by {step:.3g} >= {LISSA_SETTLED:g} (minibatch noise)"
            )
            advice = (
                f"Raise `batch_size` (now {self.batch_size}) or `repeats` (now {self.repeats}), or use CGSolver / "
                "solver='auto'."
            )
        self._report(advice, reason)
        return total / self.repeats


def _chain_spread(total: Tensor, sumsq: Tensor, repeats: int) -> float | None:
    """Largest relative standard error ``sqrt(var_c / R) / |mean|`` of the mean of ``R >= 2`` chains, or None."""
    if repeats < 2:
        return None
    mean = total / repeats
    mnorm2 = mean.pow(2).sum(-1)
    var = (sumsq / repeats - mnorm2).clamp_min(0) * repeats / (repeats - 1)  # sample variance (summed over P)
    se = (var / repeats).sqrt() / mnorm2.sqrt().clamp_min(torch.finfo(total.dtype).tiny)
    return float(se.max()) if se.numel() else 0.0


def _lissa_advice(lo: float, hi: float, damping: float, scale: float, kind: str) -> str:
    if damping + lo <= 0:
        need = -lo
        return (
            f"But the cause here is not `scale`: the {kind} is indefinite (Lanczos: lambda_min ~ {lo:.3g}, "
            f"lambda_max ~ {hi:.3g}) and `damping` = {damping:g} does not exceed -lambda_min, so the recursion has a "
            f"growing mode whatever the scale. Use `damping` > {need:.3g} (e.g. {max(2 * need, 1e-2 * hi):.3g}) or "
            "`curvature='gauss_newton'`; raising `scale` only slows the growth and leaves s_test wrong."
        )
    return (
        f"The damped {kind} is positive definite (Lanczos: lambda_min ~ {lo:.3g}, lambda_max ~ {hi:.3g}), so `scale` "
        f"= {scale:g} is below the largest eigenvalue of some minibatch: use scale='auto' or a larger `batch_size`."
    )
