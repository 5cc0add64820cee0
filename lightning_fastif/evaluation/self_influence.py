"""Self-influence: how much each training example's own loss depends on that example being trained on.

For a training example z, Koh & Liang's influence of up-weighting z on its own loss is

    I(z, z) = -grad L(z) . (C + damping I)^{-1} grad L(z)      (DESIGN section 2's sign: <= 0 for PD curvature)

This module reports the **positive** quantity ``self_influence(z) = -I(z, z) = grad L(z) . s_test(z) >= 0`` (the
convention of kronfluence, Captum's ``TracInCP.self_influence`` and Koh & Liang's mislabel experiments): large
means the model had to bend most to fit z, so z is the likeliest to be mislabelled or atypical. Removing z lowers
its own loss prediction by about ``self_influence / N`` -- i.e. raises its loss: the model fits z because z is in
the training set.

Computation, batched: per-example gradients of a chunk of training examples ``G [B, P]`` (``vmap(grad)``), one
batched solve ``S = solver.solve(curvature, G)`` (with ``ExactSolver`` one matrix product per chunk with the cached
inverse; any other :class:`~lightning_fastif.functional.solvers.base.Solver` works the same way), and the row-wise dot
product ``(G * S).sum(-1)``. The math runs in one process on the ids it is given; :class:`SelfInfluenceTask` spreads
the ids over processes under DDP (rank r scores ids ``r::W``) and gathers them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_fastif._runtime import eval_mode
from lightning_fastif.errors import ConfigurationError, expected
from lightning_fastif.functional.batch import fetch
from lightning_fastif.functional.grads import per_example_grads_and_losses
from lightning_fastif.functional.losses import check_finite

__all__ = [
    "SelfInfluenceTask",
    "mislabel_detection",
    "rank_by_self_influence",
    "run_self_influence",
    "self_influence",
]


def _check_ids(ids: Sequence[int] | Tensor | None, n: int) -> Tensor:
    if ids is None:
        return torch.arange(n)
    out = torch.as_tensor(ids, dtype=torch.long).flatten()
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= n):
        raise ConfigurationError(
            expected("ids", f"training ids in [0, {n})", f"values from {int(out.min())} to {int(out.max())}")
        )
    return out


def self_influence(
    im: Any,
    ids: Sequence[int] | Tensor | None = None,
    *,
    chunk_size: int | None = None,
    return_losses: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Self-influence ``grad L(z) . (C + damping I)^{-1} grad L(z)`` (>= 0) of training examples: ``[n]``.

    This is ``-I(z, z)`` in the library's sign convention (``I`` positive = harmful): the positive number that
    Koh & Liang, kronfluence and Captum rank by to find mislabelled and atypical training examples.

    Args:
        im: an :class:`~lightning_fastif.InfluenceModule` (its solver, selected parameters, loss and damping).
        ids: training ids to score (default: every training example), ``[n]``.
        chunk_size: examples per per-example-gradient chunk and batched solve (default: the module's
            ``batch_size``). Memory is about ``3 * chunk_size * P`` numbers.
        return_losses: also return the examples' training losses ``[n]`` (the usual baseline ranking).

    Returns:
        ``[n]`` self-influence values in the order of ``ids`` (and ``[n]`` losses with ``return_losses``).

    Example:
        >>> im = lf.InfluenceModule(model, train_ds, solver=lf.ExactSolver(1e-3), num_candidates=None)
        >>> scores = lf.self_influence(im)                 # [N]
        >>> suspects = scores.argsort(descending=True)[:20]
    """
    n = len(im.train_dataset)
    ids_t = _check_ids(ids, n)
    step = im.score_batch_size if chunk_size is None else chunk_size
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ConfigurationError(expected("chunk_size", "a positive int or None", chunk_size))
    theta, spec = im._theta()
    values = theta.new_empty(ids_t.numel())
    losses = theta.new_empty(ids_t.numel())
    start = time.perf_counter()
    curvature = _one_process_curvature(im, theta, spec)
    with eval_mode(im.model):
        for at in range(0, ids_t.numel(), step):
            chunk = ids_t[at : at + step].tolist()
            batch = im._prepare(fetch(im.train_dataset, chunk, im._user_collate))
            grads, loss = per_example_grads_and_losses(im.loss, theta, spec, batch)
            check_finite(loss.detach(), "training loss")
            check_finite(grads, "training-example gradient")
            solved = im.solver.solve(curvature, grads)
            check_finite(solved, "solver solution for the training-example gradients")
            values[at : at + len(chunk)] = (grads * solved).sum(-1)
            losses[at : at + len(chunk)] = loss.detach()
    im._timed("self_influence", start)
    return (values, losses) if return_losses else values


