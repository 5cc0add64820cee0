"""Per-example loss resolution (DESIGN section 3) as a pure function of ``(params, batch)``.

The sources, in order: an explicit ``loss_fn(outputs, batch) -> [B]``; the wrapped module's
``per_example_loss(batch) -> [B]``; a loss module found on the model (an attribute such as
``self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)``), used as a copy with ``reduction="none"`` and its own
settings; the default classification loss (batch ``(x, y)`` or a dict with ``labels``, logits = ``model(x)`` or its
``.logits``, plain cross-entropy without reduction). The model is called on a batch by ``forward_fn(model, batch)``
when given, else by the convention of :func:`~lightning_fastif.functional.batch.call_model`.

``PerExampleLoss.description`` says in words which loss is in use (it is recorded in every result).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_fastif.errors import ConfigurationError, LossResolutionError
from lightning_fastif.functional.batch import (
    FORWARD_FN_HELP,
    ForwardFn,
    call_model,
    check_forward_fn,
    labels_of,
    logits_of,
)

__all__ = [
    "PerExampleLoss",
    "check_class_labels",
    "describe_loss_module",
    "find_loss_module",
    "output_tensor",
    "resolve_loss",
]

LossFn = Callable[[Any, Any], Tensor]

_HOW_TO = (
    "Provide one of: (1) `loss_fn=callable(outputs, batch) -> per-example losses [B]`; (2) a method "
    "`per_example_loss(self, batch) -> [B]` on the module; (3) a loss module as an attribute of the model "
    "(`self.criterion = nn.CrossEntropyLoss(...)`, `nn.MSELoss()`...); (4) batches the default classification loss "
    "reads: `(x, y)` or a dict with `labels`, where `model(x)` returns logits `[B, C]` (or an object with `.logits`)."
)

DEFAULT_DESCRIPTION = "cross-entropy on the logits (the default: the model stores no loss module)"
_CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)
_SETTINGS = (
    "label_smoothing",
    "ignore_index",
    "weight",
    "pos_weight",
    "beta",
    "delta",
    "margin",
    "log_target",
)


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is a vmap-batched tensor (value checks cannot run on it; they run on the unbatched call)."""
    try:
        # under vmap(grad(...)) the batch's tensors are functorch-wrapped (not "batched" at the inner level)
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except Exception:
        return False


def output_tensor(outputs: Any) -> Tensor:
    """The tensor of a model output that the loss reads: the output itself, its ``.logits`` / ``"logits"``, or the
    only tensor of a tuple.

    Raises:
        LossResolutionError: an ambiguous output (a tuple or list of several tensors and no ``.logits``) or no tensor
            at all; the message lists the positions and shapes and asks for ``loss_fn`` or ``forward_fn``.
    """
    found = logits_of(outputs)
    if found is not None and not isinstance(outputs, (list, tuple)):
        return found
    if isinstance(outputs, (list, tuple)):
        tensors = [(i, t) for i, t in enumerate(outputs) if isinstance(t, Tensor)]
        if len(tensors) == 1:
            return tensors[0][1]
        if tensors:
            shapes = ", ".join(f"[{i}]: {list(t.shape)}" for i, t in tensors)
            pos = tensors[-1][0]
            raise LossResolutionError(
                f"Expected the model output to be the logits (a tensor, or an object with `.logits`), but got a "
                f"{type(outputs).__name__} of {len(tensors)} tensors ({shapes}): which one the loss should read is "
                f"ambiguous. Say it with `forward_fn=lambda model, batch: model(batch[0])[{pos}]` (the position of "
                f"the logits), or pass `loss_fn=lambda outputs, batch: F.cross_entropy(outputs[{pos}], batch[1], "
                'reduction="none")`.'
            )
    raise LossResolutionError(
        f"Expected the model output to hold a tensor the loss can read (logits [B, C], predictions [B] or "
        f"[B, K]), but got a {type(outputs).__name__}. {_HOW_TO} {FORWARD_FN_HELP}"
    )


