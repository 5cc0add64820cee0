"""A self-contained HTML report of influence results: one card per query with its most helpful and harmful examples.

The file has inline CSS only, no scripts and no external assets: images are embedded as base64 PNG data URIs and
every piece of text is HTML-escaped, so it can be mailed, archived or opened offline.
"""

from __future__ import annotations

import datetime
import html
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_fastif._files import atomic_write_text
from lightning_fastif.reporting._items import (
    ClassNames,
    ExampleCache,
    ExampleView,
    check_class_names,
    check_title,
    coerce_results,
    format_label,
    render_kwargs,
)
from lightning_fastif.reporting.render import Decoder, Renderer
from lightning_fastif.reporting.tokens import TOKEN_CSS, TokenHeatmaps
from lightning_fastif.results import InfluenceResult

_CSS = """
*{box-sizing:border-box}
body{margin:0;padding:24px 32px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#1f2328;background:#f4f5f7}
h1{margin:0 0 4px;font-size:24px}h2{margin:0 0 6px;font-size:18px}
h3{margin:14px 0 6px;font-size:14px;text-transform:uppercase;letter-spacing:.04em}
.sub,.legend{margin:2px 0;color:#57606a}
.summary{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:6px 16px;margin:14px 0 0;
padding:12px 16px;background:#fff;border:1px solid #d0d7de;border-radius:8px}
.summary div{display:flex;justify-content:space-between;gap:8px;border-bottom:1px dotted #d0d7de}
.summary dt{color:#57606a}.summary dd{margin:0;font-weight:600;text-align:right;overflow-wrap:break-word}
.summary div.wide{grid-column:1/-1}.nw{white-space:nowrap}
.flags{color:#9a6700;font-weight:600}
.query{margin:20px 0;padding:16px 18px;background:#fff;border:1px solid #d0d7de;border-radius:10px;
box-shadow:0 1px 2px rgba(0,0,0,.05)}
.qhead{display:flex;gap:20px;align-items:flex-start}
.qhead .thumb img{width:128px;height:auto}
.qhead .thumb .text{width:380px;max-height:none}
table.meta{border-collapse:collapse}table.meta th{text-align:left;color:#57606a;font-weight:normal;padding:1px 14px 1px 0}
table.meta td{font-weight:600;font-variant-numeric:tabular-nums}
.badge{display:inline-block;margin-left:6px;padding:0 7px;border-radius:9px;font-size:12px;font-weight:600}
.ok{background:#dafbe1;color:#116329}.bad{background:#ffebe9;color:#a40e26}
h3.helpful{color:#116329}h3.harmful{color:#a40e26}
.row{display:flex;flex-wrap:wrap;gap:10px}
.tile{margin:0;padding:6px 7px;width:126px;background:#fafbfc;border:1px solid #d0d7de;border-top:4px solid;
border-radius:6px}
.tile.text-tile{width:250px}
.tile.helpful{border-top-color:#2da44e}.tile.harmful{border-top-color:#cf222e}
.thumb img{display:block;width:96px;height:auto;image-rendering:pixelated;border-radius:3px;background:#000}
.thumb .text{max-height:7.5em;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12.5px;
padding:4px 6px;background:#fff;border:1px solid #e5e7eb;border-radius:4px}
.thumb .missing{color:#8c959f;font-size:12px;font-style:italic}
figcaption{margin-top:4px;font-size:12px;line-height:1.35;font-variant-numeric:tabular-nums;white-space:nowrap;
overflow:hidden;text-overflow:ellipsis}
figcaption .k{color:#57606a}
.none{color:#8c959f;font-style:italic}
details{margin-top:10px;color:#57606a;font-size:12px}details pre{white-space:pre-wrap;margin:4px 0}
details.settings{font-size:13px}details.settings summary{cursor:pointer;font-weight:600}
dl.overview{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:14px 0 8px;padding:12px 16px;
background:#fff;border:1px solid #d0d7de;border-radius:8px;font-size:15px}
dl.overview dt{color:#57606a;font-weight:600}dl.overview dd{margin:0}
footer{margin-top:24px;color:#8c959f;font-size:12px}
"""


