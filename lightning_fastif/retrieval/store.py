"""Saving and loading an index folder, atomically and with what it was built from.

A folder holds the index file (``index.faiss``, a plain ``faiss.write_index`` file, or ``index.pt`` for the torch
backend), ``ids.npy`` (int64, insertion order), optional arrays (``<name>.npy``, e.g. cached logits) and
``meta.json`` (:class:`IndexMeta`: feature layer, dimension, dataset length, factory, backend, model fingerprint,
library version, creation time, and the size and SHA-256 of every file, so a truncated file is detected).

Atomic replacement (one writer per folder): ``save_index`` writes everything into a hidden sibling
``.<name>.tmp-<pid>-<token>``, fsyncs every file, writes ``meta.json`` last, fsyncs the folder, then swaps with two
renames: ``<name>`` -> ``.<name>.old-<pid>-<token>``, ``tmp`` -> ``<name>`` (then fsyncs the parent and deletes
the old folder, ``meta.json`` first). A folder is complete exactly when its ``meta.json`` exists and every file
matches its checksum. A process killed at any moment therefore leaves ``<name>`` complete (old or new), or, between
the two renames, no ``<name>`` but a complete ``.old-`` (and ``.tmp-``) sibling. ``load_index`` reads such a sibling
when ``<name>`` is missing (it never renames anything); the next ``save_index`` first promotes it back to
``<name>`` and deletes leftovers of writers that are no longer running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fastif._files import (
    META_FILE,
    digest,
    folder_lock,
    fsync_path,
    leftovers,
    pid_alive,
    remove_folder,
    write_npy,
)
from lightning_fastif.errors import ConfigurationError, IndexCorruptError, IndexMismatchError
from lightning_fastif.retrieval.factory import index_from_bytes
from lightning_fastif.retrieval.index import CandidateIndex

__all__ = ["IndexMeta", "load_arrays", "load_index", "save_index"]

IDS_FILE = "ids.npy"
INDEX_FILES = {"faiss": "index.faiss", "torch": "index.pt"}
FORMAT_VERSION = 1
COMPARABLE = (
    "feature_layer",
    "dim",
    "dataset_length",
    "ntotal",
    "factory",
    "backend",
    "model_fingerprint",
    "space",
    "dataset_fingerprint",
)
_REBUILD = (
    "Rebuild it (FeatureIndexCallback, `lightning-fastif index`, or retrieval.save_index) or point `index` at "
    "another folder."
)


@dataclasses.dataclass
class IndexMeta:
    """What an index folder was built from (``meta.json``).

    ``save_index`` fills ``dim``, ``ntotal``, ``factory``, ``backend``, ``params``, ``library_version``,
    ``created``, ``files`` and ``arrays``; the caller gives the rest.
    """

    feature_layer: str | None = None
    dataset_length: int | None = None
    model_fingerprint: str | None = None
    dataset_fingerprint: dict[str, Any] | None = (
        None  # functional.params.dataset_fingerprint: labels, input sample, content (every in-memory byte or row)
    )
    dim: int | None = None
    ntotal: int | None = None
    factory: str = "Flat"
    backend: str = "faiss"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    library_version: str = ""
    created: str = ""
    files: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    arrays: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # "features" (penultimate-layer kNN, L2) or "gradients" (gradient sketches, inner product; see
    # retrieval.gradient_index); ``sketch`` holds a gradient index's projection settings, seed and parameter names
    space: str = "features"
    sketch: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexMeta:
        """Known keys become fields; unknown keys go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        extra = {**dict(known.pop("extra", None) or {}), **{k: v for k, v in data.items() if k not in names}}
        return cls(**known, extra=extra)

    @property
    def index_file(self) -> str:
        return INDEX_FILES.get(self.backend, "index.bin")


def _recover(dirpath: Path) -> None:
    """Promote a complete leftover when ``dirpath`` is missing; delete leftovers of writers no longer running."""
    if not dirpath.exists():
        for _kind, pid, path in leftovers(dirpath):
            if pid_alive(pid):  # another writer is between its renames: not ours to move
                continue
            try:
                _read_meta_and_verify(path)
            except IndexCorruptError:
                continue
            os.rename(path, dirpath)
            fsync_path(dirpath.parent)
            break
    for _kind, pid, path in leftovers(dirpath):
        if not pid_alive(pid):
            remove_folder(path)


