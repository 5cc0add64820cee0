"""An induced class-pair confusion, the embedded setting of the correction experiment (digits, no download).

:func:`induce_confusion` relabels (or removes) part of one class of a training set; :class:`ConfusedDigitsDataModule`
is scikit-learn's digits with that done to its training split only (validation and test labels stay correct, so the
validation split is a pool of correctly labelled data the model never trained on).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.zoo.digits import DigitsDataModule

__all__ = ["ConfusedDigitsDataModule", "induce_confusion"]


def induce_confusion(
    x: Tensor, y: Tensor, source: int, target: int, fraction: float, mode: str = "relabel", seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Relabel ``fraction`` of class ``source`` as ``target`` (``mode="relabel"``) or drop them (``"remove"``).

    Args:
        x: inputs ``[N, ...]``; y: labels ``[N]``.
        source, target: the class pair ("true source, predicted target" is the slice this creates).
        fraction: share of ``source`` examples changed, in [0, 1].
        mode: ``relabel`` or ``remove``.
        seed: which examples.

    Returns:
        ``(x', y', changed)``: the new tensors and the positions (in the input) of the changed examples.
    """
    if mode not in ("relabel", "remove"):
        raise ConfigurationError(f"Expected `mode` to be 'relabel' or 'remove', but got {mode!r}.")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ConfigurationError(f"Expected `fraction` to lie in [0, 1], but got {fraction!r}.")
    members = (y == source).nonzero().flatten()
    g = torch.Generator().manual_seed(int(seed))
    changed = members[torch.randperm(len(members), generator=g)[: round(float(fraction) * len(members))]]
    changed = changed.sort().values
    if mode == "relabel":
        y = y.clone()
        y[changed] = target
        return x, y, changed
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[changed] = False
    return x[keep], y[keep], changed


class ConfusedDigitsDataModule(DigitsDataModule):
    """:class:`~lightning_fastif.zoo.digits.DigitsDataModule` with part of class ``source`` relabelled as ``target`` (or
    removed) in the training split only.

    Args:
        source, target: the confused pair (default 3 -> 8).
        fraction: share of the training ``source`` examples changed.
        mode: ``relabel`` or ``remove``.
        confusion_seed: which examples.
        batch_size, val_fraction, test_fraction, seed: as in ``DigitsDataModule``.
    """

    def __init__(
        self,
        source: int = 3,
        target: int = 8,
        fraction: float = 0.6,
        mode: str = "relabel",
        confusion_seed: int = 0,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
        if mode not in ("relabel", "remove") or not 0.0 <= float(fraction) <= 1.0:
            raise ConfigurationError(
                f"Expected `mode` in (relabel, remove) and `fraction` in [0, 1], but got {mode!r} and {fraction!r}."
            )
        self.save_hyperparameters()
        self.changed: Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        h = self.hparams
        x, y = self.train_set.tensors  # type: ignore[union-attr]
        x, y, self.changed = induce_confusion(x, y, h.source, h.target, h.fraction, h.mode, h.confusion_seed)
        self.train_set = TensorDataset(x, y)
