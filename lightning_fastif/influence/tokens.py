"""Per-token influence for :class:`~lightning_fastif.InfluenceModule`: the ``[Q, n, T]`` token scores of training
sequences, and the top tokens of each listed helpful and harmful example in the results.

The math is :func:`lightning_fastif.functional.tokens.token_scores` (one forward-mode jvp of the token-loss matrix).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fastif._runtime import eval_mode
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import fetch
from lightning_fastif.functional.losses import check_finite
from lightning_fastif.functional.tokens import (
    TOKEN_LOSS_HELP,
    find_token_losses,
    token_ids_of,
    token_scores,
    top_tokens,
)
from lightning_fastif.results import InfluenceResult

__all__ = ["attach_top_tokens", "check_top_tokens", "per_token_influence", "require_token_losses"]


def check_top_tokens(top_tokens: Any, loss: Any) -> int:
    """``top_tokens`` checked: a non-negative int (0 = off); above 0 the loss must expose ``token_losses``."""
    if isinstance(top_tokens, bool) or not isinstance(top_tokens, int) or top_tokens < 0:
        raise ConfigurationError(
            f"Expected `top_tokens` to be a non-negative int (0 = no per-token influence in the results), but got "
            f"{top_tokens!r}."
        )
    if top_tokens and find_token_losses(loss) is None:
        raise ConfigurationError(
            f"Expected a loss with token losses for `top_tokens={top_tokens}`, but the loss {loss.description} has "
            f"no `token_losses(outputs, batch)`. {TOKEN_LOSS_HELP}"
        )
    return top_tokens


def require_token_losses(module: Any) -> Any:
    """The module's ``(params, batch) -> [B, T]`` token loss, or a :class:`ConfigurationError` saying it has none."""
    token_loss = find_token_losses(module.loss)
    if token_loss is None:
        raise ConfigurationError(
            f"Expected a loss with token losses for `per_token=True`, but the loss {module.loss.description} has no "
            f"`token_losses(outputs, batch)`. {TOKEN_LOSS_HELP}"
        )
    return token_loss


def per_token_influence(
    module: Any, s_test: Tensor, train_indices: Sequence[int] | Tensor | None = None, with_ids: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token influence ``[Q, n, T]`` of the training sequences ``train_indices`` (all N if None).

    ``T`` is the longest token-loss row among the scored sequences; shorter ones are padded with 0 (a token that
    is not there contributes nothing), so the sum over T is each sequence's score.

    Args:
        module: the :class:`~lightning_fastif.InfluenceModule`.
        s_test: ``[Q, P]``.
        train_indices: training ids (all N when None).
        with_ids: also return the token ids ``[n, T]`` of the sequences (-1 where unknown or padded).
    """
    token_loss = require_token_losses(module)
    n = len(module.train_dataset)
    ids = (
        torch.arange(n)
        if train_indices is None
        else torch.as_tensor(train_indices, dtype=torch.long).reshape(-1)
    )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ConfigurationError(
            f"Expected `train_indices` to lie in [0, {n}), but got values from {int(ids.min())} to {int(ids.max())}."
        )
    theta, spec = module._theta()
    s_test = s_test.to(device=theta.device, dtype=theta.dtype)
    parts: list[Tensor] = []
    tokens: list[Tensor] = []
    with eval_mode(module.model):
        for at in range(0, ids.numel(), module.score_batch_size):
            chunk = ids[at : at + module.score_batch_size].tolist()
            batch = module._prepare(fetch(module.train_dataset, chunk, module._user_collate))
            scores = token_scores(token_loss, theta, spec, batch, s_test)  # [b, Q, T]
            parts.append(scores.detach())
            found = token_ids_of(batch)
            if found is None or found.shape[1] != scores.shape[2]:
                found = torch.full((len(chunk), scores.shape[2]), -1, dtype=torch.long)
            tokens.append(found.detach().to("cpu", torch.long))
    width = max((p.shape[2] for p in parts), default=0)
    out = s_test.new_zeros(s_test.shape[0], ids.numel(), width)
    token_ids = torch.full((ids.numel(), width), -1, dtype=torch.long)
    at = 0
    for scores, found in zip(parts, tokens):
        b, t = scores.shape[0], scores.shape[2]
        out[:, at : at + b, :t] = scores.permute(1, 0, 2)
        token_ids[at : at + b, :t] = found
        at += b
    check_finite(out.permute(1, 0, 2), "per-token influence score (a training example's token losses)", ids)
    return (out, token_ids) if with_ids else out


def attach_top_tokens(module: Any, results: list[InfluenceResult], s_test: Tensor, k: int) -> None:
    """Fill ``result.top_tokens`` (training id as a string -> ``[(position, token id, score), ...]``) for the
    listed helpful (most negative tokens) and harmful (most positive tokens) examples of each query."""
    for q, result in enumerate(results):
        listed = [(i, -1) for i in result.helpful_ids] + [(i, 1) for i in result.harmful_ids]
        if not listed:
            result.top_tokens = {}
            continue
        scores, token_ids = per_token_influence(
            module, s_test[q : q + 1], [i for i, _ in listed], with_ids=True
        )
        result.top_tokens = {
            str(int(train_id)): top_tokens(scores[0, row], token_ids[row], k, sign)
            for row, (train_id, sign) in enumerate(listed)
        }
