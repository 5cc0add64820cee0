"""The linear datamodeling score (LDS; Park et al. 2023, TRAK): how well summed influences predict retraining.

Draw M random subsets S_1..S_M of the training set, each of ``round(fraction * N)`` examples (seeded). Retrain
the model on each subset through Lightning (the module's own ``training_step`` and ``configure_optimizers``, a
``pl.Trainer`` fit on a ``Subset``), every time from the same initialisation, and record each query's loss. The
attribution predicts the **change of the query loss from training on S_m instead of the full set**, to first
order in the library's convention (DESIGN section 2: removing z changes the test loss by about ``-I(z) / N``):

    predicted[q, m] = -(1/N) * sum_{i not in S_m} I(z_i, q) = (1/N) * (sum_{i in S_m} I(z_i, q) - sum_i I(z_i, q))

The LDS of a query is the Spearman correlation over the M subsets between ``predicted[q, :]`` and the actual loss
of the M retrained models; the reported LDS is the mean over queries, with a bootstrap confidence interval over
queries. (Spearman is invariant to the constant term and to the positive 1/N, so this is the same number TRAK,
dattri and kronfluence publish from "sum of the subset's attributions".)

Retraining is resumable: each subset's query losses go to ``<output_dir>/lds-<fingerprint>/subset_<m>.json`` as it
finishes (the fingerprint covers the subsets, the settings, the initial weights and the queries), and a rerun
loads finished subsets instead of retraining them. ``rank``/``world_size`` spread the subsets over processes
(rank r retrains subsets ``r::W``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.errors import ConfigurationError, expected
from lightning_fastif.functional.batch import move_to
from lightning_fastif.functional.solvers import Solver

__all__ = [
    "IdentitySolver",
    "LDSReport",
    "LDSSettings",
    "LDSTask",
    "lds_check",
    "lds_subsets",
    "linear_datamodeling_score",
    "predicted_group_effects",
    "retrain_subsets",
    "run_lds",
    "shard_subsets",
]


@dataclass
class LDSSettings:
    """The LDS check of ``lightning-fastif evaluate`` (``--lds.subsets M --lds.fraction alpha``).

    Attributes:
        subsets: M, the number of random training subsets retrained (0: skip the LDS check).
        fraction: alpha, the share of the training set in each subset (0 < alpha < 1; TRAK and dattri use 0.5).
        seed: seed of the subsets, the initialisation (unless warm start) and the data order of each retraining.
        max_epochs: epochs of each retraining.
        batch_size: training batch size of the retraining (default: the datamodule's ``batch_size``, else 64).
        warm_start: start every retraining from the trained weights instead of the seeded re-initialisation
            (much less retraining noise, but it measures a local linearisation; reported as such).
        num_queries: the first this many examples of the query split are the LDS queries.
        confidence: level of the bootstrap confidence interval of the mean LDS over queries.
    """

    subsets: int = 0
    fraction: float = 0.5
    seed: int = 0
    max_epochs: int = 20
    batch_size: int | None = None
    warm_start: bool = False
    num_queries: int = 100
    confidence: float = 0.95

    def __post_init__(self) -> None:
        for name in ("subsets", "max_epochs", "num_queries", "seed"):
            value = getattr(self, name)
            low = 0 if name in ("subsets", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(expected(f"lds.{name}", f"an int >= {low}", value))
        if self.subsets == 1:
            raise ConfigurationError(
                expected("lds.subsets", "0 (off) or at least 2 (a correlation over subsets)", 1)
            )
        if not isinstance(self.fraction, (int, float)) or not 0.0 < float(self.fraction) < 1.0:
            raise ConfigurationError(
                expected("lds.fraction", "a number strictly between 0 and 1", self.fraction)
            )
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ConfigurationError(expected("lds.batch_size", "a positive int or None", self.batch_size))
        if not 0.0 < float(self.confidence) < 1.0:
            raise ConfigurationError(
                expected("lds.confidence", "a number strictly between 0 and 1", self.confidence)
            )


@dataclass
class LDSReport:
    """The LDS of an attribution: mean Spearman over queries, with a bootstrap confidence interval."""

    lds: float
    ci_low: float
    ci_high: float
    per_query: list[float]
    num_queries: int
    num_subsets: int
    fraction: float
    solver: str
    warm_start: bool
    max_epochs: int
    retrained: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    retrain_seconds: float = 0.0
    folder: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_table(self) -> str:
        start = "warm start (trained weights)" if self.warm_start else "same seeded initialisation"
        return (
            "| solver | LDS (mean Spearman) | CI | queries | subsets M | fraction | retraining |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {self.solver} | {self.lds:.4f} | [{self.ci_low:.4f}, {self.ci_high:.4f}] | {self.num_queries} | "
            f"{self.num_subsets} | {self.fraction:g} | {self.max_epochs} epochs, {start} |"
        )


class IdentitySolver(Solver):
    """No curvature: ``s_test = grad L(z_test)`` (the gradient dot product / TracIn-at-the-end baseline).

    A stand-in solver with the Solver interface (``solve(curvature, vectors) -> vectors``), so influence with it is
    ``-grad L(z) . grad L(z_test)``. ``damping`` is recorded but unused (it would only rescale every score).
    """

    name = "identity"

    def solve(self, curvature: Any, vectors: Tensor) -> Tensor:
        return vectors.clone()


# ---------------------------------------------------------------------------------------------- pure parts
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
    from lightning_fastif.self_influence import _average_ranks

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


# ---------------------------------------------------------------------------------------------- retraining
def _copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of the user's module that does not drag its Trainer along (the user's model is never touched)."""
    trainer = getattr(model, "_trainer", None)
    memo = {} if trainer is None else {id(trainer): None}
    return copy.deepcopy(model, memo)


def _seeded_init(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """The state dict after re-initialising every submodule that has ``reset_parameters`` (seeded)."""
    fresh = _copy_model(model)
    covered: set[str] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prefix, module in fresh.named_modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(
                    f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)
                )
    kept = [n for n, _ in fresh.named_parameters() if n not in covered]
    if kept:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"LDS: {len(kept)} parameter tensor(s) belong to modules without `reset_parameters` and keep their "
            f"trained values in every retraining (e.g. {kept[:3]}); the rest are re-initialised (seeded)."
        )
    return {k: v.detach().clone() for k, v in fresh.state_dict().items()}


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Tensor):
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(p, dict):
            for k in sorted(p):
                h.update(k.encode())
                h.update(_digest(p[k]).encode())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


