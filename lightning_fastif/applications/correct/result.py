"""The result of error correction: accuracy curves and choices per (method, seed), their summary table, and
the per-step metrics sent to Lightning loggers.

Part of ``lightning_fastif.applications.correct``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["CorrectionResult"]


@dataclass
class CorrectionResult:
    """Curves and choices of every (method, seed) run.

    Attributes:
        slice: the slice description; ``slice_ids`` its positions in the test set.
        pool: which dataset the examples came from (``train`` or the pool's name); ``pool_size`` its length.
        settings: the loop's settings.
        curves: ``method -> {"slice": [seeds][steps + 1], "test": [seeds][steps + 1]}`` accuracies (step 0 is
            before any step).
        selected: ``method -> [seeds][steps][examples]`` the pool ids (``anchors``: test ids) stepped on.
        anchors: ``[seeds][steps][anchors]`` the anchors of each step (the same for every method).
        heldout: ``[seeds]`` the held-out slice ids of each seed.
        seconds: wall time per method.
    """

    slice: str
    slice_ids: list[int]
    pool: str
    pool_size: int
    settings: dict[str, Any]
    curves: dict[str, dict[str, list[list[float]]]]
    selected: dict[str, list[list[list[int]]]]
    anchors: list[list[list[int]]]
    heldout: list[list[int]]
    seconds: dict[str, float] = field(default_factory=dict)
    model: Any = field(
        default=None, repr=False
    )  # the corrected model (first seed, first method), not serialised

    def stats(self, method: str, what: str = "slice", step: int = -1) -> tuple[float, float]:
        """``(mean, standard deviation)`` over seeds of an accuracy at ``step`` (``-1``: the last)."""
        values = torch.tensor([run[step] for run in self.curves[method][what]], dtype=torch.float64)
        values = values[~values.isnan()]
        if values.numel() == 0:
            return float("nan"), float("nan")
        std = float(values.std(unbiased=True)) if values.numel() > 1 else 0.0
        return float(values.mean()), std

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per method: slice and test accuracy before and after, mean and std over seeds."""
        out = []
        for m in self.curves:
            s0, _ = self.stats(m, "slice", 0)
            s1, s1d = self.stats(m, "slice", -1)
            t0, _ = self.stats(m, "test", 0)
            t1, t1d = self.stats(m, "test", -1)
            out.append(
                {
                    "method": m,
                    "slice_before": s0,
                    "slice_after": s1,
                    "slice_after_std": s1d,
                    "slice_gain": s1 - s0,
                    "test_before": t0,
                    "test_after": t1,
                    "test_after_std": t1d,
                    "test_gain": t1 - t0,
                    "seeds": len(self.curves[m]["slice"]),
                    "seconds": self.seconds.get(m, float("nan")),
                }
            )
        return out

    def to_markdown(self) -> str:
        """The summary table in Markdown (accuracies in %, mean ± std over seeds)."""
        lines = [
            f"slice: {self.slice} ({len(self.slice_ids)} test examples), pool: {self.pool} ({self.pool_size}), "
            f"{self.settings.get('steps')} steps, {len(self.settings.get('seeds', []))} seeds",
            "",
            "| method | held-out slice acc. before → after (± std) | whole test acc. before → after (± std) |",
            "|---|---|---|",
        ]
        for r in self.rows():
            lines.append(
                f"| {r['method']} | {_pc(r['slice_before'])} → **{_pc(r['slice_after'])}** ± {_pc(r['slice_after_std'])} "
                f"| {_pc(r['test_before'])} → {_pc(r['test_after'])} ± {_pc(r['test_after_std'])} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        from lightning_fastif.results import _plain

        data = asdict(self)
        data.pop("model", None)
        data["summary"] = self.rows()
        return _plain(data)


def _pc(value: float) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"
    )


def _log(loggers: Sequence[Any], result: CorrectionResult) -> None:
    """Per-step mean accuracies to every logger, and the summary table to W&B loggers."""
    steps = result.settings["steps"]
    for logger in loggers:
        for t in range(steps + 1):
            metrics = {}
            for m, c in result.curves.items():
                for what in ("slice", "test"):
                    vals = [run[t] for run in c[what] if not math.isnan(run[t])]
                    if vals:
                        metrics[f"correct/{m}/{what}_acc"] = sum(vals) / len(vals)
            logger.log_metrics(metrics, step=t)
        if callable(getattr(logger, "log_table", None)) and type(logger).__name__ == "WandbLogger":
            rows = result.rows()
            cols = list(rows[0])
            logger.log_table(key="correction", columns=cols, data=[[r[c] for c in cols] for r in rows])
        logger.save()
