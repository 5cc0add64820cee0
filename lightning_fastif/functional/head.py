"""The head fast path (DESIGN section 2): influence of a final ``Linear`` layer from cached features and logits.

When the selected parameters are only a final ``Linear`` ``logits = W phi + b`` trained with cross-entropy,
``grad_W L(z) = g(z) phi(z)^T`` and ``grad_b L(z) = g(z)`` with ``g = softmax(logits) - onehot(y)``. A score is then
``I(z) = -(g^T S phi + g^T s_b)``, with ``S [C, d]`` and ``s_b [C]`` the s_test reshaped as the weight and bias. From
features and logits cached when the index is built, scoring needs no forward pass at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["head_scores"]


def head_scores(
    features: Tensor, logits: Tensor, labels: Tensor, s_weight: Tensor, s_bias: Tensor | None = None
) -> Tensor:
    """Influence scores ``[n, Q]`` of n examples of a cross-entropy ``Linear`` head.

    Args:
        features: the head's inputs ``phi [n, d]``.
        logits: the head's outputs ``[n, C]``.
        labels: integer classes ``[n]``.
        s_weight: s_test of the weight, ``[Q, C, d]``.
        s_bias: s_test of the bias, ``[Q, C]`` (None for a head without bias).

    Example:
        >>> phi, lg = torch.randn(5, 3), torch.randn(5, 2)
        >>> head_scores(phi, lg, torch.tensor([0, 1, 1, 0, 1]), torch.randn(4, 2, 3)).shape
        torch.Size([5, 4])
    """
    g = torch.softmax(logits, dim=-1)
    g[torch.arange(len(labels), device=g.device), labels] -= 1.0  # dL/dlogits of cross-entropy
    # (g^T S phi) for every (example, query): contract C with g and d with phi
    out = torch.einsum("nc,qcd,nd->nq", g, s_weight, features)
    if s_bias is not None:
        out = out + g @ s_bias.T
    return -out
