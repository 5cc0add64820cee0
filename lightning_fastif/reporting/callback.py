"""``InfluenceReport``: a predict callback that turns the results into ``report.html`` and a W&B table."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Subset

from lightning_fastif._runtime import check_bool
from lightning_fastif.errors import ConfigurationError, check_keywords
from lightning_fastif.reporting._items import check_class_names, check_decoder, check_title
from lightning_fastif.results import InfluenceResult

__all__ = ["InfluenceReport"]


def _base_dataset(trainer: pl.Trainer, dataloader_idx: int = 0) -> Any:
    """The query dataset of the predict run, unwrapped from a ``Subset`` (query ids are ids of the base set)."""
    loaders = trainer.predict_dataloaders
    loader = loaders[dataloader_idx] if isinstance(loaders, Sequence) else loaders
    dataset = getattr(loader, "dataset", None)
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class InfluenceReport(pl.Callback):
    """Write ``output_dir/report.html`` (self-contained, inputs rendered) and log a W&B table after ``predict``.

    The W&B table goes to the trainer's ``WandbLogger`` when it has one (offline mode works without network);
    when W&B is missing or fails, the HTML report is still written and the reason is logged.

    Args:
        output_dir: folder of the report.
        title: page title.
        image_shape: reshape flat inputs into images (e.g. ``[8, 8]`` for digits); default: the datamodule's
            ``image_shape`` attribute when it has one.
        class_names: names of the classes (default: the datamodule's ``class_names`` when it has one).
        decoder: turns token ids into text (e.g. ``tokenizer.decode``) for text models.
        html: write the HTML report.
        wandb: log the W&B table when a ``WandbLogger`` is attached.
    """

    @check_keywords
    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        title: str = "lightning_fastif influence report",
        image_shape: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        decoder: Callable[[Any], str] | None = None,
        html: bool = True,
        wandb: bool = True,
    ) -> None:
        if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
            raise ConfigurationError(f"Expected `output_dir` to be a folder path, but got {output_dir!r}.")
        check_bool("html", html)
        check_bool("wandb", wandb)
        check_class_names(class_names)
        self.output_dir = Path(output_dir)
        self.title = check_title(title)
        self.image_shape = list(image_shape) if image_shape is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.decoder = check_decoder(decoder)
        self.html, self.wandb = html, wandb
        self.results: list[InfluenceResult] = []
        self.html_path: Path | None = None
        self.wandb_skipped: str | None = None

    @property
    def report_path(self) -> Path:
        return self.output_dir / "report.html"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check every output path before any work: the report's folder and the W&B logger's folder."""
        from lightning_fastif.reporting._paths import check_output_dir, check_output_file

        if stage != "predict" or not trainer.is_global_zero:
            return
        if self.html:
            check_output_dir(self.output_dir, "output_dir", create=True)
            check_output_file(self.report_path, "output_dir", create=True)
        if self.wandb:
            for logger in trainer.loggers:
                save_dir = getattr(logger, "save_dir", None) if _is_wandb(logger) else None
                if save_dir:
                    check_output_dir(save_dir, "WandbLogger(save_dir)", create=True)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.results = []
        if self.html and trainer.is_global_zero:  # never a stale report beside the results of a new run
            self.report_path.unlink(missing_ok=True)

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if outputs:
            self.results.extend(r for r in outputs if isinstance(r, InfluenceResult))

    def _settings(self, trainer: pl.Trainer) -> dict[str, Any]:
        dm = getattr(trainer, "datamodule", None)
        return {
            "image_shape": self.image_shape or getattr(dm, "image_shape", None),
            "class_names": self.class_names or getattr(dm, "class_names", None),
            "decoder": self.decoder,
        }

    def summary(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Run details shown in the report header and the W&B summary."""
        solver = getattr(pl_module, "solver", None)
        train = getattr(pl_module, "train_dataset", None)
        loss = getattr(getattr(pl_module, "loss", None), "description", None)
        out: dict[str, Any] = {
            "training examples": len(train) if train is not None and hasattr(train, "__len__") else None,
            "num_candidates": getattr(pl_module, "num_candidates", None) or "all (full scan)",
            "solver": repr(solver) if solver is not None else None,
        }
        if isinstance(loss, str) and loss:
            out["loss"] = loss
        timings = getattr(pl_module, "timings", {}) or {}
        out.update({f"seconds/{k}": round(v, 3) for k, v in timings.items()})
        diag = getattr(solver, "diagnostics", None)
        if diag is not None:
            out["solver iterations (last)"] = diag.iterations
            # issue 10: convergence is never silent (the same fields are in every JSONL record's `extra`)
            from lightning_fastif.solvers.auto import solver_record

            rec = solver_record(solver)
            conv = rec.get("convergence") or {}
            if conv.get("value") is not None:
                out["solver converged"] = (
                    f"{rec['converged']} ({conv['measure']} {conv['value']:.3g}, tolerance {conv['tolerance']:.3g})"
                )
            for key in ("curvature", "damping", "solver_choice"):
                if rec.get(key) is not None:
                    out[f"solver {key.replace('solver_', '')}"] = rec[key]
        return out

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_fastif.reporting.writer import splits_queries

        if splits_queries(trainer) and hasattr(trainer.strategy, "gather_objects"):
            # ranks explained different queries: gather every rank's records (a collective: all ranks take part)
            every = trainer.strategy.gather_objects([r.to_dict() for r in self.results])
            self.results = sorted(
                (InfluenceResult.from_dict(d) for part in every for d in part), key=lambda r: r.query_id
            )
        if not trainer.is_global_zero:
            return
        self.results = _with_resumed(trainer, self.results)
        train = getattr(pl_module, "train_dataset", None)
        queries = _base_dataset(trainer)
        settings = self._settings(trainer)
        summary = self.summary(pl_module)
        if self.html:
            from lightning_fastif.reporting.html import write_html_report

            self.html_path = write_html_report(
                self.results,
                self.output_dir / "report.html",
                train,
                queries,
                title=self.title,
                summary=summary,
                **settings,
            )
            rank_zero_info(
                f"lightning_fastif: HTML report of {len(self.results)} queries in {self.html_path}"
            )
        if self.wandb and not trainer.loggers:  # logging turned off (`logger: false`): nothing to warn about
            self.wandb_skipped = "no logger (logging is off)"
        elif self.wandb:
            from lightning_fastif.reporting.wandb_table import log_to_wandb

            self.wandb_skipped = log_to_wandb(
                trainer.loggers, self.results, train, queries, summary=summary, **settings
            )
            if self.wandb_skipped is None:
                where = wandb_run_dir(trainer.loggers)
                rank_zero_info(
                    "lightning_fastif: logged the influence table to W&B"
                    + (
                        f": run folder {where} (offline: upload it with `wandb sync {where}`)"
                        if where
                        else ""
                    )
                )
            else:
                rank_zero_warn(f"lightning_fastif: W&B table skipped: {self.wandb_skipped}")


def _is_wandb(logger: Any) -> bool:
    return callable(getattr(logger, "log_table", None)) and hasattr(type(logger), "experiment")


def wandb_run_dir(loggers: Sequence[Any]) -> str | None:
    """The run folder of the first W&B logger (``.../wandb/offline-run-...``), or None."""
    for logger in loggers:
        if _is_wandb(logger):
            try:
                run_dir = Path(logger.experiment.dir)  # <run folder>/files
            except Exception:
                return None
            return str(run_dir.parent if run_dir.name == "files" else run_dir)
    return None


def _with_resumed(trainer: pl.Trainer, results: list[InfluenceResult]) -> list[InfluenceResult]:
    """This run's results plus those an ``InfluenceWriter`` kept from the run it resumed: the report shows what
    ``influence.jsonl`` holds, one record per query id (the first one seen)."""
    from lightning_fastif.reporting.writer import InfluenceWriter

    merged: dict[int, InfluenceResult] = {}
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, InfluenceWriter):
            for qid, r in cb.previous.items():
                merged.setdefault(int(qid), r)
    for r in results:
        merged.setdefault(int(r.query_id), r)
    return list(merged.values())
