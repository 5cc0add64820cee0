"""``lightning-fastif``: Lightning's CLI (fit, validate, test, predict) plus ``index``, ``influence`` and ``evaluate``.

Arguments come from the signatures and docstrings below; configs are YAML with omegaconf interpolation resolved after
every file and flag is merged (``parser_mode="omegaconf+"``). See ``configs/`` for examples.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Subset

from lightning_fastif.applications.correct import SliceSpec
from lightning_fastif.callbacks import FeatureIndexCallback, InfluenceWriter
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.solvers import Solver
from lightning_fastif.lds import LDSSettings
from lightning_fastif.module import InfluenceModule
from lightning_fastif.reporting.callback import InfluenceReport

__all__ = ["FastIFCLI", "InfluenceTrainer", "QuerySelection", "main"]


@dataclass
class QuerySelection:
    """Which examples to explain.

    Attributes:
        split: dataset of the datamodule the queries come from: ``train``, ``val``, ``test`` or ``predict``.
        select: ``misclassified`` (examples the model gets wrong, in order), ``ids`` (the given ``ids``) or
            ``first`` (the first ``n``).
        ids: query ids (positions in the split), for ``select: ids``.
        n: at most this many queries (for ``misclassified`` and ``first``).
        batch_size: queries per predict batch.
        group: explain the selected queries as one group: one s_test for their mean loss, one result whose
            ``group`` lists the members (all queries in one batch).
    """

    split: str = "test"
    select: str = "misclassified"
    ids: list[int] | None = None
    n: int = 10
    batch_size: int = 16
    group: bool = False

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test", "predict"):
            raise ConfigurationError(
                f"Expected `queries.split` to be train, val, test or predict, but got {self.split!r}."
            )
        if self.select not in ("misclassified", "ids", "first"):
            raise ConfigurationError(
                f"Expected `queries.select` to be misclassified, ids or first, but got {self.select!r}."
            )
        if self.select == "ids" and not self.ids:
            raise ConfigurationError(
                "Expected `queries.ids` to be a non-empty list with `select: ids`, but got none."
            )
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigurationError(f"Expected `queries.n` to be a positive int, but got {self.n!r}.")


def _dataset_of(datamodule: pl.LightningDataModule | None, split: str) -> tuple[Any, Any]:
    """(dataset, collate_fn) of a datamodule split, read from its dataloader (not iterated)."""
    if datamodule is None:
        raise ConfigurationError("Expected a `data` (LightningDataModule) in the config, but got none.")
    stage = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split]
    datamodule.setup(stage)
    method = {
        "train": "train_dataloader",
        "val": "val_dataloader",
        "test": "test_dataloader",
        "predict": "predict_dataloader",
    }[split]
    loader = getattr(datamodule, method)()
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ConfigurationError(
            f"Expected the datamodule's {method}() to wrap a map-style dataset, but got {type(dataset).__name__}."
        )
    return dataset, getattr(loader, "collate_fn", None)


def check_checkpoint_file(ckpt_path: str | os.PathLike[str]) -> Path:
    """``ckpt_path`` as a ``Path`` when it is a file ``torch.save`` wrote (zip, or a legacy pickle), else a clear
    ConfigurationError (torch's own error for a text file is ``KeyError: 101`` or an unpickling message)."""
    import zipfile

    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigurationError(
            f"Expected `ckpt_path` to be an existing checkpoint file, but got {str(ckpt_path)!r}"
            + (" (a folder)." if path.is_dir() else " (no such file).")
        )
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        shown = head[:40].decode("utf-8", "replace").splitlines()[0] if head else "an empty file"
        raise ConfigurationError(
            f"Expected `ckpt_path` to be a checkpoint written by Lightning or torch.save (a .ckpt), but "
            f"{str(ckpt_path)!r} is not one (it starts with {shown!r})."
        )
    return path


def _index_readable(index_dir: str | os.PathLike[str]) -> bool:
    """Whether ``load_index`` can read ``index_dir``: the folder, or the complete leftover of an interrupted swap."""
    from lightning_fastif.retrieval._files import leftovers

    path = Path(index_dir)
    return path.exists() or bool(leftovers(path))


def _check_run_arguments(output_dir: str | None = None, **positive: Any) -> None:
    """Model-free arguments of a subcommand, checked before the checkpoint, data or index are loaded."""
    from lightning_fastif._runtime import check_positive_int
    from lightning_fastif.reporting._paths import check_output_dir

    for name, value in positive.items():
        check_positive_int(name, value)
    if output_dir is not None:
        check_output_dir(output_dir, "output_dir")


def load_weights(model: torch.nn.Module, ckpt_path: str | os.PathLike[str] | None) -> None:
    """Load a Lightning checkpoint's weights into ``model``, with an error that says what does not match."""
    if ckpt_path is None:
        return
    path = check_checkpoint_file(ckpt_path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigurationError(
            f"Expected `ckpt_path` to be a readable checkpoint, but reading {path} failed: {err}"
        ) from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConfigurationError(f"Expected `ckpt_path` to hold a state_dict, but got {type(ckpt).__name__}.")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ConfigurationError(
            f"The checkpoint {path} does not match the model {type(model).__name__}: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]}, shape mismatches {shapes[:8]}. Check `model` and `ckpt_path`."
        )
    model.load_state_dict(state)


def _select_queries(model: torch.nn.Module, dataset: Any, collate_fn: Any, sel: QuerySelection) -> list[int]:
    n = len(dataset)
    if sel.select == "ids":
        bad = [i for i in sel.ids or [] if not 0 <= int(i) < n]
        if bad:
            raise ConfigurationError(f"Expected `queries.ids` to lie in [0, {n}), but got {bad[:10]}.")
        return [int(i) for i in sel.ids or []]
    if sel.select == "first":
        return list(range(min(sel.n, n)))
    from lightning_fastif.functional.batch import call_model, labels_of, logits_of, move_to

    wrong: list[int] = []
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=512, collate_fn=collate_fn)
    was = model.training
    model.eval()
    with torch.no_grad():
        start = 0
        for batch in loader:
            batch = move_to(batch, device)
            logits, labels = logits_of(call_model(model, batch)), labels_of(batch)
            if logits is None or labels is None:
                raise ConfigurationError(
                    "Expected `queries.select: misclassified` to see logits and labels; use ids or first."
                )
            wrong += (start + (logits.argmax(-1) != labels).nonzero().flatten()).tolist()
            start += len(labels)
            if len(wrong) >= sel.n:
                break
    model.train(was)
    return wrong[: sel.n]


def _default_solver() -> Solver:
    from lightning_fastif.solver_choice import AutoSolver

    return AutoSolver()  # Exact if it fits, else EK-FAC, else CG on Gauss-Newton; damping "auto"


class InfluenceTrainer(pl.Trainer):
    """A ``Trainer`` with the influence subcommands of ``lightning-fastif``."""

    def index(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        index_dir: str = "outputs/index",
        feature_layer: str | None = None,
        index_factory: str = "Flat",
        backend: str = "faiss",
        nprobe: int | None = None,
        ef_search: int | None = None,
        batch_size: int = 256,
        space: str = "features",
        params: list[str] | None = None,
        sketch: str = "auto",
        sketch_dim: int = 1024,
        float16: bool = False,
    ) -> Path:
        """Build the FastIF candidate index (penultimate-layer features of the training set) from a checkpoint.

        Args:
            model: the trained model (its weights are loaded from ``ckpt_path``).
            datamodule: provides the training set (read in order, unshuffled).
            ckpt_path: checkpoint to load.
            index_dir: folder to write the index to.
            feature_layer: module whose input is the feature (default: the last nn.Linear called).
            index_factory: FAISS factory string: Flat (exact), IVF1024,Flat, HNSW32...
            backend: faiss or torch (exact).
            nprobe: IVF lists searched per query.
            ef_search: HNSW search depth.
            batch_size: batch size of the feature pass.
            space: features (FastIF's penultimate-layer kNN) or gradients (per-example gradient sketches, searched by
                inner product with the projected s_test; use with ``candidates: gradients``).
            params: (gradients) glob patterns of the differentiated parameters: those of ``influence``.
            sketch: (gradients) auto, head (exact, final Linear), kronecker (LoGra, Linear layers) or dense.
            sketch_dim: (gradients) dimension of the random projections.
            float16: (gradients) store the sketches as float16.
        """
        _check_run_arguments(batch_size=batch_size)
        load_weights(model, ckpt_path)
        train, collate = _dataset_of(datamodule, "train")
        if space not in ("features", "gradients"):
            raise ConfigurationError(f"Expected `space` to be 'features' or 'gradients', but got {space!r}.")
        if space == "gradients":
            from lightning_fastif.gradient_callback import GradientIndexCallback

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

    def _influence_module(
        self,
        model: pl.LightningModule,
        datamodule: Any,
        ckpt_path: str | None,
        index_dir: str | None,
        solver: Solver | None,
        params: list[str] | None,
        num_candidates: int | None,
        top_k: int,
        batch_size: int,
        candidates: str = "features",
    ) -> InfluenceModule:
        load_weights(model, ckpt_path)
        train, collate = _dataset_of(datamodule, "train")
        if index_dir is not None and num_candidates is not None and not _index_readable(index_dir):
            raise ConfigurationError(
                f"Expected `index_dir` to be an index folder (run `lightning-fastif index` or fit with "
                f"FeatureIndexCallback first), but {index_dir!r} does not exist."
            )
        return InfluenceModule(
            model,
            train,
            params=params,
            solver=solver or _default_solver(),
            num_candidates=num_candidates,
            top_k=top_k,
            index=index_dir if num_candidates is not None else None,
            batch_size=batch_size,
            collate_fn=collate,
            candidates=candidates,
        )

    def influence(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        index_dir: str | None = "outputs/index",
        output_dir: str = "outputs/influence",
        solver: Solver | None = None,
        params: list[str] | None = None,
        num_candidates: int | None = 1000,
        top_k: int = 10,
        queries: QuerySelection = QuerySelection(),  # noqa: B008 - a frozen-by-convention settings block
        score_batch_size: int = 256,
        image_shape: list[int] | None = None,
        report: bool = True,
        pool: str | None = None,
        candidates: str = "features",
    ) -> list[Any]:
        """Rank the most helpful and most harmful training examples of a set of queries, and write the results.

        Writes ``output_dir/influence.jsonl`` (one query a line), ``output_dir/report.html`` and, when the trainer
        has a WandbLogger, a W&B table.

        Args:
            model: the trained model (weights loaded from ``ckpt_path``).
            datamodule: provides the training set and the query split.
            ckpt_path: checkpoint to load.
            index_dir: the candidate index folder (from fit with FeatureIndexCallback or the ``index`` subcommand).
            output_dir: where results go.
            solver: AutoSolver (default: Exact when the dense system fits, else EK-FAC, else CG on Gauss-Newton,
                damping "auto"), ExactSolver, CGSolver, LiSSASolver, EKFACSolver or KFACSolver.
            params: glob patterns of the parameters to differentiate (default: all trainable).
            num_candidates: k nearest training examples scored per query (null: the whole training set).
            top_k: helpful and harmful examples kept per query.
            queries: which examples to explain.
            score_batch_size: batch size of candidate scoring and Hessian passes.
            candidates: features (FastIF's kNN) or gradients (gradient-sketch index, `index --space gradients`);
                the candidates are scored exactly either way.
            image_shape: reshape flat inputs into images in the reports (default: the datamodule's image_shape).
            report: write report.html and the W&B table.
            pool: candidate pool other than the training set: a datamodule split (val, test, predict) searched and
                scored instead (the curvature still comes from the training set); ids then refer to it and every
                record says ``extra.pool``; its index is built in memory.
        """
        _check_run_arguments(output_dir, score_batch_size=score_batch_size, top_k=top_k)
        im = self._influence_module(
            model, datamodule, ckpt_path, index_dir, solver, params, num_candidates, top_k, score_batch_size,
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
            from lightning_fastif.applications._cli import prepare_influence

            im = prepare_influence(im, datamodule, queries.group, pool)
        out = Path(output_dir)
        self.callbacks.append(InfluenceWriter(out, query_split=queries.split))
        if report:
            self.callbacks.append(
                InfluenceReport(
                    out,
                    image_shape=image_shape or getattr(datamodule, "image_shape", None),
                    class_names=getattr(datamodule, "class_names", None),
                )
            )
        self.predict_loop.inference_mode = False  # influence needs gradients inside predict
        start = time.perf_counter()
        batches = self.predict(
            im,
            dataloaders=DataLoader(
                Subset(query_set, ids),
                batch_size=len(ids) if queries.group else queries.batch_size,
                collate_fn=collate,
            ),
        )
        results = [r for b in batches or [] for r in b]
        rank_zero_info(
            f"lightning_fastif: explained {len(results)} queries in {time.perf_counter() - start:.1f}s "
            f"(stages: {', '.join(f'{k} {v:.2f}s' for k, v in im.timings.items())}); results in {out.resolve()}/"
            "{influence.jsonl, report.html}"
        )
        return results

    def evaluate(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        index_dir: str | None = "outputs/index",
        output_dir: str = "outputs/evaluate",
        solver: Solver | None = None,
        reference_solver: Solver | None = None,
        params: list[str] | None = None,
        queries: QuerySelection = QuerySelection(n=5),  # noqa: B008
        ks: list[int] = [10, 100, 1000],  # noqa: B006
        top_m: int = 10,
        loo_removals: int = 10,
        score_batch_size: int = 256,
        candidates: str = "features",
        lds: LDSSettings = LDSSettings(),  # noqa: B008 - a settings block, like queries
    ) -> dict[str, Any]:
        """Measure the approximations on this model: kNN recall against a full scan, solver agreement against a
        reference solver, and a small leave-one-out retraining check. Prints tables and writes JSON.

        Args:
            model: the trained model (weights loaded from ``ckpt_path``).
            datamodule: provides the training set and the query split.
            ckpt_path: checkpoint to load.
            index_dir: the candidate index folder (null: build an exact one in memory).
            output_dir: where ``evaluation.json`` goes.
            solver: the solver to check (default as in ``influence``).
            reference_solver: the solver to compare with (default: ExactSolver when the selected parameters fit
                in memory, else CGSolver), with the same damping.
            params: glob patterns of the parameters to differentiate.
            queries: which examples to evaluate on.
            ks: candidate counts of the recall table.
            top_m: size of the full-scan top lists whose recall is measured.
            loo_removals: training examples removed one at a time in the leave-one-out check (0: skip it).
            score_batch_size: batch size of scoring and Hessian passes.
            candidates: features (FastIF's kNN) or gradients (gradient-sketch index, `index --space gradients`);
                the candidates are scored exactly either way.
            lds: the linear datamodeling score (``--lds.subsets M --lds.fraction alpha``; 0 subsets: skip): M
                subsets retrained through Lightning, Spearman of summed influences against the actual query losses.
        """
        from lightning_fastif.diagnostics import approximation_diagnostics
        from lightning_fastif.evaluation import leave_one_out_check, solver_agreement
        from lightning_fastif.functional.batch import fetch

        _check_run_arguments(output_dir, score_batch_size=score_batch_size)
        im = self._influence_module(
            model, datamodule, ckpt_path, index_dir, solver, params, max(ks), 10, score_batch_size,
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
        from lightning_fastif.diagnostics import compare_candidate_spaces

        spaces = compare_candidate_spaces(im, batch, ks=ks, top_m=top_m)
        result["candidate_recall"] = spaces.to_dict()
        print(
            f"\n## Candidate recall of both spaces (full-scan top-{top_m} found among the k candidates; "
            f"this run uses {candidates})\n\n{spaces.to_table()}"
        )
        from lightning_fastif.solver_choice import reference_solver_for

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
            from lightning_fastif.lds import evaluate_lds

            result["lds"] = evaluate_lds(
                im, datamodule, query_set, collate, lds, Path(output_dir) / "lds", self
            )
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(result, indent=2))
        for logger in self.loggers:
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

    def self_influence(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output_dir: str = "outputs/self_influence",
        solver: Solver | None = None,
        params: list[str] | None = None,
        ids: list[int] | None = None,
        top: int = 60,
        score_batch_size: int = 256,
        image_shape: list[int] | None = None,
        report: bool = True,
    ) -> list[dict[str, Any]]:
        """Rank training examples by self-influence (most likely mislabelled or atypical first) and write them.

        Self-influence is grad L(z) . (C + damping I)^-1 grad L(z) >= 0 (= -I(z, z)). Writes
        ``output_dir/self_influence.jsonl`` (ranked), ``self_influence.html`` and, with a WandbLogger, a W&B table.
        Under InfluenceStrategy / DDP, rank r scores ids r::W.

        Args:
            model: the trained model (weights loaded from ``ckpt_path``).
            datamodule: provides the training set.
            ckpt_path: checkpoint to load.
            output_dir: where results go.
            solver: AutoSolver, ExactSolver, CGSolver, LiSSASolver... (default as in ``influence``).
            params: glob patterns of the parameters to differentiate (default: all trainable).
            ids: training ids to score (default: all).
            top: examples shown in the HTML report.
            score_batch_size: examples per gradient chunk and batched solve.
            image_shape: reshape flat inputs into images in the report (default: the datamodule's image_shape).
            report: write the HTML report and the W&B table.
        """
        from lightning_fastif.self_influence import run_self_influence, write_self_influence_outputs

        im = self._influence_module(
            model, datamodule, ckpt_path, None, solver, params, None, 10, score_batch_size
        )
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

        run_self_influence(self, im, ids, batch_size=score_batch_size, on_done=write)
        return records

    def correct(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output_dir: str = "outputs/correct",
        solver: Solver | None = None,
        params: list[str] | None = None,
        num_candidates: int | None = 100,
        candidates: str = "features",
        slice: SliceSpec | None = None,
        steps: int = 5,
        anchors_per_step: int = 4,
        examples_per_step: int = 8,
        lr: float = 0.05,
        seeds: list[int] = [0, 1, 2],  # noqa: B006
        methods: list[str] = ["helpful", "random", "harmful", "anchors"],  # noqa: B006
        pool: str | None = None,
        score_batch_size: int = 256,
        report: bool = True,
    ) -> dict[str, Any]:
        """FastIF's error correction: fine-tune on the most helpful examples of a failing slice, against baselines.

        Each step samples anchors from the slice, takes the most helpful examples of their mean loss among the
        anchors' kNN candidates and makes one SGD step on the selected parameters; baselines (random, most harmful,
        the anchors themselves) run under the same seeds. Writes ``output_dir/correction.json``, ``report.html``,
        ``corrected.ckpt`` (the helpful run of the first seed; usable as ``ckpt_path`` of ``influence``) and, with a
        logger, the per-step accuracies (a W&B table too).

        Args:
            model: the trained model (weights loaded from ``ckpt_path``; never changed: every run fine-tunes a copy).
            datamodule: provides the training set and the slice's split.
            ckpt_path: checkpoint to load.
            output_dir: where results go.
            solver: AutoSolver, ExactSolver, CGSolver, LiSSASolver... (default as in ``influence``).
            params: glob patterns of the parameters to differentiate and fine-tune (default: all trainable).
            num_candidates: k nearest candidates per anchor (null: score the whole pool).
            candidates: candidate space, ``features`` (FastIF's kNN, index of the original model reused at every
                step) or ``gradients`` (gradient sketches, rebuilt from the current weights at every step).
            slice: the failing slice: ``{kind: pair, label: 3, predicted: 8}``, ``{kind: class, label: 3}`` or
                ``{kind: ids, ids: [...]}``, with ``split`` and ``anchor_fraction``.
            steps: SGD steps per run.
            anchors_per_step: anchors sampled per step.
            examples_per_step: examples fine-tuned on per step.
            lr: SGD learning rate.
            seeds: one run per seed and method (>= 3 for a spread).
            methods: helpful, random, harmful, anchors.
            pool: draw the examples from another split of the datamodule (e.g. val: data the model never trained
                on); ids then refer to it.
            score_batch_size: batch size of candidate scoring and Hessian passes.
            report: write report.html.
        """
        from lightning_fastif.applications._cli import run_correct
        from lightning_fastif.applications.correct import CorrectionSettings

        settings = CorrectionSettings(
            steps=steps,
            anchors_per_step=anchors_per_step,
            examples_per_step=examples_per_step,
            lr=lr,
            seeds=list(seeds),
            methods=list(methods),
        )
        args = (model, datamodule, ckpt_path, None, solver, params, num_candidates, 10, score_batch_size)
        im = self._influence_module(*args, candidates=candidates)
        return run_correct(self, im, datamodule, slice, settings, pool, output_dir, report)


class FastIFCLI(LightningCLI):
    """Lightning's CLI with the ``index``, ``influence`` and ``evaluate`` subcommands."""

    parsers: ClassVar[dict[str, Any]] = {}  # subcommand -> its parser (for "did you mean" after a parse error)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        from lightning_fastif._cli_support import own_groups_first

        kwargs.setdefault("exit_on_error", False)  # main() prints the one clear line (no usage dump)
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand not in LightningCLI.subcommands():  # the library's own options first in --help
            own_groups_first(parser, self._subcommand_method_arguments.get(subcommand, []))
        FastIFCLI.parsers[subcommand] = parser
        return parser

    def add_arguments_to_parser(self, parser: Any) -> None:
        from lightning_fastif._cli_support import stderr_is_interactive

        if not stderr_is_interactive():  # output to a file or CI: no per-step progress bar updates
            parser.set_defaults({"trainer.enable_progress_bar": False})

    def _run_subcommand(self, subcommand: str) -> None:
        from lightning_fastif._cli_support import lightning_info_gate

        if subcommand in LightningCLI.subcommands():  # fit, test...: Lightning's start-up lines now
            lightning_info_gate(reset=False).release()
        super()._run_subcommand(subcommand)

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the checkpoint's hyper-parameters here: a file that is no checkpoint is a clear error."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(ckpt).exists():  # a missing file is reported by the subcommand, after cheaper checks
            check_checkpoint_file(ckpt)
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            raise ConfigurationError(
                f"Expected `ckpt_path` to be a Lightning checkpoint, but reading its hyper-parameters from "
                f"{str(ckpt)!r} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from err

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "index": {"model", "datamodule"},
            "influence": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
            "correct": {"model", "datamodule"},
            "self-influence": {"model", "datamodule"},
        }


# the subcommand is spelled `self-influence` on the command line; LightningCLI looks the method up by that name
setattr(InfluenceTrainer, "self-influence", InfluenceTrainer.self_influence)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-fastif``.

    Besides Lightning's arguments: ``--threads N|auto`` (CPU threads of torch and FAISS; default ``auto``: the
    cores not already busy, at most 4, or ``OMP_NUM_THREADS`` when set) and ``--debug`` (a traceback with errors;
    also ``LIGHTNING_FASTIF_DEBUG=1``). An error prints one line (exit code 2 for usage and configuration errors).
    """
    from lightning_fastif._cli_support import (
        UsageError,
        debug_requested,
        describe,
        lightning_info_gate,
        pop_option,
    )
    from lightning_fastif.threads import set_num_threads

    gate = lightning_info_gate()  # Lightning's start-up lines wait until the command is under way
    argv = list(sys.argv[1:] if args is None else args)
    debug = debug_requested(argv)
    if debug:
        os.environ["LIGHTNING_FASTIF_DEBUG"] = "1"  # DDP ranks re-run the command without the flag
    try:
        threads = pop_option(argv, "--threads")
        if args is None:  # Lightning reads sys.argv (and DDP's popen re-runs it): keep only its own arguments
            sys.argv[1:] = argv or ["--help"]
        set_num_threads("auto" if threads is None else threads)
        FastIFCLI(
            model_class=pl.LightningModule,
            subclass_mode_model=True,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_data=True,
            trainer_class=InfluenceTrainer,
            parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False},
            save_config_kwargs={"overwrite": True},
            args=None if args is None else (argv or ["--help"]),
        )
        gate.release()
    except (SystemExit, KeyboardInterrupt):
        gate.release()
        raise
    except (Exception, UsageError) as err:
        if debug:
            gate.release()
            raise
        gate.discard()
        code, text = describe(err, argv, FastIFCLI.parsers)
        print(text, file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
