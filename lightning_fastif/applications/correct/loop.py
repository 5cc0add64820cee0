"""The error-correction loop (FastIF section 6) and its baselines under the same seeds and anchors.

Every run fine-tunes its own deep copy of the model with plain SGD steps on the selected parameters, in ``eval()``
mode. Part of ``lightning_fastif.applications.correct`` (see its docstring for the loop).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_fastif.applications._rebind import rebind
from lightning_fastif.applications.correct.result import CorrectionResult, _log
from lightning_fastif.applications.correct.slice import _accuracy, _is_int
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import fetch, move_to
from lightning_fastif.functional.params import select_params
from lightning_fastif.influence.group import group_candidates, group_s_test

__all__ = ["METHODS", "CorrectionSettings", "correct", "sgd_step"]

METHODS = ("helpful", "random", "harmful", "anchors")


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
