"""Image classification data stored as ``.npz`` files (``x_train``, ``y_train``, ``x_test``, ``y_test``), such as
the MNIST and Fashion-MNIST copies in the project's ``shared/data`` folder. Reads local files only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.zoo._splits import TensorSplits

__all__ = ["NpzImageDataModule"]


class NpzImageDataModule(TensorSplits):
    eval_batch_size = 1024

    """Images ``[N, H, W]`` uint8 and labels from an ``.npz`` file, normalised by ``mean`` / ``std``.

    Args:
        path: the ``.npz`` file.
        batch_size: training batch size.
        train_size: use only the first ``train_size`` training images (None: all).
        val_size: images taken from the end of the training split for validation.
        mean, std: pixel statistics over 255 (MNIST: 0.1307 / 0.3081; Fashion-MNIST: 0.2860 / 0.3530).
        class_names: optional names of the classes (for reports).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 128,
        train_size: int | None = None,
        val_size: int = 5000,
        mean: float = 0.1307,
        std: float = 0.3081,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigurationError(
                f"Expected `path` to be an existing .npz file (x_train, y_train, x_test, y_test), but got {str(path)!r}."
            )
        self.batch_size, self.train_size, self.val_size = batch_size, train_size, val_size
        self.mean, self.std = mean, std
        self.class_names = class_names
        self.image_shape: tuple[int, int] | None = None
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        with np.load(self.path) as data:
            x_tr, y_tr, x_te, y_te = (data[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        self.image_shape = tuple(x_tr.shape[1:3])  # type: ignore[assignment]

        def prep(x: np.ndarray) -> torch.Tensor:
            return (torch.from_numpy(x.astype(np.float32)) / 255.0 - self.mean) / self.std

        n_val = min(self.val_size, len(x_tr) // 5)
        train_end = len(x_tr) - n_val
        n_train = train_end if self.train_size is None else min(self.train_size, train_end)
        self.train_set = TensorDataset(prep(x_tr[:n_train]), torch.from_numpy(y_tr[:n_train]).long())
        self.val_set = TensorDataset(prep(x_tr[train_end:]), torch.from_numpy(y_tr[train_end:]).long())
        self.test_set = TensorDataset(prep(x_te), torch.from_numpy(y_te).long())
