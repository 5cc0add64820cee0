"""The HTML report: self-contained, complete, escaped, and written atomically."""

from __future__ import annotations

import base64
import io
import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.reporting.html import render_html_report, write_html_report
from lightning_fastif.reporting.jsonl import JsonlWriter, read_jsonl
from lightning_fastif.results import InfluenceResult

SENTENCES = [
    "a gorgeous, witty, seductive movie.",
    "<script>alert('owned')</script> & friends",
    "the plot is nothing but boilerplate clichés",
    "an intelligent and moving film",
    "unflinchingly bleak and desperate",
]


class _Tags(HTMLParser):
    """Collect every tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, Any]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(text: str) -> list[tuple[str, dict[str, Any]]]:
    parser = _Tags()
    parser.feed(text)
    return parser.tags


def _digit_results() -> list[InfluenceResult]:
    return [
        InfluenceResult(
            0,
            3,
            3,
            [11, 12, 13],
            [-0.3, -0.2, -0.1],
            [21, 22],
            [0.4, 0.2],
            50,
            0.1,
            [1.0, 2.0, 3.0],
            [4.0, 5.0],
        ),
        InfluenceResult(
            1, 5, 6, [14], [-1e-6], [23, 24], [3e5, 0.5], 50, 2.3, extra={"timing": {"total_s": 0.5}}
        ),
    ]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((30, 64)).astype(np.float32), np.arange(30) % 10


def test_report_is_self_contained_with_every_id_and_inline_images(tmp_path: Path) -> None:
    images, labels = _digits()
    results = _digit_results()
    path = write_html_report(
        results,
        tmp_path / "report.html",
        train_lookup=lambda i: (images[i], int(labels[i])),
        query_lookup=lambda q: (images[q], int(labels[q])),
        image_shape=(8, 8),
        summary={"solver": "LiSSASolver", "timing": {"index_s": 1.5}},
    )
    text = path.read_text(encoding="utf-8")
    tags = _tags(text)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    sources = [attrs["src"] for tag, attrs in tags if "src" in attrs]
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert len(sources) == 2 + sum(len(r.helpful_ids) + len(r.harmful_ids) for r in results)
    png = Image.open(io.BytesIO(base64.b64decode(sources[0].split(",", 1)[1])))
    assert png.size == (64, 64)
    shown_train = {int(attrs["data-train-id"]) for _, attrs in tags if "data-train-id" in attrs}
    assert shown_train == {11, 12, 13, 14, 21, 22, 23, 24}
    sections = {attrs.get("id") for tag, attrs in tags if tag == "section"}
    assert sections == {"query-0", "query-1"}
    for needle in (
        "Query 0",
        "Query 1",
        "LiSSASolver",
        "timing/index_s",
        "+3e+05",
        "-1e-06",
        "wrong",
    ):
        assert needle in text


def test_text_is_escaped_and_shown_as_text(tmp_path: Path) -> None:
    train = [{"sentence": s, "label": i % 2} for i, s in enumerate(SENTENCES)]
    result = InfluenceResult(0, 1, 0, [0, 1], [-0.5, -0.2], [2, 3], [0.3, 0.1], 5, 0.7)
    text = render_html_report(
        [result],
        train_lookup=train.__getitem__,
        query_lookup=lambda q: "<b>query</b> sentence",
        title="<Report & co>",
        class_names=["neg", "<pos>"],
        summary={"note": "<img src=x onerror=alert(1)>"},
    )
    assert "<script>" not in text and "<img src=x" not in text and "<b>query" not in text
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt; &amp; friends" in text
    assert "&lt;b&gt;query&lt;/b&gt; sentence" in text
    assert "&lt;Report &amp; co&gt;" in text and "1 (&lt;pos&gt;)" in text
    assert not [attrs for _, attrs in _tags(text) if "src" in attrs]  # text inputs make no images


def test_dataset_lookups_dict_results_and_missing_inputs(tmp_path: Path) -> None:
    dataset = torch.utils.data.TensorDataset(torch.rand(30, 1, 8, 8), torch.arange(30) % 10)
    path = tmp_path / "influence.jsonl"
    with JsonlWriter(path) as writer:
        writer.write_many(_digit_results())
    dicts = [r.to_dict() for r in read_jsonl(path)]
    text = render_html_report(iter(dicts), train_lookup=dataset, query_lookup=None)
    assert text.count("data:image/png;base64,") == 8  # training images only
    assert text.count("no input") == 2  # the two queries
    assert "label</span> 4" in text  # label 14 % 10 from the dataset's (x, y) pairs


def test_failing_lookup_warns_and_shows_the_id(tmp_path: Path) -> None:
    def broken(i: int) -> Any:
        raise KeyError(i)

    with pytest.warns(UserWarning, match="`train_lookup` failed for id 11"):
        text = render_html_report(_digit_results(), train_lookup=broken)
    assert "input unavailable (KeyError: 11)" in text
    assert 'data-train-id="24"' in text


def test_empty_lists_and_user_errors() -> None:
    empty = InfluenceResult(7, None, None, [], [], [], [], 0)
    text = render_html_report([empty])
    assert text.count('<p class="none">none</p>') == 2 and "Query 7" in text
    with pytest.raises(ConfigurationError, match="`image_shape`"):
        render_html_report(_digit_results(), train_lookup=lambda i: np.zeros(64), image_shape=(5, 5))
    with pytest.raises(ConfigurationError, match="`results`"):
        render_html_report(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="`train_lookup`"):
        render_html_report(_digit_results(), train_lookup=42)
    with pytest.raises(ConfigurationError, match="`class_names`"):
        render_html_report(_digit_results(), class_names="abc")


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "report.html"
    write_html_report(_digit_results()[:1], path, title="first")
    assert "first" in path.read_text()

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_html_report(_digit_results(), path, title="second")
    monkeypatch.undo()
    assert "first" in path.read_text() and "second" not in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary file left behind

    write_html_report(_digit_results(), path, title="third")
    assert "third" in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # an ordinary file, not mkstemp's private 0600
