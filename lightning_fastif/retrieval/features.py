"""Penultimate-layer features: finding the feature layer and reading its input over a dataset.

The feature of an example is the INPUT of the feature layer (by default the last ``nn.Linear`` the model calls),
captured with a forward pre-hook. It is detached, flattened to one row per example, cast to float32 and cloned,
so an in-place operation further down the network (``nn.ReLU(inplace=True)``) cannot change it afterwards.
Features are read in ``eval()`` mode under ``torch.no_grad()``; the training flags of every submodule are restored
and every hook is removed afterwards, even when the forward pass raises.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import ForwardFn, batch_size, call_model, logits_of, move_to

__all__ = [
    "FEATURE_POOLINGS",
    "check_pooling",
    "extract_features",
    "extract_features_and_outputs",
    "find_feature_layer",
    "ordered_loader",
    "pool_features",
]

FEATURE_POOLINGS = ("mean", "last", "flatten")
"""How a sequence feature ``[B, T, d]`` becomes one row: the mean over unmasked positions, the last unmasked
position (a causal LM's summary of the sequence), or the T x d values flattened (fixed-length inputs only)."""

# Prefixes that wrappers put in front of module names (LightningModule attribute, DDP, torch.compile).
_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "net.")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode under ``no_grad``; restore every submodule's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _shown(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _layer_by_name(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    if name in modules:
        return name, modules[name]
    # A name given relative to an inner model ("head" for "model.head"): a unique match on a dot boundary.
    matches = [n for n in modules if n.endswith("." + name)]
    if not matches:
        # A name given with a wrapper prefix that this model lacks ("model.head" for "head").
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix) and name[len(prefix) :] in modules:
                matches.append(name[len(prefix) :])
    if len(matches) == 1:
        return matches[0], modules[matches[0]]
    if len(matches) > 1:
        raise ConfigurationError(
            f"Expected `feature_layer` to name one module, but {name!r} matches several: {_shown(matches)}. "
            "Pass the full dotted name."
        )
    raise ConfigurationError(
        f"Expected `feature_layer` to be the name of a module of the model, but got {name!r}. "
        f"Available module names: {_shown([n for n in modules if n])}."
    )


def _last_linear_called(
    model: nn.Module, batch: Any, forward_fn: ForwardFn | None = None
) -> tuple[str, nn.Module]:
    """Run one forward pass and return the ``nn.Linear`` called last (registration order is not call order)."""
    calls: list[str] = []
    handles = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_pre_hook(lambda _m, _a, _n=name: calls.append(_n)))
        if not handles:
            raise ConfigurationError(
                "Expected the model to contain an `nn.Linear` to use as the default feature layer, but it has none. "
                "Pass `feature_layer` (a module name or the module itself)."
            )
        with _eval_mode(model):
            call_model(model, batch, forward_fn)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ConfigurationError(
            "Expected the forward pass to call an `nn.Linear` to use as the default feature layer, but none was "
            "called (a layer applied through its weights alone, as in `nn.MultiheadAttention`, is not a call). "
            "Pass `feature_layer`."
        )
    modules = dict(model.named_modules())
    return calls[-1], modules[calls[-1]]


def find_feature_layer(
    model: nn.Module,
    batch: Any = None,
    feature_layer: str | nn.Module | None = None,
    forward_fn: ForwardFn | None = None,
) -> tuple[str, nn.Module]:
    """The module whose input is the feature, and its dotted name in ``model.named_modules()``.

    Args:
        model: the network (a LightningModule or any ``nn.Module``); it is not changed.
        batch: one real batch, already on the model's device; needed only when ``feature_layer`` is None.
        feature_layer: a dotted module name, the module itself, or None for the last ``nn.Linear`` called during
            a forward pass on ``batch`` (found by recording the calls, in eval mode). A name missing from the
            model is also accepted when it is the unique dot-boundary suffix of one (``"head"`` for
            ``"model.head"``) or when it carries a wrapper prefix the model lacks (``"model.head"`` for ``"head"``).

    Returns:
        ``(name, module)``.

    Raises:
        ConfigurationError: an unknown or ambiguous name (the message lists the module names), a module that is
            not part of ``model``, or no ``nn.Linear`` called when the default is asked for.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> find_feature_layer(net, torch.randn(2, 4))[0]
        '2'
    """
    if isinstance(feature_layer, nn.Module):
        for name, module in model.named_modules():
            if module is feature_layer:
                return name, module
        raise ConfigurationError(
            "Expected `feature_layer` to be a submodule of the model, but got a "
            f"{type(feature_layer).__name__} that is not one of its modules."
        )
    if isinstance(feature_layer, str):
        return _layer_by_name(model, feature_layer)
    if feature_layer is not None:
        raise ConfigurationError(
            f"Expected `feature_layer` to be a module name, an nn.Module or None, but got {feature_layer!r}."
        )
    if batch is None:
        raise ConfigurationError(
            "Expected `batch` to be a real batch when `feature_layer` is None (the default layer is found by "
            "running the model), but got None."
        )
    return _last_linear_called(model, batch, forward_fn)


