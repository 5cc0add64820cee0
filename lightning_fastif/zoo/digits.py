"""scikit-learn's bundled digits (1,797 8x8 images, 10 classes) as a LightningDataModule, and a small MLP."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.zoo._splits import TensorSplits

__all__ = ["DigitsClassifier", "DigitsDataModule", "MLPClassifier"]


class DigitsDataModule(TensorSplits):
    """Digits split into train / val / test by a fixed permutation; pixels scaled to [0, 1], float32 ``[64]``.

    Args:
        batch_size: training batch size.
        val_fraction, test_fraction: shares of the 1,797 images held out.
        seed: seed of the split.
    """

    image_shape = (8, 8)

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
    ) -> None:
        super().__init__()
        if (
            not 0.0 <= val_fraction < 1.0
            or not 0.0 < test_fraction < 1.0
            or val_fraction + test_fraction >= 1.0
        ):
            raise ConfigurationError(
                "Expected `val_fraction` in [0, 1) and `test_fraction` in (0, 1) with a sum below 1, but got "
                f"{val_fraction} and {test_fraction}."
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.hparams.seed))
        n_test = round(self.hparams.test_fraction * len(x))
        n_val = round(self.hparams.val_fraction * len(x))
        test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])


class MLPClassifier(pl.LightningModule):
    """A small tanh MLP (smooth, so influence is well defined) trained with AdamW and weight decay.

    Inputs of any shape are flattened. The penultimate feature is the input of ``head``.

    Args:
        in_features: input size after flattening (64 for digits, 784 for MNIST).
        hidden: width of the two hidden layers.
        num_classes: number of classes.
        lr: learning rate.
        weight_decay: L2 strength (use about the same value as the solver's damping).
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: int = 64,
        num_classes: int = 10,
        lr: float = 1e-2,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train")
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=stage != "train")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )


class DigitsClassifier(MLPClassifier):
    """:class:`MLPClassifier` sized for scikit-learn's digits (64 inputs, 10 classes)."""

    def __init__(self, hidden: int = 64, lr: float = 1e-2, weight_decay: float = 1e-3) -> None:
        super().__init__(in_features=64, hidden=hidden, num_classes=10, lr=lr, weight_decay=weight_decay)