def _one_process_curvature(im: Any, theta: Tensor, spec: Any) -> Any:
    """``im.curvature`` with one-process math even under an InfluenceStrategy: each rank solves for its own ids,
    so the solvers' collectives (sharded Hessian passes, LiSSA chains spread over ranks) must not run."""
    im.__dict__["_collectives"] = lambda: (0, 1, None)  # shadows the method on this instance only
    try:
        return im.curvature(theta, spec)
    finally:
        del im.__dict__["_collectives"]


# ---------------------------------------------------------------------------------------------- ranking
def rank_by_self_influence(
    ids: Tensor, values: Tensor, losses: Tensor | None = None, labels: Tensor | None = None
) -> list[dict[str, Any]]:
    """Records sorted by decreasing self-influence (ties by id): ``rank`` (1 = most suspicious), ``train_id``,
    ``self_influence``, and ``loss`` / ``label`` when given."""
    order = sorted(range(len(ids)), key=lambda i: (-float(values[i]), int(ids[i])))
    out = []
    for rank, i in enumerate(order):
        rec: dict[str, Any] = {"rank": rank + 1, "train_id": int(ids[i]), "self_influence": float(values[i])}
        if losses is not None:
            rec["loss"] = float(losses[i])
        if labels is not None:
            rec["label"] = int(labels[i])
        out.append(rec)
    return out


def mislabel_detection(
    scores: Tensor, flipped: Tensor, fractions: Sequence[float] = (0.05, 0.1, 0.2)
) -> dict[str, float]:
    """How well a ranking by ``scores`` (higher = more suspicious) finds the flipped labels.

    Args:
        scores: ``[N]`` one score per training example.
        flipped: ``[N]`` bool, True where the label was corrupted.
        fractions: inspection budgets: the share of the training set looked at, from the top of the ranking.

    Returns:
        ``{"found@5%": share of all flipped labels among the top 5%, ..., "auc": ROC AUC}`` (AUC 0.5 = chance,
        1 = every flipped example ranks above every clean one; ties count half).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    flipped = torch.as_tensor(flipped).flatten().bool()
    if scores.shape != flipped.shape:
        raise ConfigurationError(
            expected("flipped", f"a mask of shape {tuple(scores.shape)}", tuple(flipped.shape))
        )
    n_pos = int(flipped.sum())
    if n_pos == 0 or n_pos == flipped.numel():
        raise ConfigurationError(
            expected("flipped", "both flipped and clean examples", f"{n_pos} of {flipped.numel()}")
        )
    order = torch.argsort(scores, descending=True, stable=True)
    out: dict[str, float] = {}
    for f in fractions:
        k = max(1, round(f * scores.numel()))
        out[f"found@{f:.0%}"] = float(flipped[order[:k]].sum()) / n_pos
    # ROC AUC by the Mann-Whitney statistic, ties at average rank (exact; scores need not lie in [0, 1])
    ranks = _average_ranks(scores)
    n_neg = flipped.numel() - n_pos
    out["auc"] = float((ranks[flipped].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return out


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values`` in increasing order, tied values sharing their average rank."""
    order = torch.argsort(values, stable=True)
    sorted_v = values[order]
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, values.numel() + 1, dtype=values.dtype)
    uniq, inverse = torch.unique_consecutive(sorted_v, return_inverse=True)
    if uniq.numel() < values.numel():  # average within tie groups
        pos = torch.arange(1, values.numel() + 1, dtype=values.dtype)
        sums = torch.zeros(uniq.numel(), dtype=values.dtype).index_add_(0, inverse, pos)
        counts = torch.zeros(uniq.numel(), dtype=values.dtype).index_add_(0, inverse, torch.ones_like(pos))
        ranks[order] = (sums / counts)[inverse]
    return ranks


