"""Sequence losses: per-sequence token cross-entropy for language models and token classifiers (pure torch).

The protocol (issue 19): a sequence loss is a callable ``loss(outputs, batch) -> [B]`` that also exposes
``token_losses(outputs, batch) -> [B, T]``, the contribution of each position, with

    ``loss(outputs, batch) == loss.token_losses(outputs, batch).sum(-1)``

exactly: the reduction's weights (``1 / n_tokens`` for ``"mean"``) are folded into the token losses, and ignored
positions (label ``-100``, or ``attention_mask == 0``) are zeros. Column ``t`` is always the loss of predicting token
``t`` of the batch (for a shifted causal LM, column 0, which nothing predicts, is zero), so per-token influence, which
reads ``token_losses``, credits each token of ``input_ids`` where it stands.

Which models get which loss (:func:`sequence_loss_for`): a Hugging Face ``*ForCausalLM`` / ``*LMHeadModel`` (labels
are the input ids, the model shifts inside) gets ``shift=True``; any other ``[B, T, V]`` logits with ``[B, T]``
labels (token classification, a LitGPT ``GPT`` fed ``(input_ids, targets)`` already shifted) get ``shift=False``.

Also here: the Hugging Face cache switch (:func:`caches_off`), the attention kernel of influence
(:func:`math_attention`) and float32 compute for bf16/fp16 models (:func:`compute_dtype`, :func:`float32_tensors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fastif.errors import ConfigurationError, LossResolutionError
from lightning_fastif.functional.batch import labels_of, logits_of

__all__ = [
    "IGNORE_INDEX",
    "SequenceCrossEntropy",
    "cached_configs",
    "caches_off",
    "causal_lm_module",
    "compute_dtype",
    "float32_tensors",
    "full_precision",
    "has_attention",
    "math_attention",
    "sequence_loss_for",
]

IGNORE_INDEX = -100
"""The label of positions without a loss (Hugging Face's and PyTorch's convention)."""

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _is_batched(t: Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except Exception:
        return False


class SequenceCrossEntropy:
    """Per-sequence token cross-entropy ``[B]`` of logits ``[B, T, V]`` against labels ``[B, T]``.

    Args:
        reduction: ``"mean"`` (default: the mean over the sequence's counted tokens, as a causal LM is trained) or
            ``"sum"`` (the sum over them).
        shift: predict token ``t + 1`` from position ``t`` (Hugging Face causal LMs: the labels are the input ids and
            the model shifts inside): logits ``[:, :-1]`` against labels ``[:, 1:]``.
        ignore_index: the label of positions without a loss.

    Positions whose label is ``ignore_index``, or whose ``attention_mask`` (a dict batch's key, shifted like the
    labels) is 0, count for nothing. A sequence with no counted position has loss 0.

    Example:
        >>> loss = SequenceCrossEntropy()
        >>> logits, labels = torch.randn(2, 5, 7), torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
        >>> batch = {"input_ids": labels.clamp(min=0), "labels": labels}
        >>> bool(torch.allclose(loss(logits, batch), loss.token_losses(logits, batch).sum(-1)))
        True
    """

    def __init__(
        self, reduction: str = "mean", shift: bool = False, ignore_index: int = IGNORE_INDEX
    ) -> None:
        if reduction not in ("mean", "sum"):
            raise ConfigurationError(f'Expected `reduction` to be "mean" or "sum", but got {reduction!r}.')
        self.reduction = reduction
        self.shift = bool(shift)
        self.ignore_index = int(ignore_index)

    @property
    def description(self) -> str:
        how = "mean" if self.reduction == "mean" else "sum"
        shifted = ", shifted (position t predicts token t+1)" if self.shift else ""
        return f"token cross-entropy, {how} over each sequence's tokens (labels {self.ignore_index} ignored){shifted}"

    def __repr__(self) -> str:
        return f"SequenceCrossEntropy(reduction={self.reduction!r}, shift={self.shift})"

    def _aligned(self, outputs: Any, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits [B, T, V], labels [B, T] with ignored = 0, counted [B, T] bool)`` after the shift."""
        logits = logits_of(outputs)
        labels = labels_of(batch)
        if logits is None or labels is None:
            raise LossResolutionError(
                "Expected a sequence batch with `labels` [B, T] and model outputs with logits [B, T, V] (a tensor, "
                f"`.logits` or a 'logits' key), but got outputs of type {type(outputs).__name__} and a batch "
                f"{'without labels' if labels is None else 'with labels'}. Pass `loss_fn` or `forward_fn`."
            )
        if (
            logits.dim() != 3
            or labels.dim() != 2
            or labels.shape != logits.shape[:2]
            or labels.is_floating_point()
        ):
            raise LossResolutionError(
                f"Expected logits [B, T, V] and integer labels [B, T] for a sequence cross-entropy, but got logits "
                f"{list(logits.shape)} and labels {list(labels.shape)} ({labels.dtype}). Pass `loss_fn`."
            )
        labels = labels.long()
        counted = labels != self.ignore_index
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, Tensor) and mask.shape == labels.shape:
            counted = counted & (mask != 0)
        if self.shift:
            logits, labels, counted = logits[:, :-1], labels[:, 1:], counted[:, 1:]
        v = int(logits.shape[-1])
        if not _is_batched(labels):
            bad = counted & ((labels < 0) | (labels >= v))
            if bool(bad.any()):
                got = sorted(set(labels[bad].tolist()))[:10]
                raise ConfigurationError(
                    f"Expected `labels` to be token ids in [0, {v}) (the logits have {v} entries) or "
                    f"{self.ignore_index} (ignored), but got {got} at (sequence, position) "
                    f"{bad.nonzero().tolist()[:10]}."
                )
        return logits, torch.where(counted, labels, torch.zeros_like(labels)), counted

    def token_losses(self, outputs: Any, batch: Any) -> Tensor:
        """Each token's share of the sequence loss ``[B, T]`` (``T`` = the batch's sequence length; column ``t`` is the
        loss of predicting token ``t``): its cross-entropy times its weight (``1 / n_tokens`` for ``"mean"``, 1 for
        ``"sum"``), 0 where not counted (and at position 0 of a shifted causal LM, which nothing predicts)."""
        logits, labels, counted = self._aligned(outputs, batch)
        b, t, v = logits.shape
        ce = F.cross_entropy(logits.reshape(b * t, v), labels.reshape(b * t), reduction="none").reshape(b, t)
        weight = counted.to(ce.dtype)
        if self.reduction == "mean":
            weight = weight / counted.sum(dim=1, keepdim=True).clamp(min=1).to(ce.dtype)
        shares = ce * weight
        if self.shift:  # column t = predicting token t, aligned with input_ids
            shares = F.pad(shares, (1, 0))
        return shares

    def __call__(self, outputs: Any, batch: Any) -> Tensor:
        """Per-sequence losses ``[B]``: ``token_losses(outputs, batch).sum(-1)``."""
        return self.token_losses(outputs, batch).sum(-1)

    def sampled_batch(self, outputs: Any, batch: Any, uniform: Tensor) -> Any:
        """``batch`` with its labels replaced by tokens drawn from the model's own predictive distribution at every
        counted position (Gumbel-max on ``uniform [B, T', V]`` noise in (0, 1)): the loss on this batch has the true
        Fisher's gradient distribution (K-FAC/EK-FAC with ``fisher="true"``)."""
        logits, _, counted = self._aligned(outputs, batch)
        gumbel = -torch.log(-torch.log(uniform[:, : logits.shape[1]].to(torch.float64)))
        drawn = (torch.log_softmax(logits.detach().double(), -1) + gumbel).argmax(-1)
        drawn = torch.where(counted, drawn, torch.full_like(drawn, self.ignore_index))
        labels = labels_of(batch).long().clone()
        if self.shift:
            labels[:, 1:] = drawn
        else:
            labels = drawn
        if isinstance(batch, Mapping):
            key = "labels" if "labels" in batch else "label"
            return {**batch, key: labels}
        return type(batch)((batch[0], labels, *batch[2:]))


