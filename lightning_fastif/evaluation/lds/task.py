"""Running the LDS check: directly (:func:`lds_check`), under a Trainer's ``predict`` spread over processes
(:class:`LDSTask`, :func:`run_lds`), and as the LDS block of ``lightning-fastif evaluate`` (:func:`evaluate_lds`).

Part of ``lightning_fastif.evaluation.lds``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.errors import ConfigurationError, expected
from lightning_fastif.evaluation.lds.core import (
    lds_subsets,
    linear_datamodeling_score,
    predicted_group_effects,
)
from lightning_fastif.evaluation.lds.retrain import retrain_subsets
from lightning_fastif.evaluation.lds.settings import LDSReport, LDSSettings

__all__ = ["LDSTask", "evaluate_lds", "first_queries", "lds_check", "run_lds"]


def lds_check(
    im: Any,
    query: Any,
    settings: LDSSettings,
    output_dir: str | Path,
    *,
    scores: Tensor | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> LDSReport | None:
    """The LDS of ``im``'s influence (its solver) on the queries of ``query``, by retraining ``im.model``.

    Args:
        im: an :class:`~lightning_fastif.InfluenceModule` (its model, training set, loss and solver). The model
            is deep-copied for every retraining, never changed.
        query: a batch of query examples.
        settings: :class:`LDSSettings` (M, alpha, epochs, warm start...).
        output_dir: where the per-subset results go (resumable).
        scores: ``[Q, N]`` influence values to evaluate instead of ``im.influence(query)`` (e.g. a baseline).
        trainer_kwargs: extra ``pl.Trainer`` arguments of each retraining (accelerator, precision, strategy...).
        rank, world_size: retrain only the subsets ``rank::world_size`` (several processes share the work);
            the LDS is computed once every subset's file exists, else None is returned.

    Returns:
        An :class:`LDSReport`, or None when other ranks' subsets are not finished yet.
    """
    if settings.subsets < 2:
        raise ConfigurationError(expected("lds.subsets", "at least 2", settings.subsets))
    n = len(im.train_dataset)
    subsets = lds_subsets(n, settings.subsets, settings.fraction, settings.seed)
    if scores is None:
        scores = im.influence(query)
    scores = scores.detach().double().cpu()
    if scores.shape[1] != n:
        raise ConfigurationError(expected("scores", f"[Q, {n}] influence values", tuple(scores.shape)))
    start = time.perf_counter()
    mine, retrained, resumed, folder = retrain_subsets(
        im.model,
        im.train_dataset,
        subsets,
        query,
        settings,
        output_dir,
        loss_fn=im.loss.loss_fn,
        collate_fn=im._user_collate,
        trainer_kwargs=trainer_kwargs,
        rank=rank,
        world_size=world_size,
    )
    seconds = time.perf_counter() - start
    actual: dict[int, Tensor] = dict(mine)
    for m in range(settings.subsets):  # other ranks' finished subsets
        if m not in actual:
            path = folder / f"subset_{m:04d}.json"
            if not path.is_file():
                return None
            actual[m] = torch.tensor(json.loads(path.read_text())["query_losses"], dtype=torch.float64)
    losses = torch.stack([actual[m] for m in range(settings.subsets)], 1)  # [Q, M]
    predicted = predicted_group_effects(scores, subsets)
    mean, low, high, per = linear_datamodeling_score(
        predicted, losses, settings.confidence, seed=settings.seed
    )
    return LDSReport(
        lds=mean,
        ci_low=low,
        ci_high=high,
        per_query=per,
        num_queries=int(scores.shape[0]),
        num_subsets=settings.subsets,
        fraction=float(settings.fraction),
        solver=repr(im.solver),
        warm_start=settings.warm_start,
        max_epochs=settings.max_epochs,
        retrained=retrained,
        resumed=resumed,
        retrain_seconds=seconds,
        folder=str(folder),
    )


def first_queries(dataset: Any, n: int, collate_fn: Any = None) -> Any:
    """The batch of the first ``n`` examples of ``dataset`` (the LDS queries)."""
    from lightning_fastif.functional.batch import fetch

    return fetch(dataset, list(range(min(n, len(dataset)))), collate_fn)


def evaluate_lds(
    im: Any,
    datamodule: Any,
    query_set: Any,
    collate_fn: Any,
    settings: LDSSettings,
    output_dir: str | Path,
    trainer: Any = None,
) -> dict[str, Any]:
    """The LDS block of ``lightning-fastif evaluate``: the first ``settings.num_queries`` query examples, batch
    size from the datamodule unless set; prints the table beside the solver and returns the report as a dict."""
    import dataclasses

    if settings.batch_size is None:
        bs = getattr(datamodule, "batch_size", None)
        settings = dataclasses.replace(settings, batch_size=bs if isinstance(bs, int) and bs > 0 else None)
    query = first_queries(query_set, settings.num_queries, collate_fn)
    rep = run_lds(trainer, im, query, settings, output_dir) if trainer is not None else None
    if rep is None:  # no trainer, or a spawn/fork parent: every subset's file exists, so this resumes them
        rep = lds_check(im, query, settings, output_dir)
    if rep is None:  # pragma: no cover - one process always finishes every subset
        return {}
    if trainer is not None and trainer.global_rank != 0:
        return rep.to_dict()
    start = (
        "warm start from the trained weights" if rep.warm_start else "cold, from one seeded initialisation"
    )
    print(
        f"\n## Linear datamodeling score ({rep.num_subsets} subsets of {rep.fraction:g} of the training set, "
        f"retrained {rep.max_epochs} epochs, {start}; {len(rep.resumed)} resumed from {rep.folder})\n\n"
        f"{rep.to_table()}\n\nPublished for reference (dattri, MNIST MLP, cold retraining): CG ~0.26, TRAK-50 ~0.45."
    )
    return rep.to_dict()


# ---------------------------------------------------------------------------------------------- under a Trainer
def _lightning_module_base() -> type:
    import lightning.pytorch as pl

    return pl.LightningModule


class LDSTask(_lightning_module_base()):  # type: ignore[misc]
    """Retrain the LDS subsets under a Trainer's ``predict``, spread over processes, then compute the LDS.

    Feed ``trainer.predict`` a loader of subset indices (``DataLoader(torch.arange(M), batch_size=1)``). With plain
    DDP or ``InfluenceStrategy(shard="queries")`` the sampler gives rank r the subsets ``r::W``; with
    ``InfluenceStrategy(shard="candidates")`` (every rank sees every batch) rank r takes subset m when
    ``m % W == r``. Each subset is retrained by a one-process ``pl.Trainer`` inside its rank and saved to its file;
    at the end of the epoch the ranks meet at a barrier and every rank computes the same :class:`LDSReport` from the
    files (``report``), then calls ``on_done(report, trainer)``.

    Args:
        im: the :class:`~lightning_fastif.InfluenceModule`.
        query: the query batch.
        settings: :class:`LDSSettings`.
        output_dir: where the per-subset files go.
        scores: ``[Q, N]`` attribution to evaluate instead of ``im.influence(query)``.
        trainer_kwargs: extra ``pl.Trainer`` arguments of each retraining.
        on_done: ``callback(report, trainer)``, on every rank.
    """

    def __init__(
        self,
        im: Any,
        query: Any,
        settings: LDSSettings,
        output_dir: str | Path,
        scores: Tensor | None = None,
        trainer_kwargs: dict[str, Any] | None = None,
        on_done: Any = None,
    ) -> None:
        super().__init__()
        self.im = im
        self.query, self.settings, self.output_dir = query, settings, Path(output_dir)
        self.scores, self.trainer_kwargs, self.on_done = scores, trainer_kwargs, on_done
        self.subsets = lds_subsets(len(im.train_dataset), settings.subsets, settings.fraction, settings.seed)
        self.done: list[int] = []
        self.report: LDSReport | None = None

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> int:
        ids = torch.as_tensor(batch[0] if isinstance(batch, (list, tuple)) else batch).flatten().tolist()
        if getattr(self.trainer.strategy, "shards_candidates", False):  # every rank sees every batch
            ids = [m for m in ids if m % self.trainer.world_size == self.trainer.global_rank]
        if ids:
            _, retrained, _, _ = retrain_subsets(
                self.im.model,
                self.im.train_dataset,
                self.subsets,
                self.query,
                self.settings,
                self.output_dir,
                loss_fn=self.im.loss.loss_fn,
                collate_fn=self.im._user_collate,
                trainer_kwargs=self.trainer_kwargs,
                only=[int(m) for m in ids],
            )
            self.done.extend(retrained)
        return len(ids)

    def on_predict_epoch_end(self) -> None:
        barrier = getattr(self.trainer.strategy, "barrier", None)
        if callable(barrier):
            barrier("lds-subsets-retrained")
        with torch.enable_grad():
            self.report = lds_check(
                self.im,
                self.query,
                self.settings,
                self.output_dir,
                scores=self.scores,
                trainer_kwargs=self.trainer_kwargs,
            )
        if self.report is not None:
            self.report.retrained = sorted(self.done)  # what THIS rank retrained (the rest came from files)
        if self.on_done is not None:
            self.on_done(self.report, self.trainer)


def run_lds(
    trainer: Any,
    im: Any,
    query: Any,
    settings: LDSSettings,
    output_dir: str | Path,
    *,
    scores: Tensor | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    on_done: Any = None,
) -> LDSReport | None:
    """:func:`lds_check` through ``trainer.predict``: the subsets spread over the trainer's processes (DDP).

    Returns the report, or None in a launcher's parent process (``start_method`` spawn/fork), where the ranks'
    objects are not available (the per-subset files are: :func:`lds_check` then resumes every subset).
    """
    from torch.utils.data import DataLoader

    if settings.subsets < 2:
        raise ConfigurationError(expected("lds.subsets", "at least 2", settings.subsets))
    task = LDSTask(im, query, settings, output_dir, scores, trainer_kwargs, on_done)
    trainer.predict_loop.inference_mode = False
    trainer.predict(task, DataLoader(torch.arange(settings.subsets), batch_size=1), return_predictions=False)
    return task.report
