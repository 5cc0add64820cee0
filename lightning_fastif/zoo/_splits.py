"""The dataloaders shared by the shipped data modules: train / val / test sets held as ``TensorDataset``s."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset

from lightning_fastif.errors import ConfigurationError


class TensorSplits(pl.LightningDataModule):
    """A data module whose ``setup`` fills ``train_set``, ``val_set`` and ``test_set``; ``predict`` reads the test set.

    Subclasses set ``batch_size`` (training) and may set ``eval_batch_size``.
    """

    batch_size: int = 64
    eval_batch_size: int = 256
    train_set: TensorDataset | None = None
    val_set: TensorDataset | None = None
    test_set: TensorDataset | None = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)

    def split(self, name: str) -> TensorDataset:
        """The ``"train"``, ``"val"`` or ``"test"`` dataset (after ``setup``)."""
        self.setup()
        sets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        if name not in sets:
            raise ConfigurationError(f"Expected `split` to be 'train', 'val' or 'test', but got {name!r}.")
        return sets[name]  # type: ignore[return-value]
