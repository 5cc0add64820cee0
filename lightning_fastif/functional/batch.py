"""How a batch is read: moving it to a device, finding the model inputs and labels, counting its examples.

Conventions (DESIGN section 3): a batch is ``(x, y, ...)`` (tuple or list: ``x`` is the model input, ``y`` the
labels), a dict (the model is called with every key but ``labels``; ``labels`` are the labels), or a bare tensor
(an input without labels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["batch_size", "call_model", "fetch", "labels_of", "logits_of", "move_to", "slice_batch"]


def move_to(batch: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a nested batch to ``device``; floating tensors also to ``dtype`` when given."""
    if isinstance(batch, Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, dtype) for v in batch)
    return batch


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for v in batch.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(batch, (list, tuple)):
        for v in batch:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the leading dimension of its first tensor."""
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise TypeError(f"Cannot find a batched tensor in a batch of type {type(batch).__name__}.")
    return int(t.shape[0])


def slice_batch(batch: Any, index: slice | Tensor) -> Any:
    """The sub-batch at ``index`` along the leading dimension of every batched tensor (others kept as they are)."""
    n = batch_size(batch)

    def cut(v: Any) -> Any:
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
            return v[index]
        if isinstance(v, Mapping):
            return {k: cut(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            if len(v) == n and not any(isinstance(x, (Tensor, Mapping, list, tuple)) for x in v):
                idx = range(n)[index] if isinstance(index, slice) else index.tolist()
                return [v[i] for i in idx]
            return type(v)(cut(x) for x in v)
        return v

    return cut(batch)


def model_args(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of the model call for a batch (see the module docstring)."""
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in ("labels", "label")}
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
        return (batch[0],), {}
    raise TypeError(f"Cannot read model inputs from a batch of type {type(batch).__name__}.")


def call_model(model: torch.nn.Module, batch: Any) -> Any:
    """``model(x)`` for ``(x, y)`` batches, ``model(**inputs)`` for dict batches, ``model(batch)`` for tensors."""
    args, kwargs = model_args(batch)
    return model(*args, **kwargs)


def labels_of(batch: Any) -> Tensor | None:
    """The labels of a batch (``batch[1]`` or ``batch["labels"]``), or ``None`` when it has none."""
    if isinstance(batch, Mapping):
        lab = batch.get("labels", batch.get("label"))
        return lab if isinstance(lab, Tensor) else None
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


def logits_of(outputs: Any) -> Tensor | None:
    """The logits tensor of a model output: the output itself, its ``.logits``, or its ``"logits"`` key."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), Tensor):
        return outputs["logits"]
    lg = getattr(outputs, "logits", None)
    if isinstance(lg, Tensor):
        return lg
    if isinstance(outputs, (list, tuple)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    return None


def fetch(dataset: Any, ids: list[int], collate_fn: Any = None) -> Any:
    """The batch of examples ``ids`` of a map-style dataset.

    A ``TensorDataset`` is indexed directly (one gather per tensor); otherwise the examples are collated with
    ``collate_fn`` (default: torch's ``default_collate``).
    """
    from torch.utils.data import TensorDataset
    from torch.utils.data.dataloader import default_collate

    if collate_fn is None and isinstance(dataset, TensorDataset):
        index = torch.as_tensor(ids, dtype=torch.long)
        return tuple(t[index] for t in dataset.tensors)
    return (collate_fn or default_collate)([dataset[i] for i in ids])
