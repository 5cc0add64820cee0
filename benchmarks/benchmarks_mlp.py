"""A generated classification set and an MLP for the memory benchmark (kept apart so the child imports little)."""

import torch
from torch import nn


def make(n: int, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :10].argmax(1) + (x[:, 10] > 1).long()) % 10
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(d, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    ).eval()
    return model, x, y
