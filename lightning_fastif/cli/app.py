"""``lightning-fastif``: Lightning's CLI (fit, validate, test, predict) plus ``index``, ``influence`` and ``evaluate``.

Arguments come from the signatures and docstrings below; configs are YAML with omegaconf interpolation resolved after
every file and flag is merged (``parser_mode="omegaconf+"``). See ``configs/`` for examples.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from lightning_fastif.applications.correct.slice import SliceSpec
from lightning_fastif.cli.commands import (
    correct_command,
    evaluate_command,
    index_command,
    influence_command,
    self_influence_command,
)
from lightning_fastif.cli.inputs import (
    QuerySelection,
    check_checkpoint_file,
)
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.evaluation.lds.settings import LDSSettings
from lightning_fastif.functional.solvers.base import Solver

__all__ = ["FastIFCLI", "InfluenceTrainer", "QuerySelection", "main"]


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
        loss: str | None = None,
        forward_fn: str | None = None,
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
            loss: (gradients) the per-example loss, as for ``influence``.
            forward_fn: import path of ``callable(model, batch) -> outputs``, how the model is called on a batch.
        """
        return index_command(
            self,
            model=model,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            index_dir=index_dir,
            feature_layer=feature_layer,
            index_factory=index_factory,
            backend=backend,
            nprobe=nprobe,
            ef_search=ef_search,
            batch_size=batch_size,
            space=space,
            params=params,
            sketch=sketch,
            sketch_dim=sketch_dim,
            float16=float16,
            loss=loss,
            forward_fn=forward_fn,
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
        overwrite: bool = False,
        loss: str | None = None,
        forward_fn: str | None = None,
        curvature: str | None = None,
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
            solver: AutoSolver (default: Exact when the dense system fits, else CG on Gauss-Newton when affordable,
                else EK-FAC, else CG; damping "auto"), ExactSolver, CGSolver, LiSSASolver, EKFACSolver or KFACSolver.
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
            overwrite: recompute every query. By default a rerun into the same ``output_dir`` reuses the records
                made with the same settings (every setting, the model, the data and each query's input and label
                are compared) and recomputes the rest, saying which settings changed.
            loss: the per-example loss: a preset (causal_lm: Hugging Face causal LM batches, shifted token
                cross-entropy, mean per sequence; causal_lm_sum: summed; sequence / sequence_sum: logits [B, T, V] against aligned labels
                [B, T]; token_classification; sequence_classification) or the import path of a
                ``callable(outputs, batch) -> [B]`` (``mypkg.losses.my_loss``; a class is instantiated). Default: found
                automatically (the module's per_example_loss, a loss module on it, or cross-entropy).
            forward_fn: import path of ``callable(model, batch) -> outputs`` (default: ``model(x)`` for ``(x, y)``
                batches, ``model(**inputs)`` for dict batches).
            curvature: hessian or gauss_newton (default: the solver's choice).
        """
        return influence_command(
            self,
            model=model,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            index_dir=index_dir,
            output_dir=output_dir,
            solver=solver,
            params=params,
            num_candidates=num_candidates,
            top_k=top_k,
            queries=queries,
            score_batch_size=score_batch_size,
            image_shape=image_shape,
            report=report,
            pool=pool,
            candidates=candidates,
            overwrite=overwrite,
            loss=loss,
            forward_fn=forward_fn,
            curvature=curvature,
        )

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
        return evaluate_command(
            self,
            model=model,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            index_dir=index_dir,
            output_dir=output_dir,
            solver=solver,
            reference_solver=reference_solver,
            params=params,
            queries=queries,
            ks=ks,
            top_m=top_m,
            loo_removals=loo_removals,
            score_batch_size=score_batch_size,
            candidates=candidates,
            lds=lds,
        )

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
        return self_influence_command(
            self,
            model=model,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            output_dir=output_dir,
            solver=solver,
            params=params,
            ids=ids,
            top=top,
            score_batch_size=score_batch_size,
            image_shape=image_shape,
            report=report,
        )

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
                on); ids then refer to it, and the results go to ``output_dir/pool-<pool>/`` (so a run over another
                pool never overwrites this one's).
            score_batch_size: batch size of candidate scoring and Hessian passes.
            report: write report.html.
        """
        return correct_command(
            self,
            model=model,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            output_dir=output_dir,
            solver=solver,
            params=params,
            num_candidates=num_candidates,
            candidates=candidates,
            slice=slice,
            steps=steps,
            anchors_per_step=anchors_per_step,
            examples_per_step=examples_per_step,
            lr=lr,
            seeds=seeds,
            methods=methods,
            pool=pool,
            score_batch_size=score_batch_size,
            report=report,
        )


class FastIFCLI(LightningCLI):
    """Lightning's CLI with the ``index``, ``influence`` and ``evaluate`` subcommands."""

    parsers: ClassVar[
        dict[str, Any]
    ] = {}  # subcommand -> its parser (for "did you mean" after a parse error)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        from lightning_fastif.cli.support import own_groups_first

        kwargs.setdefault("exit_on_error", False)  # main() prints the one clear line (no usage dump)
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand not in LightningCLI.subcommands():  # the library's own options first in --help
            own_groups_first(parser, self._subcommand_method_arguments.get(subcommand, []))
        FastIFCLI.parsers[subcommand] = parser
        return parser

    def add_arguments_to_parser(self, parser: Any) -> None:
        from lightning_fastif.cli.support import stderr_is_interactive

        if not stderr_is_interactive():  # output to a file or CI: no per-step progress bar updates
            parser.set_defaults({"trainer.enable_progress_bar": False})

    def instantiate_classes(self) -> None:
        from lightning_fastif.cli.support import quiet_dependency_noise

        quiet_dependency_noise(
            wandb="wandb" in str(self.config.get(self.config.get("subcommand"), "")).lower()
        )
        super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        from lightning_fastif.cli.support import lightning_info_gate

        if subcommand in LightningCLI.subcommands():  # fit, test...: Lightning's start-up lines now
            lightning_info_gate(reset=False).release()
        super()._run_subcommand(subcommand)
        if subcommand == "fit":  # the run folder of the training curves, as influence says its own
            from lightning.pytorch.utilities import rank_zero_info

            from lightning_fastif.reporting.callback import wandb_run_dir

            where = wandb_run_dir(self.trainer.loggers)
            if where:
                rank_zero_info(
                    f"lightning_fastif: the training curves are in the W&B run folder {where} (offline: upload "
                    f"it with `wandb sync {where}`)"
                )

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
    from lightning_fastif.cli.support import (
        HELP,
        USAGE_EXIT,
        UsageError,
        debug_requested,
        describe,
        early_error,
        format_warning,
        lightning_info_gate,
        pop_flag,
        pop_option,
    )
    from lightning_fastif.threads import set_num_threads

    warnings.formatwarning = (
        format_warning  # the library's warnings as one plain line, like its other messages
    )
    # W&B's own banners ("Tracking run...", "You can sync this run...") repeat what lightning_fastif says (the run
    # folder and its `wandb sync` command): quiet unless the user asked for them
    os.environ.setdefault("WANDB_SILENT", "true")
    if os.getcwd() not in sys.path:  # `class_path: mymodule.MyNet` finds ./mymodule.py, as `python -m` would
        sys.path.append(os.getcwd())  # (appended: it never shadows an installed package)
    gate = lightning_info_gate()  # Lightning's start-up lines wait until the command is under way
    argv = list(sys.argv[1:] if args is None else args)
    debug = debug_requested(argv)
    debug_before = os.environ.get("LIGHTNING_FASTIF_DEBUG")
    if debug:
        os.environ["LIGHTNING_FASTIF_DEBUG"] = "1"  # DDP ranks re-run the command without the flag
    HELP["all"] = pop_flag(argv, "--help-all")
    if HELP["all"]:
        argv.append("--help")
    try:
        early = early_error(argv)
        if early:  # also found by lightning_fastif.cli.main before importing Lightning
            print(early, file=sys.stderr)
            sys.exit(USAGE_EXIT)
        threads = pop_option(argv, "--threads")
        for i, arg in enumerate(
            argv
        ):  # `influence --overwrite` as a flag (jsonargparse wants a value for a bool)
            if arg == "--overwrite" and (i + 1 == len(argv) or argv[i + 1].lower() not in ("true", "false")):
                argv[i] = "--overwrite=true"
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
    finally:  # called in-process (tests, notebooks): `--debug` must not outlive its own command
        if debug_before is None:
            os.environ.pop("LIGHTNING_FASTIF_DEBUG", None)
        else:
            os.environ["LIGHTNING_FASTIF_DEBUG"] = debug_before


if __name__ == "__main__":
    main()