def causal_lm_module(model: nn.Module) -> str | None:
    """The dotted name (``""`` for the model itself) of a Hugging Face causal LM inside ``model`` (a class named
    ``*ForCausalLM`` / ``*LMHeadModel`` with a ``config``), or None."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith(_CAUSAL_SUFFIXES) and hasattr(module, "config"):
            return name
    return None


def sequence_loss_for(model: nn.Module, reduction: str = "mean") -> SequenceCrossEntropy:
    """The sequence loss the default resolution uses for ``model``: shifted for a Hugging Face causal LM."""
    return SequenceCrossEntropy(reduction=reduction, shift=causal_lm_module(model) is not None)


# ---------------------------------------------------------------------------------------------- model call settings
def cached_configs(model: nn.Module) -> list[tuple[str, Any]]:
    """``(dotted name, config)`` of every submodule whose config turns a key/value cache on (``use_cache=True``)."""
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and id(cfg) not in seen and getattr(cfg, "use_cache", False) is True:
            seen.add(id(cfg))
            found.append((name, cfg))
    return found


@contextlib.contextmanager
def caches_off(configs: list[tuple[str, Any]]) -> Iterator[None]:
    """``use_cache=False`` on the given configs for the duration (restored after): a model output that holds a
    key/value cache cannot go through ``jvp``/``vmap``, and influence never generates."""
    turned = [
        cfg for _, cfg in configs if getattr(cfg, "use_cache", False) is True
    ]  # re-entrant: only those on
    for cfg in turned:
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg in turned:
            cfg.use_cache = True


def has_attention(model: nn.Module) -> bool:
    """Whether the model has a module that looks like attention (a class or name with "attention"/"attn")."""
    for name, module in model.named_modules():
        low = f"{type(module).__name__}.{name.rsplit('.', 1)[-1]}".lower()
        if "attention" in low or "attn" in low:
            return True
    return False


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off (on CPU and CUDA) for the duration: a precision plugin's autocast (``bf16-mixed``) would run the
    curvature, solves and scores in bf16."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if device == "cpu" or torch.cuda.is_available():
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on its math kernel, ``nn.MultiheadAttention`` off its fused fast path, and
    autocast off (float32 math): fused attention kernels (flash, memory-efficient, cuDNN, the CPU flash kernel, torch's
    native transformer layers) have no double backward and no forward mode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    if (
        mha is not None
    ):  # nn.MultiheadAttention / TransformerEncoderLayer's fused eval path: no forward mode either
        mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), full_precision():
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)


def compute_dtype(model: nn.Module) -> torch.dtype | None:
    """float32 when some floating parameter or buffer of ``model`` is bf16/fp16 (influence then computes in float32),
    else None (the model's own dtype)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dtype in _LOW_PRECISION:
            return torch.float32
    return None


def float32_tensors(named: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of ``named`` with every bf16/fp16 one replaced by a detached float32 copy (others as they are)."""
    return {k: (v.detach().float() if v.dtype in _LOW_PRECISION else v) for k, v in named.items()}
