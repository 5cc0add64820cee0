"""Solver accuracy on whole MNIST MLPs: the default (auto), CG on Gauss-Newton, self-tuned LiSSA, FastIF's LiSSA.

Models: MLPs 784-128-10 with ReLU and with tanh (P = 101,770, every parameter selected), trained with Adam (5 epochs,
batch 128) on the first ``--n-train`` MNIST training images (``--quick``: 2,000 images, 784-32-10, 4 queries).
Queries: the first half misclassified test images, the rest correctly classified ones.

What each contender is compared with: a float64 conjugate-gradient reference on the SAME curvature and damping,
run to a relative residual ``||(C + lambda I) x - v|| / ||v|| <= 1e-8`` (re-checked by one more product), with the
curvature product written by hand (Gauss-Newton) or by plain autograd (Hessian), see ``benchmarks/_reference.py``.
The influence of every training example, ``-grad L(z_i) . s_test``, is computed in float64 by hand from each
contender's s_test, so the comparison is about s_test alone.

Contenders, in one run:
- ``auto``: ``InfluenceModule``'s default ``AutoSolver()`` as a user gets it (damping "auto"); its choice and the
  damping it picked are recorded; that damping (lambda) is then used for every Gauss-Newton contender and reference;
- ``cg-gn``: ``CGSolver(lambda, tol=1e-6, max_iter=200, curvature="gauss_newton")`` (when auto chose exactly this
  solver, its row is auto's, not rerun);
- ``ekfac``: ``EKFACSolver(damping=lambda)`` (issue10-kfac's; true Fisher), one-time = the factor fit;
- ``lissa-auto``: ``LiSSASolver(lambda, scale="auto", depth="auto", batch_size=100, curvature="gauss_newton")``, and
  ``lissa-auto-x4`` with ``repeats=4`` (its chains' spread is then part of the convergence measure);
- ``fastif-original`` / ``fastif-fast``: ``LiSSASolver.fastif_original()`` / ``.fastif_fast()`` (damping 50, scale
  1e4, on the Hessian as in FastIF), compared with the float64 Hessian reference at damping 50 (their own system)
  AND with the Gauss-Newton reference at lambda (what the default answers).

Reported per contender: Spearman, Pearson, top-10 overlap (mean over queries; min Spearman), relative error of
s_test, the solver's own ``converged`` flag and convergence measure, the one-time cost and the time per query.
The machine is a shared 2-core box: times are indicative; the ratios are measured side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/solver_accuracy.py [--quick] [--n-train N] [--queries Q]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any

import torch
from _common import (
    agreement,
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
from _reference import HandMLP, cg64, lanczos64
from torch import Tensor
from torch.utils.data import TensorDataset

import lightning_fastif as lf


def problem(activation: str, n_train: int, hidden: int, n_queries: int, epochs: int) -> dict[str, Any]:
    x, y, xt, yt = load_mnist(n_train, 2000)
    model = mlp([784, hidden, 10], activation)
    acc = train(model, x, y, epochs)
    model.eval()
    with torch.no_grad():
        pred = model(xt).argmax(1)
    wrong, right = (pred != yt).nonzero().flatten(), (pred == yt).nonzero().flatten()
    k = min(len(wrong), n_queries // 2)
    idx = torch.cat([wrong[:k], right[: n_queries - k]])
    return {
        "model": model,
        "x": x,
        "y": y,
        "xq": xt[idx],
        "yq": yt[idx],
        "train_accuracy": acc,
        "test_accuracy": float((pred == yt).float().mean()),
        "misclassified_queries": k,
    }


def run_solver(im: lf.InfluenceModule, solver: Any, q: tuple[Tensor, Tensor]) -> dict[str, Any]:
    """One-time work (auto's choice and damping, LiSSA's tuning, EK-FAC's fit) is timed apart from the solve."""
    im.solver = solver
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        if isinstance(solver, lf.AutoSolver):
            solver.choose(im.curvature())
        elif isinstance(solver, lf.LiSSASolver):
            solver.tune(solver._on(im.curvature()))
        one_time = time.perf_counter() - start
        start = time.perf_counter()
        s = im.s_test(q)
        first = time.perf_counter() - start
        per_query = first / len(q[1])
        chosen = getattr(solver, "chosen", solver)
        if chosen is not None and chosen.name in ("ekfac", "kfac"):  # the first solve fitted the factors
            start = time.perf_counter()
            im.s_test(q)
            second = time.perf_counter() - start
            one_time += first - second
            per_query = second / len(q[1])
    d = solver.diagnostics
    measure = f"{d.measure} {d.value:.2g}" if d.value is not None else d.measure
    if "last_step_change" in d.extra:
        measure += f", last step {d.extra['last_step_change']:.2g}"
    if isinstance(d.extra.get("chain_spread"), float):
        measure += f", chain spread {d.extra['chain_spread']:.2g}"
    return {
        "s": s.detach().double(),
        "seconds_per_query": per_query,
        "one_time_seconds": one_time,
        "converged": bool(d.converged),
        "measure": d.measure,
        "value": d.value,
        "tolerance": d.tolerance,
        "measure_text": measure,
        "warnings": sorted({str(w.message)[:200] for w in caught if "converge" in str(w.message)}),
        "config": repr(solver),
        "choice": getattr(solver, "choice", None),
        "chosen": repr(getattr(solver, "chosen", None)),
        "damping": solver.damping_used,
        "curvature": d.extra.get("curvature"),
        "extra": {k: v for k, v in d.extra.items() if isinstance(v, (int, float, str, bool))},
    }


def compare(hand: HandMLP, s: Tensor, ref: Tensor) -> dict[str, float]:
    inf, inf_ref = hand.influence(s), hand.influence(ref)
    out = mean_agreement([agreement(a, b) for a, b in zip(inf, inf_ref)])
    out["s_test_rel_error"] = float(((s - ref).norm(dim=1) / ref.norm(dim=1)).max())
    return out


def run_model(activation: str, args: argparse.Namespace) -> dict[str, Any]:
    pb = problem(activation, args.n_train, args.hidden, args.queries, args.epochs)
    model, x, y = pb["model"], pb["x"], pb["y"]
    hand = HandMLP(model, x, y)
    ds = TensorDataset(x, y)
    q = (pb["xq"], pb["yq"])
    v64 = hand.query_grads(*q)
    im = lf.InfluenceModule(model, ds, num_candidates=None, progress=False, batch_size=1000)
    rows: dict[str, Any] = {}

    rows["auto"] = run_solver(im, lf.AutoSolver(), q)
    lam = float(rows["auto"]["damping"])
    print(f"[{activation}] auto chose: {rows['auto']['choice']}")
    start = time.perf_counter()
    ref_gn, ref_gn_info = cg64(hand.ggn, v64, lam)
    ref_gn_info["seconds"] = time.perf_counter() - start
    print(f"[{activation}] GN reference at damping {lam:.4g}: {ref_gn_info}")

    cg = lf.CGSolver(lam, max_iter=200, tol=1e-6, curvature="gauss_newton")
    chosen = rows["auto"]["chosen"]
    if chosen == repr(cg):  # auto chose exactly this solver: the same computation, not run twice
        rows["cg-gn"] = {
            **rows["auto"],
            "choice": None,
            "config": repr(cg),
            "note": "= auto's choice (not rerun)",
        }
    else:
        rows["cg-gn"] = run_solver(im, cg, q)
    rows["ekfac"] = run_solver(im, lf.EKFACSolver(damping=lam), q)
    rows["lissa-auto"] = run_solver(
        im, lf.LiSSASolver(lam, scale="auto", depth="auto", batch_size=100, curvature="gauss_newton"), q
    )
    rows["lissa-auto-x4"] = run_solver(
        im,
        lf.LiSSASolver(lam, scale="auto", depth="auto", batch_size=100, repeats=4, curvature="gauss_newton"),
        q,
    )
    for name in ("fastif-original", "fastif-fast"):
        preset = lf.LiSSASolver.fastif_original if name == "fastif-original" else lf.LiSSASolver.fastif_fast
        rows[name] = run_solver(im, preset(curvature="hessian"), q)
    ref_h50, ref_h50_info = cg64(hand.hessian, v64, 50.0)

    spectrum: dict[str, float] = {}
    if not args.quick:
        spectrum["gn_lambda_min"], spectrum["gn_lambda_max"] = lanczos64(hand.ggn, hand.numel, iters=40)
        spectrum["hessian_lambda_min"], spectrum["hessian_lambda_max"] = lanczos64(
            hand.hessian, hand.numel, 40
        )

    table = []
    for name, r in rows.items():
        r["vs_reference"] = compare(hand, r["s"], ref_h50 if name.startswith("fastif") else ref_gn)
        if name.startswith("fastif"):
            r["vs_default_answer"] = compare(hand, r["s"], ref_gn)
        a = r["vs_reference"]
        table.append(
            [
                name,
                r["curvature"],
                f"{r['damping']:.3g}",
                f"{a['spearman']:.4f}",
                f"{a['spearman_min']:.4f}",
                f"{a['pearson']:.4f}",
                f"{a['topk']:.2f}",
                f"{a['s_test_rel_error']:.2e}",
                f"{r['vs_default_answer']['spearman']:.4f}" if "vs_default_answer" in r else "",
                f"{r['converged']} ({r['measure_text']})",
                f"{r['one_time_seconds']:.1f}",
                f"{r['seconds_per_query']:.2f}",
            ]
        )
        r.pop("s")
    print_table(
        f"{activation} MLP 784-{args.hidden}-10, {args.n_train} images, {len(q[1])} queries "
        f"({pb['misclassified_queries']} misclassified); reference: float64 CG to 1e-8 on the same curvature",
        [
            "solver",
            "curvature",
            "damping",
            "Spearman",
            "min Spearman",
            "Pearson",
            "top-10",
            "s_test rel. err",
            "Spearman vs default's answer",
            "converged (measure)",
            "one-time s",
            "s / query",
        ],
        table,
    )
    return {
        "activation": activation,
        "params": hand.numel,
        "n_train": args.n_train,
        "train_accuracy": pb["train_accuracy"],
        "test_accuracy": pb["test_accuracy"],
        "damping": lam,
        "reference_gn": ref_gn_info,
        "reference_hessian_damping50": ref_h50_info,
        "spectrum": spectrum,
        "solvers": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=["relu", "tanh"])
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    args.n_train = args.n_train or (2000 if args.quick else 10_000)
    args.hidden = args.hidden or (32 if args.quick else 128)
    args.queries = args.queries or (4 if args.quick else 10)
    threads = set_threads()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    start = time.perf_counter()
    results = [run_model(a, args) for a in args.models]
    payload = {
        "machine": machine_info(),
        "threads": threads,
        "args": vars(args),
        "models": results,
        "seconds": time.perf_counter() - start,
        "note": "shared 2-core machine, loaded by other jobs: times are indicative, ratios side by side",
    }
    path = save_json("solver_accuracy" + ("-quick" if args.quick else ""), payload)
    print(f"\nwrote {path} ({payload['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
