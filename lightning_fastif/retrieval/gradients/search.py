"""Searching a gradient index: the union of the two maximum-inner-product searches and the index object.

Influence is ``I = -grad L(z) . s_test``: the most helpful candidates have the largest ``g . s`` and the most
harmful the largest ``g . (-s)``. :class:`GradientIndex` searches both sides in one call (or, for an exact head
index, in factored form) and :func:`mips_union` merges them. Part of ``retrieval.gradient_index``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.retrieval.gradients.sketcher import GradientSketcher
from lightning_fastif.retrieval.index import CandidateIndex

__all__ = ["BuiltGradientIndex", "GradientIndex", "mips_union"]


def mips_union(pos: Tensor, neg: Tensor, k: int) -> Tensor:
    """``k`` candidate ids per query from two ranked id lists: ``ceil(k/2)`` of ``pos``, ``floor(k/2)`` of ``neg``,
    deduplicated, topped up alternately from what is left of either list.

    Args:
        pos: ``[Q, m]`` ids, largest ``x . q`` first (the most helpful side: ``I = -x . q`` most negative).
        neg: ``[Q, m]`` ids, largest ``x . (-q)`` first (the most harmful side).
        k: candidates per query, at most the number of distinct ids in the two lists.

    Returns:
        ``[Q, k]`` int64, unique per row.
    """
    out = []
    half = (k + 1) // 2
    for p, n in zip(pos.tolist(), neg.tolist()):
        chosen = dict.fromkeys(p[:half])
        for i in n[: k - half]:
            chosen.setdefault(i)
        for pair in itertools.zip_longest(p[half:], n[k - half :]):  # top up from both sides alternately
            for i in pair:
                if i is not None and len(chosen) < k:
                    chosen.setdefault(i)
            if len(chosen) >= k:
                break
        if len(chosen) < k:
            raise ConfigurationError(
                f"Expected at least k={k} distinct candidates, but the two searches found {len(chosen)}."
            )
        out.append(list(chosen)[:k])
    return torch.tensor(out, dtype=torch.long).reshape(len(out), k)


@dataclasses.dataclass
class GradientIndex:
    """A maximum-inner-product index over gradient sketches, with the sketcher that made them.

    Attributes:
        index: the candidate index (metric ``"ip"``) over the sketches, id = training position.
        sketcher: projects s_test rows the same way (None for a folder loaded without a model).
        meta: what it was built from (``IndexMeta`` fields; ``space = "gradients"``, ``sketch`` settings).
        features, logits: head features and logits (method ``head``), cached for the head scoring fast path.
        head_grads: ``g = softmax - onehot`` ``[N, C]`` of a head with bias: with ``features`` the exact head sketch
            in factored form, so an exact (``Flat``) search costs ``N (d + C)`` per query, not ``N C (d + 1)``.
    """

    index: CandidateIndex
    sketcher: GradientSketcher | None
    meta: dict[str, Any]
    features: Tensor | None = None
    logits: Tensor | None = None
    head_grads: Tensor | None = None

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def candidates(self, s_test: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``(approximate g . s of the candidates [Q, k], candidate ids [Q, k])`` for s_test rows ``[Q, P]``.

        The approximate ``g . s`` is the sketch inner product (exact for ``head``); the module scores the ids
        exactly. Ids come helpful side first.
        """
        if self.sketcher is None:
            raise ConfigurationError(
                "Expected a GradientIndex with its sketcher (a model) to search with s_test."
            )
        n = self.index.ntotal
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigurationError(f"Expected `num_candidates` to be an int in [1, {n}], but got {k!r}.")
        m, nq = min(n, k), s_test.shape[0]
        if self._factored():
            dist, found = self._head_search(s_test, m)
        else:
            q = self.sketcher.query(s_test)
            dist, found = self.index.search(torch.cat([q, -q]), m)  # one call: both sides share the scan
        ids = mips_union(found[:nq], found[nq:], k)
        dots = torch.full((nq, k), float("nan"))
        buf = torch.full((n,), float("nan"))
        for row in range(nq):
            buf[found[row + nq]] = -dist[row + nq]
            buf[found[row]] = dist[row]
            dots[row] = buf[ids[row]]
        return dots, ids

    def _factored(self) -> bool:
        return (
            self.sketcher is not None
            and self.sketcher.method == "head"
            and self.head_grads is not None
            and self.features is not None
            and self.index.factory == "Flat"
        )

    def _head_search(self, s_test: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """Exact head search in factored form: ``g . s = g^T (S_W phi + s_b)``, chunked over the training set.

        Returns ``(values [2Q, m], ids [2Q, m])`` like ``index.search([q; -q], m)``.
        """
        if self.sketcher is None or self.features is None or self.head_grads is None:
            raise RuntimeError(
                "internal: the factored head search needs the sketcher, features and head gradients"
            )
        layer = self.sketcher.layer
        parts = self.sketcher.spec.unflatten(s_test.detach().float().cpu())
        s_w = parts[f"{layer}.weight"]  # [Q, C, d]
        s_b = parts[f"{layer}.bias"]  # [Q, C]
        nq, c, d = s_w.shape
        flat_w = s_w.reshape(nq * c, d).T.contiguous()
        best_v = torch.empty(2 * nq, 0)
        best_i = torch.empty(2 * nq, 0, dtype=torch.long)
        step = max(1024, (1 << 22) // max(1, nq * c))
        for at in range(0, self.features.shape[0], step):
            phi = torch.as_tensor(self.features[at : at + step]).float()
            g = torch.as_tensor(self.head_grads[at : at + step]).float()
            t = (phi @ flat_w).view(-1, nq, c) + s_b.unsqueeze(0)  # [n, Q, C]
            dots = (t * g.unsqueeze(1)).sum(-1).T  # [Q, n]
            vals = torch.cat([dots, -dots])
            ids = torch.arange(at, at + dots.shape[1]).expand(2 * nq, -1)
            vals, ids = torch.cat([best_v, vals], 1), torch.cat([best_i, ids], 1)
            best_v, sel = vals.topk(min(m, vals.shape[1]), dim=1)
            best_i = ids.gather(1, sel)
        return best_v, best_i


@dataclasses.dataclass
class BuiltGradientIndex(GradientIndex):
    sketches: Tensor | None = None
