"""The influence map (FastIF's "visualising influence interactions"), as inline SVG.

Queries sit on a circle, grouped by a key (their label by default) with a gap between groups. Each training example
that appears in a query's top lists is placed inside the circle where its influence pulls: the |influence|-weighted
average of the positions of the queries it influences (drawn a little inwards, so it never hides a query). Edges join
training examples to their queries with a width proportional to |influence|. Helpful (negative) and harmful
(positive) influence are drawn in two panels, green and red. Hovering a node shows its id, label and scores
(``<title>`` elements: no scripts, nothing from the network).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["influence_map_html", "influence_map_svg", "map_layout", "map_legend"]

_KINDS = {"helpful": "#2da44e", "harmful": "#cf222e"}
_GROUP_COLOURS = ["#0969da", "#bf8700", "#8250df", "#1b7c83", "#e16f24", "#cf4a9c", "#57606a", "#116329"]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _get(r: Any, name: str, default: Any = None) -> Any:
    return r.get(name, default) if isinstance(r, Mapping) else getattr(r, name, default)


def _name(value: Any, class_names: Any) -> str:
    if value is None:
        return "?"
    if class_names is not None:
        try:
            return f"{value} ({class_names[value]})"
        except (KeyError, IndexError, TypeError):
            pass
    return str(value)


def _query_key(r: Any) -> str:
    group = _get(r, "group")
    return f"group:{_get(r, 'query_id')}" if group else f"q:{_get(r, 'query_id')}"


def map_layout(
    results: Sequence[Any],
    kind: str = "helpful",
    per_query: int = 5,
    group_by: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Positions (unit disc) of the queries and of the training examples of one panel, and the edges.

    Args:
        results: ``InfluenceResult`` objects or their dicts.
        kind: ``helpful`` or ``harmful``.
        per_query: training examples taken from the top of each query's list.
        group_by: ``result -> key`` grouping queries on the circle (default: the label).

    Returns:
        ``{"queries": [(key, x, y, result, group)], "train": {id: (x, y, weight)}, "edges": [(key, id, score)]}``.
    """
    if kind not in _KINDS:
        raise ValueError(f"Expected `kind` to be 'helpful' or 'harmful', but got {kind!r}.")
    group_by = group_by or (lambda r: _get(r, "label"))
    keyed = sorted(((str(group_by(r)), i, r) for i, r in enumerate(results)), key=lambda t: (t[0], t[1]))
    groups = sorted({g for g, _, _ in keyed})
    slots = len(keyed) + len(groups)  # one empty slot between groups
    queries, pos = [], {}
    slot = 0
    for g in groups:
        for gk, _, r in keyed:
            if gk != g:
                continue
            angle = 2 * math.pi * slot / max(slots, 1) - math.pi / 2
            key = _query_key(r)
            pos[key] = (math.cos(angle), math.sin(angle))
            queries.append((key, *pos[key], r, g))
            slot += 1
        slot += 1
    edges: list[tuple[str, int, float]] = []
    pull: dict[int, list[tuple[float, float, float]]] = {}
    for key, _, _, r, _ in queries:
        ids = list(_get(r, f"{kind}_ids", []) or [])[:per_query]
        scores = list(_get(r, f"{kind}_scores", []) or [])[:per_query]
        for train_id, score in zip(ids, scores):
            if score is None or not math.isfinite(score):
                continue
            edges.append((key, int(train_id), float(score)))
            qx, qy = pos[key]
            pull.setdefault(int(train_id), []).append((qx, qy, abs(float(score))))
    train: dict[int, tuple[float, float, float]] = {}
    for train_id, parts in pull.items():
        w = sum(p[2] for p in parts)
        if w > 0:
            x, y = sum(p[0] * p[2] for p in parts) / w, sum(p[1] * p[2] for p in parts) / w
        else:
            x, y = sum(p[0] for p in parts) / len(parts), sum(p[1] for p in parts) / len(parts)
        # inwards, and spread examples pulled to the same point on a small golden-angle spiral
        jitter = 0.06 * math.sqrt((train_id * 0.618034) % 1.0)
        a = train_id * 2.399963
        train[train_id] = (0.72 * x + jitter * math.cos(a), 0.72 * y + jitter * math.sin(a), w)
    return {"queries": queries, "train": train, "edges": edges}