def find_loss_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The loss module stored on the model (``(dotted name, module)``), or None when there is none.

    Raises:
        LossResolutionError: several different loss modules (the message names them and asks for ``loss_fn``).
    """
    seen: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.loss._Loss) and id(module) not in seen:
            seen[id(module)] = (name, module)
    if not seen:
        return None
    found = list(seen.values())
    if len({describe_loss_module(m) for _, m in found}) > 1:
        names = ", ".join(f"model.{n} = {describe_loss_module(m)}" for n, m in found)
        raise LossResolutionError(
            f"Expected at most one loss module on the model to use as the training loss, but found several ({names}). "
            "Pass `loss_fn=callable(outputs, batch) -> [B]` to say which training objective to explain."
        )
    return found[0]


def describe_loss_module(module: nn.Module) -> str:
    """``"CrossEntropyLoss(label_smoothing=0.1)"``: the class and every setting that differs from its defaults."""
    try:
        default = type(module)()
    except Exception:
        default = None
    parts = []
    for key in _SETTINGS:
        if not hasattr(module, key):
            continue
        value = getattr(module, key)
        base = getattr(default, key, object()) if default is not None else object()
        same = (value is None and base is None) or (
            not isinstance(value, Tensor) and not isinstance(base, Tensor) and value == base
        )
        if same:
            continue
        if isinstance(value, Tensor):
            value = [round(float(v), 4) for v in value.detach().reshape(-1)[:8]] + (
                ["..."] if value.numel() > 8 else []
            )
        parts.append(f"{key}={value}")
    return f"{type(module).__name__}({', '.join(parts)})"


def check_class_labels(
    labels: Tensor, logits: Tensor, ignore_index: int | None = None, ids: Any = None
) -> Tensor:
    """Integer class ids ``[B]`` checked against ``logits [B, C]`` (int32 and other integer types cast to int64)."""
    wrong_type = labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex()
    if wrong_type or logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        hint = (
            " Float targets: cast class ids to torch.long, or for a regression put the loss on the model "
            "(`self.criterion = nn.MSELoss()`) or pass `loss_fn`."
            if wrong_type
            else ""
        )
        raise LossResolutionError(
            f"Expected `labels` and the outputs to fit a cross-entropy loss: logits [B, C] and integer labels [B], "
            f"but got logits {list(logits.shape)} and labels {list(labels.shape)} ({labels.dtype}).{hint} {_HOW_TO}"
        )
    labels = labels.long()
    if _is_batched(labels) or _is_batched(logits):
        return labels
    c = int(logits.shape[1])
    bad = (labels < 0) | (labels >= c)
    if ignore_index is not None:
        bad = bad & (labels != ignore_index)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        got = sorted(set(labels[bad].tolist()))[:10]
        hint = ""
        if -100 in got:
            hint = (
                " -100 is cross-entropy's ignore value: the default loss does not ignore examples; to ignore them "
                "as training did, put the loss on the model (`self.criterion = nn.CrossEntropyLoss(ignore_index=-100)`"
                ") or pass `loss_fn` (an ignored example then has loss 0 and influence 0)."
            )
        where = (
            f"training example id(s) {[int(ids[r]) for r in rows[:20]]}"
            if ids is not None
            else f"batch position(s) {rows[:20]}"
        )
        raise ConfigurationError(
            f"Expected `labels` to be class ids in [0, {c}) (the logits have {c} classes), but got {got} at "
            f"{where}.{hint}"
        )
    return labels


def _default_cross_entropy(outputs: Any, batch: Any) -> Tensor:
    labels = labels_of(batch)
    if labels is None:
        raise LossResolutionError(
            f"Cannot compute per-example losses for a batch of type {type(batch).__name__}: it has no labels "
            f"(expected `(x, y)` or a dict with `labels`). {_HOW_TO}"
        )
    logits = output_tensor(outputs)
    return F.cross_entropy(logits, check_class_labels(labels, logits, None), reduction="none")


class _ModuleLoss:
    """A loss module of the model as a per-example loss: a copy with ``reduction="none"``, other settings kept."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = copy.deepcopy(module)
        self.module.reduction = "none"
        self.description = f"{describe_loss_module(module)} from model.{name}"
        self.classes = isinstance(module, _CLASS_LOSSES)
        self.plain_cross_entropy = (
            isinstance(module, nn.CrossEntropyLoss)
            and float(module.label_smoothing) == 0.0
            and module.weight is None
        )

    def __call__(self, outputs: Any, batch: Any) -> Tensor:
        target = labels_of(batch)
        if target is None:
            raise LossResolutionError(
                f"Cannot compute the loss {self.description} for a batch of type {type(batch).__name__}: it has no "
                f"targets (expected `(x, y)` or a dict with `labels`). {_HOW_TO}"
            )
        out = output_tensor(outputs)
        crit = self.module.to(device=out.device, dtype=out.dtype) if out.is_floating_point() else self.module
        if self.classes and not (target.is_floating_point() and target.shape == out.shape):  # class ids
            ignore = getattr(self.module, "ignore_index", None)
            losses = crit(out, check_class_labels(target, out, ignore))
        else:
            if target.is_floating_point() is False and out.is_floating_point():
                target = target.to(out.dtype)
            if out.shape != target.shape:
                if out.dim() >= 1 and out.shape[0] == target.shape[0] and out.numel() == target.numel():
                    out = out.reshape(target.shape)  # [B, 1] predictions of [B] targets
                else:
                    raise ConfigurationError(
                        f"Expected the model outputs to have the shape of the targets `labels` {list(target.shape)} "
                        f"for {self.description}, but got outputs {list(out.shape)}. Pass `loss_fn` or `forward_fn`."
                    )
            losses = crit(out, target)
        if losses.dim() == 0 or losses.shape[0] != out.shape[0]:
            raise LossResolutionError(
                f"Expected {self.description} with reduction='none' to give one loss per example, but got shape "
                f"{list(losses.shape)}. Pass `loss_fn=callable(outputs, batch) -> [B]`."
            )
        return losses.reshape(losses.shape[0], -1).mean(dim=1) if losses.dim() > 1 else losses


