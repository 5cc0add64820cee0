"""The head fast path of :class:`~lightning_fastif.InfluenceModule`: when only the indexed ``Linear`` head is
differentiated under plain cross-entropy, scores come in closed form from the cached features and logits (DESIGN
section 2), with no forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import fetch, labels_of
from lightning_fastif.functional.head import head_scores
from lightning_fastif.functional.losses import check_class_labels
from lightning_fastif.functional.params import ParamSpec


def head_fast_path(im: Any, spec: ParamSpec) -> tuple[str, str | None] | None:
    """``(weight name, bias name)`` when scores can come from cached features and logits (DESIGN section 2):
    the selected parameters are exactly the indexed ``Linear`` head, the loss is the default cross-entropy,
    the model computes in float32 like the cache, and ``score_method`` is ``"auto"`` or ``"head"``."""
    if (
        im.score_method not in ("auto", "head")
        or im._cache is None
        or not im.loss.plain_cross_entropy  # label smoothing, class weights... change g: no closed form
    ):
        return None
    layer = im._feature_layer_name
    module = dict(im.model.named_modules()).get(layer or "")
    if not isinstance(module, nn.Linear) or module.weight.dtype != torch.float32:
        return None
    feats, logits = im._cache.get("features"), im._cache.get("logits")
    if (
        feats is None
        or logits is None
        or feats.dim() != 2
        or logits.dim() != 2
        or feats.shape[1] != module.in_features
        or logits.shape[1] != module.out_features
    ):  # the cached logits are not this head's outputs (a model returning several tensors): no closed form
        return None
    w, b = f"{layer}.weight", f"{layer}.bias" if module.bias is not None else None
    return (w, b) if set(spec.names) == {w, b} - {None} else None


def train_labels(module: Any, ids: Tensor) -> Tensor:
    """Labels of the training examples ``ids`` (cached for a ``TensorDataset``), for the head fast path."""
    if module._train_labels is None and isinstance(module.train_dataset, TensorDataset):
        module._train_labels = labels_of(module.train_dataset.tensors)
    if module._train_labels is not None:
        return module._train_labels[ids]
    labels = labels_of(fetch(module.train_dataset, ids.tolist(), module._user_collate))
    if labels is None:
        raise ConfigurationError("Expected the training examples to carry labels for the head fast path.")
    return labels


def head_fast_scores(
    module: Any, head: tuple[str, str | None], spec: ParamSpec, s_test: Tensor, ids: Tensor
) -> Tensor:
    """Scores ``[Q, n]`` of the training examples ``ids`` from the cached features and logits (closed form of the head)."""
    cache = module._cache or {}
    parts = spec.unflatten(s_test)
    s_w = parts[head[0]]
    s_b = parts[head[1]] if head[1] is not None else None
    out = []
    for chunk in ids.split(max(module.score_batch_size, 4096)):
        feats = cache["features"][chunk].to(s_test.device)
        logits = cache["logits"][chunk].to(s_test.device)
        labels = check_class_labels(module._labels(chunk).to(s_test.device), logits, None, chunk)
        out.append(head_scores(feats, logits, labels, s_w, s_b))
    return torch.cat(out).T if out else s_test.new_zeros(s_test.shape[0], 0)
