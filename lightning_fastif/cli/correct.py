"""What the ``lightning-fastif`` subcommands do for the applications: the CLI methods stay thin and call these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_fastif.errors import ConfigurationError

__all__ = ["correct_output_dir", "prepare_influence", "run_correct"]


def _split(datamodule: Any, split: str, what: str) -> tuple[Any, Any]:
    from lightning_fastif.cli.inputs import _dataset_of

    if split not in ("train", "val", "test", "predict"):
        raise ConfigurationError(f"Expected `{what}` to be train, val, test or predict, but got {split!r}.")
    return _dataset_of(datamodule, split)


def _pooled(im: Any, datamodule: Any, pool: str | None) -> Any:
    if pool is None or pool == "train":
        return im
    from lightning_fastif.applications.pool import with_pool

    dataset, _ = _split(datamodule, pool, "pool")
    if im.index is not None:
        rank_zero_info(
            f"lightning_fastif: `pool: {pool}`: the candidate index is built in memory over that split"
        )
    out = with_pool(im, dataset, pool)
    rank_zero_info(f"lightning_fastif: candidate pool {pool!r} ({len(dataset)} examples); ids refer to it")
    return out


def prepare_influence(im: Any, datamodule: Any, group: bool, pool: str | None) -> Any:
    """``influence`` with ``queries.group`` (one result for the mean loss of the queries) and/or a ``pool``."""
    im = _pooled(im, datamodule, pool)
    if group:
        im.group_queries = True
    return im


def run_correct(
    trainer: Any,
    im: Any,
    datamodule: Any,
    slice_spec: Any,
    settings: Any,
    pool: str | None,
    output_dir: str,
    report: bool = True,
) -> dict[str, Any]:
    """``lightning-fastif correct``: the loop, then ``correction.json``, ``report.html``, ``corrected.ckpt``, W&B."""
    from lightning_fastif.applications.correct.loop import correct
    from lightning_fastif.applications.correct.report import write_correction_report
    from lightning_fastif.applications.correct.slice import select_slice

    if slice_spec is None:
        raise ConfigurationError(
            "Expected `slice` in the config (e.g. `slice: {kind: pair, label: 3, predicted: 8}`), but got none."
        )
    test, collate = _split(datamodule, slice_spec.split, "slice.split")
    ids = select_slice(im.model, test, slice_spec, collate, getattr(im, "forward_fn", None))
    rank_zero_info(
        f"lightning_fastif correct: slice {slice_spec.describe()!r}: {len(ids)} {slice_spec.split} examples"
    )
    im = _pooled(im, datamodule, pool)
    result = correct(
        im,
        test,
        ids,
        settings,
        slice_name=slice_spec.describe(),
        anchor_fraction=slice_spec.anchor_fraction,
        test_collate_fn=collate,
        loggers=[] if not trainer.is_global_zero else trainer.loggers,
    )
    data = result.to_dict()
    if not trainer.is_global_zero:  # the loop runs in every process alike (it is not sharded); rank 0 writes
        return data
    out = correct_output_dir(output_dir, pool)
    out.mkdir(parents=True, exist_ok=True)
    from lightning_fastif._files import atomic_write_text

    atomic_write_text(out / "correction.json", json.dumps(data, indent=2))
    ckpt = out / "corrected.ckpt"
    model = result.model
    state = {
        "state_dict": model.state_dict(),
        "correction": {"summary": data["summary"], "slice": result.slice},
    }
    hparams = getattr(model, "hparams", None)
    if hparams:
        state["hyper_parameters"] = dict(hparams)
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(ckpt)
    if report:
        write_correction_report(result, out / "report.html", title=f"Error correction: {result.slice}")
    if not result.rows():
        rank_zero_warn("lightning_fastif correct: no method ran")
    print("\n" + result.to_markdown() + "\n")
    rank_zero_info(
        f"lightning_fastif correct: results in {out.resolve()}/{{correction.json, report.html}}; the corrected model "
        f"({_first_method(settings)} examples, seed {settings.seeds[0]}) in {ckpt}"
    )
    return data


def correct_output_dir(output_dir: str, pool: str | None) -> Path:
    """Where ``correct`` writes: ``output_dir`` for the training pool, ``output_dir/pool-<name>`` for another pool,
    so that runs over different pools never overwrite each other's ``correction.json`` and ``corrected.ckpt``."""
    out = Path(output_dir)
    return out if pool is None or pool == "train" else out / f"pool-{pool}"


def _first_method(settings: Any) -> str:
    return "helpful" if "helpful" in settings.methods else settings.methods[0]
