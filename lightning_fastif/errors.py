"""Exception types of lightning_fastif.

Every error a user can cause is one of these, with a message that names the argument, what was expected and what
was got. They subclass the built-in type a caller would catch (``ValueError``, ``RuntimeError``...) so code that
already handles those keeps working.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any


class FastIFError(Exception):
    """Base class of every error raised on purpose by lightning_fastif."""


class ConfigurationError(FastIFError, ValueError):
    """An argument has the wrong type or value."""


class LossResolutionError(FastIFError, TypeError):
    """No per-example loss can be computed for a batch: say which of the three loss sources to provide."""


class NonFiniteError(FastIFError, FloatingPointError):
    """A loss, gradient or solution is NaN or infinite."""


class SolverDivergenceError(FastIFError, RuntimeError):
    """An iterative solver diverged (for LiSSA: ``scale`` too small)."""


class SolverMemoryError(FastIFError, MemoryError):
    """A dense solver would need more memory than allowed."""


class IndexMismatchError(FastIFError, ValueError):
    """A saved candidate index was built from another model, layer or dataset."""


class IndexCorruptError(FastIFError, OSError):
    """A saved candidate index is missing files or is truncated."""


class UnsupportedModelError(FastIFError, RuntimeError):
    """The model uses an operator that the needed differentiation mode does not support."""


class ModelCallError(FastIFError, TypeError):
    """The model cannot be called on a batch by the default convention: pass ``forward_fn(model, batch)``."""


class DistributedError(FastIFError, RuntimeError):
    """A rank failed or the ranks disagree."""


def expected(name: str, what: str, got: object) -> str:
    """The house style of an error message: ``Expected `name` to be what, but got got.``"""
    return f"Expected `{name}` to be {what}, but got {got!r}."


class SolverConvergenceError(FastIFError, RuntimeError):
    """A solver did not reach its convergence tolerance and ``strict=True`` was asked (issue 10)."""


class SolverConvergenceWarning(UserWarning):
    """A solver did not reach its convergence tolerance: its s_test (and influence) are approximate."""


class RecordFormatError(ConfigurationError, TypeError):
    """A result record (an ``InfluenceResult.to_dict()``) lacks required keys; a ``TypeError`` as it used to be."""


class ResultsWriteError(FastIFError, OSError):
    """Results could not be written (no space left, a file-size limit...); those written before are kept."""

    def __str__(self) -> str:  # one line: the message only, without OSError's "[Errno 28]" prefix
        return str(self.strerror)


class UnknownArgumentError(ConfigurationError, TypeError):
    """A keyword argument the function does not take (a typo: ``dampnig=``); says which name was meant."""


def check_keywords(init: Any) -> Any:
    """Decorate an ``__init__`` so that an unknown keyword raises :class:`UnknownArgumentError` with a "did you
    mean" (``dampnig=`` -> ``damping``) instead of Python's bare ``TypeError``. The signature is kept
    (``functools.wraps``), so LightningCLI and ``inspect.signature`` see the original arguments."""
    signature = inspect.signature(init)
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return init
    names = _names(params)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            accepted = _keyword_names(type(self)) or names
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
                hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
            raise UnknownArgumentError(
                f"Expected the keyword arguments of {type(self).__name__} to be among {', '.join(accepted)}, but got the unknown "
                f"keyword(s) {', '.join(hints)}."
            )
        return init(self, *args, **kwargs)

    return wrapper


def _names(params: Any) -> list[str]:
    return [
        n
        for n, p in params.items()
        if p.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL)
        and p.kind is not inspect.Parameter.VAR_KEYWORD
        and n != "self"
    ]


def _keyword_names(cls: type) -> list[str]:
    """Every keyword the constructors of ``cls`` and its bases accept (a subclass passing ``**kwargs`` on)."""
    out: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            params = inspect.signature(inspect.unwrap(init)).parameters
        except (TypeError, ValueError):
            continue
        out += [n for n in _names(params) if n not in out]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return out
