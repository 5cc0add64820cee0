"""EK-FAC and K-FAC against the exact Gauss-Newton answer on whole MNIST MLPs, with kronfluence's EK-FAC beside them.

Models: MLPs 784-128-10 with ReLU and with tanh (P = 101,770, every parameter selected), trained with Adam on a
10,000-image MNIST subset (``--quick``: 2,000 images, 784-32-10). 10 test queries: the first 5 misclassified test
images and the first 5 correctly classified ones. Damping lambda = 1e-2 for everything (``--damping``).

Reference: s_test = (G + lambda I)^-1 grad L(z_test) with G the Gauss-Newton matrix (= the true Fisher for
cross-entropy) of the mean training loss, by float64 conjugate gradient on a hand-written GGN product for this MLP
(written from the formula J^T (diag(p) - p p^T) J, independent of the library's hooks and of its torch.func GGN),
run until the relative residual ||(G + lambda I)x - v|| / ||v|| <= 1e-8, re-checked with one more product (cached in
benchmarks/results/cache/ by weights, data, queries and damping: the first full run spends most of its time there;
``--no-cache`` recomputes it). Influence
of every training example, I_i = -grad L(z_i) . s_test, is also computed in float64 by hand (per-example
backpropagated vectors, no per-example gradient materialised) for every contender's s_test, so the comparison is
about s_test alone.

Contenders (one run, side by side):
- ``EKFACSolver`` and ``KFACSolver`` (true Fisher, labels sampled from the model; the model in float32), fitted once
  (the fit time is reported apart); time per query = one batched solve of the 10 queries / 10 (with the solvers'
  default convergence measure: the residual on one batch of 512);
- ``EKFACSolver(refine=5)`` and ``refine=10``: the same factors as preconditioner of 5 / 10 CG steps on the full
  Gauss-Newton system (each step one pass over the training set);
- ``CGSolver`` on the library's Gauss-Newton curvature (float32, ``tol`` 1e-4, at most 100 iterations): the time
  baseline of the ">= 10x faster per query than CG" target;
- kronfluence 1.0.1 EK-FAC (``pip install --no-deps``, see benchmarks/requirements.txt): ``fit_all_factors`` with
  ``strategy="ekfac"`` (true Fisher) and ``damping_factor = lambda``; its pairwise scores over the whole training set
  (kronfluence's sign is "positive = helpful": multiplied by -1). Its per-query time includes scoring all training
  examples, so ours is also reported with the library's jvp scoring of all training examples added.

``--diagnose`` adds EK-FAC with ``fisher="exact"`` (the expectation over labels, no sampling noise) and counts the steps
EK-FAC-preconditioned CG and plain CG need to reach tolerances 1e-2 and 1e-4 (slow: use with ``--quick``).
``--blockdiag`` adds what any per-layer curvature can reach at best: each layer's exact Gauss-Newton block, solved by
float64 CG (cross-layer terms dropped); slow, meant for ``--quick``.

For each: Spearman, Pearson and top-10 overlap (harmful and helpful) of the influence over all training examples
against the reference (mean over the 10 queries, and the minimum Spearman), the relative error of s_test, and the
solvers' own convergence measure next to the true error.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/solvers.py [--quick] [--models relu tanh]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    agreement,
    kronfluence_classification_task,
    load_mnist,
    machine_info,
    mean_agreement,
    mlp,
    print_table,
    save_json,
    set_threads,
)
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_fastif import CGSolver, EKFACSolver, KFACSolver
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.grads import per_example_grads
from lightning_fastif.functional.kfac.solve import preconditioned_cg, solve_kfac
from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, select_params
from lightning_fastif.functional.scores import jvp_scores
from lightning_fastif.functional.solvers.algorithms import conjugate_gradient

DAMPING = 1e-2
REF_TOL = 1e-8
CACHE = Path(__file__).resolve().parent / "results" / "cache"
N_QUERIES = 10


# ---------------------------------------------------------------------------------------------- the problem
def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int = 0) -> dict[str, float]:
    """Adam (lr 1e-3, batch 128) for a few epochs; returns train accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return {"train_accuracy": float((model(x).argmax(1) == y).float().mean())}