def _query_losses(model: nn.Module, loss_fn: Any, query: Any) -> Tensor:
    from lightning_fastif.functional.losses import resolve_loss

    loss = resolve_loss(model, loss_fn)
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            params = {n: p.detach() for n, p in model.named_parameters()}
            ref = next(iter(params.values()))
            return loss(params, move_to(query, ref.device, ref.dtype)).detach().cpu().double()
    finally:
        for m, mode in was.items():
            m.training = mode


def retrain_subsets(
    model: nn.Module,
    train_dataset: Any,
    subsets: Tensor,
    query: Any,
    settings: LDSSettings,
    output_dir: str | Path,
    *,
    loss_fn: Any = None,
    collate_fn: Any = None,
    trainer_kwargs: dict[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    only: list[int] | None = None,
) -> tuple[dict[int, Tensor], list[int], list[int], Path]:
    """Retrain this rank's subsets (``rank::world_size``, or exactly ``only``) through Lightning; record query losses.

    Each subset: a deep copy of ``model`` loaded with the common initial state (seeded re-initialisation, or the
    trained weights with ``settings.warm_start``), ``pl.Trainer(max_epochs=...).fit`` on a shuffled
    ``DataLoader(Subset(train_dataset, ids))`` (order seeded by ``(seed, m)``), then the per-example query losses.
    A finished subset is saved at once to ``<output_dir>/lds-<fingerprint>/subset_<m>.json``; finished subsets are
    loaded, not retrained.

    Returns:
        ``({m: query losses [Q]}, retrained ids, resumed ids, folder)`` for this rank's subsets.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info
    from torch.utils.data import DataLoader, Subset

    from lightning_fastif.functional.losses import resolve_loss
    from lightning_fastif.reporting.html import atomic_write_text

    init = (
        {k: v.detach().clone() for k, v in model.state_dict().items()}
        if settings.warm_start
        else _seeded_init(model, settings.seed)
    )
    base_losses = _query_losses(model, loss_fn, query)  # also checks the loss resolves before any retraining
    resolve_loss(model, loss_fn)
    batch_size = settings.batch_size or 64
    key = _digest(
        subsets,
        init,
        base_losses,
        (settings.max_epochs, batch_size, settings.warm_start, settings.seed, len(train_dataset)),
        sorted((trainer_kwargs or {}).items()),
    )
    folder = Path(output_dir) / f"lds-{key[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(
        json.dumps(
            {**asdict(settings), "batch_size": batch_size, "num_subsets": int(subsets.shape[0])}, indent=2
        )
    )
    results: dict[int, Tensor] = {}
    retrained: list[int] = []
    resumed: list[int] = []
    for m in shard_subsets(int(subsets.shape[0]), rank, world_size) if only is None else only:
        path = folder / f"subset_{m:04d}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                results[m] = torch.tensor(saved["query_losses"], dtype=torch.float64)
                resumed.append(m)
                continue
        start = time.perf_counter()
        trained = _copy_model(model)
        trained.load_state_dict(init)
        trained.train()  # the user's model may sit in eval mode (influence runs there); training starts in train mode
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + m + 1)
        loader = DataLoader(
            Subset(train_dataset, subsets[m].tolist()),
            batch_size=batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=collate_fn,
        )
        kwargs = {
            "max_epochs": settings.max_epochs,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
        }
        kwargs.update(trainer_kwargs or {})
        quiet = logging.getLogger("lightning.pytorch")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # M fits would print M copies of Lightning's banner
        try:
            with torch.random.fork_rng(
                devices=[]
            ):  # dropout etc. seeded per subset; the caller's RNG untouched
                torch.manual_seed(settings.seed * 1_000_003 + m + 1)
                pl.Trainer(**kwargs).fit(trained, train_dataloaders=loader)
        finally:
            quiet.setLevel(level)
        losses = _query_losses(trained, loss_fn, query)
        record = {
            "key": key,
            "subset": m,
            "query_losses": losses.tolist(),
            "seconds": time.perf_counter() - start,
        }
        atomic_write_text(path, json.dumps(record))
        results[m] = losses
        retrained.append(m)
        rank_zero_info(
            f"lightning_fastif: LDS subset {m + 1}/{subsets.shape[0]} retrained in {record['seconds']:.1f}s "
            f"({len(subsets[m])} examples, {settings.max_epochs} epochs); saved to {path}"
        )
    return results, retrained, resumed, folder


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
