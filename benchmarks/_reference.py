"""Float64 references for the solver benchmarks, written from the formulas and independent of the library's math.

- :class:`HandMLP`: a 2-layer MLP ``W2 act(W1 x + b1) + b2`` (ReLU or tanh) in float64 with
  the Gauss-Newton product ``J^T (diag(p) - p p^T) J v`` written out by hand (the same derivation as
  ``benchmarks/solvers.py``'s ``HandGGN``), the Hessian product by plain autograd double backward (no torch.func, no
  library code), and the influence ``-grad L(z_i) . s`` of every training example without per-example gradients.
- :func:`cg64`: conjugate gradient (optionally preconditioned) until ``||(C + lambda I) x - v|| / ||v|| <= tol``,
  re-checked afterwards with one more independent product.
- :func:`lanczos64`: extreme eigenvalues by Lanczos with full reorthogonalisation.

Parameter layout = the library's flat vector for ``nn.Sequential(Linear, act, Linear)``: W1, b1, W2, b2 (row-major).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HandMLP", "block_cg64", "cg64", "lanczos64"]


class HandMLP:
    """Float64 curvature products and influence of a trained ``nn.Sequential(Linear, ReLU|Tanh, Linear)``.

    Args:
        model: the trained model (read, never changed).
        x, y: the training inputs ``[N, D]`` and labels ``[N]``.
        chunk: examples per autograd pass of the Hessian product.
    """

    def __init__(self, model: nn.Sequential, x: Tensor, y: Tensor, chunk: int = 5000) -> None:
        lin1, act, lin2 = model[0], model[1], model[2]
        self.relu = isinstance(act, nn.ReLU)
        self.w1, self.b1 = lin1.weight.detach().double(), lin1.bias.detach().double()
        self.w2, self.b2 = lin2.weight.detach().double(), lin2.bias.detach().double()
        self.x, self.y, self.chunk = x.double(), y, chunk
        z1 = self.x @ self.w1.T + self.b1
        if self.relu:
            self.h, self.d1 = torch.relu(z1), (z1 > 0).double()
        else:
            self.h = torch.tanh(z1)
            self.d1 = 1 - self.h**2
        self.p = torch.softmax(self.h @ self.w2.T + self.b2, 1)
        self.hid, self.inp, self.out = self.w1.shape[0], self.w1.shape[1], self.w2.shape[0]
        self.numel = self.w1.numel() + self.b1.numel() + self.w2.numel() + self.b2.numel()

    def split(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q, h, d, o = v.shape[0], self.hid, self.inp, self.out
        a, b, c, e = torch.split(v, [h * d, h, o * h, o], 1)
        return a.reshape(q, h, d), b, c.reshape(q, o, h), e

    def ggn(self, v: Tensor) -> Tensor:
        """``G v`` of the mean training loss for ``v [Q, P]``: ``J^T (diag(p) - p p^T) J v`` by hand."""
        n, (v1, c1, v2, c2) = self.x.shape[0], self.split(v.double())
        q = v.shape[0]
        u = (self.x @ v1.reshape(q * self.hid, self.inp).T).reshape(n, q, self.hid) + c1
        dl = (
            torch.einsum("nh,qoh->nqo", self.h, v2)
            + torch.einsum("nqh,oh->nqo", self.d1[:, None, :] * u, self.w2)
            + c2
        )
        p = self.p[:, None, :]
        dz = p * dl - p * (p * dl).sum(-1, keepdim=True)
        gw2, gb2 = torch.einsum("nqo,nh->qoh", dz, self.h), dz.sum(0)
        du = (dz @ self.w2) * self.d1[:, None, :]
        gw1 = (du.reshape(n, q * self.hid).T @ self.x).reshape(q, self.hid, self.inp)
        return torch.cat([gw1.reshape(q, -1), du.sum(0), gw2.reshape(q, -1), gb2], 1) / n

    def _loss(self, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        w1, b1, w2, b2 = (t[0] for t in self.split(flat[None]))
        z1 = x @ w1.T + b1
        hid = torch.relu(z1) if self.relu else torch.tanh(z1)
        return F.cross_entropy(hid @ w2.T + b2, y, reduction="sum")

    def hessian(self, v: Tensor) -> Tensor:
        """``H v`` of the mean training loss for ``v [Q, P]`` by plain autograd double backward, in chunks."""
        theta = torch.cat([self.w1.reshape(-1), self.b1, self.w2.reshape(-1), self.b2]).requires_grad_(True)
        v = v.double()
        out = torch.zeros_like(v)
        for at in range(0, self.x.shape[0], self.chunk):
            xs, ys = self.x[at : at + self.chunk], self.y[at : at + self.chunk]
            (g,) = torch.autograd.grad(self._loss(theta, xs, ys), theta, create_graph=True)
            for i in range(v.shape[0]):
                (hv,) = torch.autograd.grad(g, theta, v[i], retain_graph=i + 1 < v.shape[0])
                out[i] += hv
        return out / self.x.shape[0]

    def influence(self, s: Tensor) -> Tensor:
        """``I [Q, N] = -grad L(z_i) . s_q`` for every training example, without per-example gradients."""
        s1, sb1, s2, sb2 = self.split(s.double())
        q, n = s.shape[0], self.x.shape[0]
        delta2 = self.p - F.one_hot(self.y, self.out).double()
        delta1 = (delta2 @ self.w2) * self.d1
        xs1 = (self.x @ s1.reshape(q * self.hid, self.inp).T).reshape(n, q, self.hid) + sb1
        hs2 = torch.einsum("nh,qoh->nqo", self.h, s2) + sb2
        return -((delta1[:, None, :] * xs1).sum(-1) + (delta2[:, None, :] * hs2).sum(-1)).T

    def query_grads(self, xq: Tensor, yq: Tensor) -> Tensor:
        """Per-example gradients ``[Q, P]`` of the query losses (float64, one backward each)."""
        theta = torch.cat([self.w1.reshape(-1), self.b1, self.w2.reshape(-1), self.b2]).requires_grad_(True)
        rows = [
            torch.autograd.grad(self._loss(theta, xq[i : i + 1].double(), yq[i : i + 1]), theta)[0]
            for i in range(len(xq))
        ]
        return torch.stack(rows)


def cg64(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    damping: float,
    tol: float = 1e-8,
    max_iter: int = 3000,
    precond: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """(Preconditioned) CG on ``(C + damping I) x = b`` for every row of ``b [Q, P]``, in float64.

    Returns:
        ``x`` and ``{"iterations", "relative_residual" (re-checked with one more product), "seconds"}``.

    Raises:
        RuntimeError: non-positive curvature (the damped system is indefinite) or no convergence in ``max_iter``.
    """
    b = b.double()
    start = time.perf_counter()

    def a(t: Tensor) -> Tensor:
        return matvec(t) + damping * t

    pre = precond or (lambda t: t)
    x = torch.zeros_like(b)
    r = b.clone()
    z = pre(r)
    p = z.clone()
    rz = (r * z).sum(1)
    bnorm = b.norm(dim=1)
    it = 0
    while it < max_iter:
        it += 1
        ap = a(p)
        pap = (p * ap).sum(1)
        active = r.norm(dim=1) > tol * bnorm
        if bool((pap[active] <= 0).any()):
            raise RuntimeError("cg64: non-positive curvature: the damped system is not positive definite")
        alpha = torch.where(active, rz / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rz))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        if bool((r.norm(dim=1) <= tol * bnorm).all()):
            break
        z = pre(r)
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz.clamp_min(1e-300))[:, None] * p
        rz = rz_new
    check = float(((a(x) - b).norm(dim=1) / bnorm).max())
    if check > 10 * tol:
        raise RuntimeError(f"cg64: relative residual {check:.3g} > {tol:g} after {it} iterations")
    return x, {"iterations": it, "relative_residual": check, "seconds": time.perf_counter() - start}


def lanczos64(
    matvec: Callable[[Tensor], Tensor], p: int, iters: int = 60, seed: int = 0
) -> tuple[float, float]:
    """``(lambda_min, lambda_max)`` estimates by Lanczos (full reorthogonalisation), float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(p, generator=g, dtype=torch.float64)
    basis, alphas, betas = [q / q.norm()], [], []
    for _ in range(iters):
        w = matvec(basis[-1][None])[0].double()
        alphas.append(float(w @ basis[-1]))
        stack = torch.stack(basis)
        w = w - stack.T @ (stack @ w)
        w = w - stack.T @ (stack @ w)
        beta = float(w.norm())
        if beta < 1e-12:
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    ev = torch.linalg.eigvalsh(t)
    return float(ev[0]), float(ev[-1])


