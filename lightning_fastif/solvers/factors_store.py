"""Saving and loading fitted K-FAC / EK-FAC factors in a folder, atomically and with what they were fitted on.

A factors folder holds ``factors.pt`` (a ``torch.save`` of ``{"<kind>/<module>": tensor}``, float64 on CPU) and
``meta.json``: the factors' kind (``"kfac"`` or ``"ekfac"``), the Fisher (``"true"``/``"empirical"``, how it was
realised, the seed), the layers, the selected parameter names, the model's fingerprint and the training data's
fingerprint (:func:`~lightning_fastif.functional.params.dataset_fingerprint`), the library version, the creation
time and the SHA-256 of ``factors.pt``. Writes go to a hidden sibling folder that is renamed into place (the scheme
of :mod:`lightning_fastif.retrieval.store`): a killed run leaves the old folder or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lightning_fastif._files import (
    META_FILE,
    digest,
    folder_lock,
    fsync_path,
    leftovers,
    pid_alive,
    remove_folder,
)
from lightning_fastif.errors import ConfigurationError, IndexCorruptError, IndexMismatchError
from lightning_fastif.functional.kfac.factors import KFACFactors
from lightning_fastif.functional.kfac.layers import LayerSlot

__all__ = [
    "COMPARED",
    "check_factors_dir",
    "clean_dead_leftovers",
    "load_factors",
    "read_meta",
    "save_factors",
]

FACTORS_FILE = "factors.pt"
FORMAT_VERSION = 1
COMPARED = ("fisher", "seed", "param_names", "dataset_length", "model_fingerprint", "data_fingerprint")
"""The meta.json fields that must equal the current run's for saved factors to be reused."""

OURS = frozenset({FACTORS_FILE, META_FILE})
"""The only names a factors folder (or one of its temporary siblings) written by this library holds."""


def check_factors_dir(dirpath: str | Path) -> None:
    """Refuse a ``factors_dir`` the library did not write: an existing file, or a folder holding other files.

    A missing folder, an empty one, or one holding only ``factors.pt`` / ``meta.json`` may be written (and replaced).

    Raises:
        ConfigurationError: naming ``factors_dir`` and what is there; nothing is renamed or removed.
    """
    dirpath = Path(dirpath)
    if dirpath.exists() and not dirpath.is_dir():
        raise ConfigurationError(
            f"Expected `factors_dir` to be a folder (or a path that does not exist yet), but {str(dirpath)!r} is a "
            "file. It is left as it is: point `factors_dir` at a folder."
        )
    if dirpath.is_dir():
        foreign = sorted(p.name for p in dirpath.iterdir() if p.name not in OURS)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
            raise ConfigurationError(
                f"Expected `factors_dir` to be a new folder or a factors folder (with only {FACTORS_FILE} and "
                f"{META_FILE}), but {str(dirpath)!r} holds other files ({shown}). Saving factors there would replace "
                "them, so nothing is written: point `factors_dir` at another folder."
            )


def clean_dead_leftovers(dirpath: str | Path) -> list[Path]:
    """Delete the temporary siblings (``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>-*``) of writers that died.

    Only folders holding nothing but ``factors.pt`` / ``meta.json`` are deleted (what a factors save writes);
    a leftover of a live process is left alone. Returns the deleted paths.
    """
    removed = []
    for _kind, pid, path in leftovers(Path(dirpath)):
        if pid_alive(pid):
            continue
        try:
            names = {p.name for p in path.iterdir()}
        except OSError:
            continue
        if names <= OURS:
            remove_folder(path)
            removed.append(path)
    return removed


def save_factors(dirpath: str | Path, factors: KFACFactors, meta: dict[str, Any]) -> Path:
    """Write ``factors`` and ``meta`` (plus kind, layers, version, time, checksum) to ``dirpath`` atomically."""

    dirpath = Path(dirpath)
    check_factors_dir(dirpath)  # never rename or remove what the library did not write
    dirpath.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(dirpath, "factors folder"):  # one writer at a time (another one fails at once, named)
        clean_dead_leftovers(dirpath)
        return _save_locked(dirpath, factors, meta)


