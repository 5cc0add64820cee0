"""How ``lightning-fastif`` meets a person: errors as one clear line, ``--help`` with the library's options first,
"did you mean" for typos, ``--threads`` and ``--debug`` (both read before the Lightning parser sees the arguments).

Kept apart from ``cli.py`` so that the parsing of these few flags and the error formatting import nothing heavy.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

DEBUG_ENV = "LIGHTNING_FASTIF_DEBUG"
USAGE_EXIT = 2  # usage and configuration errors, as argparse
FAILURE_EXIT = 1


def pop_flag(argv: list[str], flag: str) -> bool:
    """Remove every ``flag`` from ``argv``; whether it was there."""
    found = flag in argv
    argv[:] = [a for a in argv if a != flag]
    return found


def pop_option(argv: list[str], name: str) -> str | None:
    """Remove ``name VALUE`` / ``name=VALUE`` from ``argv`` and return the last value (None when absent)."""
    value, out, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == name:
            if i + 1 >= len(argv):
                raise UsageError(f"Expected a value after `{name}` (a positive int or 'auto'), but got none.")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    argv[:] = out
    return value


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` on the command line (removed from ``argv``) or ``LIGHTNING_FASTIF_DEBUG=1``."""
    flag = pop_flag(argv, "--debug")
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class UsageError(Exception):
    """A command-line mistake caught before Lightning's parser (exit code 2)."""


# ------------------------------------------------------------------------------------------------ errors
def _chain(err: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__  # type: ignore[assignment]


def _options(parser: Any) -> list[str]:
    """Every long option of a (jsonargparse) parser, nested groups included."""
    names: list[str] = []
    for action in getattr(parser, "_actions", []):
        names += [s for s in getattr(action, "option_strings", []) if s.startswith("--")]
    return names


def did_you_mean(unknown: str, parser: Any) -> str | None:
    """The closest option of ``parser`` to ``unknown`` (``--top_kk=3`` -> ``--top_k``), or None."""
    key = unknown.split("=", 1)[0]
    if not key.startswith("--"):
        return None
    options = [o for o in _options(parser) if not o.endswith(".help")]
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.75)
    if not close:  # a typo inside a nested key: compare the last part within the same prefix
        prefix, _, last = key.rpartition(".")
        same = [o for o in options if o.rpartition(".")[0] == prefix]
        tails = difflib.get_close_matches(last, [o.rpartition(".")[2] for o in same], n=1, cutoff=0.6)
        close = [f"{prefix}.{tails[0]}"] if tails and prefix else []
    return close[0] if close else None


def describe(err: BaseException, argv: list[str], parsers: dict[str, Any]) -> tuple[int, str]:
    """``(exit code, the message to print)`` for an error that ended the command."""
    from lightning_fastif.errors import (
        ConfigurationError,
        FastIFError,
        IndexCorruptError,
        IndexMismatchError,
        LossResolutionError,
    )

    subcommand = next((a for a in argv if a in parsers), None)
    prog = f"lightning-fastif {subcommand}" if subcommand else "lightning-fastif"
    ours = next((e for e in _chain(err) if isinstance(e, FastIFError)), None)
    if ours is not None:
        usage = isinstance(
            ours, (ConfigurationError, IndexMismatchError, IndexCorruptError, LossResolutionError)
        )
        return (USAGE_EXIT if usage else FAILURE_EXIT), f"{prog}: error: {ours}"
    if isinstance(err, UsageError):
        return USAGE_EXIT, f"{prog}: error: {err}"
    config = next((e for e in _chain(err) if type(e).__module__.split(".")[0] == "omegaconf"), None)
    if config is not None:  # a `${...}` that names no key, a bad interpolation...: the config's fault
        return USAGE_EXIT, f"{prog}: error: {config_error_message(config)}"
    if isinstance(err, argparse.ArgumentError) or type(err).__name__ == "ArgumentError":
        text = _clean_parser_message(str(err))
        match = re.search(r"[Uu]nrecognized arguments: (.+)", text)
        if match:
            hints = []
            parser = parsers.get(subcommand) if subcommand else None
            for unknown in match.group(1).split():
                guess = did_you_mean(unknown, parser) if parser is not None else None
                if guess:
                    hints.append(f"did you mean {guess}?")
            text = "unrecognized arguments: " + match.group(1) + ("; " + " ".join(hints) if hints else "")
        return USAGE_EXIT, f"{prog}: error: {text}\n(see `{prog} --help`)"
    name = type(err).__module__.split(".")[0]
    if name == "lightning" and type(err).__name__ == "MisconfigurationException":
        return USAGE_EXIT, f"{prog}: error: {err}"
    return FAILURE_EXIT, (
        f"{prog}: error: {type(err).__name__}: {err}\n(rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
    )


