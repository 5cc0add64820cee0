"""Group queries: one s_test for the mean loss of a set of query examples.

By linearity, ``(H + λI)^{-1} ∇ mean_q L(z_q) = mean_q s_test(z_q)``: the group s_test equals the mean of the
per-example s_test rows, and the group influence of a training example equals the mean of its per-query influences.
It is computed here as one solve of the mean gradient (one backward pass and one solve instead of B of each).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from lightning_fastif._runtime import eval_mode
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import batch_size as _batch_size
from lightning_fastif.functional.batch import call_model, labels_of, logits_of
from lightning_fastif.functional.grads import flat_loss
from lightning_fastif.functional.losses import check_finite
from lightning_fastif.influence.checks import check_query_ids
from lightning_fastif.results import InfluenceResult

__all__ = ["explain_group", "group_candidates", "group_influence", "group_s_test"]


def _check_batch(batch: Any) -> int:
    n = _batch_size(batch)
    if n == 0:
        raise ConfigurationError(
            "Expected `batch` to hold at least one query example, but got an empty batch."
        )
    return n


def group_s_test(im: Any, batch: Any) -> Tensor:
    """``(H + damping I)^{-1} ∇θ mean_q L(z_q)``: one s_test ``[1, P]`` for the mean loss of the batch.

    Args:
        im: an ``InfluenceModule``.
        batch: the group's query examples (``B >= 1``).

    Returns:
        ``[1, P]``; equals ``im.s_test(batch).mean(0, keepdim=True)`` up to the solver's own approximation.

    Example:
        >>> s = group_s_test(im, (x_test[:8], y_test[:8]))   # [1, P]
    """
    _check_batch(batch)
    start = time.perf_counter()
    batch = im._prepare(batch)
    theta, spec = im._theta()
    with eval_mode(im.model):
        losses = im.loss(spec.unflatten(theta), batch).detach()
        check_finite(losses, "query loss")
        g = grad(flat_loss(im.loss, spec, batch))(theta)[None]
        check_finite(g, "group query gradient")
        s = im.solver.solve(im.curvature(theta, spec), g)
    check_finite(s, "group s_test (the solver's solution)")
    im._timed("s_test", start)
    return s


def group_influence(im: Any, batch: Any, train_indices: Sequence[int] | Tensor | None = None) -> Tensor:
    """Influence ``[n]`` of the training examples ``train_indices`` (all N if None) on the group's mean loss.

    Equals the mean over the group of ``im.influence(batch, train_indices)`` rows. Sign as everywhere: positive =
    harmful, negative = helpful.
    """
    return im.score(group_s_test(im, batch), train_indices)[0]


def group_candidates(im: Any, batch: Any) -> Tensor | None:
    """The union ``[k']`` of the members' ``num_candidates`` nearest training examples (``None``: full scan)."""
    if im.num_candidates is None:
        return None
    _, ids = im.search(batch)
    return torch.unique(ids.flatten())


def explain_group(im: Any, batch: Any, query_ids: Sequence[int] | None = None) -> InfluenceResult:
    """One :class:`InfluenceResult` for the mean loss of ``batch``: the group's most helpful and harmful examples.

    Candidates are the union of the members' kNN candidates (the whole training set for a full scan). The result's
    ``group`` lists the members' query ids; ``query_id`` is the first member, ``label`` / ``prediction`` are set when
    every member shares them, and ``extra`` holds the members' labels and predictions.

    Args:
        im: an ``InfluenceModule``.
        batch: the group's query examples.
        query_ids: their ids in the query dataset (default ``0..B-1``).
    """
    n = _check_batch(batch)
    query_ids = list(range(n)) if query_ids is None else check_query_ids(query_ids, n)
    batch = im._prepare(batch)
    theta, spec = im._theta()
    with eval_mode(im.model):
        losses = im.loss(spec.unflatten(theta), batch).detach()
        logits = logits_of(call_model(im.model, batch, getattr(im, "forward_fn", None)))
    labels = labels_of(batch)
    preds = logits.argmax(-1) if logits is not None and logits.dim() == 2 else None
    s = group_s_test(im, batch)
    candidates = group_candidates(im, batch)
    h_ids, h_sc, x_ids, x_sc = im.rank_candidates(s, None if candidates is None else candidates[None])[0]
    lab = None if labels is None else [int(v) for v in labels.reshape(-1).tolist()]
    pre = None if preds is None else [int(v) for v in preds.tolist()]
    extra: dict[str, Any] = {"solver": im.solver.name, "group_size": n}
    if lab is not None:
        extra["group_labels"] = lab
    if pre is not None:
        extra["group_predictions"] = pre
    pool = getattr(im, "pool_name", None)
    if pool is not None:
        extra["pool"] = pool
    return InfluenceResult(
        query_id=query_ids[0],
        label=lab[0] if lab and len(set(lab)) == 1 else None,
        prediction=pre[0] if pre and len(set(pre)) == 1 else None,
        helpful_ids=h_ids.tolist(),
        helpful_scores=h_sc.tolist(),
        harmful_ids=x_ids.tolist(),
        harmful_scores=x_sc.tolist(),
        num_candidates=len(im.train_dataset) if candidates is None else int(candidates.numel()),
        query_loss=float(losses.mean()),
        extra=extra,
        group=query_ids,
    )
