"""The W&B table: real offline runs through Lightning's WandbLogger, and every way W&B can be skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_fastif.reporting.wandb_table import WANDB_COLUMNS, build_rows, log_to_wandb
from lightning_fastif.results import InfluenceResult

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, silent W&B whose every file (runs, staging, cache, settings) lands under tmp_path."""
    root = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(root))
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(root / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return root


def _results() -> list[InfluenceResult]:
    return [
        InfluenceResult(0, 3, 3, [11, 12], [-0.3, -0.2], [21], [0.4], 50, 0.1, [1.0, 2.0], [4.0]),
        InfluenceResult(1, 5, 6, [14], [-0.1], [23, 24], [0.9, float("nan")], 50, 2.3),
    ]


def _digits() -> np.ndarray:
    return np.random.default_rng(0).random((30, 64)).astype(np.float32)


def test_table_lands_in_the_offline_run(offline_wandb: Path, tmp_path: Path) -> None:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    images = _digits()
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="t")
    try:
        reason = log_to_wandb(
            logger,
            _results(),
            train_lookup=lambda i: (images[i], i % 10),
            query_lookup=lambda q: (images[q], [3, 5][q]),
            image_shape=(8, 8),
            summary={"solver": "LiSSASolver", "timing": {"total_s": 1.5}, "skipped": [1, 2]},
        )
        assert reason is None
        summary = logger.experiment.summary
        assert summary["influence/num_queries"] == 2
        assert summary["influence/candidates_scored"] == 100
        assert summary["influence/solver"] == "LiSSASolver"
        assert summary["influence/timing/total_s"] == 1.5
    finally:
        wandb.finish()  # Lightning never finishes the run; the table file is complete only after this
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/influence_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == list(WANDB_COLUMNS)
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["query_id"], r["kind"], r["rank"], r["train_id"]) for r in rows] == [
        (0, "helpful", 1, 11),
        (0, "helpful", 2, 12),
        (0, "harmful", 1, 21),
        (1, "helpful", 1, 14),
        (1, "harmful", 1, 23),
        (1, "harmful", 2, 24),
    ]
    assert [r["score"] for r in rows] == [-0.3, -0.2, 0.4, -0.1, 0.9, None]
    assert [r["knn_distance"] for r in rows] == [1.0, 2.0, 4.0, None, None, None]
    assert [r["train_label"] for r in rows] == [1, 2, 1, 4, 3, 4]
    assert [(r["query_label"], r["prediction"]) for r in rows][2:4] == [(3, 3), (5, 6)]
    # the run folder is self-contained (what `wandb sync` uploads): every image cell of the run's table file is an
    # image reference whose PNG lies in the run's files/, and the table artifact's staged copies lie in the run
    # folder too (wandb 0.31 alone writes the string "Image" and stages the PNGs under ~/.local/share/wandb)
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    cells = [r[c] for r in rows for c in ("train_input", "query_input")]
    assert all(isinstance(c, dict) and c["_type"] == "image-file" for c in cells), cells[:2]
    for cell in cells:
        png = run_dir / "files" / cell["path"]
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", cell
        assert (cell["width"], cell["height"]) == (64, 64)
    assert len({c["path"] for c in cells}) == len(
        {r["train_id"] for r in rows} | {0, 1}
    )  # one PNG per example
    staged = [p for p in offline_wandb.rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x89PNG"]
    assert not staged, "artifact files were staged outside the run folder"
    inside = [p for p in run_dir.rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x89PNG"]
    assert len(inside) > len({c["path"] for c in cells})  # the artifact's staged copies are in the run folder


def test_text_inputs_and_a_bare_run(offline_wandb: Path, tmp_path: Path) -> None:
    import wandb

    sentences = [f"<i>sentence</i> {i}" for i in range(30)]
    run = wandb.init(project="t", dir=str(tmp_path), mode="offline")
    try:
        reason = log_to_wandb(
            run, _results(), {i: (s, i % 2) for i, s in enumerate(sentences)}, None, key="inf"
        )
        assert reason is None
        assert run.summary["inf/num_queries"] == 2
    finally:
        run.finish()
    (table_path,) = tmp_path.glob("wandb/offline-run-*/files/media/table/inf_*.table.json")
    table = json.loads(table_path.read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert rows[0]["train_input"] == "<i>sentence</i> 11"  # raw text: W&B does its own escaping
    assert all(r["query_input"] is None for r in rows)


class _RaisingLogger:
    """Looks like a WandbLogger but its table call fails, like a W&B outage would."""

    @property
    def experiment(self) -> Any:
        return self

    def log_table(self, **kwargs: Any) -> None:
        raise RuntimeError("backend unreachable")

    def log_metrics(self, metrics: Any, step: Any = None) -> None:
        raise RuntimeError("backend unreachable")


def test_a_failing_logger_returns_a_reason_and_never_raises() -> None:
    with pytest.warns(UserWarning, match="backend unreachable"):
        reason = log_to_wandb(_RaisingLogger(), _results())
    assert reason is not None and "RuntimeError: backend unreachable" in reason


def test_missing_wandb_or_logger_is_skipped_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    class CSVLogger:
        pass

    class Trainer:
        def __init__(self) -> None:
            self.loggers = [CSVLogger()]

    with pytest.warns(UserWarning, match="no W&B logger"):
        assert log_to_wandb(None, _results()) == "no W&B logger or run was given"
    with pytest.warns(UserWarning, match=r"no WandbLogger among the loggers \(CSVLogger\)"):
        assert log_to_wandb(Trainer(), _results()) is not None
    with pytest.warns(UserWarning, match="neither a Lightning WandbLogger nor a wandb run"):
        assert log_to_wandb(object(), _results()) is not None
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.warns(UserWarning, match="wandb is not importable"):
        reason = log_to_wandb(_RaisingLogger(), _results())
    assert reason is not None and reason.startswith("wandb is not importable")


def test_build_rows_without_wandb_uses_class_names_and_pil_images() -> None:
    images = _digits()
    rows = build_rows(
        _results(),
        train_lookup=lambda i: (images[i], i % 10),
        query_lookup=lambda q: images[q],
        class_names=[f"digit {d}" for d in range(10)],
        image_shape=(8, 8),
    )
    assert len(rows) == 6 and all(len(row) == len(WANDB_COLUMNS) for row in rows)
    first = dict(zip(WANDB_COLUMNS, rows[0]))
    assert first["query_label"] == "3 (digit 3)" and first["train_label"] == "1 (digit 1)"
    assert first["train_input"].size == (64, 64)


def test_importing_reporting_imports_neither_wandb_nor_lightning() -> None:
    code = (
        "import sys, lightning_fastif.reporting as r; "
        "print(sorted(m for m in ('wandb', 'lightning', 'faiss') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
