"""Influence scores of candidate batches against s_test vectors, and top-k ranking.

Sign convention (DESIGN section 2): ``I(z, z_test) = -grad L(z) . s_test``; positive = harmful, negative = helpful.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import batch_size, slice_batch
from lightning_fastif.functional.grads import Loss, flat_loss, per_example_grads
from lightning_fastif.functional.params import ParamSpec

__all__ = ["PAD_ID", "grad_scores", "jvp_scores", "merge_topk", "score_batch", "split_topk"]

JVP_BLOCK = 64
"""``"auto"`` scores by forward mode, ``JVP_BLOCK`` s_test vectors at a time. Measured on an MLP of 235k parameters,
batch 256 (``benchmarks/scoring_throughput.py``): jvp beat per-example gradients x s_test at every Q up to 256
(7.6x at Q = 32, 1.2x at Q = 256), so per-example gradients are used only when asked for (``"grad"``)."""


def jvp_scores(loss: Loss, theta: Tensor, spec: ParamSpec, batch: Any, s_test: Tensor) -> Tensor:
    """Scores ``[B, Q]``: ``-d/dt L(z_i, theta + t s_q)`` at t = 0 by forward mode; no per-example gradient.

    Example:
        >>> from lightning_fastif.functional.losses import PerExampleLoss
        >>> m = torch.nn.Linear(3, 2)
        >>> params = {n: p.detach() for n, p in m.named_parameters()}
        >>> spec = ParamSpec.of(params)
        >>> b = (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
        >>> jvp_scores(PerExampleLoss(m), spec.flatten(params), spec, b, torch.randn(4, 8)).shape
        torch.Size([5, 4])
    """
    f = flat_loss(loss, spec, batch, "none")

    def one(direction: Tensor) -> Tensor:
        return jvp(f, (theta,), (direction,))[1]

    if s_test.shape[0] == 1:
        return -one(s_test[0])[:, None]
    return -vmap(one)(s_test).T


def grad_scores(
    loss: Loss, theta: Tensor, spec: ParamSpec, batch: Any, s_test: Tensor, chunk_size: int | None = 64
) -> Tensor:
    """Scores ``[B, Q]`` as ``-G s_test^T`` with per-example gradients ``G`` (cheaper for many queries).

    ``G`` is made ``chunk_size`` examples at a time and multiplied at once, so at most ``[chunk_size, P]`` is held.
    """
    n = batch_size(batch)
    step = n if not chunk_size else max(1, int(chunk_size))
    parts = [
        per_example_grads(loss, theta, spec, slice_batch(batch, slice(i, i + step)), None) @ s_test.T
        for i in range(0, n, step)
    ]
    return -torch.cat(parts)


def score_batch(
    loss: Loss, theta: Tensor, spec: ParamSpec, batch: Any, s_test: Tensor, method: str = "auto"
) -> Tensor:
    """Scores ``[B, Q]`` of a candidate batch, by ``"jvp"``, ``"grad"`` or ``"auto"`` (jvp in blocks of 64)."""
    if method == "auto":
        if s_test.shape[0] > JVP_BLOCK:
            return torch.cat(
                [score_batch(loss, theta, spec, batch, block, "jvp") for block in s_test.split(JVP_BLOCK)],
                dim=1,
            )
        method = "jvp"
    if method == "jvp":
        try:
            return jvp_scores(loss, theta, spec, batch, s_test)
        except NotImplementedError as err:  # an operator without a forward-mode rule (e.g. fused attention)
            warnings.warn(
                f"Forward-mode AD is not supported by this model ({str(err)[:200]}); scoring with per-example "
                "gradients instead (slower). For attention, the math path supports it (Hugging Face: "
                '`attn_implementation="eager"`).',
                stacklevel=2,
            )
            return grad_scores(loss, theta, spec, batch, s_test)
    if method == "grad":
        return grad_scores(loss, theta, spec, batch, s_test)
    raise ConfigurationError(f"Expected `score_method` to be 'auto', 'jvp' or 'grad', but got {method!r}.")


PAD_ID = -1
"""Id of an empty slot of a top-k list (its score is NaN): fewer than k candidates had a score of that sign."""


def _signed(
    h_ids: Tensor, h_sc: Tensor, x_ids: Tensor, x_sc: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty the slots of the wrong sign: helpful keeps scores < 0, harmful scores > 0 (0 is neither)."""
    nan = torch.tensor(float("nan"), dtype=h_sc.dtype, device=h_sc.device)
    pad = torch.tensor(PAD_ID, dtype=h_ids.dtype, device=h_ids.device)
    h_ok, x_ok = h_sc < 0, x_sc > 0  # NaN compares False: padding stays padding
    return (
        torch.where(h_ok, h_ids, pad),
        torch.where(h_ok, h_sc, nan),
        torch.where(x_ok, x_ids, pad),
        torch.where(x_ok, x_sc, nan),
    )


def split_topk(scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Most helpful and most harmful of ``scores [Q, n]`` with training ``ids [n]`` (or ``[Q, n]``).

    Returns:
        ``helpful_ids, helpful_scores`` (most negative first) and ``harmful_ids, harmful_scores`` (most positive
        first), each ``[Q, min(k, n)]``. A helpful score is always negative and a harmful one positive, so the two
        lists never share an id (even when ``2 k > n``); slots left over are padding, id :data:`PAD_ID` and score
        NaN, at the end of the row (a score of exactly 0 is in neither list). Equal scores rank the smaller id
        first, so the answer does not depend on the order of the candidates, nor on how they were split into
        shards (see :func:`merge_topk`).

    Example:
        >>> split_topk(torch.tensor([[-2.0, 1.0, -0.5]]), torch.tensor([7, 8, 9]), 2)[2]
        tensor([[ 8, -1]])
    """
    q, n = scores.shape
    k = min(k, n)
    ids = ids.expand(q, n) if ids.dim() == 1 else ids
    up = _lexsort(scores, ids)[:, :k]
    down = _lexsort(-scores, ids)[:, :k]
    return _signed(
        torch.gather(ids, 1, up),
        torch.gather(scores, 1, up),
        torch.gather(ids, 1, down),
        torch.gather(scores, 1, down),
    )


def merge_topk(
    parts: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]], k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge per-shard :func:`split_topk` outputs into the global top-k, equal to :func:`split_topk` of all shards.

    Args:
        parts: one ``(helpful_ids, helpful_scores, harmful_ids, harmful_scores)`` per shard, each ``[Q, k_s]``;
            shards may hold different numbers ``k_s`` of entries (even none) and padding (id -1, score NaN).
        k: entries kept per query.

    Returns:
        The same four tensors, ``[Q, min(k, sum k_s)]``: by score, equal scores by id (shard order is irrelevant);
        helpful scores negative, harmful positive, padding last.
    """
    if not parts:
        raise ConfigurationError("Expected `parts` to hold at least one shard's top-k lists, but got none.")
    h_ids = torch.cat([p[0] for p in parts], 1)
    h_sc = torch.cat([p[1] for p in parts], 1)
    x_ids = torch.cat([p[2] for p in parts], 1)
    x_sc = torch.cat([p[3] for p in parts], 1)
    hi = _lexsort(h_sc, h_ids)[:, :k]  # NaN (padding) sorts last
    xi = _lexsort(-x_sc, x_ids)[:, :k]
    return _signed(
        torch.gather(h_ids, 1, hi),
        torch.gather(h_sc, 1, hi),
        torch.gather(x_ids, 1, xi),
        torch.gather(x_sc, 1, xi),
    )


def _lexsort(primary: Tensor, secondary: Tensor) -> Tensor:
    """Column order of each row of ``[Q, n]`` by ``primary``, equal values by ``secondary`` (both ascending)."""
    first = torch.sort(secondary, dim=1, stable=True).indices
    second = torch.sort(torch.gather(primary, 1, first), dim=1, stable=True).indices
    return torch.gather(first, 1, second)
