"""The ``lightning-fastif`` command: ``app`` (the LightningCLI subclass and ``main``), ``commands`` (the bodies of
the subcommands), ``inputs`` (datasets, checkpoints, query selection), ``support`` (one-line errors, resume),
``correct`` (the ``correct`` subcommand) and ``demo``."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-fastif``: mistakes found without Lightning (a mistyped subcommand, a missing config
    file, a bad ``--threads``) answer in one line before the seconds of imports; the rest is
    :func:`lightning_fastif.cli.app.main`."""
    from lightning_fastif.cli.support import USAGE_EXIT, early_error

    argv = list(sys.argv[1:] if args is None else args)
    message = early_error([a for a in argv if a not in ("--debug", "--help-all")])
    if message:
        print(message, file=sys.stderr)
        sys.exit(USAGE_EXIT)
    from lightning_fastif.cli.app import main as run

    run(args)
