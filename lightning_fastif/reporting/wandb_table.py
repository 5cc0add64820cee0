"""Influence results as a W&B Table, through Lightning's ``WandbLogger`` or a bare ``wandb`` run.

Logging to W&B is a nice-to-have next to the JSONL and HTML outputs, so it never breaks a run: when ``wandb`` is
missing, no W&B logger is configured, or W&B raises, :func:`log_to_wandb` warns and returns the reason instead.
``wandb`` is imported only inside the function.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightning_fastif.reporting._items import (
    ClassNames,
    ExampleCache,
    ExampleView,
    check_class_names,
    coerce_results,
    format_label,
    render_kwargs,
)
from lightning_fastif.reporting.render import Decoder, Renderer
from lightning_fastif.reporting.tokens import top_tokens_text
from lightning_fastif.results import InfluenceResult

WANDB_COLUMNS: tuple[str, ...] = (
    "query_id",
    "query_input",
    "query_label",
    "prediction",
    "kind",
    "rank",
    "train_id",
    "train_input",
    "train_label",
    "score",
    "knn_distance",
    "top_tokens",
    "query_flags",
)


def log_to_wandb(
    logger_or_run: Any,
    results: Iterable[InfluenceResult | Mapping[str, Any]],
    train_lookup: Any = None,
    query_lookup: Any = None,
    *,
    key: str = "influence",
    summary: Mapping[str, Any] | None = None,
    class_names: ClassNames | None = None,
    image_shape: Sequence[int] | None = None,
    decoder: Decoder | None = None,
    renderer: Renderer | None = None,
) -> str | None:
    """Log one W&B Table row per (query, kind, rank) and the run's summary metrics; never raise.

    Columns are :data:`WANDB_COLUMNS`: ``query_id``, ``query_input`` (a ``wandb.Image`` for images, text for
    text), ``query_label``, ``prediction``, ``kind`` (``"helpful"`` or ``"harmful"``), ``rank`` (1 = most
    influential), ``train_id``, ``train_input``, ``train_label``, ``score``, ``knn_distance`` (``None`` after
    a full scan) and ``query_flags`` (the query's flags joined by ``"; "``, empty when none). Summary metrics go
    to ``run.summary`` under ``"<key>/..."``: the number of queries, the candidates scored, and the scalar entries
    of ``summary`` (nested dicts flattened with ``/``; the loss in use and the solver settings among them).

    Args:
        logger_or_run: a Lightning ``WandbLogger``, a list of loggers (``trainer.loggers``: the first W&B one is
            used), a ``Trainer``, or a ``wandb`` run. Anything else is skipped with a reason.
        results: ``InfluenceResult`` objects (or their ``to_dict()``), one per query.
        train_lookup: training id -> ``x``, ``(x, label)`` or a dataset item dict; a map-style dataset also works.
            ``None`` logs ids and scores without inputs.
        query_lookup: the same for query ids.
        key: the table's key in the run (also the prefix of the summary metrics).
        summary: run details (timings, solver, candidates...) to put in the run summary.
        class_names: names of the classes by index; labels are then logged as ``"3 (cat)"``.
        image_shape: shape to reshape flat vectors into images, e.g. ``(8, 8)`` for scikit-learn digits.
        decoder: turns token-id vectors into text (``tokenizer.decode`` or a vocabulary).
        renderer: ``renderer(x) -> PIL.Image | str`` overriding the built-in rendering rules.

    Returns:
        ``None`` when the table was logged, otherwise why W&B was skipped (also emitted as a warning).

    Example:
        >>> reason = log_to_wandb(trainer.loggers, results, train_set, query_set, summary={"solver": "lissa"})
        ... # doctest: +SKIP
    """
    try:
        import wandb
    except Exception as error:  # ImportError, or a broken install failing at import
        return _skip(f"wandb is not importable ({type(error).__name__}: {error})")
    target = _resolve(logger_or_run)
    if isinstance(target, str):
        return _skip(target)
    kind, handle = target
    try:
        run = handle.experiment if kind == "logger" else handle
        if type(run).__name__ == "DummyExperiment":
            return _skip("this process is not rank 0 (the WandbLogger has no run here)")
        records = coerce_results(results)
        rows = build_rows(
            records,
            train_lookup,
            query_lookup,
            class_names=class_names,
            image_shape=image_shape,
            decoder=decoder,
            renderer=renderer,
            image_factory=wandb.Image,
        )
        table = _run_file_table(wandb)(columns=list(WANDB_COLUMNS), data=rows)
        with _StagingInside(run):
            if kind == "logger":
                handle.log_metrics({key: table})
            else:
                run.log({key: table})
        run.summary.update(_summary_metrics(key, records, summary))
    except Exception as error:  # W&B must never take the run down with it
        return _skip(f"W&B raised {type(error).__name__}: {error}")
    return None


def build_rows(
    results: Iterable[InfluenceResult | Mapping[str, Any]],
    train_lookup: Any = None,
    query_lookup: Any = None,
    *,
    class_names: ClassNames | None = None,
    image_shape: Sequence[int] | None = None,
    decoder: Decoder | None = None,
    renderer: Renderer | None = None,
    image_factory: Any = None,
) -> list[list[Any]]:
    """The table rows of :func:`log_to_wandb`, in :data:`WANDB_COLUMNS` order.

    Args:
        image_factory: wraps a ``PIL.Image`` for the table (``wandb.Image``); ``None`` keeps the ``PIL.Image``.
        Other arguments: as in :func:`log_to_wandb`.
    """
    records = coerce_results(results)
    class_names = check_class_names(class_names, records)
    kwargs = render_kwargs(image_shape, decoder, renderer)
    train = ExampleCache(train_lookup, "train_lookup", **kwargs)
    queries = ExampleCache(query_lookup, "query_lookup", **kwargs)
    rows: list[list[Any]] = []
    for result in records:
        query = queries.get(result.query_id)
        query_label = result.label if result.label is not None else query.label
        query_cell = _cell(query, image_factory, f"query {result.query_id}")
        for kind, ids, scores, distances in (
            ("helpful", result.helpful_ids, result.helpful_scores, result.helpful_distances),
            ("harmful", result.harmful_ids, result.harmful_scores, result.harmful_distances),
        ):
            for rank, train_id in enumerate(ids):
                example = train.get(train_id)
                rows.append(
                    [
                        int(result.query_id),
                        query_cell,
                        _label(query_label, class_names),
                        _label(result.prediction, class_names),
                        kind,
                        rank + 1,
                        int(train_id),
                        _cell(example, image_factory, f"train {int(train_id)}"),
                        _label(example.label, class_names),
                        _float(scores[rank] if rank < len(scores) else None),
                        _float(distances[rank] if rank < len(distances) else None),
                        top_tokens_text((result.top_tokens or {}).get(str(int(train_id))), decoder),
                        "; ".join(getattr(result, "flags", None) or []),
                    ]
                )
    return rows


def _run_file_table(wandb: Any) -> type:
    """A ``wandb.Table`` whose run-folder copy references real images.

    wandb 0.31 writes the run's ``files/media/table/<key>_<step>_<hash>.table.json`` with the string ``"Image"`` in
    every image cell and keeps the images only in the run's ``run_table`` artifact. This table binds each image to
    the run first (its PNG is copied to ``files/media/images/``) and writes the cell as the image's run JSON
    (``{"_type": "image-file", "path": "media/images/....png", ...}``), so the run folder holds the images that
    ``wandb sync`` uploads; the artifact copy is unchanged.
    """

    class RunFileTable(wandb.Table):  # type: ignore[misc, name-defined]
        _run_for_file: Any = None

        def bind_to_run(self, run: Any, key: Any, step: Any, *args: Any, **kwargs: Any) -> None:
            for row in self.data:
                for cell in row:
                    if isinstance(cell, wandb.Image) and not cell.is_bound():
                        cell.bind_to_run(run, key, step)
            self._run_for_file = run
            try:
                super().bind_to_run(run, key, step, *args, **kwargs)
            finally:
                self._run_for_file = None

        def _to_table_json(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            out = super()._to_table_json(*args, **kwargs)
            run = self._run_for_file
            if run is None:  # the artifact's copy: wandb's own serialisation
                return out
            data = [
                [c.to_json(run) if isinstance(c, wandb.Image) and c.is_bound() else c for c in row]
                for row in out["data"]
            ]
            return {**out, "data": data}

    return RunFileTable


class _StagingInside:
    """Stage the run's artifact files (the table artifact's PNGs) inside the run folder, not in the user's
    ``~/.local/share/wandb``: ``WANDB_DATA_DIR`` points there while the table is logged."""

    def __init__(self, run: Any) -> None:
        run_dir = getattr(run, "dir", None)  # <run folder>/files
        self.target = os.path.join(os.path.dirname(run_dir), "artifact-staging") if run_dir else None
        self.before: str | None = None

    def __enter__(self) -> None:
        if self.target is not None:
            self.before = os.environ.get("WANDB_DATA_DIR")
            os.environ["WANDB_DATA_DIR"] = self.target

    def __exit__(self, *exc: Any) -> None:
        if self.target is None:
            return
        if self.before is None:
            os.environ.pop("WANDB_DATA_DIR", None)
        else:
            os.environ["WANDB_DATA_DIR"] = self.before


def _resolve(target: Any) -> tuple[str, Any] | str:
    """``("logger", WandbLogger)``, ``("run", wandb run)`` or the reason there is nothing to log to."""
    if target is None:
        return "no W&B logger or run was given"
    if not hasattr(target, "log_table") and hasattr(target, "loggers"):  # a Trainer
        target = list(target.loggers)
    if isinstance(target, list | tuple):
        for logger in target:
            if _is_wandb_logger(logger):
                return "logger", logger
        names = ", ".join(type(logger).__name__ for logger in target) or "none"
        return f"no WandbLogger among the loggers ({names})"
    if _is_wandb_logger(target):
        return "logger", target
    if callable(getattr(target, "log", None)) and hasattr(target, "summary"):
        return "run", target
    return f"{type(target).__name__} is neither a Lightning WandbLogger nor a wandb run"


def _is_wandb_logger(logger: Any) -> bool:
    return callable(getattr(logger, "log_table", None)) and hasattr(type(logger), "experiment")


def _cell(view: ExampleView, image_factory: Any, caption: str) -> Any:
    rendered = view.rendered
    if rendered is None:
        return None
    if rendered.kind == "text":
        return rendered.text
    if image_factory is None:
        return rendered.image
    return image_factory(rendered.image, caption=caption)


def _label(label: Any, class_names: ClassNames | None) -> Any:
    if label is None:
        return None
    if class_names is not None:
        return format_label(label, class_names)
    if hasattr(label, "item"):
        label = label.item()
    return label if isinstance(label, int | float | str) else str(label)


def _float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _summary_metrics(
    key: str, records: list[InfluenceResult], summary: Mapping[str, Any] | None
) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        f"{key}/num_queries": len(records),
        f"{key}/candidates_scored": sum(int(r.num_candidates) for r in records),
    }
    pending: list[tuple[str, Any]] = list((summary or {}).items())
    while pending:
        name, value = pending.pop(0)
        if isinstance(value, Mapping):
            pending.extend((f"{name}/{k}", v) for k, v in value.items())
        elif isinstance(value, bool | str) or (
            isinstance(value, numbers.Real) and math.isfinite(float(value))
        ):
            metrics[f"{key}/{name}"] = value
    return metrics


def _skip(reason: str) -> str:
    warnings.warn(
        f"Skipped logging influence results to W&B: {reason}. JSONL and HTML outputs are unaffected.",
        stacklevel=3,
    )
    return reason
