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
    Records are reused only when everything that determined them is equal: ``influence.run.json`` beside the file
    records every setting (solver, num_candidates, top_k, params, candidates, index, loss, forward_fn, curvature,
    pool, model and training-data fingerprints...; see ``reporting._signature.run_signature``); when one differs,
    or when records are there without a run file, the file is started over and a warning says which settings
    changed. Each record carries ``extra["record_sha256"]`` (its digest under those settings: a hand-edited or
    foreign record is recomputed, with a warning) and ``extra["query_sha256"]`` (the digest of the query's input
    and label: a query of the same id with another input or label is recomputed).

    The output folder is locked (``.<filename>.lock``: owner pid and host) from ``setup`` to ``teardown``: a second
    writer on the same folder, in this process or another, fails at once with an error naming the owner.

    Args:
        output_dir: folder of ``influence.jsonl`` (created; checked writable in ``setup``, before any work).
        filename: name of the file.
        overwrite: start a new file at the beginning of ``predict`` instead of resuming.
        resume: keep the complete records of an earlier run of the same settings and skip their query ids; with
            ``resume=False`` and ``overwrite=False`` an existing non-empty file is an error.
        query_split: the dataset the queries come from (``"test"``...), written in every record (``query_split``).
        overwrite_hint: how the user starts over, in the message saying records are reused (the CLI passes
            ``"--overwrite"``).

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
        overwrite_hint: str = "InfluenceWriter(overwrite=True)",
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
        self.overwrite_hint = str(overwrite_hint)
        self._lock: Any = None
        self._key = ""  # the run signature's digest: what each record's digest is keyed with
        self._digests: dict[int, str] = {}  # query id -> query digest of a kept record (every rank)
        # kept query ids recomputed because their query's input or label changed
        self.replaced: set[int] = set()
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
            self._take_lock()

    @property
    def lock_path(self) -> Path:
        """The lock file of the output folder, held while this writer may write it."""
        return self.path.with_name(f".{self.path.stem}.lock")

    def _take_lock(self) -> None:
        from lightning_fastif._files import FolderLock, FolderLockedError

        if self._lock is None:
            self._lock = FolderLock(
                self.lock_path, f"output folder {str(self.output_dir)!r} ({self.path.name})"
            )
        try:
            self._lock.acquire()
        except FolderLockedError as err:
            raise ConfigurationError(str(err)) from err

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release_lock()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._release_lock()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_fastif.reporting._signature import QUERY_DIGEST, run_signature, signature_key
        from lightning_fastif.reporting.jsonl import JsonlWriter

        self.written, self._seen, self.previous, self._train_labels = 0, set(), {}, None
        self.replaced = set()
        split = splits_queries(trainer)
        state: tuple[str, dict[int, str]] = ("", {})
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self._lock is None or not self._lock.held:  # predict without setup (a writer driven by hand)
                self._take_lock()
            signature = run_signature(pl_module, self.query_split)
            self.previous = self._recover(trainer.world_size, signature)
            state = (
                signature_key(signature),
                {q: str(r.extra.get(QUERY_DIGEST, "")) for q, r in self.previous.items()},
            )
        if trainer.world_size > 1:
            state = trainer.strategy.broadcast(state, src=0)
        self._key, self._digests = state[0], {int(q): d for q, d in state[1].items()}
        self.done = set(self._digests)
        # the module does not compute these again (when the query's digest is the same)
        if hasattr(pl_module, "skip_query_ids"):
            pl_module.skip_query_ids = frozenset(self.done)
            pl_module.skip_query_digests = dict(self._digests)
            self._module = pl_module
        if self.done:
            rank_zero_info(
                f"lightning_fastif: reusing {len(self.done)} records made with the same settings; "
                f"{self.overwrite_hint} to recompute ({self.path})"
            )
        if not (split or trainer.is_global_zero):
            return
        self._own = self._rank_path(trainer.global_rank) if split else self.path
        self._writer = JsonlWriter(self._own)

    def _recover(self, world: int, signature: dict[str, Any]) -> dict[int, Any]:
        """Rank 0: the complete records of an earlier run to keep (by query id); the files are made consistent."""
        import json
        import warnings

        from lightning_fastif.reporting._signature import changed_settings, signature_key, verify
        from lightning_fastif.reporting.jsonl import read_jsonl

        leftovers = sorted(self.output_dir.glob(f"{self.path.stem}.rank*{self.path.suffix}"))
        has_records = any(p.exists() and p.stat().st_size for p in (self.path, *leftovers))
        start_over = self.overwrite or not self.resume
        if not self.overwrite and not self.resume and self.path.exists() and self.path.stat().st_size:
            raise ConfigurationError(
                f"Expected {str(self.path)!r} not to exist with InfluenceWriter(resume=False, overwrite=False), but "
                "it holds results. Pass resume=True to continue it or overwrite=True to start over."
            )
        if self.overwrite and has_records:
            rank_zero_info(f"lightning_fastif: overwrite: recomputing every query ({self.path} started over)")
        if not start_over and has_records:
            if not self.run_path.exists():
                rank_zero_warn(
                    f"lightning_fastif: settings unknown: {self.path} holds records but no {self.run_path.name} says "
                    "what made them -> recomputing (started over)"
                )
                start_over = True
            else:
                try:
                    before = json.loads(self.run_path.read_text())
                except (OSError, ValueError):
                    before = None
                if before != signature:
                    rank_zero_warn(
                        f"lightning_fastif: settings changed: {', '.join(changed_settings(before, signature))} -> "
                        f"recomputing ({self.path} holds records of other settings: started over)"
                    )
                    start_over = True
        if start_over:
            for path in (self.path, *leftovers):
                path.unlink(missing_ok=True)
            kept: dict[int, Any] = {}
        else:
            key = signature_key(signature)
            kept, bad, lines = {}, set(), 0
            with warnings.catch_warnings(record=True) as caught:  # a torn last line is expected after a kill
                warnings.simplefilter("always")
                for path in (self.path, *leftovers):
                    if path.exists():
                        for r in read_jsonl(path):
                            lines += 1
                            if verify(r, key):
                                kept[int(r.query_id)] = r  # the last valid record of an id is the newest
                            else:
                                bad.add(int(r.query_id))
            for w in caught:
                rank_zero_info(f"lightning_fastif: {w.message}")
            bad -= set(kept)
            if bad:
                rank_zero_warn(
                    f"lightning_fastif: {len(bad)} records of {self.path} fail their digest check (edited by hand, "
                    f"or copied from another run): recomputing query ids {sorted(bad)[:20]}"
                    + (" ..." if len(bad) > 20 else "")
                )
            if (
                leftovers
                or (self.path.exists() and len(kept) != _count_lines(self.path))
                or lines != len(kept)
            ):
                _rewrite_jsonl(
                    self.path, [kept[q] for q in sorted(kept)]
                )  # one clean file, one verified record per id
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
        from lightning_fastif.reporting._signature import QUERY_DIGEST, sign

        fresh = []
        for r in prediction:
            qid = int(getattr(r, "query_id", -1))
            if qid in self._seen:
                rank_zero_warn(
                    f"lightning_fastif: query id {qid} was explained twice (a duplicate in the query set): "
                    f"{self.path.name} keeps its first record"
                )
                continue
            if qid in self.done:
                extra = getattr(r, "extra", None)
                if not isinstance(extra, dict) or str(extra.get(QUERY_DIGEST, "")) == self._digests.get(qid):
                    continue  # the kept record answers the same query (a module that does not skip)
                self.replaced.add(qid)  # the query of this id changed: its new record replaces the kept one
            self._seen.add(qid)
            fresh.append(sign(self._enrich(pl_module, r), self._key))
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
            self._module.skip_query_digests = {}
            self._module = None
        if splits_queries(trainer):
            trainer.strategy.barrier("lightning_fastif.influence_writer")
            if trainer.is_global_zero:
                self._merge_rank_files(trainer.world_size)
        elif self.replaced and trainer.is_global_zero:  # new records of changed queries replace kept ones
            self._keep_newest()
        if self.replaced:
            rank_zero_info(
                f"lightning_fastif: recomputed {len(self.replaced)} queries whose input or label differ from their "
                f"records' (query ids {sorted(self.replaced)[:20]})"
            )
        rank_zero_info(f"lightning_fastif: wrote results to {self.path}")

    def _keep_newest(self) -> None:
        from lightning_fastif.reporting.jsonl import read_jsonl

        newest = {int(r.query_id): r for r in read_jsonl(self.path)}
        _rewrite_jsonl(self.path, [newest[q] for q in sorted(newest)])

    def _merge_rank_files(self, world: int) -> None:
        from lightning_fastif.reporting.jsonl import read_jsonl

        fresh: dict[int, Any] = {}
        for rank in range(world):
            if self._rank_path(rank).exists():
                for r in read_jsonl(self._rank_path(rank)):
                    fresh.setdefault(int(r.query_id), r)
        merged = {**self.previous, **fresh}  # a recomputed query (its input changed) replaces its kept record
        self.written = len(fresh)
        _rewrite_jsonl(self.path, [merged[q] for q in sorted(merged)])
        for rank in range(world):
            self._rank_path(rank).unlink(missing_ok=True)


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