def config_error_message(err: BaseException) -> str:
    """One line for an OmegaConf error: which key holds the bad ``${...}`` and what is wrong with it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    where = f"`{key}`" if key else "the configuration"
    if type(err).__name__ == "InterpolationKeyError":
        return (
            f"Expected every `${{...}}` interpolation to name a key of the configuration, but {where} holds one "
            f"that does not ({first})."
        )
    return (
        f"Expected a valid configuration, but {where} could not be resolved ({type(err).__name__}: {first})."
    )


def _clean_parser_message(text: str) -> str:
    """jsonargparse's message without its noise: the union's list of subtypes, the "given value" echo and the
    ``Expected a <class 'NoneType'>`` alternative; what is left are the reasons, one per line."""
    noise = (
        "Subtypes:",
        "Errors:",
        "Given value type",
        "Given value:",
        "tip:",
        "- Expected a <class 'NoneType'>",
    )
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    kept = [line for line in lines if not line.strip().startswith(noise)]
    if not kept:
        return lines[0] if lines else text
    head, rest = kept[0].strip(), [line.strip() for line in kept[1:]]
    if len(rest) == 1 and not rest[0].startswith("- "):
        return f"{head} {rest[0]}"
    return "\n".join([head, *("  " + r for r in rest)])


# ------------------------------------------------------------------------------------------------ help
def own_groups_first(parser: Any, own: Iterable[str]) -> None:
    """Move the argument groups of the subcommand's own arguments ahead of Lightning's trainer, model and data
    groups, and shorten the usage line (argparse lists every one of the ~100 options in it otherwise)."""
    roots = set(own)
    groups = list(getattr(parser, "_action_groups", []))

    def is_own(group: Any) -> bool:
        dests = [str(getattr(a, "dest", "")) for a in getattr(group, "_group_actions", [])]
        return bool(dests) and all(d.split(".")[0] in roots for d in dests)

    head = [g for g in groups if getattr(g, "title", None) in ("positional arguments", "options")]
    mine = [g for g in groups if g not in head and is_own(g)]
    if not mine:
        return
    rest = [g for g in groups if g not in head and g not in mine]
    parser._action_groups = head + mine + rest
    parser.usage = (
        "%(prog)s [-c CONFIG] [--OPTION VALUE ...]   (the subcommand's options first, then Lightning's)"
    )


def stderr_is_interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class LightningInfoGate:
    """A logging filter on Lightning's rank-zero logger: drops its advertising lines ("💡 Tip: ... litlogger") and,
    while holding, keeps its start-up lines ("Seed set to 0", "GPU available: ...") back, so that an error found
    while the command starts prints alone. They are let out (in order) by :meth:`release`, or by the first
    message of the library itself; :meth:`discard` drops them after an error."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[Any] = []

    def filter(self, record: Any) -> bool:
        message = str(record.getMessage())
        if message.startswith("💡 Tip"):
            return False
        if not self.hold:
            return True
        if message.startswith("lightning_fastif"):
            self.release()
            return True
        self.held.append(record)
        return False

    def release(self) -> None:
        import logging

        self.hold = False
        held, self.held = self.held, []
        for record in held:
            logging.getLogger(record.name).handle(record)

    def discard(self) -> None:
        self.hold, self.held = False, []


_GATED = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)
_GATE = LightningInfoGate()


def lightning_info_gate(reset: bool = True) -> LightningInfoGate:
    """The gate on Lightning's rank-zero loggers (installed once); with ``reset``, emptied and holding."""
    import logging

    for name in _GATED:
        logger = logging.getLogger(name)
        if _GATE not in logger.filters:
            logger.addFilter(_GATE)
    if reset:
        _GATE.discard()
        _GATE.hold = True
    return _GATE
