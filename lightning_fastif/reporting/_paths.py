"""Output paths checked before any work starts: a folder that cannot be created or written, or a file standing
where a folder (or a folder where a file) is expected, is a :class:`ConfigurationError` naming the argument.

Two levels: :func:`check_output_dir` / :func:`check_output_file` with ``create=False`` only inspect the path (the
CLI calls them before it loads a model); with ``create=True`` (callbacks' ``setup``) the folder is created and a
probe file is written and removed, which also catches read-only mounts and permissions (``os.access`` says yes to
root on a read-only file system).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lightning_fastif.errors import ConfigurationError

__all__ = ["check_output_dir", "check_output_file"]


def _first_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_dir(path: str | os.PathLike[str], name: str, *, create: bool = False) -> Path:
    """Check that ``path`` is (or can become) a writable folder; returns it as a ``Path``.

    Args:
        path: the folder.
        name: the argument's name in messages, e.g. ``"output_dir"``.
        create: create the folder and write a probe file into it (else only inspect the path).

    Raises:
        ConfigurationError: when ``path`` or one of its parents is a file, or the folder cannot be created or
            written.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigurationError(f"Expected `{name}` to be a folder path, but got {path!r}.")
    folder = Path(path)
    existing = _first_existing(folder.absolute())
    if not existing.is_dir():
        what = "is an existing file" if existing == folder.absolute() else f"lies under a file ({existing})"
        raise ConfigurationError(
            f"Expected `{name}` to be a folder (or a path where one can be created), but {str(folder)!r} {what}."
        )
    if not create:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigurationError(
                f"Expected `{name}` to be a writable folder, but {str(existing)!r} is not writable "
                f"(needed for {str(folder)!r})."
            )
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-", delete=True):
            pass
    except OSError as err:
        raise ConfigurationError(
            f"Expected `{name}` to be a writable folder, but {str(folder)!r} cannot be written: "
            f"{type(err).__name__}: {err.strerror or err}."
        ) from err
    return folder


def check_output_file(path: str | os.PathLike[str], name: str, *, create: bool = False) -> Path:
    """Check that ``path`` can be written as a file: its folder passes :func:`check_output_dir` and ``path`` is
    not a folder. Returns it as a ``Path``.

    Raises:
        ConfigurationError: naming ``name``, when the file cannot be written there.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigurationError(f"Expected `{name}` to be a file path, but got {path!r}.")
    file = Path(path)
    if file.is_dir():
        raise ConfigurationError(
            f"Expected `{name}` to be a file path, but {str(file)!r} is an existing folder."
        )
    check_output_dir(file.parent, name, create=create)
    if file.exists() and create and not os.access(file, os.W_OK):
        raise ConfigurationError(f"Expected `{name}` to be writable, but {str(file)!r} is read-only.")
    return file
