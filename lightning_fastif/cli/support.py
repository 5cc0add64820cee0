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
import warnings
from collections.abc import Iterable
from typing import Any

DEBUG_ENV = "LIGHTNING_FASTIF_DEBUG"
USAGE_EXIT = 2  # usage and configuration errors, as argparse
FAILURE_EXIT = 1
SUBCOMMANDS = (
    "fit",
    "validate",
    "test",
    "predict",
    "index",
    "influence",
    "evaluate",
    "correct",
    "self-influence",
)
"""Every subcommand, known without importing Lightning (a test keeps it equal to ``FastIFCLI.subcommands()``)."""
_TOP_OPTIONS_WITH_VALUE = ("-c", "--config", "--threads")
_FLAGS = ("-h", "--help", "--help-all", "--debug", "--print_config")
HELP = {"all": False}  # ``--help-all``: Lightning's options too (main() sets it)
OWN_OPTIONS_HELP = """lightning-fastif's own options (before or after the subcommand):
  --threads N|auto      CPU threads of torch and FAISS (default auto: the cores not already busy, at most 4;
                        OMP_NUM_THREADS wins when set).
  --debug               show the traceback of an error (also LIGHTNING_FASTIF_DEBUG=1).
  --help-all            this help with Lightning's trainer, model, data, optimizer and scheduler options
                        ({hidden} more lines)."""


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


def early_error(argv: list[str]) -> str | None:
    """The one-line error for mistakes found without importing Lightning (seconds of imports saved), else None.

    Checks the subcommand's name ("did you mean"), that every ``-c``/``--config`` file exists, and ``--threads``.
    """
    subcommand, i = None, 0
    while i < len(argv):
        arg = argv[i]
        if arg in _TOP_OPTIONS_WITH_VALUE:
            value = argv[i + 1] if i + 1 < len(argv) else None
            problem = _option_value_problem(arg, value)
            if problem:
                return f"{_prog(subcommand)}: error: {problem}"
            i += 2
            continue
        if arg.startswith(tuple(o + "=" for o in _TOP_OPTIONS_WITH_VALUE)):
            name, value = arg.split("=", 1)
            problem = _option_value_problem(name, value)
            if problem:
                return f"{_prog(subcommand)}: error: {problem}"
        elif subcommand is None and arg.startswith("-") and "=" not in arg and arg not in _FLAGS:
            if i + 1 < len(argv) and not argv[i + 1].startswith("-") and argv[i + 1] not in SUBCOMMANDS:
                i += 1  # another option's value (`--seed_everything 1`), not a subcommand
        elif subcommand is None and not arg.startswith("-"):
            if arg not in SUBCOMMANDS:
                close = difflib.get_close_matches(arg, SUBCOMMANDS, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}?" if close else ""
                return (
                    f"lightning-fastif: error: unknown subcommand {arg!r}{hint} (the subcommands: "
                    f"{', '.join(SUBCOMMANDS)}; see `lightning-fastif --help`)"
                )
            subcommand = arg
        i += 1
    return None


def _prog(subcommand: str | None) -> str:
    return f"lightning-fastif {subcommand}" if subcommand else "lightning-fastif"


def _option_value_problem(name: str, value: str | None) -> str | None:
    if value is None:
        return f"Expected a value after `{name}`, but got none."
    if name == "--threads":
        if value != "auto" and not (value.isdigit() and int(value) > 0):
            return f"Expected `threads` to be a positive int or 'auto', but got {value!r}."
        return None
    path = os.path.expanduser(value)
    if value.lstrip().startswith(("{", "[")) or "\n" in value:  # an inline config, not a file
        return None
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        close = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.6)
        hint = f"; did you mean {os.path.join(os.path.dirname(value), close[0])}?" if close else ""
        where = "" if os.path.isabs(value) else f" (relative to {os.getcwd()})"
        return f"Expected `{name}` to name a config file, but {value!r} does not exist{where}{hint}"
    return None


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
        hint = import_hint(text)
        if hint:
            return USAGE_EXIT, f"{prog}: error: {text}\n{hint}"
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


def import_hint(text: str) -> str | None:
    """What to do when a ``class_path`` names a module Python cannot import (``No module named 'mymodule'``)."""
    match = re.search(r"No module named '([\w.]+)'", text)
    if not match:
        return None
    module = match.group(1)
    top = module.split(".")[0]
    return (
        f"`{module}` is not importable: Python looks for {top}.py (or a package {top}/) in the current folder "
        f"({os.getcwd()}) and on PYTHONPATH. Run from the folder that holds it, or put that folder on PYTHONPATH, "
        f'e.g. `PYTHONPATH=/path/to/folder .venv/bin/lightning-fastif ...` (see README.md, "Your own model '
        'and data").'
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
    parser.usage = "%(prog)s [-c CONFIG] [--OPTION VALUE ...]"
    full_help = parser.format_help

    def format_help() -> str:
        """The subcommand's own options and lightning-fastif's; Lightning's hundreds only with ``--help-all``."""
        if HELP["all"]:
            return full_help()
        everything = full_help()
        parser._action_groups = head + mine
        try:
            short = full_help().rstrip("\n")
        finally:
            parser._action_groups = head + mine + rest
        hidden = everything.count("\n") - short.count("\n")
        return f"{short}\n\n{OWN_OPTIONS_HELP.format(hidden=hidden)}\n"

    parser.format_help = format_help


def stderr_is_interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


_DROPPED = (
    "💡 Tip",
    "GPU available: False",
    "TPU available: False",
)  # advertising; no accelerator: nothing to say
_WANDB_ANONYMOUS = "The anonymous setting has no effect and will be removed in a future version."


def quiet_dependency_noise(wandb: bool = False) -> None:
    """Silence dependency lines a person cannot act on: Lightning's own ``_pytree`` deprecation and, with ``wandb``,
    W&B's warning about the ``anonymous`` argument that Lightning's WandbLogger always passes."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    if wandb:
        try:
            from wandb.errors import term

            # wandb prints this one once (repeat=False), keyed by its prefixed text: now never
            term._printed_messages.add(f"{term.WARN_STRING} {_WANDB_ANONYMOUS}")
        except Exception:  # another wandb version: the line may show, nothing else changes
            pass


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
        if message.startswith(_DROPPED):
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


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def format_warning(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    """How the command prints a warning: the library's own as one plain line (``lightning_fastif: ...``, with no
    source path and line of our code in front of it), everyone else's as Python does."""
    if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
        text = str(message)
        return (text if text.startswith("lightning_fastif") else f"lightning_fastif: {text}") + "\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


_PYTHON_FORMAT = warnings.formatwarning
