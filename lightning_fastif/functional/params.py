"""Selecting the differentiated parameters by name patterns, flattening them, and fingerprinting a model.

The model is never mutated: parameters are read with ``named_parameters`` and substituted with
``torch.func.functional_call``.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_fastif.errors import ConfigurationError

__all__ = ["ParamSpec", "fingerprint", "select_params"]


def select_params(model: nn.Module, patterns: str | Sequence[str] | None = None) -> dict[str, Tensor]:
    """The parameters to differentiate, by glob patterns over ``named_parameters()`` names.

    Args:
        model: any module; it is not changed.
        patterns: glob patterns (``"head.*"``); ``None`` selects every parameter with ``requires_grad``. A pattern
            may match parameters that have ``requires_grad=False`` (selecting frozen weights is allowed).

    Returns:
        An ordered dict ``name -> tensor`` (detached views of the live parameters, in module order).

    Raises:
        ConfigurationError: a pattern matches no parameter (the message lists the available names), or nothing
            is selected.

    Example:
        >>> m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        >>> list(select_params(m, ["1.*"]))
        ['1.weight', '1.bias']
    """
    named = list(model.named_parameters())
    if patterns is None:
        chosen = {n: p.detach() for n, p in named if p.requires_grad}
        if not chosen:
            raise ConfigurationError(
                "Expected the model to have at least one parameter with `requires_grad=True` (or pass `params` "
                "patterns to select frozen ones), but got none."
            )
        return chosen
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Iterable) or not all(isinstance(p, str) for p in patterns):
        raise ConfigurationError(f"Expected `params` to be a list of glob patterns, but got {patterns!r}.")
    names = [n for n, _ in named]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
            raise ConfigurationError(
                f"Expected every pattern of `params` to match a parameter name, but {pat!r} matches none. "
                f"Available names: {shown}."
            )
    return {n: p.detach() for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and sizes of a parameter dict, to go between the dict and one flat vector ``[P]``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: dict[str, Tensor]) -> ParamSpec:
        return cls(tuple(params), tuple(p.shape for p in params.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        """P, the total number of selected scalars."""
        return sum(self.numels)

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """``{name: tensor}`` -> ``[P]`` (or ``[..., P]`` when every tensor has the same extra leading dims)."""
        parts = [tensors[n] for n in self.names]
        lead = parts[0].shape[: parts[0].dim() - len(self.shapes[0])]
        return torch.cat([t.reshape(*lead, -1) for t in parts], dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``[..., P]`` -> ``{name: [..., *shape]}`` (views of ``flat``)."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, list(self.numels), dim=-1)
        return {n: t.reshape(*lead, *s) for n, t, s in zip(self.names, pieces, self.shapes)}


def fingerprint(model: nn.Module, include_buffers: bool = True) -> str:
    """A SHA-256 of the names, shapes, dtypes and values of a module's parameters (and buffers).

    Two models with the same weights give the same string; a single changed weight changes it.
    """
    h = hashlib.sha256()
    tensors = list(model.named_parameters())
    if include_buffers:
        tensors += [(n, b) for n, b in model.named_buffers() if b is not None]
    for name, t in tensors:
        t = t.detach()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
