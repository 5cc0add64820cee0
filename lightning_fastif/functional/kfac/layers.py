"""K-FAC layer discovery: which selected parameters sit in a supported ``nn.Linear`` / ``nn.Conv2d`` layer, or a
GPT-2 ``Conv1D`` (``transformers.pytorch_utils.Conv1D``: ``y = x W + b`` with ``W [in, out]``, a ``Linear`` with its
weight stored transposed; recognised by its shape, transformers is not imported).

A module walk, no forward pass (see :mod:`lightning_fastif.functional.kfac` for the math). Imports torch only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_fastif.errors import UnsupportedModelError

__all__ = ["LayerSlot", "is_conv1d", "kfac_layers", "kfac_unsupported", "weight_matrix"]


@dataclass(frozen=True)
class LayerSlot:
    """One supported layer with at least one selected parameter.

    Attributes:
        module: the module's name in ``model.named_modules()``.
        kind: ``"linear"``, ``"conv2d"`` or ``"conv1d"`` (GPT-2's ``Conv1D``: weight ``[in, out]``).
        weight, bias: full parameter names if selected, else ``None``.
        out_dim: output features / channels.
        in_dim: weight columns (``in_features`` or ``C_in * kh * kw``); 0 when the weight is not selected.
    """

    module: str
    kind: str
    weight: str | None
    bias: str | None
    out_dim: int
    in_dim: int

    @property
    def a_dim(self) -> int:
        """Size of the activation factor: weight columns plus the ones column of a selected bias."""
        return self.in_dim + (1 if self.bias is not None else 0)


def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is a GPT-2 style ``Conv1D`` (``y = x W + b``, ``weight [in, out]``, ``nf`` = out), by duck type."""
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(getattr(m, "nf", None), int)
        and isinstance(w, nn.Parameter)
        and w.dim() == 2
        and w.shape[1] == m.nf
    )


def weight_matrix(slot: LayerSlot, weight: Tensor) -> Tensor:
    """A weight (or a batch of them, ``[..., *shape]``) in the ``[..., out, in_dim]`` layout of the factors:
    transposed for ``Conv1D``, flattened for ``Conv2d``."""
    if slot.kind == "conv1d":
        return weight.transpose(-1, -2)
    lead = weight.shape[: weight.dim() - (4 if slot.kind == "conv2d" else 2)]
    return weight.reshape(*lead, slot.out_dim, -1)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                return None  # asymmetric 'same' padding
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(m.padding[0]), int(m.padding[1]))


def _why_unsupported(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear) or is_conv1d(m):
        return None
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"grouped Conv2d (groups={m.groups})"
        if m.padding_mode != "zeros":
            return f"Conv2d with padding_mode={m.padding_mode!r}"
        if _conv_padding(m) is None:
            return "Conv2d with asymmetric 'same' padding"
        return None
    return type(m).__name__


def _owner(model: nn.Module, name: str) -> tuple[str, str, nn.Module | None]:
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return mod_name, attr, None
    if attr not in dict(mod.named_parameters(recurse=False)):
        return mod_name, attr, None
    return mod_name, attr, mod


def kfac_unsupported(model: nn.Module, param_names: Iterable[str]) -> list[str]:
    """The selected parameters that K-FAC/EK-FAC cannot take, each with its module type: ``[]`` when all fit.

    Supported: ``weight`` and ``bias`` of ``nn.Linear``, of GPT-2's ``Conv1D`` and of ``nn.Conv2d`` (groups 1,
    zero padding), wherever they sit (inside transformer blocks too). A module walk, no forward pass.

    Example:
        >>> m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        >>> kfac_unsupported(m, ["0.weight", "1.weight"])
        ['1.weight (LayerNorm)']
    """
    bad = []
    for name in param_names:
        _, attr, mod = _owner(model, name)
        if mod is None:
            bad.append(f"{name} (a parameter not owned by a Linear, Conv1D or Conv2d module)")
            continue
        why = _why_unsupported(mod)
        if why is not None and next(mod.children(), None) is not None:
            why = f"a free nn.Parameter of {type(mod).__name__}"
        if why is None and attr not in ("weight", "bias"):
            why = f"{type(mod).__name__}.{attr}"
        if why is not None:
            bad.append(f"{name} ({why})")
    return bad


def kfac_layers(model: nn.Module, param_names: Iterable[str]) -> list[LayerSlot]:
    """The supported layers holding the selected parameters, in module order.

    Raises:
        UnsupportedModelError: some selected parameters are not in a supported layer (the message names them).
    """
    names = list(param_names)
    bad = kfac_unsupported(model, names)
    if bad:
        shown = ", ".join(bad[:20]) + (f", ... ({len(bad)} in all)" if len(bad) > 20 else "")
        raise UnsupportedModelError(
            "K-FAC/EK-FAC take only the weight and bias of nn.Linear, Conv1D and nn.Conv2d layers, but the selected "
            f"parameters include {shown}. Select only such layers with `params` (e.g. ['encoder.*.dense.*']), "
            "or use CGSolver (on curvature='gauss_newton') or ExactSolver for the others."
        )
    chosen = set(names)
    slots = []
    for mod_name, mod in model.named_modules():
        conv1d = is_conv1d(mod)
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) and not conv1d:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        w = f"{prefix}weight" if f"{prefix}weight" in chosen else None
        b = f"{prefix}bias" if mod.bias is not None and f"{prefix}bias" in chosen else None
        if w is None and b is None:
            continue
        if conv1d:
            out_dim, in_dim, kind = int(mod.weight.shape[1]), int(mod.weight.shape[0]), "conv1d"
        else:
            out_dim, in_dim = int(mod.weight.shape[0]), int(mod.weight[0].numel())
            kind = "linear" if isinstance(mod, nn.Linear) else "conv2d"
        slots.append(LayerSlot(mod_name, kind, w, b, out_dim, in_dim if w is not None else 0))
    return slots
