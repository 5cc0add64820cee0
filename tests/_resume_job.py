"""A small influence job for tests/test_resume.py: run as a script it SIGKILLs itself after ``argv[2]`` batches."""

from __future__ import annotations

import os
import signal
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_fastif as lf

QUERY_IDS = [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9]  # 3 twice: one record per query id
BATCH = 2


class Counting(lf.InfluenceModule):
    """Records the query ids it explains (to prove a resumed run does not compute done ones again)."""

    explained: list[int]

    def explain(self, batch, query_ids=None):
        self.explained = [*getattr(self, "explained", []), *(query_ids or [])]
        return super().explain(batch, query_ids)


class KillAfter(pl.Callback):
    """SIGKILL this process after ``n`` predict batches (after the writer has written them)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx + 1 >= self.n:
            os.kill(os.getpid(), signal.SIGKILL)


def build():
    torch.manual_seed(0)
    x, y = torch.randn(60, 5, dtype=torch.float64), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    im = Counting(
        model, TensorDataset(x, y), solver=lf.ExactSolver(damping=0.1), num_candidates=None, top_k=4
    )
    queries = TensorDataset(x[:10] + 0.1, y[:10])
    return im, DataLoader(Subset(queries, QUERY_IDS), batch_size=BATCH)


def run(out: str, callbacks=()) -> Counting:
    im, loader = build()
    trainer = pl.Trainer(
        accelerator="cpu",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lf.InfluenceWriter(out), lf.InfluenceReport(out, wandb=False), *callbacks],
    )
    trainer.predict(im, loader, return_predictions=False)
    return im


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], [KillAfter(int(sys.argv[2]))])