def _model_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    for v in itertools.chain(args, kwargs.values()):
        if isinstance(v, Tensor):
            return v
    return None


def check_pooling(pooling: Any, name: str = "feature_pooling") -> str:
    """``pooling`` checked against :data:`FEATURE_POOLINGS`."""
    if pooling not in FEATURE_POOLINGS:
        raise ConfigurationError(
            f"Expected `{name}` to be one of {list(FEATURE_POOLINGS)} (how a sequence feature [B, T, d] becomes one "
            f"row), but got {pooling!r}."
        )
    return str(pooling)


def _attention_mask(batch: Any) -> Tensor | None:
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return mask
    return None


def pool_features(x: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    """One feature row per example from a layer input ``x``: ``[B, T, d]`` pooled over T, others unchanged.

    Args:
        x: the captured input of the feature layer, ``[B, d]`` or ``[B, T, d]``.
        mask: ``[B, T]`` attention mask (1 = a real token), or None (every position counts); ignored when its T
            differs from ``x``'s.
        pooling: ``"mean"`` over unmasked positions, ``"last"`` unmasked position, or ``"flatten"`` (``[B, T*d]``).

    Returns:
        ``[B, d]`` (``[B, T*d]`` for ``"flatten"``); an input that is not ``[B, T, d]`` is returned as it is.

    Example:
        >>> x = torch.arange(12.0).reshape(1, 3, 4)
        >>> pool_features(x, torch.tensor([[1, 1, 0]]), "last").tolist()
        [[4.0, 5.0, 6.0, 7.0]]
    """
    pooling = check_pooling(pooling)
    if x.dim() != 3 or pooling == "flatten":
        return x
    b, t, _ = x.shape
    keep = torch.ones(b, t, dtype=torch.bool, device=x.device)
    if mask is not None and tuple(mask.shape) == (b, t):
        keep = mask.to(x.device) != 0
        keep = torch.where(
            keep.any(1, keepdim=True), keep, torch.ones_like(keep)
        )  # an empty row: every position
    if pooling == "mean":
        w = keep.to(x.dtype)
        return (x * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    last = (torch.arange(t, device=x.device)[None, :] * keep).argmax(1)  # the last unmasked position
    return x[torch.arange(b, device=x.device), last]


def _as_rows(t: Tensor, n: int) -> Tensor:
    """``[n, ...]`` -> ``[n, m]`` float32 on the CPU, sharing no memory with ``t``."""
    t = t.detach()
    t = t.reshape(n, 1) if t.dim() == 1 else t.flatten(1)
    return t.float().cpu().clone()


def _extract(
    model: nn.Module,
    dataloader: Iterable[Any],
    feature_layer: str | nn.Module | None,
    device: torch.device | str | None,
    progress: bool,
    with_outputs: bool,
    forward_fn: ForwardFn | None = None,
    pooling: str = "mean",
) -> tuple[Tensor, Tensor | None]:
    pooling = check_pooling(pooling)
    device = _model_device(model) if device is None else torch.device(device)
    batches = iter(dataloader)
    try:
        first = next(batches)
    except StopIteration:
        raise ConfigurationError("Expected `dataloader` to yield at least one batch, but got none.") from None
    first = move_to(first, device)
    name, layer = find_feature_layer(model, first, feature_layer, forward_fn)

    captured: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = _first_input(args, kwargs)
        if x is not None:  # cloned now: an in-place op later in the forward pass would change it
            captured.append(x.detach().clone())

    try:
        total = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    from tqdm.auto import tqdm

    feats: list[Tensor] = []
    outs: list[Tensor] = []
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _eval_mode(model):
            stream = itertools.chain([first], (move_to(b, device) for b in batches))
            for batch in tqdm(stream, total=total, disable=not progress, desc="Features", unit="batch"):
                captured.clear()
                outputs = call_model(model, batch, forward_fn)
                if not captured:
                    raise ConfigurationError(
                        f"Expected the feature layer {name!r} to be called with a tensor input in every forward "
                        "pass, but it was not called. Choose another `feature_layer`."
                    )
                x = captured[-1]  # a layer called several times: its last call is the feature
                n = _batch_rows(batch, x)
                x = pool_features(
                    x, _attention_mask(batch), pooling
                )  # a sequence [B, T, d]: one row per example
                rows = _as_rows(x, n)
                if feats and rows.shape[1] != feats[0].shape[1]:
                    raise ConfigurationError(
                        f"Expected the input of feature layer {name!r} to have the same size for every example, "
                        f"but got {feats[0].shape[1]} then {rows.shape[1]} values (variable-length inputs: "
                        "use `feature_pooling='mean'` or 'last', or choose a layer after pooling)."
                    )
                feats.append(rows)
                if with_outputs:
                    outs.append(_logit_rows(outputs, n, pooling))
                captured.clear()
    finally:
        handle.remove()
        captured.clear()
    features = torch.cat(feats)
    keep_outputs = with_outputs and all(o is not None for o in outs)
    return features, (torch.cat(outs) if keep_outputs else None)  # type: ignore[arg-type]


def _batch_rows(batch: Any, x: Tensor) -> int:
    """Number of examples in ``batch``, checked against the leading dimension of the captured input ``x``."""
    try:
        n = batch_size(batch)
    except TypeError:
        n = int(x.shape[0]) if x.dim() > 0 else 1
    if x.dim() == 0 or x.shape[0] != n:
        raise ConfigurationError(
            f"Expected the feature layer's input to have one row per example ({n} in this batch), but got shape "
            f"{tuple(x.shape)} (a sequence-first layout?). Choose a layer whose input is batch-first."
        )
    return n


def _logit_rows(outputs: Any, n: int, pooling: str = "flatten") -> Tensor | None:
    """The logits as rows ``[n, C]``; None for per-position logits ``[n, T, V]`` of a pooled sequence feature (the
    head fast path they serve needs ``[n, C]``, and ``N x T x V`` values would not fit in memory for a language
    model)."""
    logits = logits_of(outputs)
    if logits is None:
        raise ConfigurationError(
            "Expected the model output to hold logits (a tensor, a `.logits` attribute or a 'logits' key), "
            f"but got a {type(outputs).__name__}."
        )
    if logits.dim() == 0 or logits.shape[0] != n:
        raise ConfigurationError(
            f"Expected the logits to have one row per example ({n}), but got shape {tuple(logits.shape)}."
        )
    if logits.dim() > 2 and pooling != "flatten":
        return None
    return _as_rows(logits, n)


def extract_features(
    model: nn.Module,
    dataloader: Iterable[Any],
    feature_layer: str | nn.Module | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    forward_fn: ForwardFn | None = None,
    pooling: str = "mean",
) -> Tensor:
    """The input of the feature layer for every example of ``dataloader``, in dataloader order.

    Args:
        model: the network; it runs in eval mode under ``no_grad`` and its training flags are restored.
        dataloader: batches as ``functional.batch`` reads them (``(x, y)``, dict or tensor); read once, in order.
        feature_layer: see :func:`find_feature_layer`; None = the last ``nn.Linear`` called (found on the first
            batch).
        device: where batches are moved (the model must already be there); default: the model's device.
        progress: show a tqdm progress bar.
        forward_fn: ``callable(model, batch) -> outputs``, how the model is called on a batch (default:
            ``model(x)`` for ``(x, y)`` batches, ``model(**inputs)`` for dict batches).
        pooling: how a sequence input ``[B, T, d]`` of the feature layer becomes one row (see
            :func:`pool_features`; the batch's ``attention_mask`` says which positions are real): ``"mean"``
            (default), ``"last"`` or ``"flatten"``. Inputs of queries must be pooled like the index's.

    Returns:
        Features ``[N, d]`` float32 on the CPU, one row per example.

    Raises:
        ConfigurationError: an empty dataloader, a bad ``feature_layer``, a layer that is not called or whose
            input is not batch-first, or feature sizes that differ between examples.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> loader = ordered_loader(torch.utils.data.TensorDataset(torch.randn(10, 4)), batch_size=4)
        >>> extract_features(net, loader).shape
        torch.Size([10, 8])
    """
    return _extract(
        model,
        dataloader,
        feature_layer,
        device,
        progress,
        with_outputs=False,
        forward_fn=forward_fn,
        pooling=pooling,
    )[0]


def extract_features_and_outputs(
    model: nn.Module,
    dataloader: Iterable[Any],
    feature_layer: str | nn.Module | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    forward_fn: ForwardFn | None = None,
    pooling: str = "mean",
) -> tuple[Tensor, Tensor | None]:
    """Like :func:`extract_features`, and the model's logits from the same pass.

    Returns:
        ``(features [N, d], logits [N, C])``, both float32 on the CPU (logits of more than two dimensions are
        flattened after the first with ``pooling="flatten"``, and not kept otherwise: logits None). The logits are
        what the head fast path needs to score without a forward pass.

    Raises:
        ConfigurationError: as :func:`extract_features`, or a model output without logits.
    """
    return _extract(
        model,
        dataloader,
        feature_layer,
        device,
        progress,
        with_outputs=True,
        forward_fn=forward_fn,
        pooling=pooling,
    )


def ordered_loader(
    dataset: Dataset[Any], batch_size: int, collate_fn: Any = None, num_workers: int = 0
) -> DataLoader[Any]:
    """A DataLoader that reads a map-style dataset in order: no shuffling, no dropped last batch.

    Row ``i`` of features extracted through it is example ``i`` of ``dataset`` (the id used by the index).

    Raises:
        ConfigurationError: an iterable-style dataset, a non-positive ``batch_size`` or negative ``num_workers``.
    """
    if (
        isinstance(dataset, IterableDataset)
        or not hasattr(dataset, "__getitem__")
        or not hasattr(dataset, "__len__")
    ):
        raise ConfigurationError(
            "Expected `dataset` to be a map-style dataset (with __getitem__ and __len__, so that position i is "
            f"example id i), but got {type(dataset).__name__}."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigurationError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigurationError(f"Expected `num_workers` to be a non-negative int, but got {num_workers!r}.")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SequentialSampler(dataset),  # type: ignore[arg-type]
        drop_last=False,
        collate_fn=collate_fn,
        num_workers=num_workers,
    )