def _save_locked(dirpath: Path, factors: KFACFactors, meta: dict[str, Any]) -> Path:
    from lightning_fastif._version import __version__

    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = dirpath.parent / f".{dirpath.name}.tmp-{token}"
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu", torch.float64).contiguous() for k, v in factors.tensors().items()}
        with open(tmp / FACTORS_FILE, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        full = {
            **meta,
            "kind": "ekfac" if factors.corrected else "kfac",
            "layers": [asdict(s) for s in factors.slots],
            "num_examples": factors.num_examples,
            "library_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {FACTORS_FILE: digest(tmp / FACTORS_FILE)},
            "format_version": FORMAT_VERSION,
        }
        with open(tmp / META_FILE, "w") as f:
            json.dump(full, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        old = dirpath.parent / f".{dirpath.name}.old-{token}"
        if dirpath.exists():
            os.replace(dirpath, old)
        os.replace(tmp, dirpath)
        fsync_path(dirpath.parent)
        if old.exists():
            remove_folder(old)
    except BaseException:
        remove_folder(tmp)
        raise
    return dirpath


def read_meta(dirpath: str | Path) -> dict[str, Any] | None:
    """The folder's ``meta.json``, or ``None`` when there is no complete factors folder there."""
    path = Path(dirpath) / META_FILE
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexCorruptError(
            f"Expected {str(path)!r} to be the JSON of a factors folder, but it is not valid JSON ({err}). Pass "
            "`overwrite=True` to refit the factors there, or point `factors_dir` at another folder."
        ) from err
    if not isinstance(meta, dict):
        raise IndexCorruptError(
            f"Expected {str(path)!r} to hold a JSON object (the factors' settings), but got {type(meta).__name__}. "
            "Pass `overwrite=True` to refit the factors there, or point `factors_dir` at another folder."
        )
    return meta


def mismatches(meta: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a saved folder's meta and the current run, one phrase per field."""
    out = []
    for key in COMPARED:
        if key == "data_fingerprint" and key in expected:
            from lightning_fastif.functional.params import dataset_fingerprint_diffs

            if isinstance(meta.get(key), dict) and isinstance(expected[key], dict):
                out += [
                    f"data_fingerprint differs (other training data: {d})"
                    for d in dataset_fingerprint_diffs(meta[key], expected[key])
                ]
                continue
        if key in expected and meta.get(key) != expected[key]:
            if key in ("model_fingerprint", "data_fingerprint"):
                out.append(
                    f"{key} differs (another model's weights)"
                    if key[0] == "m"
                    else f"{key} differs (other training data)"
                )
            else:
                out.append(f"{key}: saved {meta.get(key)!r}, now {expected[key]!r}")
    return out


def load_factors(dirpath: str | Path, expected: dict[str, Any], kind: str) -> KFACFactors | None:
    """The saved factors if the folder holds factors of ``kind`` fitted on what ``expected`` describes.

    Returns ``None`` when the folder has no factors yet, or holds K-FAC factors and EK-FAC's are asked for.

    Raises:
        IndexMismatchError: the folder was fitted on another model, other data, parameters, Fisher or seed (the
            message says which).
        IndexCorruptError: ``factors.pt`` is missing or does not match its checksum.
    """
    dirpath = Path(dirpath)
    check_factors_dir(dirpath)
    clean_dead_leftovers(dirpath)
    meta = read_meta(dirpath)
    if meta is None:
        return None
    diff = mismatches(meta, expected)
    if diff:
        raise IndexMismatchError(
            f"The factors in {str(dirpath)!r} were fitted on something else: {'; '.join(diff)}. Pass "
            "`overwrite=True` to refit them there, or point `factors_dir` at another folder."
        )
    if kind == "ekfac" and meta.get("kind") != "ekfac":
        return None
    path = dirpath / FACTORS_FILE
    if not path.is_file() or digest(path) != meta.get("files", {}).get(FACTORS_FILE):
        raise IndexCorruptError(
            f"Expected {str(path)!r} to match the checksum in its meta.json, but it is missing or differs "
            "(a truncated copy?). Pass `overwrite=True` to refit the factors."
        )
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    slots = [LayerSlot(**s) for s in meta["layers"]]
    return KFACFactors.from_tensors(slots, tensors, int(meta["num_examples"]))
