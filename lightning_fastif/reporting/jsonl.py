"""Influence results as JSON Lines: one ``InfluenceResult.to_dict()`` a line, durable line by line.

The writer appends, flushes and fsyncs after every batch of lines, so a killed run loses at most the line being
written; a reader (or the next writer) drops such a truncated last line with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from lightning_fastif._files import FULL_DISK_ERRNOS, full_disk_error
from lightning_fastif.errors import ConfigurationError, ResultsWriteError, expected
from lightning_fastif.results import InfluenceResult


class JsonlWriter:
    """Append influence results to a ``.jsonl`` file, one JSON object per line.

    The file is opened on the first write (so the writer can be built on every rank and pickled before use).
    If the file ends with a partial line left by a killed run, that line is cut off before appending, with a
    warning, so every line of the file stays a complete record.

    Args:
        path: the ``.jsonl`` file; parent folders are created. Existing lines are kept.
        fsync: call ``os.fsync`` after each batch of lines (on by default; off only for throwaway files).

    Example:
        >>> with JsonlWriter(tmp_path / "influence.jsonl") as writer:  # doctest: +SKIP
        ...     writer.write_many(results)
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        if not isinstance(path, str | os.PathLike):
            raise ConfigurationError(expected("path", "a str or os.PathLike", type(path).__name__))
        self.path = Path(path)
        self.fsync = bool(fsync)
        self._handle: IO[bytes] | None = None
        self._closed = False

    def write(self, result: InfluenceResult | Mapping[str, Any]) -> None:
        """Append one result and make it durable."""
        self.write_many([result])

    def write_many(self, results: Iterable[InfluenceResult | Mapping[str, Any]]) -> int:
        """Append several results in one write, then flush and fsync.

        Returns:
            The number of lines written.
        """
        lines = [_encode(result, position) for position, result in enumerate(results)]
        if not lines:
            return 0
        handle = self._open()
        start = handle.tell()
        try:
            handle.write(b"".join(lines))
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        except OSError as err:  # ENOSPC, EFBIG (a file-size limit), EDQUOT: keep what was written before
            if err.errno not in FULL_DISK_ERRNOS:
                raise
            raise self._write_failed(err, start) from err
        return len(lines)

    def _write_failed(self, err: OSError, start: int) -> ResultsWriteError:
        """Cut the file back to the records written before the failed batch and say so in one line."""
        handle, self._handle = self._handle, None
        try:
            if handle is not None:
                handle.close()  # flushes the buffer again: may fail (or write part of it) once more
        except OSError:
            pass
        try:
            os.truncate(self.path, start)  # never a partial record; shrinking needs no space
            kept = self.path.read_bytes().count(b"\n")
        except OSError:
            kept = None
        kept_text = (
            f"the {kept} record(s) written before are kept (a rerun resumes after them)"
            if kept is not None
            else "the records written before are kept"
        )
        return full_disk_error(err, self.path, kept_text)

    def close(self) -> None:
        """Close the file; later writes raise."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # an open file handle does not pickle: reopen after unpickling
        return {**self.__dict__, "_handle": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def _open(self) -> IO[bytes]:
        if self._closed:
            raise ConfigurationError(expected("JsonlWriter", "open (write before close)", "a closed writer"))
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_last_line(self.path)
            self._handle = open(self.path, "ab")  # noqa: SIM115 - kept open across writes, closed in close()
        return self._handle


def read_jsonl(path: str | os.PathLike[str]) -> list[InfluenceResult]:
    """Read the results of a ``.jsonl`` file written by :class:`JsonlWriter` (or ``InfluenceWriter``).

    Blank lines are ignored. A truncated or unreadable *last* line (a run killed mid-write) is skipped with a
    warning; an unreadable line anywhere else is an error, since that is not how an interrupted append looks.

    Args:
        path: the ``.jsonl`` file.

    Returns:
        One ``InfluenceResult`` per complete line, in file order.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ConfigurationError: when a line other than the last is not a result record.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    results: list[InfluenceResult] = []
    for position, (number, line) in enumerate(numbered):
        try:
            results.append(InfluenceResult.from_dict(_decode(line)))
        except (ValueError, TypeError) as error:
            if position == len(numbered) - 1:
                warnings.warn(
                    f"Skipped the truncated last line ({number}) of {str(path)!r}: {error}. "
                    "It is what an interrupted write leaves; the complete lines before it were read.",
                    stacklevel=2,
                )
                break
            raise ConfigurationError(
                expected(
                    "path", f"a JSON Lines file of influence results ({path})", f"line {number}: {error}"
                )
            ) from error
    return results


def _encode(result: InfluenceResult | Mapping[str, Any], position: int) -> bytes:
    if isinstance(result, Mapping):
        try:
            result = InfluenceResult.from_dict(dict(result))
        except TypeError as error:
            raise ConfigurationError(
                expected(f"results[{position}]", "a complete InfluenceResult dict", f"{error}")
            ) from error
    if not isinstance(result, InfluenceResult):
        raise ConfigurationError(
            expected(f"results[{position}]", "an InfluenceResult or its to_dict()", type(result).__name__)
        )
    text = json.dumps(result.to_dict(), ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def _decode(line: bytes) -> dict[str, Any]:
    data = json.loads(line.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def _drop_partial_last_line(path: Path) -> None:
    """Cut a trailing line without its newline (left by a killed writer) so the next append starts clean.

    A last line that is a complete JSON object and only lacks the newline is kept and terminated instead.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        keep, step = 0, 1 << 16
        end = size
        while end > 0:  # scan backwards for the last newline
            start = max(0, end - step)
            handle.seek(start)
            chunk = handle.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        handle.seek(keep)
        tail = handle.read()
        try:
            _decode(tail)  # a complete record that only lacks its newline: keep it
            handle.seek(size)
            handle.write(b"\n")
            complete = True
        except (ValueError, TypeError):
            handle.truncate(keep)
            complete = False
        handle.flush()
        os.fsync(handle.fileno())
    if complete:
        return
    warnings.warn(
        f"{str(path)!r} ended with a partial line ({size - keep} bytes) from an interrupted write; it was removed "
        "before appending.",
        stacklevel=4,
    )
