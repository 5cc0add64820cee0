"""Exact influence at scale: our default (solver="auto") against kronfluence's EK-FAC and our EKFACSolver.

Model: MNIST MLP 784-128-10 with ReLU (P = 101,770, every parameter selected), trained with Adam (5 epochs, batch
128) on the first ``N`` MNIST training images of a seeded permutation (N = 60,000: all of them). Queries: the first
``Q`` test images, half of them misclassified. Every contender scores all N training examples for all Q queries.

Contenders, timed side by side in one process, one thread, each from scratch (no cache shared between them):

- ``ours default``: ``InfluenceModule(model, data, num_candidates=None)`` with its default ``AutoSolver()`` and
  ``damping="auto"`` as a user gets it, then ``im.influence((xq, yq))`` -> ``[Q, N]``; the time includes the
  choice, the damping estimate, the solve and the scoring. Its damping ``lambda`` is used by everyone else.
- ``kronfluence EK-FAC``: kronfluence 1.0.1 ``fit_all_factors(strategy="ekfac")`` then
  ``compute_pairwise_scores`` over all N (``damping_factor = lambda``); factors and scores go to a temporary
  folder, as kronfluence does.
- ``ours EKFACSolver``: ``EKFACSolver(damping=lambda)`` (fit + queries).

Reference: s_test in float64 on the SAME Gauss-Newton matrix and damping, with the product written out by hand
(``benchmarks/_reference.py``: ``HandMLP.ggn``) and solved by a float64 block CG written there apart from the
library's (``block_cg64``) until every query's relative residual is at most ``--ref-tol`` (default 1e-7),
re-checked by one more product; one reference per N for the largest Q (smaller Q take its first rows: the same
queries). The influence of every training example is then computed in float64 by hand. Reported per contender: seconds, Spearman (mean and min over queries), Pearson, top-10 overlap,
``converged`` and its measure. Ratios: kronfluence seconds / ours seconds (> 1: ours is faster).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kronfluence_vs_exact.py [--quick] [--cases 10000:32 ...]

``--quick``: N = 2,000 and Q = 8 (hidden width 128 still), for development.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
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
from _common import (
    train_adam as train,
)
from _reference import HandMLP, block_cg64
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf
from lightning_fastif.functional.solvers.spectrum import clear_spectrum_cache


def queries(model: nn.Module, xt: Tensor, yt: Tensor, q: int) -> tuple[Tensor, Tensor, int]:
    with torch.no_grad():
        pred = model(xt).argmax(1)
    wrong, right = (pred != yt).nonzero().flatten(), (pred == yt).nonzero().flatten()
    k = min(len(wrong), q // 2)
    idx = torch.cat([wrong[:k], right[: q - k]])
    return xt[idx], yt[idx], k


# ---------------------------------------------------------------------------------------------- contenders
def ours_default(model: nn.Module, ds: TensorDataset, xq: Tensor, yq: Tensor) -> dict[str, Any]:
    clear_spectrum_cache()  # from scratch: the spectrum of an earlier case is not reused
    start = time.perf_counter()
    im = lf.InfluenceModule(model, ds, num_candidates=None, progress=False, batch_size=1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = im.influence((xq, yq))
    seconds = time.perf_counter() - start
    d = im.solver.diagnostics
    return {
        "scores": scores.detach().double(),
        "seconds": seconds,
        "damping": im.solver.damping_used,
        "choice": im.solver.choice,
        "converged": bool(d.converged),
        "measure": f"{d.measure} {d.value:.2g} <= {d.tolerance:g}" if d.value is not None else d.measure,
        "iterations": d.iterations,
        "solve_seconds": d.seconds,
        "extra": {k: v for k, v in d.extra.items() if isinstance(v, (int, float, str, bool, list))},
        "warnings": sorted({str(w.message)[:200] for w in caught}),
        "sign": 1.0,
    }


def ours_ekfac(model: nn.Module, ds: TensorDataset, xq: Tensor, yq: Tensor, lam: float) -> dict[str, Any]:
    start = time.perf_counter()
    im = lf.InfluenceModule(
        model, ds, num_candidates=None, progress=False, batch_size=1000, solver=lf.EKFACSolver(damping=lam)
    )
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        scores = im.influence((xq, yq))
    d = im.solver.diagnostics
    return {
        "scores": scores.detach().double(),
        "seconds": time.perf_counter() - start,
        "converged": bool(d.converged),
        "measure": f"{d.measure} {d.value:.2g} <= {d.tolerance:g}" if d.value is not None else d.measure,
        "sign": 1.0,
    }


def ours_cg(
    model: nn.Module, ds: TensorDataset, xq: Tensor, yq: Tensor, lam: float, tol: float
) -> dict[str, Any]:
    """``CGSolver(lam, tol)`` on Gauss-Newton (block CG): what the tolerance costs and what it changes."""
    start = time.perf_counter()
    solver = lf.CGSolver(lam, max_iter=500, tol=tol, curvature="gauss_newton")
    im = lf.InfluenceModule(model, ds, num_candidates=None, progress=False, batch_size=1000, solver=solver)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        scores = im.influence((xq, yq))
    d = solver.diagnostics
    return {
        "scores": scores.detach().double(),
        "seconds": time.perf_counter() - start,
        "iterations": d.iterations,
        "converged": bool(d.converged),
        "measure": f"{d.measure} {d.value:.2g} <= {d.tolerance:g}",
        "relative_error_bound": d.extra.get("relative_error_bound"),
        "sign": 1.0,
    }


def kronfluence_ekfac(
    model: nn.Module, ds: TensorDataset, xq: Tensor, yq: Tensor, lam: float
) -> dict[str, Any]:
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    tmp = Path(tempfile.mkdtemp(prefix="kron_"))
    start = time.perf_counter()
    task = kronfluence_classification_task()
    kmodel = prepare_model(copy.deepcopy(model).eval(), task)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        analyzer = Analyzer(
            "bench", model=kmodel, task=task, cpu=True, disable_tqdm=True, output_dir=str(tmp),
            log_level=logging.WARNING,
        )  # fmt: skip
        torch.manual_seed(0)
        analyzer.fit_all_factors(
            "ekfac", dataset=ds, per_device_batch_size=256, factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )  # fmt: skip
        fit = time.perf_counter() - start
        analyzer.compute_pairwise_scores(
            "scores", factors_name="ekfac", query_dataset=TensorDataset(xq, yq), train_dataset=ds,
            per_device_query_batch_size=len(xq), per_device_train_batch_size=512,
            score_args=ScoreArguments(damping_factor=lam), overwrite_output_dir=True,
        )  # fmt: skip
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return {
        "scores": scores.detach().double(),
        "seconds": time.perf_counter() - start,
        "fit_seconds": fit,
        "converged": None,
        "measure": "none (approximate by design)",
        "sign": -1.0,  # kronfluence: positive = helpful
    }


# ---------------------------------------------------------------------------------------------- one N
def run_n(n: int, qs: list[int], args: argparse.Namespace, first_case: bool) -> list[dict[str, Any]]:
    x, y, xt, yt = load_mnist(None if n >= 60_000 else n, 2000)
    model = mlp([784, args.hidden, 10], "relu")
    t0 = time.perf_counter()
    acc = train(model, x, y, args.epochs)
    model.eval()
    print(f"[N={n}] trained in {time.perf_counter() - t0:.0f}s, train accuracy {acc:.3f}", flush=True)
    ds = TensorDataset(x, y)
    hand = HandMLP(model, x, y)
    xq_all, yq_all, wrong = queries(model, xt, yt, max(qs))
    out = []
    ref_all: Tensor | None = None
    ref_info: dict[str, Any] = {}
    for q in qs:
        # the same queries for every Q: the first q of the largest set (half misclassified when q = max(qs))
        xq, yq = xq_all[:q], yq_all[:q]
        rows: dict[str, dict[str, Any]] = {}
        rows["ours default"] = ours_default(model, ds, xq, yq)
        lam = float(rows["ours default"]["damping"])
        print(f"[N={n}, Q={q}] ours default: {rows['ours default']['seconds']:.1f}s; {rows['ours default']['choice']}",
              flush=True)  # fmt: skip
        for name, fn in (("kronfluence EK-FAC", kronfluence_ekfac), ("ours EKFACSolver", ours_ekfac)):
            try:
                rows[name] = fn(model, ds, xq, yq, lam)
                print(f"[N={n}, Q={q}] {name}: {rows[name]['seconds']:.1f}s", flush=True)
            except Exception as err:  # a peer that fails is recorded, not fatal
                rows[name] = {
                    "error": f"{type(err).__name__}: {err}",
                    "trace": traceback.format_exc()[-2000:],
                }
                print(f"[N={n}, Q={q}] {name} failed: {err}", flush=True)
        for tol in args.tol_sweep if first_case and q == qs[0] else []:
            rows[f"ours CG tol {tol:g}"] = ours_cg(model, ds, xq, yq, lam, tol)
            print(f"[N={n}, Q={q}] CG tol {tol:g}: {rows[f'ours CG tol {tol:g}']['seconds']:.1f}s, "
                  f"{rows[f'ours CG tol {tol:g}']['iterations']} iterations", flush=True)  # fmt: skip
        if ref_all is not None and abs(ref_info["damping"] - lam) > 1e-9 * lam:
            ref_all = None  # another damping: another reference
        if (
            ref_all is None
        ):  # one reference for the largest Q; smaller Q use its first rows (the same queries)
            start = time.perf_counter()
            v64 = hand.query_grads(xq_all, yq_all)
            ref_all, ref_info = block_cg64(hand.ggn, v64, lam, tol=args.ref_tol)
            ref_info["seconds"] = time.perf_counter() - start
            ref_info["queries"], ref_info["damping"] = len(xq_all), lam
            ref_info["what"] = (
                f"float64 block CG (benchmarks/_reference.py) on the hand-written Gauss-Newton product at damping "
                f"{lam:.4g}, every query's relative residual <= {args.ref_tol:g}, re-checked by one more product"
            )
            print(f"[N={n}] reference: {ref_info}", flush=True)
        ref = ref_all[:q]
        inf_ref = hand.influence(ref)
        for r in rows.values():
            if "scores" not in r:
                continue
            s = r.pop("scores") * r["sign"]
            r["agreement"] = mean_agreement([agreement(a, b) for a, b in zip(s, inf_ref)])
            # the largest score error relative to the largest |reference score| of that query
            err = (s - inf_ref).abs().amax(1) / inf_ref.abs().amax(1)
            r["agreement"]["max_score_error"] = float(err.max())
        ours_s = rows["ours default"]["seconds"]
        for r in rows.values():
            if "seconds" in r:
                r["seconds_over_ours"] = r["seconds"] / ours_s
        out.append(
            {
                "n_train": n,
                "queries": q,
                "misclassified_queries": min(wrong, q),
                "params": hand.numel,
                "train_accuracy": acc,
                "damping": lam,
                "reference": dict(ref_info),
                "contenders": rows,
            }
        )
    return out


def table(results: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for case in results:
        for name, r in case["contenders"].items():
            a = r.get("agreement", {})
            rows.append(
                [
                    f"{case['n_train'] // 1000}k, {case['queries']}",
                    name,
                    r.get("seconds", float("nan")),
                    r.get("seconds_over_ours", float("nan")),
                    a.get("spearman", float("nan")),
                    a.get("spearman_min", float("nan")),
                    a.get("topk", float("nan")),
                    a.get("max_score_error", float("nan")),
                    f"{r.get('converged')} ({r.get('measure', r.get('error', ''))})",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--cases", nargs="+", default=None, help="N:Q pairs, e.g. 10000:32 10000:128 60000:32"
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ref-tol", type=float, default=1e-7)
    parser.add_argument(
        "--tol-sweep",
        nargs="*",
        type=float,
        default=[],
        help="also run CGSolver on Gauss-Newton at these tolerances (what the tolerance changes)",
    )
    parser.add_argument("--name", default=None, help="JSON file name under benchmarks/results/")
    args = parser.parse_args()
    cases = args.cases or (["2000:8"] if args.quick else ["10000:32", "10000:128", "60000:32"])
    by_n: dict[int, list[int]] = {}
    for c in cases:
        n, q = (int(t) for t in c.split(":"))
        by_n.setdefault(n, []).append(q)
    threads = set_threads()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # warm-up: first-call costs (imports, torch.func, kronfluence's set-up) on a tiny problem, timed for no one
    xw, yw, xtw, ytw = load_mnist(256, 4)
    warm = mlp([784, args.hidden, 10], "relu").eval()
    with contextlib.redirect_stdout(io.StringIO()):
        ours_default(warm, TensorDataset(xw, yw), xtw[:2], ytw[:2])
        kronfluence_ekfac(warm, TensorDataset(xw, yw), xtw[:2], ytw[:2], 0.1)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for i, (n, qs) in enumerate(by_n.items()):
        results += run_n(n, sorted(qs), args, first_case=i == 0)
    headers = ["N, Q", "contender", "seconds", "x ours", "Spearman", "min Spearman", "top-10", "max score err",
               "converged"]  # fmt: skip
    print_table(
        "MNIST MLP 784-128-10 (ReLU, all 101,770 parameters), one thread; Spearman vs a float64 reference on the "
        "same Gauss-Newton matrix and damping",
        headers,
        table(results),
    )
    payload = {
        "machine": machine_info(),
        "threads": threads,
        "args": vars(args),
        "results": results,
        "seconds": time.perf_counter() - start,
    }
    path = save_json(args.name or ("kronfluence_vs_exact" + ("-quick" if args.quick else "")), payload)
    print(f"\nwrote {path} ({payload['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