def write_html_report(
    results: Iterable[InfluenceResult | Mapping[str, Any]],
    path: str | os.PathLike[str],
    train_lookup: Any = None,
    query_lookup: Any = None,
    *,
    title: str = "Influence report",
    class_names: ClassNames | None = None,
    summary: Mapping[str, Any] | None = None,
    image_shape: Sequence[int] | None = None,
    decoder: Decoder | None = None,
    renderer: Renderer | None = None,
) -> Path:
    """Write a self-contained HTML report, atomically (temporary file in the same folder, then rename).

    Args:
        results: ``InfluenceResult`` objects (or their ``to_dict()``), one per query.
        path: where to write the ``.html`` file; parent folders are created.
        train_lookup: training id -> ``x``, ``(x, label)`` or a dataset item dict; a map-style dataset also works.
            ``None`` shows ids and scores without inputs.
        query_lookup: the same for query ids.
        title: the page title.
        class_names: names of the classes, by index (a list or a mapping), shown next to labels.
        summary: run details for the header (timings, solver, candidates...); nested dicts are flattened.
        image_shape: shape to reshape flat vectors into images, e.g. ``(8, 8)`` for scikit-learn digits.
        decoder: turns token-id vectors into text (``tokenizer.decode`` or a vocabulary).
        renderer: ``renderer(x) -> PIL.Image | str`` overriding the built-in rendering rules.

    Returns:
        The path written.

    Example:
        >>> from lightning_fastif.results import InfluenceResult
        >>> r = InfluenceResult(0, 1, 1, [4, 2], [-0.5, -0.1], [7], [0.3], num_candidates=10)
        >>> out = write_html_report([r], tmp_path / "report.html")  # doctest: +SKIP
    """
    text = render_html_report(
        results,
        train_lookup,
        query_lookup,
        title=title,
        class_names=class_names,
        summary=summary,
        image_shape=image_shape,
        decoder=decoder,
        renderer=renderer,
    )
    return atomic_write_text(path, text)


def render_html_report(
    results: Iterable[InfluenceResult | Mapping[str, Any]],
    train_lookup: Any = None,
    query_lookup: Any = None,
    *,
    title: str = "Influence report",
    class_names: ClassNames | None = None,
    summary: Mapping[str, Any] | None = None,
    image_shape: Sequence[int] | None = None,
    decoder: Decoder | None = None,
    renderer: Renderer | None = None,
) -> str:
    """The HTML text of :func:`write_html_report`, without writing it (same arguments, minus ``path``)."""
    records = coerce_results(results)
    class_names = check_class_names(class_names, records)
    title = check_title(title)
    kwargs = render_kwargs(image_shape, decoder, renderer)
    train = ExampleCache(train_lookup, "train_lookup", **kwargs)
    queries = ExampleCache(query_lookup, "query_lookup", **kwargs)
    head = _summary_items(records, summary)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}{TOKEN_CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1>",
        '<p class="legend">Influence I(z, z<sub>test</sub>) = −∇L(z)·s<sub>test</sub>: '
        "<b>negative = helpful</b> (up-weighting z lowers the query's loss), "
        "<b>positive = harmful</b>. Helpful examples are listed most negative first, harmful most positive first.</p>",
        overview_html(records, summary),
        _explanations_html(records, summary),
        f'<details class="settings"><summary>All settings of this run</summary>{_summary_html(head)}</details>',
        "</header><main>",
    ]
    from lightning_fastif.applications.influence_map import influence_map_html  # issue 12: the influence map

    parts.append(influence_map_html(records, class_names, train_lookup))
    heat = TokenHeatmaps(
        train_lookup, decoder
    )  # per-token influence (issue 19), when results carry top tokens
    parts.extend(_query_html(r, train, queries, class_names, summary, heat) for r in records)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"</main><footer>Generated by lightning_fastif on {_e(stamp)}.</footer></body></html>\n")
    return "\n".join(parts)


