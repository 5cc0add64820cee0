"""File-system helpers of the index folder: durable writes, checksums, and leftovers of interrupted swaps.

See ``retrieval.store`` for the atomic replacement scheme these serve.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

META_FILE = "meta.json"


def fsync_path(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened or synced on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def digest(path: Path) -> dict[str, Any]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": size}


def write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def remove_folder(folder: Path) -> None:
    """Delete a folder, ``meta.json`` first, so that a half-deleted folder never looks complete."""
    with contextlib.suppress(FileNotFoundError):
        (folder / META_FILE).unlink()
    shutil.rmtree(folder, ignore_errors=True)


def leftovers(dirpath: Path) -> list[tuple[str, int, Path]]:
    """Hidden siblings ``(kind, pid, path)`` left by writers of ``dirpath``: ``old`` first, newest first."""
    pattern = re.compile(rf"\.{re.escape(dirpath.name)}\.(tmp|old)-(\d+)-[0-9a-f]+")
    found = []
    if dirpath.parent.is_dir():
        for p in dirpath.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and p.is_dir():
                found.append((m.group(1), int(m.group(2)), p))
    found.sort(key=lambda t: (t[0] != "old", -meta_mtime(t[2])))
    return found


def meta_mtime(path: Path) -> float:
    try:
        return (path / META_FILE).stat().st_mtime
    except OSError:
        return 0.0


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A crash leaves the previous file (or none), never half of one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    # os.open with 0o666 lets the umask decide the permissions, like any ordinary file (mkstemp would make it 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in FULL_DISK_ERRNOS:
            raise full_disk_error(err, target, "the previous file, if any, is unchanged") from err
        raise
    return target


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""No space left, a file-size limit (``ulimit -f``), a disk quota: what a write of results can meet."""


def full_disk_error(err: OSError, path: Path, kept: str) -> Any:
    """A one-line :class:`ResultsWriteError` for a failed write of ``path``, saying what was kept."""
    from lightning_fastif.errors import ResultsWriteError

    reason = os.strerror(err.errno) if err.errno else str(err)
    code = errno.errorcode.get(err.errno or 0, "")
    return ResultsWriteError(
        err.errno or 0,
        f"Expected to write {str(path)!r}, but the write failed: {reason}{f' ({code})' if code else ''}; {kept}. "
        "Free space (or raise the file-size limit) and rerun the same command.",
    )
