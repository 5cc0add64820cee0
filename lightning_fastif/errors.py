"""Exception types of lightning_fastif.

Every error a user can cause is one of these, with a message that names the argument, what was expected and what
was got. They subclass the built-in type a caller would catch (``ValueError``, ``RuntimeError``...) so code that
already handles those keeps working.
"""

from __future__ import annotations


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