def _query_html(
    result: InfluenceResult,
    train: ExampleCache,
    queries: ExampleCache,
    class_names: ClassNames | None,
    run_details: Mapping[str, Any] | None = None,
    heat: TokenHeatmaps | None = None,
) -> str:
    view = queries.get(result.query_id)
    tokens = heat.for_result(result) if heat is not None else None
    label = result.label if result.label is not None else view.label
    rows = [
        ("label", _e(format_label(label, class_names))),
        ("prediction", _e(format_label(result.prediction, class_names)) + _verdict(label, result.prediction)),
        ("loss", _e(_num(result.query_loss, signed=False))),
        ("candidates scored", _e(_num(result.num_candidates, signed=False))),
        (
            "candidate space",
            _e(str(result.extra.get("candidates", "features"))),
        ),  # features or gradients (issue 11)
    ]
    heading = f"Query {result.query_id}"
    if result.group:  # a group query: one s_test for the mean loss of its members
        heading = f"Group of {len(result.group)} queries"
        rows.insert(0, ("members", _e(", ".join(str(q) for q in result.group))))
    if result.loss:
        rows.append(("loss function", _e(result.loss)))
    if result.flags:
        rows.append(("flags", '<span class="flags">' + "<br>".join(_e(f) for f in result.flags) + "</span>"))
    meta = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    details = [("flags", "; ".join(result.flags) or "none")]
    details += [(k, _tidy(_value(v))) for k, v in _flatten(result.extra) if k.split("/")[0] not in _RUN_KEYS]
    if result.query_split:
        details.insert(0, ("query split", result.query_split))
    lines = "\n".join(f"{k}: {v}" for k, v in details)
    extra = f"<details><summary>details</summary><pre>{_e(lines)}</pre></details>"
    return (
        f'<section class="query" id="query-{result.query_id}"><div class="qhead">'
        f"{_thumb(view)}<div><h2>{_e(heading)}</h2>"
        f'<table class="meta">{meta}</table>{extra}</div></div>'
        f"{_tiles('helpful', result.helpful_ids, result.helpful_scores, result.helpful_distances, train, class_names, tokens)}"
        f"{_tiles('harmful', result.harmful_ids, result.harmful_scores, result.harmful_distances, train, class_names, tokens)}"
        "</section>"
    )


_RUN_KEYS = {"solver", "solver_config", "curvature", "damping", "solver_choice", "candidates"}
"""Record fields that are the run's (said once, in the header), not the query's."""