def block_cg64(
    matvec: Callable[[Tensor], Tensor], b: Tensor, damping: float, tol: float = 1e-8, max_iter: int = 500
) -> tuple[Tensor, dict[str, Any]]:
    """Block conjugate gradient on ``(C + damping I) X = B`` for all rows of ``b [Q, P]`` at once, in float64.

    Written here apart from the library's (plain O'Leary recurrences with the search block re-orthonormalised by
    a thin SVD): the reference's trust comes from its residual, ``||(C + damping I) x_q - v_q|| / ||v_q|| <= tol``
    for every query, re-checked afterwards with one more independent product.

    Raises:
        RuntimeError: the damped system is not positive definite, or no convergence in ``max_iter``.
    """
    b = b.double()
    start = time.perf_counter()

    def a(t: Tensor) -> Tensor:
        return matvec(t) + damping * t

    def orth(z: Tensor) -> Tensor:
        u, s, _ = torch.linalg.svd(z.T, full_matrices=False)  # [P, k]
        return u[:, s > 1e-7 * s[0]].T

    x = torch.zeros_like(b)
    r = b.clone()
    bnorm = b.norm(dim=1)
    d = orth(r / r.norm(dim=1, keepdim=True))
    it = 0
    while it < max_iter:
        it += 1
        ad = a(d)
        m = d @ ad.T
        m = 0.5 * (m + m.T)
        if float(torch.linalg.eigvalsh(m)[0]) <= 0:
            raise RuntimeError(
                "block_cg64: non-positive curvature: the damped system is not positive definite"
            )
        alpha = torch.linalg.solve(m, d @ r.T)  # [k, Q]
        x = x + alpha.T @ d
        r = r - alpha.T @ ad
        if bool((r.norm(dim=1) <= tol * bnorm).all()):
            break
        beta = torch.linalg.solve(m, ad @ r.T)
        z = r - beta.T @ d
        d = orth(z / z.norm(dim=1, keepdim=True).clamp_min(1e-300))
    check = float(((a(x) - b).norm(dim=1) / bnorm).max())
    if check > 10 * tol:
        raise RuntimeError(f"block_cg64: relative residual {check:.3g} > {tol:g} after {it} iterations")
    return x, {"iterations": it, "relative_residual": check, "seconds": time.perf_counter() - start}
