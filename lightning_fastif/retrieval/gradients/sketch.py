"""Gradient sketches: the math of the gradient-space candidate index (pure torch).

A training example's sketch ``x`` and a query's projected s_test ``q`` are built so that ``x . q`` equals (exact
sketches) or estimates without bias (random projections) ``grad L(z) . s_test``, whose negative is the influence.
Three kinds:

- **head** (exact): for a cross-entropy ``Linear`` head, ``grad_[W|b] L(z) = g (x) [phi, 1]`` with
  ``g = softmax(logits) - onehot(y)``: ``C (d + 1)`` numbers from the features and logits, no backward pass.
- **dense**: a seeded Gaussian or Rademacher matrix ``R [D, P]`` scaled by ``1/sqrt(D)`` (so ``E[R^T R] = I``) applied
  to per-example gradients; its column blocks are generated on demand from ``(seed, block)``, so a projection of
  any P needs no ``[D, P]`` matrix held at once.
- **kronecker** (LoGra): for an ``nn.Linear``, ``grad_[W|b] L = sum_t g_t [a_t, 1]^T`` (``a`` its input, ``g`` the
  gradient of its output); with independent ``R_g [k_o, out]`` and ``R_a [k_i, in + 1]`` the sketch is
  ``sum_t (R_g g_t) (x) (R_a [a_t, 1])`` and the query side is ``R_g S R_a^T``: no per-example gradient is formed.
  A factor whose size is at most its sketch size is kept exact (identity).

Layouts follow ``ParamSpec``: a head sketch is ``[vec(g phi^T), g]`` (the weight row-major, then the bias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DenseProjection",
    "KroneckerProjection",
    "head_query",
    "head_sketch",
    "random_matrix",
]

KINDS = ("gaussian", "rademacher")


def random_matrix(rows: int, cols: int, seed: int, kind: str = "gaussian") -> Tensor:
    """A seeded ``[rows, cols]`` float32 matrix of iid N(0, 1) or +-1 entries (unscaled)."""
    if kind not in KINDS:
        raise ValueError(f"Expected `kind` to be one of {KINDS}, but got {kind!r}.")
    g = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=g)
    return torch.randint(0, 2, (rows, cols), generator=g).float().mul_(2.0).sub_(1.0)


def _seed(seed: int, *parts: int) -> int:
    """A seed derived from ``seed`` and integer ``parts`` (splitmix-style mixing, stable across runs)."""
    x = int(seed) & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        x = (x ^ (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & ((1 << 63) - 1)


# --- head (exact) -------------------------------------------------------------------------------------------------


def head_sketch(features: Tensor, logits: Tensor, labels: Tensor, bias: bool = True) -> Tensor:
    """Exact per-example gradients of cross-entropy w.r.t. a ``Linear`` head ``[W | b]``, from its inputs and outputs.

    Args:
        features: the head's inputs ``phi [n, d]``.
        logits: the head's outputs ``[n, C]``.
        labels: integer classes ``[n]``.
        bias: whether the head has a (selected) bias.

    Returns:
        ``[n, C*d (+ C)]``: ``vec(g phi^T)`` row-major, then ``g`` when ``bias``.

    Example:
        >>> head_sketch(torch.randn(5, 3), torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])).shape
        torch.Size([5, 8])
    """
    g = torch.softmax(logits.to(features.dtype), dim=-1)
    g[torch.arange(len(labels), device=g.device), labels.long()] -= 1.0
    w = (g.unsqueeze(2) * features.unsqueeze(1)).flatten(1)
    return torch.cat([w, g], 1) if bias else w


def head_query(s_weight: Tensor, s_bias: Tensor | None = None) -> Tensor:
    """The query vectors ``[Q, C*d (+ C)]`` matching :func:`head_sketch`, from s_test ``[Q, C, d]`` (and ``[Q, C]``)."""
    w = s_weight.flatten(1)
    return torch.cat([w, s_bias], 1) if s_bias is not None else w


# --- dense random projection --------------------------------------------------------------------------------------


class DenseProjection:
    """``x -> R x`` with a seeded ``R [dim, input_dim]`` (``N(0, 1/dim)`` or ``+-1/sqrt(dim)`` entries).

    ``E[(R x) . (R y)] = x . y``; the variance of the estimate falls as ``1/dim``. ``R`` is generated in column
    blocks of ``block`` inputs, each from a seed derived from ``(seed, block number)``, always by the CPU generator
    (so an index sketched on one device and queried on another sees the same matrix; device generators give other
    numbers for the same seed). The blocks are kept where they are used, converted once to that device and dtype,
    when the whole matrix fits the budget of that device (``cache_bytes`` on the CPU, ``device_cache_bytes`` on an
    accelerator); otherwise they are regenerated on every call.

    Args:
        input_dim: P, the length of the vectors projected.
        dim: D, the sketch dimension.
        seed: the projection's seed (same seed, same matrix).
        kind: ``"gaussian"`` or ``"rademacher"``.
        block: columns generated at once.
        cache_bytes: keep the generated blocks on the CPU when ``dim * input_dim`` elements take at most this.
        device_cache_bytes: the same on an accelerator (a GPU's memory: 2 GiB by default, P up to ~500k at D =
            1024 in float32).

    Example:
        >>> proj = DenseProjection(100, 16, seed=0)
        >>> proj(torch.randn(3, 100)).shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        input_dim: int,
        dim: int,
        seed: int = 0,
        kind: str = "gaussian",
        block: int = 8192,
        cache_bytes: int = 1 << 28,
        device_cache_bytes: int = 1 << 31,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"Expected `kind` to be one of {KINDS}, but got {kind!r}.")
        self.input_dim, self.dim, self.seed, self.kind = int(input_dim), int(dim), int(seed), kind
        self.block = int(block)
        self.cache_bytes, self.device_cache_bytes = int(cache_bytes), int(device_cache_bytes)
        self.cache = 4 * self.dim * self.input_dim <= self.cache_bytes  # float32 blocks on the CPU
        self._blocks: dict[tuple[int, str, torch.dtype], Tensor] = {}

    def _cacheable(self, device: torch.device, dtype: torch.dtype) -> bool:
        budget = self.cache_bytes if device.type == "cpu" else self.device_cache_bytes
        return self.dim * self.input_dim * torch.empty((), dtype=dtype).element_size() <= budget

    def _block(
        self, b: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Rows ``b*block .. (b+1)*block`` of ``R^T``: ``[cols, dim]``, scaled, on ``device`` in ``dtype``."""
        device = torch.device(device)
        key = (b, str(device), dtype)
        got = self._blocks.get(key)
        if got is not None:
            return got
        cols = min(self.block, self.input_dim - b * self.block)
        out = random_matrix(cols, self.dim, _seed(self.seed, b), self.kind).div_(math.sqrt(self.dim))
        out = out.to(device=device, dtype=dtype)
        if self._cacheable(device, dtype):
            self._blocks[key] = out
        return out

    def __call__(self, x: Tensor) -> Tensor:
        """``x [n, P] -> [n, D]`` (float32 or float64 as ``x``, on ``x``'s device)."""
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"Expected vectors of length {self.input_dim}, but got shape {tuple(x.shape)}.")
        out = x.new_zeros(x.shape[0], self.dim)
        for b in range(math.ceil(self.input_dim / self.block)):
            cols = slice(b * self.block, (b + 1) * self.block)
            out += x[:, cols] @ self._block(b, x.device, x.dtype)
        return out

    def matrix(self) -> Tensor:
        """The explicit ``R [dim, input_dim]`` (for tests and small problems)."""
        return torch.cat([self._block(b) for b in range(math.ceil(self.input_dim / self.block))]).T


# --- Kronecker-factored projection of one Linear layer (LoGra) ----------------------------------------------------


class KroneckerProjection:
    """Sketch of a ``Linear`` layer's per-example gradient from its input ``a`` and output gradient ``g``.

    ``grad_[W|b] L = sum_t g_t [a_t, 1]^T`` (``t`` over any sequence positions and over repeated calls). The sketch
    is ``sum_t (R_g g_t) (x) (R_a [a_t, 1])``, ``[k_out * k_in]``; the query side of ``S = [S_W | s_b]`` is
    ``vec(R_g S R_a^T)``. Each factor is the identity (exact) when its sketch size is not smaller than its input,
    else a seeded matrix scaled by ``1/sqrt(k)`` (``E[R^T R] = I``).

    Args:
        in_features, out_features: the layer's sizes.
        bias: whether the layer's bias is part of the selected parameters (appends 1 to ``a``).
        k_in, k_out: sketch sizes of the input and output factors.
        seed: seed of this layer's two matrices.
        kind: ``"gaussian"`` or ``"rademacher"``.

    Example:
        >>> proj = KroneckerProjection(8, 4, bias=True, k_in=5, k_out=4, seed=0)
        >>> proj.sketch(torch.randn(3, 8), torch.randn(3, 4)).shape
        torch.Size([3, 20])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        k_in: int,
        k_out: int,
        seed: int = 0,
        kind: str = "gaussian",
    ) -> None:
        self.in_dim = int(in_features) + (1 if bias else 0)
        self.out_dim = int(out_features)
        self.bias = bool(bias)
        self.k_in, self.k_out = min(int(k_in), self.in_dim), min(int(k_out), self.out_dim)
        self.r_in = self._factor(self.k_in, self.in_dim, _seed(seed, 1), kind)
        self.r_out = self._factor(self.k_out, self.out_dim, _seed(seed, 2), kind)
        self._copies: dict[tuple[int, str, torch.dtype], Tensor] = {}

    @staticmethod
    def _factor(k: int, n: int, seed: int, kind: str) -> Tensor | None:
        return None if k >= n else random_matrix(k, n, seed, kind).div_(math.sqrt(k))

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in

    def _on(self, r: Tensor, like: Tensor) -> Tensor:
        """``r`` on ``like``'s device and dtype, converted once per (matrix, device, dtype) and kept."""
        if r.device == like.device and r.dtype == like.dtype:
            return r
        key = (id(r), str(like.device), like.dtype)
        got = self._copies.get(key)
        if got is None:
            got = self._copies[key] = r.to(device=like.device, dtype=like.dtype)
        return got

    def _apply(self, r: Tensor | None, x: Tensor) -> Tensor:
        return x if r is None else x @ self._on(r, x).T

    def sketch(self, a: Tensor, g: Tensor) -> Tensor:
        """``a [n, (T,) in]`` and ``g [n, (T,) out]`` -> sketches ``[n, k_out * k_in]``."""
        if self.bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
        pa, pg = self._apply(self.r_in, a), self._apply(self.r_out, g)
        if pa.dim() == 2:
            return (pg.unsqueeze(2) * pa.unsqueeze(1)).flatten(1)
        return torch.einsum("n...o,n...i->noi", pg.flatten(1, -2), pa.flatten(1, -2)).flatten(1)

    def query(self, s_weight: Tensor, s_bias: Tensor | None = None) -> Tensor:
        """``S_W [Q, out, in]`` (and ``s_b [Q, out]`` when ``bias``) -> ``[Q, k_out * k_in]``."""
        s = torch.cat([s_weight, s_bias.unsqueeze(-1)], -1) if self.bias and s_bias is not None else s_weight
        if self.r_in is not None:
            s = s @ self._on(self.r_in, s).T
        if self.r_out is not None:
            s = self._on(self.r_out, s) @ s
        return s.flatten(1)


def kronecker_sizes(shapes: Sequence[tuple[int, int]], dim: int) -> list[tuple[int, int]]:
    """``(k_out, k_in)`` per layer ``(out, in)`` for a total sketch of at most ``dim`` numbers (at least 1 each).

    Every factor gets the same size ``r``, capped by the factor's own size (then exact); ``r`` is the largest for
    which the total ``sum(min(r, out) * min(r, in))`` stays within ``dim``, so the budget a small layer cannot
    use goes to the others.
    """

    def total(r: int) -> int:
        return sum(min(r, out) * min(r, inp) for out, inp in shapes)

    r = 1
    biggest = max((max(out, inp) for out, inp in shapes), default=1)
    while r < biggest and total(r + 1) <= dim:
        r += 1
    return [(min(r, out), min(r, inp)) for out, inp in shapes]
