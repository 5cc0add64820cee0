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
    batch_size,
    call_model,
    check_forward_fn,
    labels_of,
    logits_of,
)
from lightning_fastif.functional.sequence import (
    SequenceCrossEntropy,
    cached_configs,
    caches_off,
    causal_lm_module,
    compute_dtype,
    float32_tensors,
    has_attention,
    math_attention,
)

__all__ = [
    "PerExampleLoss",
    "SequenceCrossEntropy",
    "check_class_labels",
    "describe_loss_module",
    "find_loss_module",
    "is_sequence_pair",
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


def is_sequence_pair(outputs: Any, batch: Any) -> bool:
    """Whether the outputs' logits are ``[B, T, V]`` and the batch's labels integer ``[B, T]`` (a sequence loss)."""
    labels = labels_of(batch)
    logits = logits_of(outputs)
    return (
        labels is not None
        and logits is not None
        and logits.dim() == 3
        and labels.dim() == 2
        and not labels.is_floating_point()
        and tuple(labels.shape) == tuple(logits.shape[:2])
    )


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
        self.sequence: Any = None  # the sequence loss in use (with token_losses), when there is one
        self._caches = cached_configs(model)
        self._f32: tuple[tuple[Any, ...], dict[str, Tensor]] | None = None
        if isinstance(loss_fn, SequenceCrossEntropy):
            self.source = "loss_fn"
            self.sequence = loss_fn
            self.description = f"loss_fn {loss_fn.description}"
        elif loss_fn is not None:
            self.source = "loss_fn"
            self.description = f"loss_fn ({getattr(loss_fn, '__qualname__', type(loss_fn).__name__)})"
            if callable(
                getattr(loss_fn, "token_losses", None)
            ):  # a user's sequence loss of the same protocol
                self.sequence = loss_fn
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
            elif causal_lm_module(model) is not None:
                self.source = "sequence"  # a Hugging Face causal LM: labels are the input ids, shifted here
                self.sequence = SequenceCrossEntropy(shift=True)
                self.description = f"{self.sequence.description} (Hugging Face causal LM)"
            else:
                self.source = "classification"
                self.description = DEFAULT_DESCRIPTION
                self.plain_cross_entropy = True
        self._graph = _LossGraph(model, self)

    def identity(self) -> str:
        """What this loss computes, as a string for cache keys: its source, ``loss_fn`` and ``forward_fn`` (qualified
        name and ``id``), a found loss module's settings and the model object. Two losses built from the same
        model, ``loss_fn`` and ``forward_fn`` share it; any other pair does not."""
        from lightning_fastif.functional.params import callable_identity

        found = self.module_loss.description if self.module_loss is not None else ""
        return (
            f"{self.source}|loss_fn={callable_identity(self.loss_fn)}|forward_fn={callable_identity(self.forward_fn)}"
            f"|module_loss={found}|model={type(self.model).__qualname__}@{id(self.model):x}"
        )

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """float32 when the model has bf16/fp16 weights now (a precision plugin may convert it after this loss was
        resolved), else None (the model's own dtype)."""
        return compute_dtype(self.model)

    @property
    def notes(self) -> list[str]:
        """What influence does to the model's call, in words (logged once by the module)."""
        notes = []
        if self._caches:
            names = ", ".join(f"model.{n}" if n else "model" for n, _ in self._caches)
            notes.append(
                f"key/value caches off (use_cache=False) for {names} while influence runs (a cache in the output "
                "cannot be differentiated; restored after each call)"
            )
        if has_attention(self.model):
            notes.append(
                "attention runs on the math SDPA kernel while influence runs (fused attention kernels have no double "
                "backward and no forward mode)"
            )
        if self.compute_dtype is not None:
            dtypes = sorted({str(p.dtype).replace("torch.", "") for p in self.model.parameters()})
            notes.append(
                f"curvature, solves and scores in float32 (the model's parameters are {'/'.join(dtypes)}; float32 "
                "copies are used, the model is not changed)"
            )
        return notes

    @property
    def token_loss(self) -> Any:
        """The sequence loss (with ``token_losses(outputs, batch) -> [B, T]``, summing over T to the per-sequence
        loss; see :mod:`lightning_fastif.functional.sequence`) when the loss is one, else None: a
        :class:`SequenceCrossEntropy`, or a user's ``loss_fn`` that has ``token_losses``.

        A default-resolved classification loss becomes a sequence loss when it first sees logits ``[B, T, V]`` with
        labels ``[B, T]``.
        """
        if self.loss_fn is not None:  # the user's loss decides, as it is now
            return self.loss_fn if callable(getattr(self.loss_fn, "token_losses", None)) else None
        return self.sequence

    def loss_of_outputs(self, outputs: Any, batch: Any) -> Tensor:
        """Per-example losses ``[B]`` from the model's outputs on ``batch`` (not for ``per_example_loss``)."""
        if self.loss_fn is not None:
            return self.loss_fn(outputs, batch)
        if self.module_loss is not None:
            return self.module_loss(outputs, batch)
        if self.sequence is not None:
            return self.sequence(outputs, batch)
        if is_sequence_pair(
            outputs, batch
        ):  # logits [B, T, V], labels [B, T]: token classification, LitGPT...
            self.sequence = SequenceCrossEntropy(shift=False)
            self.source = "sequence"
            self.plain_cross_entropy = False
            self.description = self.sequence.description
            return self.sequence(outputs, batch)
        return _default_cross_entropy(outputs, batch)

    def full_params(self, params: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Every parameter of the model (``"model."``-prefixed, for the loss graph): ``params`` where given, the rest
        detached; every buffer and parameter of a bf16/fp16 model as a float32 copy (cached per weight version)."""
        named = dict(self.model.named_parameters())
        if self.compute_dtype is None:
            full = {f"model.{k}": p.detach() for k, p in named.items()}
        else:
            buffers = dict(self.model.named_buffers())
            key = tuple((id(t), t._version) for t in (*named.values(), *buffers.values()))
            if self._f32 is None or self._f32[0] != key:
                cast = float32_tensors({**named, **{k: b for k, b in buffers.items() if b is not None}})
                self._f32 = (key, {f"model.{k}": v for k, v in cast.items()})
            full = dict(self._f32[1])
        if params:
            full.update({f"model.{k}": v for k, v in params.items()})
        return full

    def call_context(self) -> Any:
        """The context every model call of influence runs in: caches off, math attention, autocast off."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(caches_off(self._caches))
        stack.enter_context(math_attention())
        return stack

    def outputs(self, batch: Any) -> Any:
        """The model's outputs on ``batch`` (by ``forward_fn`` or the default convention), in the compute dtype."""
        with self.call_context():
            if self.compute_dtype is None:
                return call_model(self.model, batch, self.forward_fn)
            graph = _OutputsGraph(self.model, logits_only=False, forward_fn=self.forward_fn)
            return functional_call(graph, self.full_params(), (batch,))

    def __call__(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """Per-example losses ``[B]`` at ``params`` (names as in ``model.named_parameters()``)."""
        # every parameter is passed: the unselected ones detached, so autograd records nothing for them
        with self.call_context():
            losses = functional_call(self._graph, self.full_params(params), (batch,))
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise LossResolutionError(
                f"Expected the {self.source} loss to return per-example losses of shape [B] (no reduction), "
                f"but got {got}. {_HOW_TO}"
            )
        n = _leading_size(batch)
        if n is not None and losses.shape[0] != n:
            raise LossResolutionError(
                f"Expected the {self.source} loss to return one loss per example of the batch (shape [{n}]), but "
                f"got shape {list(losses.shape)}. {_HOW_TO}"
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
    logits_only = loss.source in ("classification", "model_loss", "sequence") or isinstance(
        loss.loss_fn, SequenceCrossEntropy
    )
    graph = _OutputsGraph(loss.model, logits_only=logits_only, forward_fn=loss.forward_fn)

    def outputs_fn(params: dict[str, Tensor], batch: Any) -> Any:
        with loss.call_context():
            return functional_call(graph, loss.full_params(params), (batch,))

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


def _leading_size(batch: Any) -> int | None:
    """The batch's number of examples (its first tensor's leading size), or None when it has no batched tensor."""
    try:
        return batch_size(batch)
    except TypeError:
        return None
