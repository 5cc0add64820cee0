"""Selecting the differentiated parameters by name patterns, flattening them, and fingerprinting a model.

The model is never mutated: parameters are read with ``named_parameters`` and substituted with
``torch.func.functional_call``.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.errors import ConfigurationError

__all__ = ["ParamSpec", "dataset_fingerprint", "fingerprint", "select_params"]


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
            tied = _tied_hint(model, pat)
            if tied:
                raise ConfigurationError(
                    f"Expected every pattern of `params` to match a parameter name, but {pat!r} matches none: "
                    f"{tied}. Select the weight by that name (e.g. `params=[{tied.rsplit('`', 2)[-2]!r}]`); "
                    "differentiating it covers every place it is used."
                )
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
            raise ConfigurationError(
                f"Expected every pattern of `params` to match a parameter name, but {pat!r} matches none. "
                f"Available names: {shown}."
            )
    return {n: p.detach() for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}


def _tied_hint(model: nn.Module, pattern: str) -> str:
    """``"lm_head.weight is tied to `transformer.wte.weight`"`` when ``pattern`` matches only names of weights shared
    with another module (``named_parameters`` lists a shared weight once, under its first name), else ``""``."""
    first: dict[int, str] = {}
    ties = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            if fnmatch.fnmatchcase(name, pattern):
                ties.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    if not ties:
        return ""
    return "; ".join(f"{alias} is tied to `{owner}`" for alias, owner in ties)


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
        return {n: t.reshape((*lead, *s)) for n, t, s in zip(self.names, pieces, self.shapes)}


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
        # reshape(-1) first: a 0-dim tensor (BatchNorm's num_batches_tracked, a scalar temperature) cannot be viewed
        # as bytes directly
        h.update(
            t.to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        )
    return h.hexdigest()


DATA_SAMPLE = 64
"""How many training examples (evenly spaced, first and last included) :func:`dataset_fingerprint` reads."""


def _digest(h: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        t = value.detach().to("cpu")
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _digest(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for v in value:
            _digest(h, v)
    else:
        h.update(repr(value).encode())


def dataset_fingerprint(dataset: Any, sample: int = DATA_SAMPLE) -> dict[str, Any]:
    """A cheap fingerprint of a training set: its labels and a sample of its inputs.

    For a ``TensorDataset`` the labels (second tensor) are hashed in full and the inputs at ``sample`` evenly
    spaced positions; for any other map-style dataset, the examples at those positions (labels and inputs apart).
    It tells "the same data" from "other data of the same length"; it is not a proof of equality.

    Returns:
        ``{"labels": sha256 hex, "inputs": sha256 hex, "sample": positions read}``.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.zeros(10, 2), torch.arange(10))
        >>> sorted(dataset_fingerprint(ds))
        ['inputs', 'labels', 'sample']
    """
    from torch.utils.data import TensorDataset

    n = len(dataset)
    pos = sorted({round(i * (n - 1) / max(sample - 1, 1)) for i in range(min(sample, n))}) if n else []
    h_lab, h_in = hashlib.sha256(), hashlib.sha256()
    h_lab.update(str(n).encode())
    if isinstance(dataset, TensorDataset):
        tensors = dataset.tensors
        index = torch.as_tensor(pos, dtype=torch.long)
        if len(tensors) >= 2:
            _digest(h_lab, tensors[1])
        _digest(h_in, [t[index] for i, t in enumerate(tensors) if i != 1])
    else:
        for i in pos:
            item = dataset[i]
            if isinstance(item, dict):
                lab = {k: v for k, v in item.items() if k in ("labels", "label")}
                _digest(h_lab, lab)
                _digest(h_in, {k: v for k, v in item.items() if k not in lab})
            elif isinstance(item, (list, tuple)) and len(item) >= 2:
                _digest(h_lab, item[1])
                _digest(h_in, [item[0], *item[2:]])
            else:
                _digest(h_in, item)
    return {"labels": h_lab.hexdigest(), "inputs": h_in.hexdigest(), "sample": len(pos)}