# ---------------------------------------------------------------------------------------------- DDP runner
class SelfInfluenceTask(pl.LightningModule):
    """Run :func:`self_influence` under a Trainer's ``predict``, sharded over processes, gathered on every rank.

    Feed ``trainer.predict`` a loader of training ids (``DataLoader(ids, batch_size=...)``). Under an
    :class:`~lightning_fastif.InfluenceStrategy` with ``shard="candidates"`` (every rank sees every batch) rank r
    scores the ids ``r::W`` of each batch; with ``shard="queries"`` or plain DDP the sampler already splits the ids.
    Each rank runs one-process math (its own solves), then ``values`` holds every id's self-influence on every rank.

    Args:
        im: the :class:`~lightning_fastif.InfluenceModule`.
        chunk_size: passed to :func:`self_influence`.
        on_done: ``callback(ids, values, losses, trainer)`` called on every rank once everything is gathered (with
            ``start_method="spawn"``/``"fork"`` the ranks are child processes: write results here, the parent's
            copy of the task stays empty).

    Example:
        >>> task = SelfInfluenceTask(im)
        >>> trainer = pl.Trainer(strategy=lf.InfluenceStrategy(), devices=2, inference_mode=False)
        >>> trainer.predict(task, DataLoader(torch.arange(len(train)), batch_size=256), return_predictions=False)
        >>> task.values  # [N]
    """

    def __init__(self, im: Any, chunk_size: int | None = None, on_done: Any = None) -> None:
        super().__init__()
        self.im = im
        self.chunk_size = chunk_size
        self.on_done = on_done
        self._parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.ids: Tensor | None = None
        self.values: Tensor | None = None
        self.losses: Tensor | None = None

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise ConfigurationError(
                "Expected the predict loop to allow gradients, but `Trainer(inference_mode=True)` (the default) "
                "runs it under torch.inference_mode. Pass `Trainer(inference_mode=False)`."
            )
        self._parts = []

    def _split_within_batch(self) -> tuple[int, int]:
        strategy = self.trainer.strategy
        if getattr(strategy, "shards_candidates", False):
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> int:
        ids = torch.as_tensor(batch[0] if isinstance(batch, (list, tuple)) else batch, dtype=torch.long).cpu()
        rank, world = self._split_within_batch()
        ids = ids[rank::world]
        if not ids.numel():
            return 0
        with torch.enable_grad():
            values, losses = self_influence(self.im, ids, chunk_size=self.chunk_size, return_losses=True)
        self._parts.append((ids, values.detach().cpu(), losses.detach().cpu()))
        return ids.numel()

    def on_predict_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        gather = getattr(strategy, "gather_objects", None)
        parts = gather(self._parts) if callable(gather) else self._gather_plain(strategy)
        flat = [p for rank_parts in parts for p in rank_parts]
        if not flat:
            self.ids = torch.zeros(0, dtype=torch.long)
            self.values = self.losses = torch.zeros(0)
            return
        ids = torch.cat([p[0] for p in flat])
        order = torch.argsort(ids, stable=True)
        self.ids = ids[order]
        self.values = torch.cat([p[1] for p in flat])[order]
        self.losses = torch.cat([p[2] for p in flat])[order]
        if self.ids.unique().numel() != self.ids.numel():
            raise ConfigurationError(
                "Expected every training id to be scored once, but some were scored on several ranks: pass a "
                "predict loader of unique ids."
            )
        rank_zero_info(f"lightning_fastif: self-influence of {self.ids.numel()} training examples")
        if self.on_done is not None:
            self.on_done(self.ids, self.values, self.losses, self.trainer)

    def _gather_plain(self, strategy: Any) -> list[Any]:
        """Every rank's parts for strategies other than InfluenceStrategy (plain DDP: all_gather_object)."""
        import torch.distributed as dist

        world = int(getattr(strategy, "world_size", 1))
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return [self._parts]
        out: list[Any] = [None] * world
        dist.all_gather_object(out, self._parts)
        return out


def run_self_influence(
    trainer: pl.Trainer,
    im: Any,
    ids: Sequence[int] | Tensor | None = None,
    batch_size: int | None = None,
    on_done: Any = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(ids, self-influence, losses)`` through ``trainer.predict`` (sharded under DDP), in increasing id order.

    ``on_done(ids, values, losses, trainer)`` runs on every rank when the values are gathered. Returns None in a
    launcher's parent process (``start_method`` spawn/fork), where the ranks' results are not available.
    """
    all_ids = _check_ids(ids, len(im.train_dataset))
    task = SelfInfluenceTask(im, on_done=on_done)
    trainer.predict_loop.inference_mode = False
    trainer.predict(
        task, DataLoader(all_ids, batch_size=batch_size or im.score_batch_size), return_predictions=False
    )
    if task.ids is None or task.values is None or task.losses is None:
        return None
    return task.ids, task.values, task.losses
