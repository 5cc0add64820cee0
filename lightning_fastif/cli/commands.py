"""The bodies of the ``lightning-fastif`` subcommands ``index``, ``influence``, ``evaluate``, ``self-influence`` and
``correct``: ``cli.InfluenceTrainer`` keeps the signatures and docstrings (LightningCLI builds the flags from
them) and hands off to these functions, ``trainer`` first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Subset

from lightning_fastif.applications.correct.slice import SliceSpec
from lightning_fastif.cli.inputs import (
    QuerySelection,
    _check_run_arguments,
    _dataset_of,
    _select_queries,
    influence_module,
    load_weights,
)
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.evaluation.lds.settings import LDSSettings
from lightning_fastif.functional.solvers.base import Solver
from lightning_fastif.reporting.callback import InfluenceReport
from lightning_fastif.reporting.writer import InfluenceWriter
from lightning_fastif.trainer.index_callback import FeatureIndexCallback


def index_command(
    trainer: pl.Trainer,
    *,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    ckpt_path: str | None,
    index_dir: str,
    feature_layer: str | None,
    index_factory: str,
    backend: str,
    nprobe: int | None,
    ef_search: int | None,
    batch_size: int,
    space: str,
    params: list[str] | None,
    sketch: str,
    sketch_dim: int,
    float16: bool,
) -> Path:
    """The ``index`` subcommand (arguments: :meth:`InfluenceTrainer.index`)."""
    _check_run_arguments(batch_size=batch_size)
    load_weights(model, ckpt_path)
    train, collate = _dataset_of(datamodule, "train")
    if space not in ("features", "gradients"):
        raise ConfigurationError(f"Expected `space` to be 'features' or 'gradients', but got {space!r}.")
    if space == "gradients":
        from lightning_fastif.trainer.gradient_callback import GradientIndexCallback

        gcb = GradientIndexCallback(
            index_dir,
            params=params,
            sketch=sketch,
            sketch_dim=sketch_dim,
            float16=float16,
            feature_layer=feature_layer,
            index_factory=index_factory,
            backend=backend,
            batch_size=batch_size,
            nprobe=nprobe,
            ef_search=ef_search,
        )
        start = time.perf_counter()
        out = gcb.build(model, train, trainer=None, collate_fn=collate)
        rank_zero_info(
            f"lightning_fastif: gradient index of {len(train)} training examples in {out} "
            f"({time.perf_counter() - start:.1f}s)"
        )
        return out
    cb = FeatureIndexCallback(
        index_dir,
        feature_layer=feature_layer,
        index_factory=index_factory,
        backend=backend,
        batch_size=batch_size,
        nprobe=nprobe,
        ef_search=ef_search,
    )
    start = time.perf_counter()
    out = cb.build(model, train, trainer=None, collate_fn=collate)
    rank_zero_info(
        f"lightning_fastif: index of {len(train)} training examples in {out} ({time.perf_counter() - start:.1f}s)"
    )
    return out


def influence_command(
    trainer: pl.Trainer,
    *,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    ckpt_path: str | None,
    index_dir: str | None,
    output_dir: str,
    solver: Solver | None,
    params: list[str] | None,
    num_candidates: int | None,
    top_k: int,
    queries: QuerySelection,
    score_batch_size: int,
    image_shape: list[int] | None,
    report: bool,
    pool: str | None,
    candidates: str,
    overwrite: bool = False,
) -> list[Any]:
    """The ``influence`` subcommand (arguments: :meth:`InfluenceTrainer.influence`)."""
    _check_run_arguments(output_dir, score_batch_size=score_batch_size, top_k=top_k)
    if not isinstance(overwrite, bool):
        raise ConfigurationError(f"Expected `overwrite` to be true or false, but got {overwrite!r}.")
    im = influence_module(
        model,
        datamodule,
        ckpt_path,
        index_dir,
        solver,
        params,
        num_candidates,
        top_k,
        score_batch_size,
        candidates=candidates,
    )
    query_set, collate = _dataset_of(datamodule, queries.split)
    ids = _select_queries(model, query_set, collate, queries)
    if not ids:
        rank_zero_info(
            "lightning_fastif: no queries selected (no misclassified examples?): nothing to explain"
        )
        return []
    if queries.group or pool is not None:  # group queries, candidate pools: lightning_fastif.applications
        from lightning_fastif.cli.correct import prepare_influence

        im = prepare_influence(im, datamodule, queries.group, pool)
    out = Path(output_dir)
    writer = InfluenceWriter(
        out, overwrite=overwrite, query_split=queries.split, overwrite_hint="--overwrite"
    )
    trainer.callbacks.append(writer)
    if report:
        trainer.callbacks.append(
            InfluenceReport(
                out,
                image_shape=image_shape or getattr(datamodule, "image_shape", None),
                class_names=getattr(datamodule, "class_names", None),
            )
        )
    trainer.predict_loop.inference_mode = False  # influence needs gradients inside predict
    start = time.perf_counter()
    batches = trainer.predict(
        im,
        dataloaders=DataLoader(
            Subset(query_set, ids),
            batch_size=len(ids) if queries.group else queries.batch_size,
            collate_fn=collate,
        ),
    )
    results = [r for b in batches or [] for r in b]
    seconds = time.perf_counter() - start
    # the queries of this run answered by kept records
    reused = len(writer.done & set(ids)) - len(writer.replaced)
    where = f"results in {out.resolve()}/{{influence.jsonl, report.html}}"
    if results:
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in im.timings.items())
        also = f"; reused {reused} records made with the same settings" if reused > 0 else ""
        rank_zero_info(
            f"lightning_fastif: explained {len(results)} queries in {seconds:.1f}s (stages: {stages}){also}; {where}"
        )
    else:
        rank_zero_info(
            f"lightning_fastif: explained no new query: all {max(reused, 0)} were reused from records made with the "
            f"same settings (--overwrite to recompute); {where}"
        )
    return results


def evaluate_command(
    trainer: pl.Trainer,
    *,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    ckpt_path: str | None,
    index_dir: str | None,
    output_dir: str,
    solver: Solver | None,
    reference_solver: Solver | None,
    params: list[str] | None,
    queries: QuerySelection,
    ks: list[int],
    top_m: int,
    loo_removals: int,
    score_batch_size: int,
    candidates: str,
    lds: LDSSettings,
) -> dict[str, Any]:
    """The ``evaluate`` subcommand (arguments: :meth:`InfluenceTrainer.evaluate`)."""
    from lightning_fastif.evaluation.checks import leave_one_out_check, solver_agreement
    from lightning_fastif.evaluation.diagnostics import approximation_diagnostics
    from lightning_fastif.functional.batch import fetch

    _check_run_arguments(output_dir, score_batch_size=score_batch_size)
    im = influence_module(
        model,
        datamodule,
        ckpt_path,
        index_dir,
        solver,
        params,
        max(ks),
        10,
        score_batch_size,
        candidates=candidates,
    )
    query_set, collate = _dataset_of(datamodule, queries.split)
    ids = _select_queries(model, query_set, collate, queries)
    if not ids:
        raise ConfigurationError("Expected `queries` to select at least one example, but got none.")
    batch = fetch(query_set, ids, collate)
    result: dict[str, Any] = {"queries": ids}
    if candidates == "features":
        rep = approximation_diagnostics(im, batch, ks=ks, top_m=top_m)
        result["knn_recall"] = rep.to_dict()
        print(
            f"\n## kNN candidate recall (full-scan top-{top_m} found among the k nearest)\n\n{rep.to_table()}"
        )
    from lightning_fastif.evaluation.diagnostics import compare_candidate_spaces

    spaces = compare_candidate_spaces(im, batch, ks=ks, top_m=top_m)
    result["candidate_recall"] = spaces.to_dict()
    print(
        f"\n## Candidate recall of both spaces (full-scan top-{top_m} found among the k candidates; "
        f"this run uses {candidates})\n\n{spaces.to_table()}"
    )
    from lightning_fastif.solvers.auto import reference_solver_for

    ref = reference_solver or reference_solver_for(im, batch)  # same curvature and damping, tight
    ag = solver_agreement(im, ref, batch)
    result["solver_agreement"] = ag.to_dict()
    print(
        f"\n## Solver agreement (influence over all {len(im.train_dataset)} training examples)\n\n"
        f"| solver | reference | Spearman | Pearson | top-10 overlap | seconds (solver / reference) |\n|---|---|---|---|---|---|\n"
        f"| {ag.solver} | {ag.reference} | {ag.spearman:.4f} | {ag.pearson:.4f} | {ag.top10_overlap:.2f} | "
        f"{ag.seconds:.2f} / {ag.reference_seconds:.2f} |"
    )
    if loo_removals:
        loo = leave_one_out_check(im, batch, removals=loo_removals)
        result["leave_one_out"] = loo.to_dict()
        print(
            f"\n## Leave-one-out retraining (query {ids[0]}, {loo_removals} removals, selected parameters, float64)\n\n"
            f"Pearson {loo.pearson:.4f}, Spearman {loo.spearman:.4f} between predicted (-I/N) and actual changes "
            "of the test loss"
        )
    if lds.subsets:
        from lightning_fastif.evaluation.lds.task import evaluate_lds

        result["lds"] = evaluate_lds(
            im, datamodule, query_set, collate, lds, Path(output_dir) / "lds", trainer
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    for logger in trainer.loggers:
        flat = {
            f"evaluate/recall_abs_{r['space']}@{r['k']}": r["recall_abs"]
            for r in spaces.rows
            if r["queries"] == "all"
        }
        flat.update({"evaluate/solver_spearman": ag.spearman})
        if "leave_one_out" in result:
            flat.update({"evaluate/loo_pearson": result["leave_one_out"]["pearson"]})
        if result.get("lds"):
            flat.update({"evaluate/lds": result["lds"]["lds"]})
        logger.log_metrics(flat)
        logger.save()
    rank_zero_info(f"lightning_fastif: evaluation written to {out / 'evaluation.json'}")
    return result


def self_influence_command(
    trainer: pl.Trainer,
    *,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    ckpt_path: str | None,
    output_dir: str,
    solver: Solver | None,
    params: list[str] | None,
    ids: list[int] | None,
    top: int,
    score_batch_size: int,
    image_shape: list[int] | None,
    report: bool,
) -> list[dict[str, Any]]:
    """The ``self-influence`` subcommand (arguments: :meth:`InfluenceTrainer.self_influence`)."""
    from lightning_fastif.evaluation.self_influence import run_self_influence
    from lightning_fastif.reporting.self_influence_html import write_self_influence_outputs

    im = influence_module(model, datamodule, ckpt_path, None, solver, params, None, 10, score_batch_size)
    records: list[dict[str, Any]] = []

    def write(got_ids: Any, values: Any, losses: Any, trainer: Any) -> None:  # on every rank (rank 0 writes)
        records[:] = write_self_influence_outputs(
            trainer,
            im,
            got_ids,
            values,
            losses,
            output_dir,
            top=top,
            image_shape=image_shape or getattr(datamodule, "image_shape", None),
            class_names=getattr(datamodule, "class_names", None),
            report=report,
        )

    run_self_influence(trainer, im, ids, batch_size=score_batch_size, on_done=write)
    return records


def correct_command(
    trainer: pl.Trainer,
    *,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    ckpt_path: str | None,
    output_dir: str,
    solver: Solver | None,
    params: list[str] | None,
    num_candidates: int | None,
    candidates: str,
    slice: SliceSpec | None,
    steps: int,
    anchors_per_step: int,
    examples_per_step: int,
    lr: float,
    seeds: list[int],
    methods: list[str],
    pool: str | None,
    score_batch_size: int,
    report: bool,
) -> dict[str, Any]:
    """The ``correct`` subcommand (arguments: :meth:`InfluenceTrainer.correct`)."""
    from lightning_fastif.applications.correct.loop import CorrectionSettings
    from lightning_fastif.cli.correct import run_correct

    settings = CorrectionSettings(
        steps=steps,
        anchors_per_step=anchors_per_step,
        examples_per_step=examples_per_step,
        lr=lr,
        seeds=list(seeds),
        methods=list(methods),
    )
    args = (model, datamodule, ckpt_path, None, solver, params, num_candidates, 10, score_batch_size)
    im = influence_module(*args, candidates=candidates)
    return run_correct(trainer, im, datamodule, slice, settings, pool, output_dir, report)