def _panel(
    layout: dict[str, Any],
    kind: str,
    ox: float,
    size: float,
    train_labels: Callable[[int], Any] | None,
    class_names: Any,
) -> str:
    r = size / 2 - 34
    cx, cy = ox + size / 2, 26 + size / 2

    def at(x: float, y: float) -> tuple[float, float]:
        return cx + r * x, cy + r * y

    colour = _KINDS[kind]
    groups = sorted({g for *_, g in layout["queries"]})
    gcol = {g: _GROUP_COLOURS[i % len(_GROUP_COLOURS)] for i, g in enumerate(groups)}
    qpos = {key: at(x, y) for key, x, y, _, _ in layout["queries"]}
    tpos = {i: at(x, y) for i, (x, y, _) in layout["train"].items()}
    top = max((abs(s) for *_, s in layout["edges"]), default=1.0) or 1.0
    out = [
        f'<g class="panel {kind}" data-kind="{kind}">',
        f'<text x="{ox + 10}" y="18" font-size="13" font-weight="600" fill="{colour}">most {kind}</text>',
        f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" fill="none" stroke="#d0d7de" stroke-dasharray="3 4"/>',
    ]
    for key, train_id, score in layout["edges"]:
        (x1, y1), (x2, y2) = tpos[train_id], qpos[key]
        width = 0.4 + 3.6 * abs(score) / top
        out.append(
            f'<line class="edge {kind}" data-query="{_e(key)}" data-train="{train_id}" data-score="{score:.6g}" '
            f'x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
            f'stroke-opacity="0.45" stroke-width="{width:.2f}"><title>train {train_id} → {_e(key)}: '
            f"{score:+.4g}</title></line>"
        )
    scores_of: dict[int, list[str]] = {}
    for key, train_id, score in layout["edges"]:
        scores_of.setdefault(train_id, []).append(f"{key} {score:+.3g}")
    for train_id, (x, y) in tpos.items():
        label = train_labels(train_id) if train_labels is not None else None
        text = f"train {train_id}" + (f", label {_name(label, class_names)}" if label is not None else "")
        out.append(
            f'<circle class="train {kind}" data-id="{train_id}" cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}" '
            f'stroke="#fff" stroke-width="1"><title>{_e(text)}; {kind} to {_e(", ".join(scores_of[train_id]))}'
            "</title></circle>"
        )
    for key, x, y, res, g in layout["queries"]:
        px, py = qpos[key]
        group = _get(res, "group")
        lab, pred = _get(res, "label"), _get(res, "prediction")
        text = (
            f"group of {len(group)} queries {group[:12]}"
            if group
            else f"query {_get(res, 'query_id')}, label {_name(lab, class_names)}, predicted {_name(pred, class_names)}"
        )
        out.append(
            f'<circle class="query" data-query="{_e(key)}" cx="{px:.1f}" cy="{py:.1f}" r="7" fill="#fff" '
            f'stroke="{gcol[g]}" stroke-width="3"><title>{_e(text)}</title></circle>'
        )
        lx, ly = cx + (r + 16) * x, cy + (r + 16) * y + 4
        short = f"G{len(group)}" if group else str(_get(res, "query_id"))
        out.append(
            f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="10" text-anchor="middle" fill="#57606a">{_e(short)}</text>'
        )
    out.append("</g>")
    return "".join(out)