class HandGGN:
    """Float64 Gauss-Newton products, gradients and influence of a 2-layer MLP ``W2 act(W1 x + b1) + b2``.

    Written from the formulas (no hooks, no torch.func), so it is an independent reference for the library.
    Parameter layout = the library's flat vector: W1, b1, W2, b2 (row-major).
    """

    def __init__(self, model: nn.Sequential, x: Tensor, y: Tensor) -> None:
        lin1, act, lin2 = model[0], model[1], model[2]
        self.w1, self.b1 = lin1.weight.detach().double(), lin1.bias.detach().double()
        self.w2, self.b2 = lin2.weight.detach().double(), lin2.bias.detach().double()
        self.x, self.y = x.double(), y
        z1 = self.x @ self.w1.T + self.b1
        if isinstance(act, nn.ReLU):
            self.h, self.d1 = torch.relu(z1), (z1 > 0).double()
        else:
            self.h = torch.tanh(z1)
            self.d1 = 1 - self.h**2
        self.p = torch.softmax(self.h @ self.w2.T + self.b2, 1)
        self.hid, self.inp, self.out = self.w1.shape[0], self.w1.shape[1], self.w2.shape[0]

    def split(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q, h, d, o = v.shape[0], self.hid, self.inp, self.out
        sizes = [h * d, h, o * h, o]
        a, b, c, e = torch.split(v, sizes, 1)
        return a.reshape(q, h, d), b, c.reshape(q, o, h), e

    def matvec(self, v: Tensor) -> Tensor:
        """``G v`` (mean over the training set) for ``v [Q, P]``."""
        n, (v1, c1, v2, c2) = self.x.shape[0], self.split(v)
        q = v.shape[0]
        u = (self.x @ v1.reshape(q * self.hid, self.inp).T).reshape(n, q, self.hid) + c1
        dl = (
            torch.einsum("nh,qoh->nqo", self.h, v2)
            + torch.einsum("nqh,oh->nqo", self.d1[:, None, :] * u, self.w2)
            + c2
        )
        p = self.p[:, None, :]
        dz = p * dl - p * (p * dl).sum(-1, keepdim=True)  # (diag(p) - p p^T) J v
        gw2, gb2 = torch.einsum("nqo,nh->qoh", dz, self.h), dz.sum(0)
        du = (dz @ self.w2) * self.d1[:, None, :]
        gw1 = (du.reshape(n, q * self.hid).T @ self.x).reshape(q, self.hid, self.inp)
        return torch.cat([gw1.reshape(q, -1), du.sum(0), gw2.reshape(q, -1), gb2], 1) / n

    def influence(self, s: Tensor) -> Tensor:
        """``I [Q, N] = -grad L(z_i) . s_q`` for every training example, without per-example gradients."""
        s1, sb1, s2, sb2 = self.split(s.double())
        q, n = s.shape[0], self.x.shape[0]
        delta2 = self.p - F.one_hot(self.y, self.out).double()  # dL/dlogits [N, O]
        delta1 = (delta2 @ self.w2) * self.d1  # dL/dz1 [N, H]
        xs1 = (self.x @ s1.reshape(q * self.hid, self.inp).T).reshape(n, q, self.hid) + sb1  # S1 x + sb1
        hs2 = torch.einsum("nh,qoh->nqo", self.h, s2) + sb2
        return -((delta1[:, None, :] * xs1).sum(-1) + (delta2[:, None, :] * hs2).sum(-1)).T


def problem(activation: str, n_train: int, hidden: int, epochs: int) -> dict[str, Any]:
    x, y, xt, yt = load_mnist(n_train, 2000)
    model = mlp([784, hidden, 10], activation)
    info = train(model, x, y, epochs)
    model.eval()
    with torch.no_grad():
        wrong = (model(xt).argmax(1) != yt).nonzero().flatten()
        right = (model(xt).argmax(1) == yt).nonzero().flatten()
    idx = torch.cat([wrong[: N_QUERIES // 2], right[: N_QUERIES - min(len(wrong), N_QUERIES // 2)]])
    info["test_accuracy"] = float((model(xt).argmax(1) == yt).float().mean())
    return {"model": model, "x": x, "y": y, "xq": xt[idx], "yq": yt[idx], "info": info}


def query_grads(model: nn.Module, xq: Tensor, yq: Tensor) -> Tensor:
    loss = PerExampleLoss(model)
    params = select_params(model)
    spec = ParamSpec.of(params)
    return per_example_grads(loss, spec.flatten(params), spec, (xq, yq))


def reference(hand: HandGGN, v: Tensor, damping: float, cache: Path | None) -> tuple[Tensor, dict[str, Any]]:
    """Float64 CG on the hand-written GGN until the relative residual is <= 1e-8, re-checked by one more product.

    Cached in ``cache`` (keyed by the weights, data, queries and damping): the first run of the full benchmark
    spends most of its time here (about 150 CG iterations of ~3-4 s per model on this machine).
    """
    import hashlib

    b = v.double()
    h = hashlib.sha256()
    for t in (hand.w1, hand.b1, hand.w2, hand.b2, hand.x, b):
        h.update(t.contiguous().numpy().tobytes())
    h.update(f"{damping}:{REF_TOL}:{hand.y.sum().item()}".encode())
    path = None if cache is None else cache / f"reference-{h.hexdigest()[:16]}.pt"
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        x, info = saved["x"], dict(saved["info"], cached=True)
    else:
        start = time.perf_counter()
        x, diag = conjugate_gradient(hand.matvec, b, damping, max_iter=3000, tol=REF_TOL)
        info = {"iterations": diag.iterations, "seconds": time.perf_counter() - start, "cached": False}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"x": x, "info": info}, path)
    info["relative_residual"] = float(((hand.matvec(x) + damping * x - b).norm(dim=1) / b.norm(dim=1)).max())
    return x, info


def block_diagonal_solve(hand: HandGGN, v: Tensor, damping: float) -> Tensor:
    """``(blockdiag(G) + lambda I)^-1 v`` with one block per layer (weight and bias), by float64 CG to 1e-8."""
    sizes = [hand.hid * hand.inp + hand.hid, hand.out * hand.hid + hand.out]
    bounds = [0, sizes[0], sizes[0] + sizes[1]]

    def matvec(t: Tensor) -> Tensor:
        out = torch.zeros_like(t)
        for lo, hi in itertools.pairwise(bounds):
            part = torch.zeros_like(t)
            part[:, lo:hi] = t[:, lo:hi]
            out[:, lo:hi] = hand.matvec(part)[:, lo:hi]
        return out

    return conjugate_gradient(matvec, v.double(), damping, max_iter=3000, tol=REF_TOL)[0]


# ---------------------------------------------------------------------------------------------- contenders
def curvature(model: nn.Module, ds: TensorDataset, mode: str = "hessian") -> TrainingCurvature:
    loss = PerExampleLoss(model)
    params = select_params(model)
    spec = ParamSpec.of(params)
    return TrainingCurvature(loss, spec.flatten(params), spec, ds, batch_size=500, mode=mode)


def ours(
    solver_cls: type,
    pb: dict[str, Any],
    v: Tensor,
    damping: float,
    refine: int = 0,
    shared: dict | None = None,
) -> dict[str, Any]:
    """Fit (or reuse the fitted ``shared`` solver: the fit is done once per model), then time solves of the batch."""
    cur = curvature(pb["model"], TensorDataset(pb["x"], pb["y"]))
    key = solver_cls.__name__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if shared is not None and key in shared:
            solver, fit = shared[key]
        else:
            solver = solver_cls(damping=damping, residual="batch")
            start = time.perf_counter()
            solver.fit(cur)
            fit = time.perf_counter() - start
            if shared is not None:
                shared[key] = (solver, fit)
        solver.refine, solver.tol, solver.residual = refine, 1e-4, "batch"
        solves = []
        for _ in range(3 if not refine else 1):
            start = time.perf_counter()
            s = solver.solve(cur, v)
            solves.append(time.perf_counter() - start)
        d = solver.diagnostics
        solver.residual = "none"
        start = time.perf_counter()
        if not refine:
            solver.solve(cur, v)
        bare = time.perf_counter() - start
    start = time.perf_counter()
    scores = torch.cat(
        [jvp_scores(cur.loss, cur.theta, cur.spec, (pb["x"][i : i + 2000], pb["y"][i : i + 2000]), s)
         for i in range(0, len(pb["x"]), 2000)]
    ).T  # fmt: skip
    score_time = time.perf_counter() - start
    per_query = sorted(solves)[len(solves) // 2]
    return {
        "s_test": s,
        "fit_seconds": fit,
        "per_query_seconds": per_query / len(v),
        "per_query_seconds_without_measure": None if refine else bare / len(v),
        "per_query_seconds_with_scoring": (per_query + score_time) / len(v),
        "iterations": d.iterations,
        "measure": getattr(d, "measure", d.extra.get("measure")),
        "measure_value": getattr(d, "value", d.extra.get("value")),
        "converged": d.converged,
        "warnings": [str(w.message)[:160] for w in caught],
        "scores_library": scores,
    }


def ours_exact_fisher(pb: dict[str, Any], v: Tensor, damping: float) -> dict[str, Any]:
    """EK-FAC with ``fisher="exact"`` (no sampling noise): fit and one solve."""
    cur = curvature(pb["model"], TensorDataset(pb["x"], pb["y"]))
    solver = EKFACSolver(damping=damping, fisher="exact", residual="none")
    start = time.perf_counter()
    s = solver.solve(cur, v)
    return {"s_test": s, "fit_seconds": time.perf_counter() - start}


def cg_library(pb: dict[str, Any], v: Tensor, damping: float) -> dict[str, Any]:
    cur = curvature(pb["model"], TensorDataset(pb["x"], pb["y"]), mode="gauss_newton")
    solver = CGSolver(damping=damping, max_iter=100, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        s = solver.solve(cur, v)
        seconds = time.perf_counter() - start
    d = solver.diagnostics
    return {
        "s_test": s,
        "fit_seconds": 0.0,
        "per_query_seconds": seconds / len(v),
        "iterations": d.iterations,
        "measure": getattr(d, "measure", "relative_residual"),
        "measure_value": getattr(d, "value", d.residual_norm),
        "converged": d.converged,
    }


def kronfluence_ekfac(pb: dict[str, Any], damping: float, tmp: Path) -> dict[str, Any]:
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = kronfluence_classification_task()
    model = prepare_model(copy.deepcopy(pb["model"]), task)
    train_ds = TensorDataset(pb["x"], pb["y"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        analyzer = Analyzer(
            "bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=str(tmp / "kron"),
            log_level=logging.WARNING,
        )  # fmt: skip
        torch.manual_seed(0)
        start = time.perf_counter()
        analyzer.fit_all_factors(
            "ekfac", dataset=train_ds, per_device_batch_size=500, factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )  # fmt: skip
        fit = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores", factors_name="ekfac", query_dataset=TensorDataset(pb["xq"], pb["yq"]),
            train_dataset=train_ds, per_device_query_batch_size=len(pb["xq"]), per_device_train_batch_size=500,
            score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return {
        "scores": -scores.double(),
        "fit_seconds": fit,
        "per_query_seconds_with_scoring": seconds / len(pb["xq"]),
    }


# ---------------------------------------------------------------------------------------------- run
def run_model(activation: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pb = problem(activation, args.n_train, args.hidden, args.epochs)
    model = pb["model"]
    p = sum(t.numel() for t in model.parameters())
    print(
        f"\n== MLP 784-{args.hidden}-10 {activation}: P = {p:,}, N = {len(pb['x']):,}, {pb['info']}",
        flush=True,
    )
    v = query_grads(model, pb["xq"], pb["yq"])
    hand = HandGGN(model, pb["x"], pb["y"])
    results: dict[str, dict[str, Any]] = {}
    raw: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}
    contenders = {
        "EK-FAC (ours)": lambda: ours(EKFACSolver, pb, v, args.damping, shared=shared),
        "EK-FAC + 5 PCG steps (ours)": lambda: ours(EKFACSolver, pb, v, args.damping, 5, shared),
        "EK-FAC + 10 PCG steps (ours)": lambda: ours(EKFACSolver, pb, v, args.damping, 10, shared),
        "K-FAC (ours)": lambda: ours(KFACSolver, pb, v, args.damping),
        "CG-GGN (ours, tol 1e-4)": lambda: cg_library(pb, v, args.damping),
        "kronfluence EK-FAC": lambda: kronfluence_ekfac(pb, args.damping, tmp),
    }
    for name, fn in contenders.items():
        try:
            raw[name] = fn()
            print(f"{name}: done", flush=True)
        except Exception as err:  # a contender that fails is recorded and skipped
            results[name] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-2000:],
            }
            print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
    if (
        args.blockdiag
    ):  # what a per-layer (block-diagonal) curvature can reach at best: each layer's block exactly
        start = time.perf_counter()
        bd = block_diagonal_solve(hand, v, args.damping)
        raw["exact block-diagonal GGN (float64 CG)"] = {"s_test": bd, "fit_seconds": 0.0,
                                                         "per_query_seconds": (time.perf_counter() - start) / len(v)}  # fmt: skip
    if args.diagnose:
        diag_exact = ours_exact_fisher(pb, v, args.damping)
        raw["EK-FAC fisher='exact' (ours)"] = diag_exact
    ref, ref_info = reference(hand, v, args.damping, None if args.no_cache else CACHE)
    if args.diagnose:  # steps to a tolerance: EK-FAC-preconditioned CG against plain CG, float64, hand GGN
        fac = shared["EKFACSolver"][0].factors
        spec = curvature(model, TensorDataset(pb["x"][:1], pb["y"][:1])).spec

        def precond(r: Tensor) -> Tensor:
            return solve_kfac(fac, spec, r, args.damping, "ekfac")

        steps = {}
        for tol in (1e-2, 1e-4):
            _, it_p, _, _ = preconditioned_cg(hand.matvec, v.double(), precond, args.damping, 3000, tol)
            it_c = conjugate_gradient(hand.matvec, v.double(), args.damping, 3000, tol)[1].iterations
            steps[f"{tol:g}"] = {"pcg_ekfac (preconditioned residual)": it_p, "cg (residual)": it_c}
        out_steps = steps
        print(f"steps to a tolerance: {steps}", flush=True)
    print(f"reference (float64 CG on G): {ref_info}", flush=True)
    ref_scores = hand.influence(ref)
    out: dict[str, Any] = {"problem": {**pb["info"], "P": p, "N": len(pb["x"])}, "reference": ref_info}
    if args.diagnose:
        out["steps_to_tolerance"] = out_steps
    rows = []
    for name, res in raw.items():
        if "s_test" in res:
            s = res.pop("s_test").double()
            scores = hand.influence(s)
            res["s_test_rel_error"] = float(((s - ref).norm(dim=1) / ref.norm(dim=1)).max())
            res["true_relative_residual"] = float(
                ((hand.matvec(s) + args.damping * s - v.double()).norm(dim=1) / v.double().norm(dim=1)).max()
            )
        else:
            scores = res.pop("scores")
        lib = res.pop("scores_library", None)
        if lib is not None:  # the library's own jvp scoring of the same s_test, against the hand formula
            res["library_scoring_rel_error"] = float((lib.double() - scores).norm() / scores.norm())
        res["agreement"] = mean_agreement([agreement(scores[i], ref_scores[i]) for i in range(len(v))])
        results[name] = res
    cg_time = results.get("CG-GGN (ours, tol 1e-4)", {}).get("per_query_seconds")
    for name, res in results.items():
        if "error" in res:
            rows.append([name, "failed", "", "", "", "", "", "", res["error"][:60]])
            continue
        a = res["agreement"]
        per_q = res.get("per_query_seconds")
        if cg_time and per_q and not name.startswith("exact block"):
            res["speedup_vs_cg"] = cg_time / per_q
        rows.append([
            name, f"{a['spearman']:.3f}", f"{a['spearman_min']:.3f}", f"{a['pearson']:.3f}", f"{a['topk']:.2f}",
            f"{res['fit_seconds']:.2f}", "" if per_q is None else f"{per_q * 1e3:.1f}",
            f"{res.get('per_query_seconds_with_scoring', float('nan')) * 1e3:.0f}",
            "" if res.get("speedup_vs_cg") is None else f"{res['speedup_vs_cg']:.0f}x",
        ])  # fmt: skip
    print_table(
        f"784-{args.hidden}-10 {activation}, damping {args.damping:g}: agreement with float64 CG on Gauss-Newton",
        ["contender", "spearman", "min", "pearson", "top10", "fit s", "ms/query", "ms/q +scores", "vs CG"],
        rows,
    )
    for name, res in results.items():
        if "s_test_rel_error" in res:
            print(
                f"  {name}: s_test rel. error {res['s_test_rel_error']:.3f}, true rel. residual "
                f"{res['true_relative_residual']:.3f}, own measure {res.get('measure')} = "
                f"{res.get('measure_value')}, converged={res.get('converged')}"
            )
    out["contenders"] = results
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2,000 images, hidden 32, 2 epochs")
    parser.add_argument("--models", nargs="+", default=["relu", "tanh"], choices=["relu", "tanh"])
    parser.add_argument("--damping", type=float, default=DAMPING)
    parser.add_argument("--no-cache", action="store_true", help="recompute the float64 reference")
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="add EK-FAC with fisher='exact' and count PCG-EKFAC vs CG steps to tolerances 1e-2 / 1e-4",
    )
    parser.add_argument(
        "--blockdiag",
        action="store_true",
        help="add the exact block-diagonal Gauss-Newton (slow: use with --quick)",
    )
    args = parser.parse_args()
    threads = set_threads()
    args.n_train, args.hidden, args.epochs = (2000, 32, 2) if args.quick else (10_000, 128, 5)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {act: run_model(act, args, Path(tmp)) for act in args.models}
    payload = {
        "settings": {
            "damping": args.damping,
            "n_train": args.n_train,
            "hidden": args.hidden,
            "epochs": args.epochs,
            "queries": N_QUERIES,
            "reference_tol": REF_TOL,
            "threads": threads,
        },
        "runs": runs,
        "total_seconds": time.perf_counter() - start,
        "machine": machine_info(),
    }
    path = save_json("solvers_quick" if args.quick else "solvers", payload)
    print(f"\nsaved {path} ({payload['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