class _LossGraph(nn.Module):
    """The model plus how to turn a batch into per-example losses; a module so ``functional_call`` can swap weights."""

    def __init__(self, model: nn.Module, owner: PerExampleLoss) -> None:
        super().__init__()
        self.model = model
        self._owner = [owner]  # a list: not registered as a submodule

    def forward(self, batch: Any) -> Tensor:
        owner = self._owner[0]
        if owner.source == "per_example_loss":
            return self.model.per_example_loss(batch)
        return owner.loss_of_outputs(call_model(self.model, batch, owner.forward_fn), batch)


class PerExampleLoss:
    """``(params, batch) -> [B]`` per-example losses of a model, with ``params`` substituted functionally.

    Args:
        model: the user's module; never mutated (weights are swapped in with ``functional_call``).
        loss_fn: optional ``callable(outputs, batch) -> [B]``.
        forward_fn: optional ``callable(model, batch) -> outputs``: how the model is called on a batch (default:
            ``model(x)`` for ``(x, y)`` batches, ``model(**inputs)`` for dict batches).

    Attributes:
        source: ``"loss_fn"``, ``"per_example_loss"``, ``"model_loss"`` (a loss module found on the model) or
            ``"classification"`` (the default cross-entropy).
        description: the loss in words, e.g. ``"CrossEntropyLoss(label_smoothing=0.1) from model.criterion"``.
        plain_cross_entropy: whether the loss is unweighted, unsmoothed cross-entropy of the output logits (what
            the head fast path's closed form assumes).

    Example:
        >>> m = nn.Linear(3, 2)
        >>> loss = PerExampleLoss(m)
        >>> params = {n: p.detach() for n, p in m.named_parameters()}
        >>> loss(params, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))).shape
        torch.Size([4])
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn | None = None, forward_fn: ForwardFn | None = None
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigurationError(
                f"Expected `loss_fn` to be a callable(outputs, batch) -> [B] or None, but got {loss_fn!r}."
            )
        self.model = model
        self.loss_fn = loss_fn
        self.forward_fn = check_forward_fn(forward_fn)
        self.module_loss: _ModuleLoss | None = None
        self.plain_cross_entropy = False
        if loss_fn is not None:
            self.source = "loss_fn"
            self.description = f"loss_fn ({getattr(loss_fn, '__qualname__', type(loss_fn).__name__)})"
        elif callable(getattr(model, "per_example_loss", None)):
            self.source = "per_example_loss"
            self.description = f"{type(model).__name__}.per_example_loss"
        else:
            found = find_loss_module(model)
            if found is not None:
                self.source = "model_loss"
                self.module_loss = _ModuleLoss(*found)
                self.description = self.module_loss.description
                self.plain_cross_entropy = self.module_loss.plain_cross_entropy
            else:
                self.source = "classification"
                self.description = DEFAULT_DESCRIPTION
                self.plain_cross_entropy = True
        self._graph = _LossGraph(model, self)

    def loss_of_outputs(self, outputs: Any, batch: Any) -> Tensor:
        """Per-example losses ``[B]`` from the model's outputs on ``batch`` (not for ``per_example_loss``)."""
        if self.loss_fn is not None:
            return self.loss_fn(outputs, batch)
        if self.module_loss is not None:
            return self.module_loss(outputs, batch)
        return _default_cross_entropy(outputs, batch)

    def outputs(self, batch: Any) -> Any:
        """The model's outputs on ``batch`` (by ``forward_fn`` or the default convention)."""
        return call_model(self.model, batch, self.forward_fn)

    def __call__(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """Per-example losses ``[B]`` at ``params`` (names as in ``model.named_parameters()``)."""
        # every parameter is passed: the unselected ones detached, so autograd records nothing for them
        full = {f"model.{k}": p.detach() for k, p in self.model.named_parameters()}
        full.update({f"model.{k}": v for k, v in params.items()})
        losses = functional_call(self._graph, full, (batch,))
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise LossResolutionError(
                f"Expected the {self.source} loss to return per-example losses of shape [B] (no reduction), "
                f"but got {got}. {_HOW_TO}"
            )
        return losses

    def split(self) -> tuple[Callable[[dict[str, Tensor], Any], Any], LossFn] | None:
        """The loss as ``(outputs_fn(params, batch), loss_of_outputs(outputs, batch) -> [B])`` for the Gauss-Newton
        curvature, or None when it cannot be split (a module's own ``per_example_loss(batch)``)."""
        return _split_loss(self)


# ---------------------------------------------------------------------------------------------- Gauss-Newton split
# (issue 10, owned by issue10-solvers: the curvature="gauss_newton" HVP needs the loss as two stages)
class _OutputsGraph(nn.Module):
    """The model's outputs on a batch (what the loss is a function of); a module so ``functional_call`` swaps weights."""

    def __init__(self, model: nn.Module, logits_only: bool, forward_fn: ForwardFn | None = None) -> None:
        super().__init__()
        self.model = model
        self.logits_only = logits_only
        self.forward_fn = forward_fn

    def forward(self, batch: Any) -> Any:
        outputs = call_model(self.model, batch, self.forward_fn)
        return output_tensor(outputs) if self.logits_only else outputs


def _split_loss(loss: PerExampleLoss) -> tuple[Callable[[dict[str, Tensor], Any], Any], LossFn] | None:
    """``(outputs_fn(params, batch), loss_of_outputs(outputs, batch) -> [B])`` with
    ``loss(params, batch) == loss_of_outputs(outputs_fn(params, batch), batch)``, or None when the loss is a user's
    ``per_example_loss(batch)`` (a closed box: its outputs cannot be separated from its loss)."""
    if loss.source == "per_example_loss":
        return None
    graph = _OutputsGraph(
        loss.model, logits_only=loss.source in ("classification", "model_loss"), forward_fn=loss.forward_fn
    )

    def outputs_fn(params: dict[str, Tensor], batch: Any) -> Any:
        full = {f"model.{k}": p.detach() for k, p in loss.model.named_parameters()}
        full.update({f"model.{k}": v for k, v in params.items()})
        return functional_call(graph, full, (batch,))

    return outputs_fn, loss.loss_of_outputs  # the tensor of the outputs for a found or default loss


def resolve_loss(
    model: nn.Module, loss_fn: LossFn | None = None, forward_fn: ForwardFn | None = None
) -> PerExampleLoss:
    """The per-example loss of ``model`` by the resolution order of DESIGN section 3."""
    return PerExampleLoss(model, loss_fn, forward_fn)


def check_finite(values: Tensor, what: str, ids: Any = None) -> None:
    """Raise :class:`NonFiniteError` naming the examples whose ``values`` are NaN or infinite.

    Args:
        values: ``[B, ...]`` (or a scalar).
        what: what the values are, for the message.
        ids: training ids of the rows (``[B]``): the message then names those ids instead of batch positions.
    """
    from lightning_fastif.errors import NonFiniteError

    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if values.dim() else [0]
        if ids is not None:
            named = [int(ids[r]) for r in rows]
            raise NonFiniteError(
                f"Expected a finite {what}, but got NaN or inf for training example id(s) {named[:20]}"
                f"{' ...' if len(named) > 20 else ''} (positions in `train_dataset`): check those examples' inputs "
                "and labels, or leave them out of the training set."
            )
        raise NonFiniteError(
            f"Expected a finite {what}, but got NaN or inf at batch position(s) {rows[:20]}: check the inputs and "
            "the model's outputs for those examples (a diverged checkpoint gives this too)."
        )