def overview_html(records: Sequence[InfluenceResult], summary: Mapping[str, Any] | None) -> str:
    """The header's answers, in words: what was explained, with which loss and curvature, can it be trusted, and
    how long it took. The settings themselves are under a fold below it."""
    summary = summary or {}
    if not records:
        return '<p class="overview">No query was explained.</p>'
    n = len(records)
    wrong = sum(
        1
        for r in records
        if isinstance(r.label, numbers.Integral)
        and isinstance(r.prediction, numbers.Integral)
        and r.label != r.prediction
    )
    splits = sorted({r.query_split for r in records if r.query_split})
    what = f"{n} quer{'y' if n == 1 else 'ies'}"
    if splits:
        what += f" of the {' and '.join(splits)} split"
    if wrong:
        what += f", {wrong} of {'it' if n == 1 else 'them'} predicted wrong"
    n_train = summary.get("training examples")
    extra = records[0].extra or {}
    space = {"features": "feature space (FastIF's kNN)", "gradients": "gradient-sketch space"}.get(
        str(extra.get("candidates", "features")), str(extra.get("candidates"))
    )
    k = records[0].num_candidates
    if isinstance(n_train, numbers.Integral) and k >= n_train:
        scored = f"every one of the {n_train:,} training examples scored"
    else:
        of = f" of {n_train:,}" if isinstance(n_train, numbers.Integral) else ""
        scored = f"each query's {k:,} nearest training examples{of} in {space} scored exactly"
    loss = records[0].loss or summary.get("loss") or "not recorded"
    solver = str(extra.get("solver") or "")
    choice = str(extra.get("solver_choice") or "")
    curvature = {"gauss_newton": "Gauss-Newton matrix", "hessian": "Hessian"}.get(
        str(extra.get("curvature")), str(extra.get("curvature") or "curvature")
    )
    damping = extra.get("damping")
    how = f"{_e(solver) or 'the solver'}"
    if choice:
        chosen = choice.split(":")[0].split(" (")[0]
        how = f"{_e(chosen.upper() if len(chosen) <= 5 else chosen)}, the auto solver's choice,"
    how += f" on the {_e(curvature)} of the training loss"
    if isinstance(damping, int | float):
        how += f", damping {_e(_num(damping, signed=False))}"
    verdicts = [r.extra.get("converged") for r in records]
    bad = [r for r, c in zip(records, verdicts, strict=True) if c is False]
    worst = max(
        (r.extra.get("convergence") or {} for r in records),
        key=lambda c: c.get("value") if isinstance(c.get("value"), int | float) else -1.0,
        default={},
    )
    measure = ""
    if isinstance(worst.get("value"), int | float):
        measure = (
            f" (worst {_e(str(worst.get('measure', 'measure')).replace('_', ' '))} "
            f"{_e(_num(worst['value'], signed=False))}, tolerance {_e(_num(worst.get('tolerance'), signed=False))})"
        )
    if bad:
        trust = (
            f'<span class="badge bad">not converged</span> {len(bad)} of {n} solves did not converge{measure}: '
            "their rankings may be wrong (see the solver's warning for the setting to change)."
        )
    elif any(v is True for v in verdicts):
        trust = f'<span class="badge ok">converged</span> every solve converged{measure}.'
    else:
        trust = "convergence was not measured by this solver."
    flagged = sum(1 for r in records if r.flags)
    if flagged:
        trust += f" {flagged} quer{'y carries' if flagged == 1 else 'ies carry'} a note (on {'its' if flagged == 1 else 'their'} card)."
    times = {str(key).split("/", 1)[1]: v for key, v in summary.items() if str(key).startswith("seconds/")}
    took = ""
    if times:
        total = sum(v for v in times.values() if isinstance(v, int | float))
        parts = ", ".join(f"{_e(key)} {_num(v, signed=False)} s" for key, v in times.items())
        took = f"<dt>How long</dt><dd>{_num(total, signed=False)} s ({parts})</dd>"
    return (
        '<dl class="overview">'
        f"<dt>What was explained</dt><dd>{_e(what)}: {_e(scored)}.</dd>"
        f"<dt>Loss and curvature</dt><dd>the influence of the loss {_e(loss)}; s<sub>test</sub> by {how}.</dd>"
        f"<dt>Can it be trusted?</dt><dd>{trust}</dd>"
        f"{took}</dl>"
    )


def _tidy(text: str) -> str:
    """Numbers inside a text for people: ``9.999999999999999e-06`` -> ``1e-05``, ``100000000000.0`` -> ``1e+11``."""
    return re.sub(
        r"(?<![\w.])-?\d+\.\d+(?:e[-+]?\d+)?(?![\w.])",
        lambda m: format(float(m.group(0)), ".4g"),
        text,
    )


def _tiles(
    kind: str,
    ids: Sequence[int],
    scores: Sequence[float | None],
    distances: Sequence[float | None],
    train: ExampleCache,
    class_names: ClassNames | None,
    tokens: Any = None,
) -> str:
    heading = f'<h3 class="{kind}">Most {kind}</h3>'
    if not ids:
        return heading + '<p class="none">none</p>'
    tiles = []
    for rank, train_id in enumerate(ids):
        view = train.get(train_id)
        lines = [
            f'<b>#{rank + 1}</b> <span class="k">id</span> {int(train_id)}',
            f'<span class="k">label</span> {_e(format_label(view.label, class_names))}',
            f'<span class="k">score</span> {_e(_num(_at(scores, rank)))}',
        ]
        if rank < len(distances):
            lines.append(f'<span class="k">dist</span> {_e(_num(distances[rank], signed=False))}')
        wide = " text-tile" if tokens or (view.rendered is not None and view.rendered.kind == "text") else ""
        tiles.append(
            f'<figure class="tile {kind}{wide}" data-train-id="{int(train_id)}">'
            f"{tokens(train_id) if tokens else _thumb(view)}"  # per-token influence: the text as a heatmap
            f"<figcaption>{'<br>'.join(lines)}</figcaption></figure>"
        )
    return heading + '<div class="row">' + "".join(tiles) + "</div>"


