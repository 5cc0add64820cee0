"""InfluenceReport: the HTML report and the W&B table after predict, and W&B failing or missing."""

import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_fastif as lf


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    im = lf.InfluenceModule(
        model, TensorDataset(x, y), solver=lf.ExactSolver(damping=0.1), num_candidates=None, top_k=3
    )
    return im, DataLoader(TensorDataset(x[:5], y[:5]), batch_size=5)


class FailingWandbLogger(WandbLogger):
    def log_table(self, *args, **kwargs):
        raise RuntimeError("W&B service unreachable")

    def log_metrics(self, *args, **kwargs):
        raise RuntimeError("W&B service unreachable")


def _predict(tmp_path, logger):
    im, queries = _setup()
    report = lf.InfluenceReport(tmp_path / "out")
    writer = lf.InfluenceWriter(tmp_path / "out")
    trainer = pl.Trainer(
        inference_mode=False, logger=logger, callbacks=[report, writer], enable_progress_bar=False
    )
    with pytest.warns(UserWarning, match="W&B"):
        trainer.predict(im, queries)
    return report


def test_failing_wandb_still_writes_jsonl_and_html_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = FailingWandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    report = _predict(tmp_path, logger)
    assert "unreachable" in report.wandb_skipped
    assert (tmp_path / "out" / "report.html").is_file()
    assert len((tmp_path / "out" / "influence.jsonl").read_text().splitlines()) == 5
    import wandb

    wandb.finish()


def test_wandb_not_installed_or_not_configured(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    report = _predict(tmp_path, CSVLogger(str(tmp_path)))
    assert report.wandb_skipped and (tmp_path / "out" / "report.html").is_file()
    html = (tmp_path / "out" / "report.html").read_text()
    assert all(f"Query {i}" in html for i in range(5))
