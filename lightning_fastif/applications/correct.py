"""FastIF's error correction: fix a failing slice by fine-tuning on its most helpful training examples.

The loop (FastIF section 6, its HANS experiment), on the module's selected parameters:

1. the slice (test examples the model gets wrong) is split into an anchor pool and a held-out slice;
2. each step samples ``anchors_per_step`` anchors, computes the group s_test of their mean loss, scores the union
   of the anchors' ``num_candidates`` nearest candidates (the whole pool for a full scan) and takes the
   ``examples_per_step`` most helpful ones;
3. one plain SGD step (``lr``) on their mean loss; repeat ``steps`` times.

Baselines under the same seeds (the same anchors at every step): ``random`` (uniform examples of the pool),
``harmful`` (the most harmful candidates) and ``anchors`` (a step on the anchors themselves). After every step the
model is evaluated on the held-out slice and on the whole test set, so a fix that breaks the rest shows.

Every run fine-tunes its own deep copy of the model: the user's model is never changed. The SGD step runs with the
model in ``eval()`` mode (dropout off, BatchNorm on its running statistics), like the influence computation.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_fastif.applications._rebind import rebind
from lightning_fastif.applications.group import group_candidates, group_s_test
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import call_model, fetch, labels_of, logits_of, move_to
from lightning_fastif.functional.params import select_params

__all__ = [
    "METHODS",
    "CorrectionResult",
    "CorrectionSettings",
    "SliceSpec",
    "correct",
    "select_slice",
    "sgd_step",
]

METHODS = ("helpful", "random", "harmful", "anchors")


@dataclass
class SliceSpec:
    """The slice of test examples the model gets wrong, named in the config.

    Attributes:
        kind: ``class`` (misclassified examples of class ``label``), ``pair`` (examples of class ``label``
            predicted as ``predicted``: "true a, predicted b") or ``ids`` (the given ``ids``).
        label: the true class (``class`` and ``pair``).
        predicted: the wrongly predicted class (``pair``).
        ids: positions in the split (``ids``).
        split: the datamodule split the slice comes from (``test``, ``val``...); ``evaluate`` on the whole of it.
        anchor_fraction: share of the slice drawn (per seed) as the anchor pool; the rest is the held-out slice.
    """

    kind: str = "pair"
    label: int | None = None
    predicted: int | None = None
    ids: list[int] | None = None
    split: str = "test"
    anchor_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("class", "pair", "ids"):
            raise ConfigurationError(
                f"Expected `slice.kind` to be class, pair or ids, but got {self.kind!r}."
            )
        if self.kind in ("class", "pair") and not _is_int(self.label):
            raise ConfigurationError(
                f"Expected `slice.label` to be a class index with `kind: {self.kind}`, but got {self.label!r}."
            )
        if self.kind == "pair" and not _is_int(self.predicted):
            raise ConfigurationError(
                f"Expected `slice.predicted` to be a class index with `kind: pair`, but got {self.predicted!r}."
            )
        if self.kind == "ids" and not self.ids:
            raise ConfigurationError(
                "Expected `slice.ids` to be a non-empty list with `kind: ids`, but got none."
            )
        if not 0.0 < float(self.anchor_fraction) < 1.0:
            raise ConfigurationError(
                f"Expected `slice.anchor_fraction` to lie in (0, 1), but got {self.anchor_fraction!r}."
            )

    def describe(self) -> str:
        if self.kind == "pair":
            return f"true {self.label}, predicted {self.predicted}"
        if self.kind == "class":
            return f"misclassified {self.label}"
        return f"{len(self.ids or [])} given ids"


@dataclass
class CorrectionSettings:
    """Settings of the correction loop.

    Attributes:
        steps: SGD steps per run.
        anchors_per_step: anchors sampled (without replacement) from the anchor pool at each step.
        examples_per_step: training (pool) examples fine-tuned on at each step (helpful, random, harmful).
        lr: learning rate of the plain SGD step on the selected parameters.
        seeds: one run per seed and method; the seed draws the anchor split, the anchors and the random examples.
        methods: any of ``helpful``, ``random``, ``harmful``, ``anchors``.
        eval_batch_size: batch size of the evaluation passes.
    """

    steps: int = 5
    anchors_per_step: int = 4
    examples_per_step: int = 8
    lr: float = 0.05
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        for name in ("steps", "anchors_per_step", "examples_per_step", "eval_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigurationError(f"Expected `{name}` to be a positive int, but got {value!r}.")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigurationError(f"Expected `lr` to be a positive number, but got {self.lr!r}.")
        if (
            not self.seeds
            or not all(_is_int(s) for s in self.seeds)
            or len(set(self.seeds)) != len(self.seeds)
        ):
            raise ConfigurationError(
                f"Expected `seeds` to be a non-empty list of distinct ints, but got {self.seeds!r}."
            )
        bad = [m for m in self.methods if m not in METHODS]
        if not self.methods or bad:
            raise ConfigurationError(
                f"Expected `methods` to be a non-empty subset of {list(METHODS)}, but got {self.methods!r}."
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------ pieces
def predictions(
    model: nn.Module,
    dataset: Any,
    ids: Sequence[int] | None = None,
    collate_fn: Any = None,
    batch_size: int = 512,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(predicted classes [n], labels [n])`` of ``dataset`` rows ``ids`` (all if None), model in eval mode.

    ``forward_fn(model, batch)`` calls the model (default: ``model(x)`` / ``model(**inputs)``)."""
    part = dataset if ids is None else Subset(dataset, list(ids))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    preds, labels = [], []
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in DataLoader(part, batch_size=batch_size, collate_fn=collate_fn):
                batch = move_to(batch, device)
                logits, y = logits_of(call_model(model, batch, forward_fn)), labels_of(batch)
                if logits is None or y is None or logits.dim() != 2:
                    raise ConfigurationError(
                        "Expected a classifier (logits [B, C]) and labelled batches for error correction, but the "
                        "model or data gave none."
                    )
                preds.append(logits.argmax(-1).cpu())
                labels.append(y.reshape(-1).cpu())
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not preds:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(preds), torch.cat(labels)


