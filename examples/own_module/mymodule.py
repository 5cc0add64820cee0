"""An own model and data module for the command line (see README, "Your own model and data").

The CLI needs only what Lightning needs, plus two things influence asks of the data module:
``train_dataloader()`` and the query split's loader (``test_dataloader()`` for ``queries.split: test``) must wrap
map-style datasets (``__getitem__`` and ``__len__``): position i of the training loader's dataset is training id i.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_iris
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class IrisData(pl.LightningDataModule):
    """scikit-learn's bundled iris flowers (150 examples, 4 features, 3 classes), 120 to train and 30 to test."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = load_iris()
        x = torch.tensor(data.data, dtype=torch.float32)
        x = (x - x.mean(0)) / x.std(0)
        y = torch.tensor(data.target)
        perm = torch.randperm(150, generator=torch.Generator().manual_seed(0))
        self.train_set = TensorDataset(x[perm[:120]], y[perm[:120]])
        self.test_set = TensorDataset(x[perm[120:]], y[perm[120:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)


class MyNet(pl.LightningModule):
    """A small tanh MLP; its ``training_step`` is all Lightning needs, the influence tools need nothing more."""

    def __init__(self, hidden: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(4, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=1e-3)
