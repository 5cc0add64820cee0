"""File-system helpers (the bottom layer): durable writes, checksums, leftovers of interrupted swaps, folder locks.

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

from lightning_fastif.errors import FastIFError

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


class FolderLockedError(FastIFError, OSError):
    """Another process (or another writer of this process) holds the lock of a folder."""


class FolderLock:
    """An exclusive, non-blocking lock on a folder while it is written: a lock file holding the owner's pid and host.

    The lock is ``fcntl.flock`` on the lock file where the platform has it (the kernel releases it when its process
    dies, so a killed owner never leaves a stale lock), else the lock file made with ``O_EXCL`` (a lock file of a
    dead pid on this host is taken over). Two holders in one process conflict too (each ``acquire`` opens its own
    file description). Release removes the lock file.

    Args:
        path: the lock file, e.g. ``<output_dir>/.influence.lock`` or ``.<index folder>.lock`` beside a folder that
            is replaced by renaming.
        what: the folder in words, for the error (``"output folder '/runs/a'"``).

    Raises:
        FolderLockedError: from :meth:`acquire` when someone else holds it; the message names the folder, the
            owner's pid and host.

    Example:
        >>> with FolderLock(tmp_path / ".out.lock", "output folder"):  # doctest: +SKIP
        ...     write_the_folder()
    """

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock at once or raise :class:`FolderLockedError` naming its owner."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # no flock on this platform: an O_EXCL lock file
            self._fd = self._acquire_exclusive()
        else:
            self._fd = self._acquire_flock(fcntl)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, _owner().encode())
        os.fsync(self._fd)
        return self

    def _acquire_flock(self, fcntl: Any) -> int:
        # a holder that releases between our open and our flock unlinks the file: retry on the new one
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                self._refuse()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
        self._refuse()
        raise AssertionError("unreachable")  # pragma: no cover

    def _acquire_exclusive(self) -> int:
        for _ in range(20):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                owner = self._owner_of()
                if owner and owner.get("host") == _host() and not pid_alive(int(owner.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # the owner died: take the lock over
                    continue
                self._refuse()
        self._refuse()
        raise AssertionError("unreachable")  # pragma: no cover

    def _owner_of(self) -> dict[str, Any] | None:
        import json

        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _refuse(self) -> None:
        owner = self._owner_of() or {}
        pid, host = owner.get("pid", "?"), owner.get("host", "?")
        who = (
            "another writer of this process"
            if pid == os.getpid() and host == _host()
            else f"process {pid} on {host}"
        )
        raise FolderLockedError(
            f"Expected the {self.what} to be free, but {who} is writing it (lock file {str(self.path)!r}, "
            f"pid {pid}). Wait for it to finish, or use another folder."
        )

    def release(self) -> None:
        """Remove the lock file and let go (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it: a newcomer opens a fresh file
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __getstate__(self) -> dict[str, Any]:  # a held descriptor does not travel to another process
        return {**self.__dict__, "_fd": None}


def folder_lock(dirpath: str | os.PathLike[str], what: str) -> FolderLock:
    """The :class:`FolderLock` of a folder replaced by renaming: ``.<name>.lock`` beside it (not inside it)."""
    dirpath = Path(dirpath)
    return FolderLock(dirpath.parent / f".{dirpath.name}.lock", f"{what} {str(dirpath)!r}")


def _host() -> str:
    import socket

    return socket.gethostname()


def _owner() -> str:
    import json
    import time

    return json.dumps({"pid": os.getpid(), "host": _host(), "since": time.time()})
