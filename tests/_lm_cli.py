"""A tiny language model and its data as a user's own package would ship them, for the CLI test
(``tests/test_language_models.py``): the CLI finds them by ``class_path`` when this folder is on ``PYTHONPATH``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from _models import DictDataset, _gpt2_config, _lm_tokens
from torch import Tensor
from torch.utils.data import DataLoader


class TinyGPT2LM(pl.LightningModule):
    """A LightningModule around a Hugging Face ``GPT2LMHeadModel`` built from a config (2 layers, 32 dims, vocab 64)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from transformers import GPT2LMHeadModel

        torch.manual_seed(seed)
        self.lm = GPT2LMHeadModel(_gpt2_config())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.lm(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def call_lm(model: TinyGPT2LM, batch: dict[str, Tensor]) -> Any:
    """``forward_fn`` of the config: the model on a batch's ids and mask."""
    return model(batch["input_ids"], batch["attention_mask"])


class TinyTextData(pl.LightningDataModule):
    """Causal-LM batches ``{input_ids, attention_mask, labels}`` (labels = ids, -100 on padding)."""

    def __init__(self, n_train: int = 16, n_val: int = 4, seq: int = 8, batch_size: int = 8) -> None:
        super().__init__()
        data = _lm_tokens(n_train + n_val, seq, 64, 0)
        self.train_set = DictDataset(**{k: v[:n_train] for k, v in data.items()})
        self.val_set = DictDataset(**{k: v[n_train:] for k, v in data.items()})
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