def _check_replaceable(dirpath: Path, overwrite: bool) -> None:
    if not dirpath.exists():
        return
    if not dirpath.is_dir():
        raise ConfigurationError(f"Expected `dirpath` to be a folder, but {str(dirpath)!r} is a file.")
    if not overwrite:
        raise ConfigurationError(
            f"Expected `dirpath` not to exist with overwrite=False, but {str(dirpath)!r} exists. "
            "Pass overwrite=True to replace it."
        )
    names = {p.name for p in dirpath.iterdir()}
    foreign = sorted(
        n for n in names if n not in (META_FILE, *INDEX_FILES.values()) and not n.endswith(".npy")
    )
    if foreign:
        raise ConfigurationError(
            f"Expected `dirpath` to be a new folder or an index folder (with {META_FILE}), but "
            f"{str(dirpath)!r} holds other files ({', '.join(foreign[:5])}); it would be deleted."
        )


# --- save ---------------------------------------------------------------------------------------------------------


def save_index(
    index: CandidateIndex,
    dirpath: str | os.PathLike[str],
    meta: IndexMeta | Mapping[str, Any] | None = None,
    overwrite: bool = True,
    arrays: Mapping[str, Tensor | np.ndarray] | None = None,
) -> IndexMeta:
    """Write ``index`` and its metadata to the folder ``dirpath``, atomically (see the module docstring).

    Args:
        index: a non-empty candidate index.
        dirpath: the index folder; its parents are created.
        meta: what the index was built from: ``feature_layer``, ``dataset_length``, ``model_fingerprint``
            (``functional.params.fingerprint(model)``) and any other keys (kept under ``extra``).
        overwrite: replace an existing index folder (a folder holding anything else is never replaced).
        arrays: extra arrays to keep with the index, e.g. ``{"logits": [N, C]}``, saved as ``<name>.npy``.

    Returns:
        The :class:`IndexMeta` written to ``meta.json``.

    Raises:
        ConfigurationError: an empty index, bad array names, or a ``dirpath`` that may not be replaced.

    Example:
        >>> from lightning_fastif.retrieval.index import TorchIndex
        >>> import tempfile
        >>> index = TorchIndex(); index.add(torch.eye(4))
        >>> folder = Path(tempfile.mkdtemp()) / "index"
        >>> save_index(index, folder, {"dataset_length": 4}).ntotal
        4
    """
    if not isinstance(index, CandidateIndex):
        raise ConfigurationError(f"Expected `index` to be a CandidateIndex, but got {type(index).__name__}.")
    if index.ntotal == 0:
        raise ConfigurationError("Expected `index` to hold at least one row, but got an empty index.")
    info = meta if isinstance(meta, IndexMeta) else IndexMeta.from_dict(dict(meta or {}))
    arrays = dict(arrays or {})
    for name in arrays:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or name in ("ids", "index", "meta"):
            raise ConfigurationError(
                f"Expected the names of `arrays` to be identifiers other than ids/index/meta, but got {name!r}."
            )
    dirpath = Path(dirpath)
    dirpath.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(dirpath, "index folder"):  # one writer at a time (another one fails at once, named)
        return _save_locked(index, dirpath, info, overwrite, arrays)