def _thumb(view: ExampleView) -> str:
    rendered = view.rendered
    if rendered is None:
        why = f"input unavailable ({view.error})" if view.error else "no input"
        return f'<div class="thumb"><div class="missing">{_e(why)}</div></div>'
    if rendered.kind == "image":
        return f'<div class="thumb"><img alt="example {view.id}" src="{rendered.to_data_uri()}"></div>'
    return f'<div class="thumb"><div class="text">{_e(rendered.text or "")}</div></div>'


def _verdict(label: Any, prediction: Any) -> str:
    if not isinstance(label, numbers.Integral) or not isinstance(prediction, numbers.Integral):
        return ""
    return (
        '<span class="badge ok">correct</span>'
        if label == prediction
        else '<span class="badge bad">wrong</span>'
    )


def _summary_items(
    records: list[InfluenceResult], summary: Mapping[str, Any] | None
) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = [("queries", len(records))]
    if records:
        items.append(("candidates scored", sum(int(r.num_candidates) for r in records)))
        losses = [r.query_loss for r in records if isinstance(r.query_loss, int | float)]
        if losses:
            items.append(("mean query loss", sum(losses) / len(losses)))
    if summary is not None:
        items.extend(_flatten(summary))
    return items


def _summary_html(items: list[tuple[str, Any]]) -> str:
    wide = ' class="wide"'
    cells = "".join(
        f"<div{wide if len(_value(v)) > 28 else ''}><dt>{_e(_key(k))}</dt><dd>{_unbroken(_value(v))}</dd></div>"
        for k, v in items
    )
    return f'<dl class="summary">{cells}</dl>'


def _key(key: Any) -> str:
    """A summary key for people: ``seconds/s_test`` -> ``time of s_test (s)``."""
    text = str(key)
    if text.startswith("seconds/"):
        return f"time of {text.split('/', 1)[1].replace('_', ' ')} (s)"
    return {"solver iterations (last)": "solver iterations (last batch of queries)"}.get(text, text)


def _unbroken(text: str) -> str:
    """Escaped ``text`` that may wrap only between its space-separated parts, never inside a number or a
    ``name=value`` (``LiSSASolver(damping=0.01, scale=25.0, ...)`` wraps after a comma)."""
    return " ".join(f'<span class="nw">{_e(part)}</span>' for part in text.split(" "))


def _explanations_html(records: list[InfluenceResult], summary: Mapping[str, Any] | None) -> str:
    """What a score's size means and, when candidates came from the kNN step, what "dist" is."""
    n = (summary or {}).get("training examples")
    n_text = f"N = {int(n):,}" if isinstance(n, numbers.Integral) else "N = the training set size"
    example = ""
    if isinstance(n, numbers.Integral) and n > 0:
        example = (
            f" (a score of −{_num(0.05 * n, signed=False)} means removing z raises the loss by about 0.05)"
        )
    parts = [
        '<p class="legend"><b>Size of a score:</b> removing a training example z changes this query\'s loss by about '
        f"<b>−I/N</b> ({_e(n_text)}){_e(example)}: the first-order estimate of leave-one-out retraining.</p>"
    ]
    if any(r.helpful_distances or r.harmful_distances for r in records):
        parts.append(
            '<p class="legend"><b>dist</b>: the L2 distance between the features of the query and of the training '
            "example (the input of the model's feature layer, the penultimate layer by default). FastIF's kNN step "
            "scores only the training examples nearest to the query in this space; smaller = nearer.</p>"
        )
    return "".join(parts)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(_flatten(value, prefix=f"{name}/"))
        else:
            out.append((name, value))
    return out


def _value(value: Any) -> str:
    if isinstance(value, float):
        return _num(value, signed=False)
    return _tidy(str(value))


def _num(value: Any, signed: bool = True) -> str:
    if value is None:
        return "–"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    sign = "+" if signed else ""
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:{sign}.3g}"
    return f"{value:{sign}.4g}"


def _at(values: Sequence[Any], index: int) -> Any:
    return values[index] if index < len(values) else None


def _e(text: str) -> str:
    return html.escape(text, quote=True)
