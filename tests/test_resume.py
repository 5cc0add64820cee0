"""Resume (issue 9, item 13): a SIGKILLed influence run continues where it stopped; one record per query id; the
report always matches its JSONL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_fastif as lf
from lightning_fastif.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]


def _records(path: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_id = {r["query_id"]: r for r in lines}
    assert len(by_id) == len(lines), "a query id was written twice"
    return by_id


def _same(got: dict, want: dict) -> None:
    assert got["helpful_ids"] == want["helpful_ids"] and got["harmful_ids"] == want["harmful_ids"]
    for key in ("helpful_scores", "harmful_scores"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12)


def test_a_killed_run_resumes_to_the_uninterrupted_result_without_recomputing(tmp_path):
    from _resume_job import run

    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "report.html").write_text("<html>stale report of an older run</html>")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_resume_job.py"), str(killed), "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILLed after 2 batches
    assert not (killed / "report.html").exists()  # the stale report went at the start, before any work
    jsonl = killed / "influence.jsonl"
    assert sorted(_records(jsonl)) == [0, 1, 2, 3]
    with open(jsonl, "ab") as f:  # a write torn by the kill
        f.write(b'{"query_id": 4, "label": 1, "helpful_ids": [3, ')

    resumed = run(str(killed))
    assert sorted(resumed.explained) == [
        4,
        5,
        6,
        7,
        8,
        9,
    ]  # done ids (and the torn one's) not recomputed once
    with pytest.warns(UserWarning, match="query id 3 was explained twice"):
        whole = run(str(tmp_path / "whole"))
    assert sorted(whole.explained) == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9]

    got, want = _records(jsonl), _records(tmp_path / "whole" / "influence.jsonl")
    assert sorted(got) == sorted(want) == list(range(10))
    for qid in want:
        _same(got[qid], want[qid])
    html = (killed / "report.html").read_text()  # rebuilt from every record, old and new
    assert "stale report" not in html and all(f"Query {q}" in html for q in range(10))
    assert html.count("Query 3<") == (tmp_path / "whole" / "report.html").read_text().count("Query 3<")


def test_resume_is_refused_for_other_settings_and_overwrite_starts_over(tmp_path):
    from _resume_job import build, run

    run(str(tmp_path))
    im, loader = build()
    im.top_k = 2  # other settings: the old records must not be mixed in
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        callbacks=[lf.InfluenceWriter(tmp_path)],
    )
    with pytest.warns(UserWarning, match="settings changed: top_k -> recomputing"):
        trainer.predict(im, loader, return_predictions=False)
    assert sorted(im.explained) == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9]
    assert all(len(r["helpful_ids"]) == 2 for r in _records(tmp_path / "influence.jsonl").values())
    with pytest.raises(ConfigurationError, match="resume=False, overwrite=False.*holds results"):
        trainer = pl.Trainer(
            inference_mode=False,
            logger=False,
            enable_progress_bar=False,
            callbacks=[lf.InfluenceWriter(tmp_path, resume=False)],
        )
        trainer.predict(im, loader, return_predictions=False)
