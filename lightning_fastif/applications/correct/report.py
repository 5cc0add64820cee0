"""The correction report: a summary table and inline-SVG line plots of accuracy per step, one self-contained file.

No scripts, no external assets: the plots are SVG written into the page, every piece of text is HTML-escaped.
"""

from __future__ import annotations

import datetime
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLOURS", "line_plot_svg", "render_correction_report", "write_correction_report"]

COLOURS = {"helpful": "#2da44e", "random": "#8c959f", "harmful": "#cf222e", "anchors": "#0969da"}
_FALLBACK = ["#8250df", "#bf8700", "#1b7c83", "#e16f24"]

_CSS = """
body{margin:0;padding:24px 32px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
background:#f4f5f7}h1{margin:0 0 4px;font-size:24px}h2{font-size:17px;margin:22px 0 8px}
.sub{color:#57606a;margin:2px 0}.card{background:#fff;border:1px solid #d0d7de;border-radius:10px;padding:14px 18px;
margin:14px 0}table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:4px 12px;border-bottom:1px solid #eaeef2;text-align:right}th:first-child,td:first-child{text-align:left}
th{color:#57606a;font-weight:600}.plots{display:flex;flex-wrap:wrap;gap:18px}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
details{color:#57606a;font-size:12px}pre{white-space:pre-wrap}footer{margin-top:24px;color:#8c959f;font-size:12px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _colour(name: str, i: int) -> str:
    return COLOURS.get(name, _FALLBACK[i % len(_FALLBACK)])


def _mean_std(runs: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    steps = len(runs[0]) if runs else 0
    means, stds = [], []
    for t in range(steps):
        vals = [r[t] for r in runs if r[t] is not None and not math.isnan(r[t])]
        m = sum(vals) / len(vals) if vals else float("nan")
        s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        means.append(m)
        stds.append(s)
    return means, stds


def line_plot_svg(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    *,
    xlabel: str = "step",
    ylabel: str = "accuracy",
    width: int = 460,
    height: int = 290,
) -> str:
    """An inline SVG line plot: one line per series (mean) with a shaded band (± std), y in [0, 1] as percent.

    Args:
        series: name -> (means per step, standard deviations per step).
        title: the plot's title.

    Returns:
        ``<svg ...>...</svg>`` text; each line has a ``<title>`` with its values (shown on hover).
    """
    left, right, top, bottom = 48, 110, 28, 36
    pw, ph = width - left - right, height - top - bottom
    n = max((len(m) for m, _ in series.values()), default=1)
    finite = [
        v for m, s in series.values() for v, d in zip(m, s) if not math.isnan(v) for v in (v - d, v + d)
    ]
    lo = max(0.0, math.floor(min(finite, default=0.0) * 10) / 10)
    hi = min(1.0, math.ceil(max(finite, default=1.0) * 10) / 10)
    if hi - lo < 0.1:
        lo, hi = max(0.0, lo - 0.05), min(1.0, hi + 0.05)
    span = hi - lo or 1.0

    def x(t: float) -> float:
        return left + (pw * t / (n - 1) if n > 1 else pw / 2)

    def y(v: float) -> float:
        return top + ph * (1.0 - (min(max(v, lo), hi) - lo) / span)

    out = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{_e(title)}" style="background:#fff">',
        f'<text x="{left}" y="16" font-size="13" font-weight="600">{_e(title)}</text>',
    ]
    for i in range(6):  # horizontal grid and y labels
        v = lo + span * i / 5
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eaeef2"/>')
        out.append(
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#57606a">{100 * v:.0f}%</text>'
        )
    for t in range(n):
        out.append(
            f'<text x="{x(t):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle" fill="#57606a">{t}</text>'
        )
    out.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 4}" font-size="11" text-anchor="middle" fill="#57606a">{_e(xlabel)}</text>'
    )
    out.append(
        f'<text transform="translate(12 {top + ph / 2:.1f}) rotate(-90)" font-size="11" text-anchor="middle" '
        f'fill="#57606a">{_e(ylabel)}</text>'
    )
    for i, (name, (means, stds)) in enumerate(series.items()):
        c = _colour(name, i)
        pts = [(t, m, s) for t, (m, s) in enumerate(zip(means, stds)) if not math.isnan(m)]
        if not pts:
            continue
        band = [f"{x(t):.1f},{y(m + s):.1f}" for t, m, s in pts] + [
            f"{x(t):.1f},{y(m - s):.1f}" for t, m, s in reversed(pts)
        ]
        out.append(
            f'<polygon class="band" points="{" ".join(band)}" fill="{c}" fill-opacity="0.12" stroke="none"/>'
        )
        line = " ".join(f"{x(t):.1f},{y(m):.1f}" for t, m, _ in pts)
        values = ", ".join(f"{100 * m:.1f}±{100 * s:.1f}%" for _, m, s in pts)
        out.append(
            f'<polyline class="series" data-name="{_e(name)}" points="{line}" fill="none" stroke="{c}" '
            f'stroke-width="2.2"><title>{_e(name)}: {_e(values)}</title></polyline>'
        )
        for t, m, s in pts:
            out.append(
                f'<circle cx="{x(t):.1f}" cy="{y(m):.1f}" r="3" fill="{c}"><title>{_e(name)}, step {t}: '
                f"{100 * m:.1f}% ± {100 * s:.1f}%</title></circle>"
            )
        ly = top + 14 + 18 * i
        out.append(f'<rect x="{left + pw + 12}" y="{ly - 9}" width="12" height="4" fill="{c}"/>')
        out.append(f'<text x="{left + pw + 30}" y="{ly - 4}" font-size="12">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _pc(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def render_correction_report(result: Any, title: str = "Error correction") -> str:
    """The HTML text of :func:`write_correction_report`."""
    rows = result.rows()
    s = result.settings
    head = (
        f"<p class='sub'>Slice <b>{_e(result.slice)}</b>: {len(result.slice_ids)} test examples, "
        f"held out per seed: {len(result.heldout[0]) if result.heldout else 0}; examples drawn from "
        f"<b>{_e(result.pool)}</b> ({result.pool_size}); {s.get('steps')} SGD steps (lr {s.get('lr')}) of "
        f"{s.get('examples_per_step')} examples for {s.get('anchors_per_step')} anchors; seeds {_e(s.get('seeds'))}; "
        f"solver {_e(s.get('solver'))}, parameters {_e(s.get('params') or 'all trainable')}, candidates "
        f"{_e(s.get('num_candidates') or 'whole pool')} per anchor.</p>"
    )
    table = [
        "<table><tr><th>method</th><th>held-out slice before</th><th>after (mean)</th><th>± std</th>"
        "<th>gain</th><th>whole test before</th><th>after (mean)</th><th>± std</th><th>seconds</th></tr>"
    ]
    for r in rows:
        table.append(
            f"<tr><td><span class='sw' style='background:{_colour(r['method'], 0)}'></span>{_e(r['method'])}</td>"
            f"<td>{_pc(r['slice_before'])}</td><td><b>{_pc(r['slice_after'])}</b></td><td>{_pc(r['slice_after_std'])}</td>"
            f"<td>{_pc(r['slice_gain'])}</td><td>{_pc(r['test_before'])}</td><td>{_pc(r['test_after'])}</td>"
            f"<td>{_pc(r['test_after_std'])}</td><td>{r['seconds']:.1f}</td></tr>"
        )
    table.append("</table>")
    plots = []
    for what, label in (("slice", "held-out slice accuracy"), ("test", "whole test-set accuracy")):
        series = {m: _mean_std(c[what]) for m, c in result.curves.items()}
        plots.append(line_plot_svg(series, f"{label} (mean ± std over {len(s.get('seeds', []))} seeds)"))
    first = {m: sel[0] for m, sel in result.selected.items() if sel}
    detail = "\n".join(f"{m}: {steps}" for m, steps in first.items())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{_e(title)}</h1>",
            head,
            "<div class='card'><h2>Summary</h2>",
            *table,
            "</div><div class='card'><h2>Accuracy after each step</h2><div class='plots'>",
            *plots,
            "</div></div>",
            f"<div class='card'><details><summary>Examples stepped on (first seed; ids in {_e(result.pool)}, "
            "anchors: test ids)</summary>",
            f"<pre>{_e(detail)}</pre></details></div>",
            f"<footer>Generated by lightning_fastif on {_e(stamp)}.</footer></body></html>",
        ]
    )


def write_correction_report(
    result: Any, path: str | os.PathLike[str], title: str = "Error correction"
) -> Path:
    """Write the correction report of a :class:`~lightning_fastif.applications.correct.result.CorrectionResult`, atomically.

    Example:
        >>> write_correction_report(res, "outputs/correct/report.html")  # doctest: +SKIP
    """
    from lightning_fastif._files import atomic_write_text

    return atomic_write_text(path, render_correction_report(result, title))