def _save_locked(
    index: CandidateIndex,
    dirpath: Path,
    info: IndexMeta,
    overwrite: bool,
    arrays: dict[str, Tensor | np.ndarray],
) -> IndexMeta:
    from lightning_fastif._version import __version__

    _recover(dirpath)
    _check_replaceable(dirpath, overwrite)

    info = dataclasses.replace(
        info,
        dim=index.dim,
        ntotal=index.ntotal,
        factory=index.factory,
        backend=index.backend,
        params=index.config(),
        library_version=__version__,
        created=datetime.now(timezone.utc).isoformat(),
        files={},
        arrays=sorted(arrays),
        format_version=FORMAT_VERSION,
    )
    token = f"{os.getpid()}-{secrets.token_hex(6)}"
    tmp = dirpath.parent / f".{dirpath.name}.tmp-{token}"
    try:
        tmp.mkdir()
        index.save(tmp / info.index_file)
        write_npy(tmp / IDS_FILE, index.ids.numpy())
        for name, value in arrays.items():
            value = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            write_npy(tmp / f"{name}.npy", value)
        for path in sorted(tmp.iterdir()):
            fsync_path(path)
            info.files[path.name] = digest(path)
        with open(tmp / META_FILE, "w") as f:  # last: its presence marks the folder complete
            json.dump(info.to_dict(), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        if dirpath.exists():
            old = dirpath.parent / f".{dirpath.name}.old-{token}"
            os.rename(dirpath, old)
            try:
                os.rename(tmp, dirpath)
            except BaseException:
                os.rename(
                    old, dirpath
                )  # an error (not a kill) between the renames: put the previous one back
                raise
            fsync_path(dirpath.parent)
            remove_folder(old)
        else:
            os.rename(tmp, dirpath)
        fsync_path(dirpath.parent)
    finally:
        if tmp.exists():
            remove_folder(tmp)
    return info


# --- load ---------------------------------------------------------------------------------------------------------


def _read_meta_and_verify(folder: Path, names: list[str] | None = None) -> tuple[IndexMeta, bytes]:
    """The folder's meta (and the raw ``meta.json``), after checking the size and SHA-256 of its files."""
    meta_path = folder / META_FILE
    try:
        raw = meta_path.read_bytes()
    except FileNotFoundError:
        raise IndexCorruptError(
            f"The index folder {str(folder)!r} has no {META_FILE}: it is not a complete index (an interrupted "
            f"write, or files copied by hand). {_REBUILD}"
        ) from None
    try:
        meta = IndexMeta.from_dict(json.loads(raw))
    except (ValueError, TypeError) as err:
        raise IndexCorruptError(
            f"The {META_FILE} of {str(folder)!r} cannot be read ({err}). {_REBUILD}"
        ) from err
    if meta.format_version > FORMAT_VERSION or meta.backend not in INDEX_FILES:
        raise IndexCorruptError(
            f"The index at {str(folder)!r} has format {meta.format_version} and backend {meta.backend!r}; this "
            f"version reads format <= {FORMAT_VERSION} with backends {sorted(INDEX_FILES)}. {_REBUILD}"
        )
    for name in [meta.index_file, IDS_FILE] if names is None else names:
        want = meta.files.get(name)
        path = folder / name
        if want is None or not path.is_file():
            raise IndexCorruptError(f"The index folder {str(folder)!r} is missing {name}. {_REBUILD}")
        got = digest(path)
        if got != want:
            raise IndexCorruptError(
                f"The file {name} of the index at {str(folder)!r} is truncated or corrupt: {got['bytes']} bytes "
                f"with SHA-256 {got['sha256'][:12]}..., expected {want.get('bytes')} bytes with "
                f"{str(want.get('sha256'))[:12]}.... {_REBUILD}"
            )
    return meta, raw


def _raw_meta(folder: Path) -> bytes | None:
    try:
        return (folder / META_FILE).read_bytes()
    except OSError:
        return None


def _load_folder(folder: Path) -> tuple[CandidateIndex, IndexMeta]:
    meta, _ = _read_meta_and_verify(folder)
    try:
        ids = np.load(folder / IDS_FILE, allow_pickle=False)
        data = (folder / meta.index_file).read_bytes()
        index = index_from_bytes(data, meta.backend, meta.factory, ids, meta.params)
    except (OSError, ValueError, RuntimeError) as err:
        if isinstance(err, IndexCorruptError):
            raise
        raise IndexCorruptError(f"The index at {str(folder)!r} cannot be read ({err}). {_REBUILD}") from err
    if index.ntotal != meta.ntotal or index.dim != meta.dim:
        raise IndexCorruptError(
            f"The index at {str(folder)!r} holds {index.ntotal} rows of dimension {index.dim}, but its {META_FILE} "
            f"says {meta.ntotal} of dimension {meta.dim}. {_REBUILD}"
        )
    return index, meta


def _resolve(dirpath: Path) -> Path:
    """``dirpath``, or the complete leftover of an interrupted swap to read instead of it."""
    if dirpath.is_dir():
        return dirpath
    if dirpath.exists():
        raise IndexCorruptError(f"Expected an index folder at {str(dirpath)!r}, but it is a file. {_REBUILD}")
    for _kind, _pid, path in leftovers(dirpath):
        try:
            _read_meta_and_verify(path)
        except IndexCorruptError:
            continue
        return path
    raise IndexCorruptError(
        f"No candidate index exists at {str(dirpath)!r}: the folder does not exist. {_REBUILD}"
    )


def _same_layer(a: Any, b: Any) -> bool:
    """Layer names equal up to a wrapper prefix (``"model.head"`` and ``"head"``)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return a == b
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _dataset_diffs(have: Any, want: Any) -> list[str]:
    """What differs between two ``dataset_fingerprint`` dicts, in words (an index saved without one: nothing)."""
    from lightning_fastif.functional.params import dataset_fingerprint_diffs

    if not isinstance(have, Mapping) or not isinstance(want, Mapping):
        return []
    return [
        f"dataset_fingerprint: {d} from those the index was built on"
        for d in dataset_fingerprint_diffs(dict(have), dict(want))
    ]


def load_index(
    dirpath: str | os.PathLike[str], expected: Mapping[str, Any] | None = None, ignore_mismatch: bool = False
) -> tuple[CandidateIndex, IndexMeta]:
    """Read an index folder written by :func:`save_index`, checking it against what it is used with.

    Args:
        dirpath: the index folder.
        expected: values the index must have been built from, any of ``feature_layer``, ``dim``,
            ``dataset_length``, ``ntotal``, ``factory``, ``backend``, ``model_fingerprint``,
            ``dataset_fingerprint`` (an index saved without one is not checked for it); None values are not
            checked. Feature layer names match up to a wrapper prefix.
        ignore_mismatch: warn instead of raising when ``expected`` disagrees.

    Returns:
        ``(index, meta)``.

    Raises:
        IndexCorruptError: no folder, no ``meta.json``, a missing, truncated or unreadable file.
        IndexMismatchError: ``expected`` disagrees with the folder (each differing field is named with both
            values), unless ``ignore_mismatch``.
        ConfigurationError: an unknown key in ``expected``.
    """
    expected = dict(expected or {})
    unknown = sorted(set(expected) - set(COMPARABLE))
    if unknown:
        raise ConfigurationError(
            f"Expected the keys of `expected` to be among {COMPARABLE}, but got {unknown}."
        )
    dirpath = Path(dirpath)
    for attempt in range(3):
        folder = _resolve(dirpath)
        before = _raw_meta(folder)
        try:
            index, meta = _load_folder(folder)
            break
        except IndexCorruptError:
            # A writer may have swapped the folder while it was read: read again when meta.json changed.
            if attempt == 2 or _raw_meta(folder) == before:
                raise
    space = expected.pop("space", None)
    if space is not None and meta.space != space:  # never ignorable: the two spaces search different vectors
        raise IndexMismatchError(
            f"The index at {str(dirpath)!r} holds {meta.space}-space candidates, but candidates={space!r} was asked "
            f"for. Pass candidates={meta.space!r}, or point `index` at a {space}-space folder (build one with "
            f"`lightning-fastif index --space {space}`, or "
            f"{'GradientIndexCallback' if space == 'gradients' else 'FeatureIndexCallback'})."
        )
    diffs = []
    for key, want in expected.items():
        have = getattr(meta, key)
        if key == "dataset_fingerprint":
            diffs += _dataset_diffs(have, want)
        elif want is not None and not (_same_layer(have, want) if key == "feature_layer" else have == want):
            diffs.append(f"{key}: the index has {have!r}, expected {want!r}")
    if diffs:
        msg = (
            f"The candidate index at {str(dirpath)!r} was built from something else: {'; '.join(diffs)}. "
            f"{_REBUILD} Or pass ignore_mismatch=True to use it anyway."
        )
        if not ignore_mismatch:
            raise IndexMismatchError(msg)
        warnings.warn(msg, stacklevel=2)
    return index, meta


def load_arrays(dirpath: str | os.PathLike[str], names: list[str] | None = None) -> dict[str, Tensor]:
    """The extra arrays saved with an index (``save_index(arrays=...)``), checksums verified.

    Raises:
        IndexCorruptError: as :func:`load_index`, or a name that was not saved.
    """
    folder = _resolve(Path(dirpath))
    meta, _ = _read_meta_and_verify(folder, names=[])
    names = list(meta.arrays) if names is None else list(names)
    missing = sorted(set(names) - set(meta.arrays))
    if missing:
        raise IndexCorruptError(
            f"The index at {str(folder)!r} has no arrays {missing} (it has {meta.arrays})."
        )
    _read_meta_and_verify(folder, names=[f"{n}.npy" for n in names])
    return {n: torch.from_numpy(np.load(folder / f"{n}.npy", allow_pickle=False)) for n in names}
