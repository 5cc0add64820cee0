"""Shared ground-truth problems for the tests: convex models trained to convergence in float64."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset


@dataclass
class DigitsProblem:
    model: nn.Module
    train: TensorDataset
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    l2: float


def load_digits_tensors(n_train: int = 1200, seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def regularised_objective(model: nn.Module, x, y, l2: float, weights=None):
    """(1/N) sum_i w_i CE_i + l2/2 |theta|^2, with N = len(x) (weights zero out removed examples)."""
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    if weights is not None:
        losses = losses * weights
    reg = sum((p**2).sum() for p in model.parameters())
    return losses.sum() / len(x) + 0.5 * l2 * reg


def fit_lbfgs(model: nn.Module, x, y, l2: float, weights=None, max_iter: int = 500) -> nn.Module:
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = regularised_objective(model, x, y, l2, weights)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return model


def digits_logistic(l2: float = 1e-3, n_train: int = 1200) -> DigitsProblem:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_tensors(n_train)
    model = nn.Linear(64, 10).double()
    fit_lbfgs(model, xtr, ytr, l2)
    return DigitsProblem(model, TensorDataset(xtr, ytr), xtr, ytr, xte, yte, l2)
