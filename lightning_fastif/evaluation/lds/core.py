"""The pure parts of the linear datamodeling score: random subsets, their split over ranks, the predicted effect
of training on each subset, and the mean Spearman with its bootstrap interval.

Part of ``lightning_fastif.evaluation.lds``; imports torch only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_fastif.errors import ConfigurationError, expected

__all__ = ["lds_subsets", "linear_datamodeling_score", "predicted_group_effects", "shard_subsets"]


def lds_subsets(n: int, subsets: int, fraction: float, seed: int = 0) -> Tensor:
    """``[M, k]`` sorted training ids of M random subsets of ``k = round(fraction * n)`` examples (seeded)."""
    k = round(float(fraction) * n)
    if not 1 <= k < n:
        raise ConfigurationError(
            expected("lds.fraction", f"a share leaving between 1 and {n - 1} of {n} examples", fraction)
        )
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(subsets)])


def shard_subsets(num_subsets: int, rank: int, world_size: int) -> list[int]:
    """The subsets rank ``rank`` of ``world_size`` retrains: ``rank, rank + W, ...``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigurationError(expected("rank", f"in [0, {world_size}) with world_size >= 1", rank))
    return list(range(rank, num_subsets, world_size))


def predicted_group_effects(scores: Tensor, subsets: Tensor) -> Tensor:
    """``[Q, M]`` predicted change of each query's loss from training on each subset instead of the full set.

    Args:
        scores: ``[Q, N]`` influence ``I(z_i, q)`` (positive = harmful) of every training example on each query.
        subsets: ``[M, k]`` training ids of each subset.

    Returns:
        ``-(1/N) sum_{i not in S_m} I(z_i, q)``, i.e. ``(1/N) (sum_{i in S_m} I - sum_i I)``.
    """
    n = scores.shape[1]
    member = torch.zeros(subsets.shape[0], n, dtype=scores.dtype, device=scores.device)
    member.scatter_(1, subsets.to(scores.device), 1.0)
    return -(scores @ (1.0 - member).T) / n


def _spearman(a: Tensor, b: Tensor) -> float:
    from lightning_fastif.evaluation.self_influence import _average_ranks

    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def linear_datamodeling_score(
    predicted: Tensor, actual: Tensor, confidence: float = 0.95, bootstrap: int = 2000, seed: int = 0
) -> tuple[float, float, float, list[float]]:
    """``(mean LDS, CI low, CI high, per-query LDS)`` from ``predicted [Q, M]`` and ``actual [Q, M]`` query losses.

    Per query: the Spearman correlation over subsets (ties at average rank). Queries where either side is
    constant (NaN) are left out of the mean. The interval is a percentile bootstrap over queries.
    """
    if predicted.shape != actual.shape or predicted.dim() != 2:
        raise ConfigurationError(
            expected(
                "actual", f"a [Q, M] tensor like predicted {tuple(predicted.shape)}", tuple(actual.shape)
            )
        )
    per = [_spearman(p, a) for p, a in zip(predicted, actual)]
    vals = torch.tensor([v for v in per if math.isfinite(v)], dtype=torch.float64)
    if vals.numel() == 0:
        return float("nan"), float("nan"), float("nan"), per
    mean = float(vals.mean())
    if vals.numel() == 1:
        return mean, float("nan"), float("nan"), per
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(vals.numel(), (bootstrap, vals.numel()), generator=gen)
    means = vals[idx].mean(1)
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return mean, float(low), float(high), per
