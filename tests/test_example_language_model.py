"""``examples/language_model.py`` runs end to end with tiny settings: a GPT-2 from a config trained on stdlib text,
one completion explained, passages with top tokens printed, in influence.jsonl and in report.html (token heatmap)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_fastif.reporting.jsonl import read_jsonl

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "language_model.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers (the text extra)"
)


def _load():
    spec = importlib.util.spec_from_file_location("language_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_language_model_example_explains_a_completion_with_top_tokens(tmp_path, capsys):
    example = _load()
    shown = example.main(
        [
            "--output-dir",
            str(tmp_path),
            "--max-passages",
            "40",
            "--epochs",
            "2",
            "--n-embd",
            "8",
            "--layers",
            "1",
            "--completion-tokens",
            "2",
            "--num-candidates",
            "10",
            "--top-k",
            "2",
            "--top-tokens",
            "2",
            "--cg-iterations",
            "5",
            "--threads",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    assert "Most helpful training passages" in printed and "top tokens:" in printed
    result = shown["result"]
    listed = result.helpful_ids + result.harmful_ids
    assert listed and result.num_candidates == 10
    assert set(result.top_tokens) == {str(i) for i in listed}
    for entry in shown["helpful"]:
        assert entry["score"] < 0 and f"#{entry['id']} " in printed
        assert all(s < 0 for _, _, s in entry["top_tokens"])
    (record,) = read_jsonl(tmp_path / "influence.jsonl")
    assert record.top_tokens == {k: [list(e) for e in v] for k, v in result.top_tokens.items()}
    page = (tmp_path / "report.html").read_text()
    assert page.count('<div class="tokens') == len(listed)
    assert 'title="position ' in page  # the heatmap's coloured tokens