def select_slice(
    model: nn.Module,
    dataset: Any,
    spec: SliceSpec,
    collate_fn: Any = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> list[int]:
    """Positions in ``dataset`` of the slice ``spec`` names, under ``model``'s current predictions.

    Example:
        >>> ids = select_slice(model, test_set, SliceSpec(kind="pair", label=3, predicted=8))
    """
    n = len(dataset)
    if spec.kind == "ids":
        bad = [i for i in spec.ids or [] if not _is_int(i) or not 0 <= i < n]
        if bad:
            raise ConfigurationError(f"Expected `slice.ids` to lie in [0, {n}), but got {bad[:10]}.")
        return sorted({int(i) for i in spec.ids or []})
    preds, labels = predictions(model, dataset, collate_fn=collate_fn, forward_fn=forward_fn)
    wrong = (labels == spec.label) & (preds != spec.label)
    if spec.kind == "pair":
        wrong &= preds == spec.predicted
    return wrong.nonzero().flatten().tolist()


def sgd_step(
    model: nn.Module,
    loss: Callable[[dict[str, Tensor], Any], Tensor],
    params: Sequence[str] | None,
    batch: Any,
    lr: float,
) -> float:
    """One plain SGD step ``θ ← θ - lr ∇θ mean L(batch)`` on the selected parameters only, in place on ``model``.

    The gradient is taken with the model in ``eval()`` mode (dropout off, BatchNorm on its running statistics);
    parameters outside ``params`` and every buffer are left as they are.

    Args:
        model: the model to update (pass a copy to keep the original).
        loss: ``(params, batch) -> [B]`` per-example losses of ``model`` (``resolve_loss(model, loss_fn)``).
        params: glob patterns of the parameters to update (``None``: every parameter with ``requires_grad``).
        batch: the examples, collated.
        lr: learning rate.

    Returns:
        The mean loss before the step.
    """
    selected = select_params(model, params)
    live = dict(model.named_parameters())
    device = next(iter(selected.values())).device
    dtype = next(iter(selected.values())).dtype
    batch = move_to(batch, device, dtype)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():

            def mean_loss(p: dict[str, Tensor]) -> Tensor:
                return loss(p, batch).mean()

            g, value = torch.func.grad_and_value(mean_loss)(selected)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not torch.isfinite(value) or not all(torch.isfinite(t).all() for t in g.values()):
        raise ConfigurationError(
            f"The correction step's loss or gradient is not finite (loss {float(value)}); lower `lr`."
        )
    with torch.no_grad():
        for name, step in g.items():
            live[name].sub_(lr * step)
    return float(value)


def _accuracy(
    model: nn.Module, dataset: Any, ids: Sequence[int] | None, collate_fn: Any, bs: int, fwd: Any = None
) -> float:
    if ids is not None and len(ids) == 0:
        return float("nan")
    preds, labels = predictions(model, dataset, ids, collate_fn, bs, fwd)
    return float((preds == labels).float().mean()) if len(labels) else float("nan")


# ------------------------------------------------------------------------------------------------ result
@dataclass
class CorrectionResult:
    """Curves and choices of every (method, seed) run.

    Attributes:
        slice: the slice description; ``slice_ids`` its positions in the test set.
        pool: which dataset the examples came from (``train`` or the pool's name); ``pool_size`` its length.
        settings: the loop's settings.
        curves: ``method -> {"slice": [seeds][steps + 1], "test": [seeds][steps + 1]}`` accuracies (step 0 is
            before any step).
        selected: ``method -> [seeds][steps][examples]`` the pool ids (``anchors``: test ids) stepped on.
        anchors: ``[seeds][steps][anchors]`` the anchors of each step (the same for every method).
        heldout: ``[seeds]`` the held-out slice ids of each seed.
        seconds: wall time per method.
    """

    slice: str
    slice_ids: list[int]
    pool: str
    pool_size: int
    settings: dict[str, Any]
    curves: dict[str, dict[str, list[list[float]]]]
    selected: dict[str, list[list[list[int]]]]
    anchors: list[list[list[int]]]
    heldout: list[list[int]]
    seconds: dict[str, float] = field(default_factory=dict)
    model: Any = field(
        default=None, repr=False
    )  # the corrected model (first seed, first method), not serialised

    def stats(self, method: str, what: str = "slice", step: int = -1) -> tuple[float, float]:
        """``(mean, standard deviation)`` over seeds of an accuracy at ``step`` (``-1``: the last)."""
        values = torch.tensor([run[step] for run in self.curves[method][what]], dtype=torch.float64)
        values = values[~values.isnan()]
        if values.numel() == 0:
            return float("nan"), float("nan")
        std = float(values.std(unbiased=True)) if values.numel() > 1 else 0.0
        return float(values.mean()), std

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per method: slice and test accuracy before and after, mean and std over seeds."""
        out = []
        for m in self.curves:
            s0, _ = self.stats(m, "slice", 0)
            s1, s1d = self.stats(m, "slice", -1)
            t0, _ = self.stats(m, "test", 0)
            t1, t1d = self.stats(m, "test", -1)
            out.append(
                {
                    "method": m,
                    "slice_before": s0,
                    "slice_after": s1,
                    "slice_after_std": s1d,
                    "slice_gain": s1 - s0,
                    "test_before": t0,
                    "test_after": t1,
                    "test_after_std": t1d,
                    "test_gain": t1 - t0,
                    "seeds": len(self.curves[m]["slice"]),
                    "seconds": self.seconds.get(m, float("nan")),
                }
            )
        return out

    def to_markdown(self) -> str:
        """The summary table in Markdown (accuracies in %, mean ± std over seeds)."""
        lines = [
            f"slice: {self.slice} ({len(self.slice_ids)} test examples), pool: {self.pool} ({self.pool_size}), "
            f"{self.settings.get('steps')} steps, {len(self.settings.get('seeds', []))} seeds",
            "",
            "| method | held-out slice acc. before → after (± std) | whole test acc. before → after (± std) |",
            "|---|---|---|",
        ]
        for r in self.rows():
            lines.append(
                f"| {r['method']} | {_pc(r['slice_before'])} → **{_pc(r['slice_after'])}** ± {_pc(r['slice_after_std'])} "
                f"| {_pc(r['test_before'])} → {_pc(r['test_after'])} ± {_pc(r['test_after_std'])} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        from lightning_fastif.results import _plain

        data = asdict(self)
        data.pop("model", None)
        data["summary"] = self.rows()
        return _plain(data)


def _pc(value: float) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"
    )


# ------------------------------------------------------------------------------------------------ the loop
def correct(
    im: Any,
    test_dataset: Any,
    slice_ids: Sequence[int],
    settings: CorrectionSettings | None = None,
    *,
    slice_name: str = "slice",
    anchor_fraction: float = 0.5,
    test_collate_fn: Callable[[list[Any]], Any] | None = None,
    loggers: Sequence[Any] = (),
) -> CorrectionResult:
    """Run FastIF's correction loop and its baselines for every seed; the user's model is not changed.

    Args:
        im: an ``InfluenceModule`` (its model, selected parameters, solver and candidate settings are used), or a
            :class:`~lightning_fastif.applications.pool.PoolInfluenceModule` to draw examples from another pool.
        test_dataset: the dataset the slice and the whole-test evaluation come from (same format as training).
        slice_ids: positions in ``test_dataset`` of the failing slice (see :func:`select_slice`).
        settings: the loop's settings (default :class:`CorrectionSettings`).
        slice_name: how the report names the slice.
        anchor_fraction: share of the slice drawn (per seed) as the anchor pool; the rest is held out.
        test_collate_fn: collate function of ``test_dataset`` (default: the module's).
        loggers: Lightning loggers; each gets the per-step mean accuracies (``correct/<method>/slice_acc``...).

    Returns:
        A :class:`CorrectionResult`; its ``model`` is the corrected copy of the first seed's ``helpful`` run (of the
        first method when ``helpful`` is not run).

    Example:
        >>> ids = select_slice(im.model, test_set, SliceSpec(kind="pair", label=3, predicted=8))
        >>> res = correct(im, test_set, ids, CorrectionSettings(steps=5, seeds=[0, 1, 2]))
        >>> print(res.to_markdown())
    """
    settings = settings or CorrectionSettings()
    slice_ids = [int(i) for i in slice_ids]
    if len(slice_ids) < 2:
        raise ConfigurationError(
            f"Expected the slice to hold at least 2 examples (anchors and held-out), but got {len(slice_ids)}. "
            "Check `slice` (no misclassified examples of that kind?)."
        )
    if not 0.0 < float(anchor_fraction) < 1.0:
        raise ConfigurationError(f"Expected `anchor_fraction` to lie in (0, 1), but got {anchor_fraction!r}.")
    n_anchor = max(1, min(len(slice_ids) - 1, round(anchor_fraction * len(slice_ids))))
    collate = test_collate_fn or im._user_collate
    pool = im.train_dataset
    pool_name = getattr(im, "pool_name", "train")
    if settings.examples_per_step > len(pool):
        raise ConfigurationError(
            f"Expected `examples_per_step` to be at most the pool size {len(pool)}, but got {settings.examples_per_step}."
        )
    index, feature_layer = _fixed_index(im) if _needs_candidates(im, settings) else (None, None)
    splits: list[tuple[list[int], list[int]]] = []
    anchors: list[list[list[int]]] = []
    for seed in settings.seeds:
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.tensor(slice_ids)[torch.randperm(len(slice_ids), generator=g)].tolist()
        a_pool, held = perm[:n_anchor], sorted(perm[n_anchor:])
        splits.append((a_pool, held))
        per = min(settings.anchors_per_step, len(a_pool))
        anchors.append(
            [
                [a_pool[j] for j in torch.randperm(len(a_pool), generator=g)[:per].tolist()]
                for _ in range(settings.steps)
            ]
        )
    curves: dict[str, dict[str, list[list[float]]]] = {}
    selected: dict[str, list[list[list[int]]]] = {}
    seconds: dict[str, float] = {}
    corrected = None
    bs = settings.eval_batch_size
    fwd = getattr(im, "forward_fn", None)  # how the user's model is called on a batch
    for method in settings.methods:
        start = time.perf_counter()
        curves[method] = {"slice": [], "test": []}
        selected[method] = []
        for s_i, seed in enumerate(settings.seeds):
            model = _copy_model(im.model)  # every run fine-tunes its own copy
            loss = rebind(im, model, index=index).loss  # the user's loss (and forward), resolved for the copy
            held = splits[s_i][1]
            acc_s = [_accuracy(model, test_dataset, held, collate, bs, fwd)]
            acc_t = [_accuracy(model, test_dataset, None, collate, bs, fwd)]
            chosen: list[list[int]] = []
            rng = torch.Generator().manual_seed(10_007 * int(seed) + 1)
            for step in range(settings.steps):
                step_anchors = anchors[s_i][step]
                a_batch = fetch(test_dataset, step_anchors, collate)
                if method == "anchors":
                    ids, batch = step_anchors, a_batch
                elif method == "random":
                    ids = torch.randperm(len(pool), generator=rng)[: settings.examples_per_step].tolist()
                    batch = fetch(pool, ids, im._user_collate)
                else:
                    module = rebind(
                        im, model, index=index, **({"feature_layer": feature_layer} if feature_layer else {})
                    )
                    ids = _extreme(module, a_batch, settings.examples_per_step, helpful=method == "helpful")
                    batch = fetch(pool, ids, im._user_collate)
                sgd_step(model, loss, im.param_patterns, batch, settings.lr)
                chosen.append([int(i) for i in ids])
                acc_s.append(_accuracy(model, test_dataset, held, collate, bs, fwd))
                acc_t.append(_accuracy(model, test_dataset, None, collate, bs, fwd))
            curves[method]["slice"].append(acc_s)
            curves[method]["test"].append(acc_t)
            selected[method].append(chosen)
            if corrected is None and (method == "helpful" or "helpful" not in settings.methods):
                corrected = model
        seconds[method] = time.perf_counter() - start
        s_mean = [
            sum(r[t] for r in curves[method]["slice"]) / len(settings.seeds)
            for t in range(settings.steps + 1)
        ]
        rank_zero_info(
            f"lightning_fastif correct: {method:8s} held-out slice acc. {100 * s_mean[0]:.1f}% -> {100 * s_mean[-1]:.1f}% "
            f"(mean of {len(settings.seeds)} seeds, {seconds[method]:.1f}s)"
        )
    result = CorrectionResult(
        slice=slice_name,
        slice_ids=sorted(slice_ids),
        pool=pool_name,
        pool_size=len(pool),
        settings={
            **asdict(settings),
            "anchor_pool_size": n_anchor,
            "solver": im.solver.name,
            "params": im.param_patterns,
            "num_candidates": im.num_candidates,
        },
        curves=curves,
        selected=selected,
        anchors=anchors,
        heldout=[h for _, h in splits],
        seconds=seconds,
        model=corrected,
    )
    _log(loggers, result)
    return result


def _copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, without the Trainer a LightningModule may be attached to (not copied, not kept)."""
    trainer = getattr(model, "_trainer", None)
    if trainer is None:
        return copy.deepcopy(model)
    model._trainer = None
    try:
        return copy.deepcopy(model)
    finally:
        model._trainer = trainer


def _needs_candidates(im: Any, settings: CorrectionSettings) -> bool:
    return im.num_candidates is not None and bool({"helpful", "harmful"} & set(settings.methods))


def _fixed_index(im: Any) -> tuple[Any, str | None]:
    """The candidate index of the original model, reused at every step (FastIF keeps its kNN index fixed).

    Feature-space candidates only; any other candidate space (``candidates="gradients"``) is left to the module,
    which builds its own at every step from the current weights.
    """
    if getattr(im, "candidates", "features") != "features":
        return None, None
    index = im.candidate_index()
    return index, getattr(im, "_feature_layer_name", None)


def _extreme(module: Any, anchors: Any, m: int, helpful: bool) -> list[int]:
    """The ``m`` most helpful (most negative) or most harmful (most positive) candidates of the anchors' mean loss."""
    s = group_s_test(module, anchors)
    cand = group_candidates(module, anchors)
    ids = torch.arange(len(module.train_dataset)) if cand is None else cand
    scores = module.score(s, ids)[0]
    order = torch.argsort(scores, descending=not helpful, stable=True)[:m]
    return ids[order].tolist()


def _log(loggers: Sequence[Any], result: CorrectionResult) -> None:
    """Per-step mean accuracies to every logger, and the summary table to W&B loggers."""
    steps = result.settings["steps"]
    for logger in loggers:
        for t in range(steps + 1):
            metrics = {}
            for m, c in result.curves.items():
                for what in ("slice", "test"):
                    vals = [run[t] for run in c[what] if not math.isnan(run[t])]
                    if vals:
                        metrics[f"correct/{m}/{what}_acc"] = sum(vals) / len(vals)
            logger.log_metrics(metrics, step=t)
        if callable(getattr(logger, "log_table", None)) and type(logger).__name__ == "WandbLogger":
            rows = result.rows()
            cols = list(rows[0])
            logger.log_table(key="correction", columns=cols, data=[[r[c] for c in cols] for r in rows])
        logger.save()
