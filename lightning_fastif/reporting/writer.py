"""``InfluenceWriter``: one JSON record per query in ``influence.jsonl``, resumable, one record per query id."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_fastif.errors import ConfigurationError

__all__ = ["InfluenceWriter", "splits_queries"]


def splits_queries(trainer: pl.Trainer) -> bool:
    """Whether each rank explains different queries (several processes, queries split by the sampler)."""
    strategy = trainer.strategy
    return strategy.world_size > 1 and not getattr(strategy, "shards_candidates", False)


class InfluenceWriter(BasePredictionWriter):
    """Append one JSON object per explained query to ``output_dir/influence.jsonl``; resume a killed run.

    Each batch's lines are flushed and fsynced before the next batch starts, so an interrupted run keeps every
    query explained so far. When every rank holds the same results (``InfluenceStrategy(shard="candidates")``)
    rank 0 writes; when ranks explain different queries (``shard="queries"``) each rank appends to its own
    ``influence.rank<r>.jsonl`` and rank 0 merges them into ``influence.jsonl``, ordered by query id, at the end.

    Resume (the default): at the start of ``predict`` the complete records already in ``influence.jsonl`` (and in
    rank files a killed query-sharded run left) are kept, a torn last line is dropped, and their query ids are
    handed to the module (``InfluenceModule.skip_query_ids``), which does not compute them again. The file holds
    one record per query id: a query id met twice (duplicates in the query set) is written once, with a warning.
    ``influence.run.json`` beside the file records what produced it (solver, candidates, top-k, model and training
    set size): records of another run are not resumed; the file is started over, with a warning.

    Args:
        output_dir: folder of ``influence.jsonl`` (created; checked writable in ``setup``, before any work).
        filename: name of the file.
        overwrite: start a new file at the beginning of ``predict`` instead of resuming.
        resume: keep the complete records of an earlier run of the same settings and skip their query ids; with
            ``resume=False`` and ``overwrite=False`` an existing non-empty file is an error.
        query_split: the dataset the queries come from (``"test"``...), written in every record (``query_split``).

    Every record also gets the labels of its listed training examples (``helpful_labels``, ``harmful_labels``),
    read from the module's training set.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        filename: str = "influence.jsonl",
        overwrite: bool = False,
        resume: bool = True,
        query_split: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
            raise ConfigurationError(f"Expected `output_dir` to be a folder path, but got {output_dir!r}.")
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ConfigurationError(f"Expected `filename` to be a plain file name, but got {filename!r}.")
        for name, value in (("overwrite", overwrite), ("resume", resume)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"Expected `{name}` to be a bool, but got {value!r}.")
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / filename
        self.overwrite = overwrite
        self.resume = resume
        self.query_split = query_split
        self._train_labels: Any = None
        self._writer: Any = None
        self._own: Path | None = None
        self.written = 0
        self.previous: dict[int, Any] = {}  # query id -> InfluenceResult kept from an earlier run (rank 0)
        self.done: set[int] = set()  # query ids not to compute again (every rank)
        self._seen: set[int] = set()
        self._module: Any = None

    def _rank_path(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")

    @property
    def run_path(self) -> Path:
        """The sidecar that records which settings produced ``influence.jsonl``."""
        return self.path.with_name(f"{self.path.stem}.run.json")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_fastif.reporting._paths import check_output_dir, check_output_file

        if (
            stage == "predict" and trainer.is_global_zero
        ):  # before any work: a bad path fails now, not at the end
            check_output_dir(self.output_dir, "output_dir", create=True)
            check_output_file(self.path, "filename", create=True)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_fastif.reporting.jsonl import JsonlWriter

        self.written, self._seen, self.previous, self._train_labels = 0, set(), {}, None
        split = splits_queries(trainer)
        done: list[int] = []
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.previous = self._recover(trainer.world_size, _run_signature(pl_module))
            done = sorted(self.previous)
        if trainer.world_size > 1:
            done = trainer.strategy.broadcast(done, src=0)
        self.done = set(done)
        if hasattr(pl_module, "skip_query_ids"):  # the module does not compute these again
            pl_module.skip_query_ids = frozenset(self.done)
            self._module = pl_module
        if self.done:
            rank_zero_info(
                f"lightning_fastif: resuming {self.path}: {len(self.done)} queries already explained are skipped "
                "(InfluenceWriter(overwrite=True) starts over)"
            )
        if not (split or trainer.is_global_zero):
            return
        self._own = self._rank_path(trainer.global_rank) if split else self.path
        self._writer = JsonlWriter(self._own)

    def _recover(self, world: int, signature: dict[str, Any]) -> dict[int, Any]:
        """Rank 0: the complete records of an earlier run to keep (by query id); the files are made consistent."""
        import json
        import warnings

        from lightning_fastif.reporting.jsonl import read_jsonl

        leftovers = sorted(self.output_dir.glob(f"{self.path.stem}.rank*{self.path.suffix}"))
        start_over = self.overwrite or not self.resume
        if not self.overwrite and not self.resume and self.path.exists() and self.path.stat().st_size:
            raise ConfigurationError(
                f"Expected {str(self.path)!r} not to exist with InfluenceWriter(resume=False, overwrite=False), but "
                "it holds results. Pass resume=True to continue it or overwrite=True to start over."
            )
        if not start_over and self.run_path.exists():
            try:
                before = json.loads(self.run_path.read_text())
            except (OSError, ValueError):
                before = None
            if before != signature:
                diff = (
                    sorted(k for k in signature if before.get(k) != signature[k])
                    if isinstance(before, dict)
                    else ["unreadable"]
                )
                rank_zero_warn(
                    f"lightning_fastif: {self.path} holds results of other settings (changed: {', '.join(diff)}): "
                    "starting it over instead of resuming"
                )
                start_over = True
        if start_over:
            for path in (self.path, *leftovers):
                path.unlink(missing_ok=True)
            kept: dict[int, Any] = {}
        else:
            kept = {}
            with warnings.catch_warnings(record=True) as caught:  # a torn last line is expected after a kill
                warnings.simplefilter("always")
                for path in (self.path, *leftovers):
                    if path.exists():
                        for r in read_jsonl(path):
                            kept.setdefault(int(r.query_id), r)
            for w in caught:
                rank_zero_info(f"lightning_fastif: {w.message}")
            if leftovers or (self.path.exists() and len(kept) != _count_lines(self.path)):
                _rewrite_jsonl(
                    self.path, [kept[q] for q in sorted(kept)]
                )  # one clean file, one record per id
                for path in leftovers:
                    path.unlink(missing_ok=True)
        _atomic_write(self.run_path, json.dumps(signature, indent=1))
        return kept

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._writer is None or not prediction:
            return
        fresh = []
        for r in prediction:
            qid = int(getattr(r, "query_id", -1))
            if qid in self._seen or qid in self.done:
                if qid in self._seen:
                    rank_zero_warn(
                        f"lightning_fastif: query id {qid} was explained twice (a duplicate in the query set): "
                        f"{self.path.name} keeps its first record"
                    )
                continue
            self._seen.add(qid)
            fresh.append(self._enrich(pl_module, r))
        self.written += self._writer.write_many(fresh)

    def _enrich(self, pl_module: Any, result: Any) -> Any:
        """The training labels of the listed ids and the query split, added to a result before it is written."""
        if self.query_split is not None and getattr(result, "query_split", None) is None:
            result.query_split = self.query_split
        for side in ("helpful", "harmful"):
            if getattr(result, f"{side}_labels", ()) is None:
                setattr(
                    result, f"{side}_labels", self._labels_of(pl_module, list(getattr(result, f"{side}_ids")))
                )
        return result

    def _labels_of(self, pl_module: Any, ids: list[int]) -> list[Any] | None:
        """Labels of training ids as plain values; None when the training examples carry none."""
        from torch.utils.data import TensorDataset

        from lightning_fastif.functional.batch import fetch, labels_of

        train = getattr(pl_module, "train_dataset", None)
        if train is None:
            return None
        if not ids:
            return []
        try:
            if isinstance(train, TensorDataset):
                if self._train_labels is None:
                    self._train_labels = labels_of(train.tensors)
                labels = None if self._train_labels is None else self._train_labels[ids]
            else:
                labels = labels_of(fetch(train, ids, getattr(pl_module, "_user_collate", None)))
        except Exception:  # labels are a courtesy of the record: never fail the write over them
            return None
        if labels is None or len(labels) != len(ids):
            return None
        return [v.item() if v.dim() == 0 else v.tolist() for v in labels]

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._module is not None:
            self._module.skip_query_ids = frozenset()
            self._module = None
        if splits_queries(trainer):
            trainer.strategy.barrier("lightning_fastif.influence_writer")
            if trainer.is_global_zero:
                self._merge_rank_files(trainer.world_size)
        rank_zero_info(f"lightning_fastif: wrote results to {self.path}")

    def _merge_rank_files(self, world: int) -> None:
        from lightning_fastif.reporting.jsonl import read_jsonl

        merged: dict[int, Any] = dict(self.previous)
        for rank in range(world):
            if self._rank_path(rank).exists():
                for r in read_jsonl(self._rank_path(rank)):
                    merged.setdefault(int(r.query_id), r)
        self.written = len(merged) - len(self.previous)
        _rewrite_jsonl(self.path, [merged[q] for q in sorted(merged)])
        for rank in range(world):
            self._rank_path(rank).unlink(missing_ok=True)


def _run_signature(pl_module: Any) -> dict[str, Any]:
    """What a resumed ``influence.jsonl`` must have been produced with (records of other settings are not kept)."""
    from lightning_fastif.functional.params import fingerprint

    model = getattr(pl_module, "model", pl_module)
    try:
        weights = fingerprint(model)
    except Exception:  # a model that cannot be fingerprinted: compare the rest
        weights = None
    train = getattr(pl_module, "train_dataset", None)
    return {
        "module": type(pl_module).__name__,
        "solver": repr(getattr(pl_module, "solver", None)),
        "num_candidates": getattr(pl_module, "num_candidates", None),
        "top_k": getattr(pl_module, "top_k", None),
        "model_fingerprint": weights,
        "train_size": len(train) if train is not None and hasattr(train, "__len__") else None,
    }


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rewrite_jsonl(path: Path, results: list[Any]) -> None:
    """Replace ``path`` by exactly ``results`` (temporary file, fsync, rename: a kill leaves old or new)."""
    from lightning_fastif.reporting.jsonl import JsonlWriter

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with JsonlWriter(tmp) as writer:
        writer.write_many(results)
    tmp.touch()
    os.replace(tmp, path)
