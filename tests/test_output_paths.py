"""Output paths are checked before any work (issue 9, item 12): an unwritable folder or a file where a folder is
expected is a ConfigurationError naming the argument, raised in setup — before the index loads or s_test runs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.reporting._paths import check_output_dir, check_output_file

UNWRITABLE = "/proc/lightning_fastif_cannot_write_here"  # fails to be created even for root


class _NoWork(lf.InfluenceModule):
    def explain(self, batch, query_ids=None):  # pragma: no cover - reaching it is the failure
        raise AssertionError("work started before the output paths were checked")


def _predict(callbacks, logger=False):
    torch.manual_seed(0)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    im = _NoWork(model, TensorDataset(x, y), solver=lf.ExactSolver(damping=0.1), num_candidates=None)
    trainer = pl.Trainer(
        inference_mode=False, logger=logger, enable_progress_bar=False, callbacks=list(callbacks)
    )
    trainer.predict(im, DataLoader(TensorDataset(x[:4], y[:4]), batch_size=4), return_predictions=False)


@pytest.mark.parametrize("make", ["writer", "report"])
def test_a_file_where_the_output_folder_should_be_fails_before_any_work(tmp_path, make):
    blocker = tmp_path / "results"
    blocker.write_text("I am a file")
    cb = lf.InfluenceWriter(blocker) if make == "writer" else lf.InfluenceReport(blocker, wandb=False)
    with pytest.raises(ConfigurationError, match=r"`output_dir`.*folder.*is an existing file"):
        _predict([cb])
    with pytest.raises(ConfigurationError, match=r"`output_dir`.*lies under a file"):
        _predict(
            [type(cb)(blocker / "sub")]
            if make == "writer"
            else [lf.InfluenceReport(blocker / "s", wandb=False)]
        )


@pytest.mark.parametrize("make", ["writer", "report"])
def test_an_unwritable_output_folder_fails_before_any_work(make):
    cb = lf.InfluenceWriter(UNWRITABLE) if make == "writer" else lf.InfluenceReport(UNWRITABLE, wandb=False)
    with pytest.raises(ConfigurationError, match="`output_dir` to be a writable folder.*cannot be written"):
        _predict([cb])


def test_a_folder_where_the_report_or_jsonl_file_should_be_is_named(tmp_path):
    (tmp_path / "report.html").mkdir()
    with pytest.raises(ConfigurationError, match=r"`output_dir`.*report\.html.*existing folder"):
        _predict([lf.InfluenceReport(tmp_path, wandb=False)])
    (tmp_path / "influence.jsonl").mkdir()
    with pytest.raises(ConfigurationError, match=r"`filename`.*influence\.jsonl.*existing folder"):
        _predict([lf.InfluenceWriter(tmp_path)])


def test_an_unusable_wandb_folder_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "wb").write_text("a file")
    logger = WandbLogger(save_dir=str(tmp_path / "wb"), offline=True, project="t")
    import wandb

    try:
        with pytest.raises(ConfigurationError, match=r"`WandbLogger\(save_dir\)`.*existing file"):
            _predict([lf.InfluenceReport(tmp_path / "out")], logger=logger)
    finally:
        wandb.finish()  # a run left open would be reused by the next WandbLogger of the session


def test_path_checks_inspect_without_creating(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_dir(target, "output_dir") == target and not target.exists()
    assert check_output_file(target / "x.jsonl", "path") and not target.exists()
    check_output_dir(target, "output_dir", create=True)
    assert target.is_dir() and list(target.iterdir()) == []  # the probe file is gone
    with pytest.raises(ConfigurationError, match="`output_dir` to be a folder path"):
        check_output_dir("", "output_dir")
