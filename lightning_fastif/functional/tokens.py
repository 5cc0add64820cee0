"""Per-token influence: the contribution of each token of a training sequence to its influence score.

Protocol: a sequence loss may expose ``token_losses(outputs, batch) -> [B, T]``, the loss of each token of each
sequence, whose sum over T is the per-example loss ``loss(outputs, batch) -> [B]`` (weights folded in, zeros at
ignored positions). The per-token influence of token t of training sequence z on a query is

    I_t(z, z_test) = -grad L_t(z) . s_test,     sum_t I_t(z, z_test) = I(z, z_test),

computed with one forward-mode ``jvp`` of the ``[B, T]`` token-loss matrix in the direction s_test: no per-token
backward, the same cost as the sequence score.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vmap

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.params import ParamSpec

__all__ = ["TOKEN_LOSS_HELP", "find_token_losses", "token_ids_of", "token_scores", "top_tokens"]

TokenLoss = Callable[[dict[str, Tensor], Any], Tensor]

TOKEN_LOSS_HELP = (
    "Per-token influence needs a loss that exposes `token_losses(outputs, batch) -> [B, T]` (the loss of each token "
    "of each sequence, summing over T to the per-example loss `loss(outputs, batch) -> [B]`), e.g. the sequence "
    "cross-entropy found automatically for language models, or pass such an object as `loss_fn`."
)


def _token_method(loss: Any) -> Callable[[Any, Any], Tensor] | None:
    """The ``token_losses`` method of the loss object behind a per-example loss, or None."""
    owners = (
        loss,
        getattr(
            loss, "token_loss", None
        ),  # the resolved sequence loss (functional.sequence.SequenceCrossEntropy)
        getattr(loss, "loss_fn", None),
        getattr(loss, "module_loss", None),
    )
    for owner in owners:
        method = getattr(owner, "token_losses", None) if owner is not None else None
        if callable(method):
            return method
    return None


def find_token_losses(loss: Any) -> TokenLoss | None:
    """``(params, batch) -> [B, T]`` token losses at ``params``, or None when the loss has no ``token_losses``.

    Args:
        loss: a :class:`~lightning_fastif.functional.losses.PerExampleLoss` (its ``loss_fn`` or found loss exposes
            ``token_losses``) or any object with ``token_losses`` and ``split()``.
    """
    method = _token_method(loss)
    split = getattr(loss, "split", None)
    if method is None or not callable(split):
        return None
    parts = split()
    if parts is None:
        return None
    outputs_fn = parts[0]

    def token_loss(params: dict[str, Tensor], batch: Any) -> Tensor:
        out = method(outputs_fn(params, batch), batch)
        if not isinstance(out, Tensor) or out.dim() != 2:
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ConfigurationError(
                f"Expected `token_losses(outputs, batch)` to return a [B, T] tensor of token losses, but got {got}."
            )
        return out

    return token_loss


def token_scores(token_loss: TokenLoss, theta: Tensor, spec: ParamSpec, batch: Any, s_test: Tensor) -> Tensor:
    """Per-token scores ``[B, Q, T]``: ``-d/dt L_t(z_i, theta + t s_q)`` at t = 0, one forward-mode jvp per query.

    Summing over T gives the sequence scores ``[B, Q]`` of :func:`~lightning_fastif.functional.scores.jvp_scores`.

    Args:
        token_loss: ``(params, batch) -> [B, T]`` (see :func:`find_token_losses`).
        theta: the selected parameters, flat ``[P]``.
        spec: how ``theta`` unflattens into named parameters.
        batch: the training batch.
        s_test: ``[Q, P]``.

    Example:
        >>> m = torch.nn.Linear(3, 4)
        >>> params = {n: p.detach() for n, p in m.named_parameters()}
        >>> spec = ParamSpec.of(params)
        >>> tl = lambda p, b: torch.func.functional_call(m, p, (b,)).pow(2)   # [B, T=4]
        >>> token_scores(tl, spec.flatten(params), spec, torch.randn(5, 3), torch.randn(2, 16)).shape
        torch.Size([5, 2, 4])
    """

    def f(flat: Tensor) -> Tensor:
        return token_loss(spec.unflatten(flat), batch)

    def one(direction: Tensor) -> Tensor:
        return jvp(f, (theta,), (direction,))[1]

    try:
        if s_test.shape[0] == 1:
            return -one(s_test[0])[:, None, :]
        return -vmap(one)(s_test).permute(1, 0, 2)
    except NotImplementedError as err:  # an operator without a forward-mode rule (e.g. fused attention)
        warnings.warn(
            f"Forward-mode AD is not supported by this model ({str(err)[:200]}); per-token scores come from the "
            "token-loss Jacobian instead (one backward per token: slower). For attention, the math path supports "
            'forward mode (Hugging Face: `attn_implementation="eager"`).',
            stacklevel=2,
        )
        jac = jacrev(f)(theta)  # [B, T, P]
        return -torch.einsum("btp,qp->bqt", jac, s_test)


def token_ids_of(batch: Any) -> Tensor | None:
    """The token ids ``[B, T]`` of a batch: its ``input_ids`` (dict batch), or its first element when that is an
    integer ``[B, T]`` tensor; None otherwise."""
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
    elif isinstance(batch, (list, tuple)) and batch:
        ids = batch[0]
    else:
        ids = batch
    if isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        return ids
    return None


def top_tokens(scores: Tensor, ids: Tensor | None, k: int, sign: int) -> list[tuple[int, int, float]]:
    """The ``k`` tokens of one sequence that push its score furthest in the direction ``sign``.

    Args:
        scores: per-token scores ``[T]`` of one training sequence.
        ids: its token ids ``[T]`` (or None: the id is then -1).
        k: tokens kept.
        sign: -1 for a helpful example (most negative first), +1 for a harmful one (most positive first).

    Returns:
        ``[(position, token id, score), ...]``, at most ``k``, only tokens whose score has the sign ``sign``.

    Example:
        >>> top_tokens(torch.tensor([0.1, -2.0, 0.0, -0.5]), torch.tensor([7, 8, 9, 10]), 2, -1)
        [(1, 8, -2.0), (3, 10, -0.5)]
    """
    signed = scores * sign
    order = torch.argsort(signed, descending=True, stable=True)[:k]
    out = []
    for pos in order.tolist():
        if float(signed[pos]) <= 0:
            break
        token = int(ids[pos]) if ids is not None and pos < ids.shape[0] else -1
        out.append((int(pos), token, float(scores[pos])))
    return out
