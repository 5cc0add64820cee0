"""A tiny causal language model for the per-token and sequence-feature tests: a Hugging Face ``GPT2LMHeadModel``
built from a config (nothing downloaded), padded dict batches ``{input_ids, attention_mask, labels}`` (labels = the
input ids with -100 on padding; the loss shifts), and a token loss implementing the ``token_losses`` protocol.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from _models import DictDataset, train_steps
from torch import Tensor, nn

VOCAB = 24


class TokenCrossEntropy:
    """Shifted, -100-aware per-sequence token cross-entropy: mean over each sequence's predicted tokens.

    ``token_losses(outputs, batch) -> [B, T]``: column t is the loss of predicting token t from the tokens before
    it, divided by the sequence's number of predicted tokens (0 at position 0 and at ignored positions), so a row
    sums to the per-sequence loss ``self(outputs, batch) -> [B]``.
    """

    def token_losses(self, outputs: Any, batch: Any) -> Tensor:
        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).reshape(labels.shape)
        count = (labels != -100).sum(1).clamp(min=1).to(ce.dtype)
        return F.pad(ce / count[:, None], (1, 0))

    def __call__(self, outputs: Any, batch: Any) -> Tensor:
        return self.token_losses(outputs, batch).sum(1)


def lm_data(n: int, seq: int, seed: int, min_len: int = 4) -> dict[str, Tensor]:
    """``n`` right-padded sequences of random lengths in [min_len, seq] (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    lengths = torch.randint(min_len, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_gpt2(
    n_train: int = 12, n_query: int = 2, seq: int = 8, steps: int = 5, seed: int = 0
) -> tuple[nn.Module, DictDataset, dict[str, Tensor]]:
    """A 1-layer GPT-2 (eager attention, no cache), a few steps trained on random padded sequences."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        use_cache=False,
        attn_implementation="eager",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    train = DictDataset(**lm_data(n_train, seq, seed))
    query = lm_data(n_query, seq, seed + 1)
    batch = {k: v for k, v in lm_data(n_train, seq, seed).items()}
    train_steps(model, lambda b: model(**b).loss, [batch], steps, lr=0.01)
    return model.eval(), train, query