def influence_map_svg(
    results: Sequence[Any],
    *,
    per_query: int = 5,
    train_labels: Callable[[int], Any] | None = None,
    class_names: Any = None,
    group_by: Callable[[Any], Any] | None = None,
    size: int = 400,
) -> str:
    """The influence map of ``results``: two panels (helpful, harmful) side by side, as one ``<svg>`` element.

    Args:
        results: ``InfluenceResult`` objects or their dicts (group results are one node each).
        per_query: training examples drawn per query and panel (the top of its lists).
        train_labels: ``train id -> label`` for the hover text (optional).
        class_names: names of the classes, by index, for the hover text.
        group_by: ``result -> key`` grouping queries on the circle (default: the label).
        size: width and height of one panel in pixels.

    Returns:
        SVG text: ``<circle class="query">`` per query and panel, ``<circle class="train">`` per training
        example, ``<line class="edge helpful|harmful">`` per (query, training example) pair, each with a hover
        ``<title>``.

    Example:
        >>> svg = influence_map_svg(trainer.predict(im, queries)[0])  # doctest: +SKIP
    """
    panels = [
        _panel(
            map_layout(results, kind, per_query, group_by), kind, i * size, size, train_labels, class_names
        )
        for i, kind in enumerate(_KINDS)
    ]
    width, height = 2 * size, size + 30
    return (
        f'<svg class="influence-map" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="influence map" style="background:#fff">'
        + "".join(panels)
        + "</svg>"
    )


def influence_map_html(records: Sequence[Any], class_names: Any = None, train_lookup: Any = None) -> str:
    """A report section with the map (empty string for no records): a heading, a legend and the SVG."""
    if not records:
        return ""

    def labels(train_id: int) -> Any:
        if train_lookup is None:
            return None
        try:
            item = train_lookup[train_id]
        except Exception:  # a lookup that cannot give labels just leaves them out of the hover text
            return None
        if isinstance(item, Mapping):
            value = item.get("labels", item.get("label"))
        elif isinstance(item, (tuple, list)) and len(item) > 1:
            value = item[1]
        else:
            return None
        return int(value) if hasattr(value, "__int__") and getattr(value, "ndim", 0) == 0 else None

    svg = influence_map_svg(records, train_labels=labels, class_names=class_names)
    return (
        '<div class="influence-map" style="margin:20px 0;padding:16px 18px;background:#fff;'
        'border:1px solid #d0d7de;border-radius:10px"><h2>Influence map</h2>'
        '<p class="legend">Each query is a white node on the circle, labelled with its id; the training examples '
        "that most helped (left, green) or most hurt (right, red) it sit inside, where their influence pulls (the "
        "|influence|-weighted mean of the positions of the queries they influence), joined to those queries by "
        "lines as thick as |influence|. Hover a node for its id, label and scores.</p>"
        f"{map_legend(records, class_names)}"
        f'<div style="overflow-x:auto">{svg}</div></div>'
    )


def map_legend(records: Sequence[Any], class_names: Any = None) -> str:
    """The key of the map: what the node colours mean and which label each query ring colour stands for."""
    groups = sorted({g for *_, g in map_layout(records, "helpful")["queries"]}, key=str)
    dot = '<span style="display:inline-block;width:11px;height:11px;border-radius:50%;vertical-align:-1px;'
    items = [
        f'{dot}background:{_KINDS["helpful"]}"></span> helpful training example',
        f'{dot}background:{_KINDS["harmful"]}"></span> harmful training example',
    ]
    for i, g in enumerate(groups):
        colour = _GROUP_COLOURS[i % len(_GROUP_COLOURS)]
        label = int(g) if g.lstrip("-").isdigit() else g
        what = "query without a label" if g == "None" else f"query labelled {_name(label, class_names)}"
        items.append(f'{dot}background:#fff;border:3px solid {colour}"></span> {_e(what)}')
    cells = "".join(f'<span style="margin-right:16px;white-space:nowrap">{item}</span>' for item in items)
    return f'<p class="legend map-key" style="line-height:1.9"><b>Key:</b> {cells}</p>'
