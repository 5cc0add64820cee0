"""s_test settings: FastIF's original and fast LiSSA settings against an exact (or CG) solution, and amortised Exact.

FastIF (Guo et al. 2021) computes s_test = (H + lambda I)^-1 grad L(z_test) by LiSSA with the "original" setting
(batch 128, depth 1000, 1 repeat) or the "fast" one (batch 1, depth 1000, 4 repeats) and reports that the fast one
halves the time at Pearson 0.999 / Spearman 0.998 of the influence values. This script checks that claim on two
models where the exact answer is at hand, in one run:

- ``digits``: a tanh MLP 64-32-10 (P = 2,410) on scikit-learn's digits (1,437 training images); reference: the
  ``ExactSolver`` (dense Hessian, Cholesky);
- ``mnist10k``: a tanh MLP 784-32-10 (P = 25,450) on a 10,000-image MNIST subset; reference: ``CGSolver`` (tol 1e-4)
  (the dense Hessian would need 7.2 GiB).

Both are trained to a stationary point (Adam then full-batch L-BFGS, weight decay 1e-3); damping lambda = 1e-2. The
LiSSA ``scale`` is set above the Hessian's top eigenvalue, estimated by power iteration with ``curvature.hvp`` (and on
single-example Hessians, which batch-1 LiSSA sees). For several test queries, it reports the time of one query's
s_test with each setting and the agreement (Spearman, Pearson, top-10 overlap) of the influence values over the whole
training set with the reference, and fast against original. It also times the ``ExactSolver`` amortised over 100
queries (one-time Hessian and factorisation included), and the cost of one HVP (the unit of LiSSA) by the library's
``batch_hvp``, double backward against forward-over-reverse. LiSSA's own diagnostics (``converged``, last-step
change) are recorded beside each setting's true error against the reference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stest_settings.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from _common import (
    agreement,
    load_digits_split,
    load_mnist,
    machine_info,
    mean_agreement,
    mlp,
    print_table,
    save_json,
    set_threads,
    time_interleaved,
    train_lbfgs,
)
from torch.utils.data import TensorDataset

from lightning_fastif import CGSolver, ExactSolver, LiSSASolver
from lightning_fastif.errors import SolverDivergenceError
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.grads import per_example_grads
from lightning_fastif.functional.hvp import batch_hvp
from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, select_params
from lightning_fastif.functional.scores import grad_scores

DAMPING = 1e-2
WEIGHT_DECAY = 1e-3
SETTINGS = {"original": {"batch_size": 128, "depth": 1000, "repeats": 1}, "fast": {"batch_size": 1, "depth": 1000, "repeats": 4}}  # fmt: skip


def build(name: str) -> dict[str, Any]:
    """Train the problem's model and return everything the solvers need."""
    if name == "digits":
        xtr, ytr, xte, yte = load_digits_split(seed=0)
        model = mlp([64, 32, 10], "tanh", seed=0)
    else:
        xtr, ytr, xte, yte = load_mnist(n_train=10_000, n_test=200, seed=0)
        model = mlp([784, 32, 10], "tanh", seed=0)
    start = time.perf_counter()
    info = train_lbfgs(model, xtr, ytr, WEIGHT_DECAY)
    info["seconds"] = time.perf_counter() - start
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    params = select_params(model)
    spec = ParamSpec.of(params)
    theta = spec.flatten(params).detach()
    loss = PerExampleLoss(model)
    ds = TensorDataset(xtr, ytr)
    curv = TrainingCurvature(loss, theta, spec, ds, batch_size=2048)
    return {"name": name, "model": model, "params": params, "spec": spec, "theta": theta, "loss": loss, "ds": ds,
            "curv": curv, "x_test": xte, "y_test": yte, "train": info}  # fmt: skip


def top_eigenvalue(matvec: Any, p: int, iters: int, seed: int = 0) -> float:
    """Largest eigenvalue (by magnitude) by power iteration, Rayleigh quotient of the last iterate."""
    v = torch.randn(1, p, generator=torch.Generator().manual_seed(seed))
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        hv = matvec(v)
        lam = float((hv * v).sum())
        v = hv / hv.norm().clamp_min(1e-30)
    return lam


def hvp_costs(prob: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
    """ms per HVP at batch 1 and 128: the library's ``batch_hvp`` as LiSSA calls it (``method="auto"``), and each
    of its two exact methods, double backward and forward-over-reverse (``jvp(grad)``)."""
    curv, gen = prob["curv"], torch.Generator().manual_seed(1)
    loss, theta, spec = prob["loss"], prob["theta"], prob["spec"]
    v = torch.randn(1, spec.numel, generator=gen)
    out = []
    for b in (1, 128):
        batch = curv.random_batch(gen, b)
        fns = {
            "auto": lambda batch=batch: curv.batch_hvp(batch, v),
            "double_backward": lambda batch=batch: batch_hvp(
                loss, theta, spec, batch, v, method="double_backward"
            ),
            "forward_over_reverse": lambda batch=batch: batch_hvp(
                loss, theta, spec, batch, v, method="forward_over_reverse"
            ),
        }
        ref = fns["double_backward"]()
        err = float((fns["forward_over_reverse"]() - ref).norm() / ref.norm().clamp_min(1e-30))
        t = time_interleaved(fns, repeats, warmup=3)
        out.append({"batch_size": b, "rel_error_fwd_rev_vs_double_backward": err} | {
            f"{k}_ms": 1e3 * t[k]["median_s"] for k in fns
        })  # fmt: skip
    return out


def choose_scales(prob: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Top eigenvalues by power iteration: of H (full data), of batch-128 Hessians and of single-example Hessians
    (samples); each LiSSA setting gets twice the top eigenvalue of the batches it draws."""
    curv, p = prob["curv"], prob["spec"].numel
    start = time.perf_counter()
    lam_full = top_eigenvalue(curv.hvp, p, 15 if quick else 30)
    gen = torch.Generator().manual_seed(2)
    sampled = {}
    for size, count in ((128, 4 if quick else 8), (1, 16 if quick else 64)):
        tops = []
        for _ in range(count):
            b = curv.random_batch(gen, size)
            tops.append(top_eigenvalue(lambda v, b=b: curv.batch_hvp(b, v), p, 15))
        sampled[size] = (max(tops), count)
    return {
        "lambda_max_full": lam_full,
        "lambda_max_batch128_sampled": sampled[128][0],
        "batch128_sampled": sampled[128][1],
        "lambda_max_single_example_sampled": sampled[1][0],
        "single_examples_sampled": sampled[1][1],
        "scale_original": 2.0 * max(lam_full, sampled[128][0]),
        "scale_fast": 2.0 * max(lam_full, sampled[1][0], sampled[128][0]),
        "seconds": time.perf_counter() - start,
    }


def lissa_solver(setting: str, scale: float, depth: int) -> LiSSASolver:
    cfg = dict(SETTINGS[setting], depth=depth)
    return LiSSASolver(damping=DAMPING, scale=scale, seed=0, **cfg)


def diag_dict(solver: Any) -> dict[str, Any]:
    d = solver.diagnostics
    return {"converged": d.converged, "residual_norm": d.residual_norm, "estimate_norm": d.estimate_norm}


def solve_lissa(
    curv: TrainingCurvature, setting: str, scale: float, depth: int, g: torch.Tensor, log: list
) -> tuple:
    """Solve with ``setting``; on divergence double ``scale`` (up to 3 times).

    Returns (s_test, scale, seconds, the solver's diagnostics as a dict)."""
    for _ in range(4):
        try:
            start = time.perf_counter()
            solver = lissa_solver(setting, scale, depth)
            out = solver.solve(curv, g)
            return out, scale, time.perf_counter() - start, diag_dict(solver)
        except SolverDivergenceError as err:
            print(f"  {setting} diverged at scale {scale:.3g}; doubling it", flush=True)
            log.append({"setting": setting, "scale": scale, "error": str(err)})
            scale *= 2.0
    raise SystemExit(f"LiSSA ({setting}) kept diverging up to scale {scale:.3g}")


def scores_over_train(prob: dict[str, Any], s: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Influence ``[Q, N]`` of every training example for the s_test rows ``s [Q, P]`` (per-example grads)."""
    x, y = prob["ds"].tensors
    parts = [
        grad_scores(prob["loss"], prob["theta"], prob["spec"], (x[i : i + chunk], y[i : i + chunk]), s)
        for i in range(0, len(x), chunk)
    ]
    return torch.cat(parts).T


def run_problem(name: str, quick: bool, n_queries: int, depth: int, repeats: int) -> dict[str, Any]:
    print(f"\n=== {name}: training ...", flush=True)
    prob = build(name)
    curv, spec = prob["curv"], prob["spec"]
    res: dict[str, Any] = {"problem": name, "num_params": spec.numel, "num_train": len(prob["ds"]),
                           "train": prob["train"], "damping": DAMPING, "weight_decay": WEIGHT_DECAY}  # fmt: skip
    print(
        f"P = {spec.numel:,}, N = {len(prob['ds']):,}, train acc {prob['train']['train_accuracy']:.4f}, "
        f"|grad| {prob['train']['grad_norm']:.1e} ({prob['train']['seconds']:.0f} s)",
        flush=True,
    )
    res["hvp_cost"] = hvp_costs(prob, repeats=20 if quick else 50)
    sc = choose_scales(prob, quick)
    res["scale_choice"] = sc
    print(
        f"top eigenvalue: H {sc['lambda_max_full']:.3g}, batch-128 Hessians (max of {sc['batch128_sampled']}) "
        f"{sc['lambda_max_batch128_sampled']:.3g}, single examples (max of {sc['single_examples_sampled']}) "
        f"{sc['lambda_max_single_example_sampled']:.3g} -> scale {sc['scale_original']:.3g} (original), "
        f"{sc['scale_fast']:.3g} (fast)",
        flush=True,
    )

    xq, yq = prob["x_test"][:n_queries], prob["y_test"][:n_queries]
    gq = per_example_grads(prob["loss"], prob["theta"], spec, (xq, yq))

    # reference solution for every query at once
    start = time.perf_counter()
    if name == "digits":
        ref_solver: Any = ExactSolver(DAMPING)
    else:
        ref_solver = CGSolver(DAMPING, max_iter=300, tol=1e-4)
    s_ref = ref_solver.solve(curv, gq)
    ref_seconds = time.perf_counter() - start
    res["reference"] = {"solver": repr(ref_solver), "seconds_all_queries": ref_seconds,
                        "diagnostics": vars(ref_solver.diagnostics)}  # fmt: skip
    print(f"reference {ref_solver!r}: {ref_seconds:.1f} s for {n_queries} queries", flush=True)

    # LiSSA for every query at once (rows equal one-query solves: the batches depend on the seed only).
    # "original" uses the scale its batch-128 Hessians need; "fast" the larger one batch-1 Hessians need;
    # "original_at_fast_scale" is the paper's protocol (one damp/scale for both settings).
    log: list = []
    s_fast, scale_fast, t_fast, d_fast = solve_lissa(curv, "fast", sc["scale_fast"], depth, gq, log)
    s_orig, scale_orig, t_orig, d_orig = solve_lissa(curv, "original", sc["scale_original"], depth, gq, log)
    s_orig_f, _, t_orig_f, d_orig_f = solve_lissa(curv, "original", scale_fast, depth, gq, log)
    diags = {"original": d_orig, "original_at_fast_scale": d_orig_f, "fast": d_fast}
    s_lissa = {"original": s_orig, "original_at_fast_scale": s_orig_f, "fast": s_fast}
    scales = {"original": scale_orig, "original_at_fast_scale": scale_fast, "fast": scale_fast}
    for key, sec in (("original", t_orig), ("original_at_fast_scale", t_orig_f), ("fast", t_fast)):
        print(f"LiSSA {key} (scale {scales[key]:.3g}): {sec:.1f} s for {n_queries} queries", flush=True)
    # does batch-1 LiSSA survive the scale that batch-128 needs? (one try, no retry)
    try:
        solver = lissa_solver("fast", scale_orig, depth)
        s_lissa["fast_at_original_scale"] = solver.solve(curv, gq)
        diags["fast_at_original_scale"] = diag_dict(solver)
        scales["fast_at_original_scale"] = scale_orig
        res["fast_at_original_scale"] = "converged (no divergence detected)"
    except SolverDivergenceError as err:
        res["fast_at_original_scale"] = f"diverged: {err}"
    print(f"LiSSA fast at the original's scale {scale_orig:.3g}: {res['fast_at_original_scale']}", flush=True)
    res["divergences"] = log
    res["scales"] = scales
    res["lissa_truncation_factor"] = {k: (1.0 - DAMPING / v) ** depth for k, v in scales.items()}
    res["depth_for_truncation_1e-2"] = {k: math.ceil(math.log(100) * v / DAMPING) for k, v in scales.items()}
    res["depth"] = depth

    # time one query's s_test with each setting, round-robin
    one = gq[:1]
    solvers = {
        "original": lissa_solver("original", scale_orig, depth),
        "fast": lissa_solver("fast", scale_fast, depth),
    }
    outs: dict[str, torch.Tensor] = {}

    def timed(setting: str) -> Any:
        def fn() -> None:
            outs[setting] = solvers[setting].solve(curv, one)

        return fn

    for setting in SETTINGS:  # warm-up: a short solve
        lissa_solver(setting, scales[setting], 5).solve(curv, one)
    t = time_interleaved({setting: timed(setting) for setting in SETTINGS}, repeats, warmup=0)
    same = {st: float((outs[st][0] - s_lissa[st][0]).norm() / s_lissa[st][0].norm()) for st in SETTINGS}
    if max(same.values()) > 1e-3:
        raise SystemExit(f"one-query LiSSA differs from the batched solve: {same}")
    res["one_query_seconds"] = {st: t[st]["median_s"] for st in SETTINGS}
    res["one_query_timings"] = t
    res["one_query_vs_batched_rel_error"] = same
    res["fast_over_original_time"] = t["fast"]["median_s"] / t["original"]["median_s"]
    res["fast_over_original_cpu_time"] = t["fast"]["cpu_median_s"] / t["original"]["cpu_median_s"]

    # agreement of influence values over the whole training set
    keys = list(s_lissa)
    scores = scores_over_train(prob, torch.cat([s_ref, *(s_lissa[k] for k in keys)]))
    sc_of = {k: scores[(i + 1) * n_queries : (i + 2) * n_queries] for i, k in enumerate(keys)}
    ref_sc = scores[:n_queries]

    def agree(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        return mean_agreement([agreement(a[q], b[q]) for q in range(n_queries)])

    res["agreement"] = {f"{k}_vs_reference": agree(sc_of[k], ref_sc) for k in keys}
    res["agreement"]["fast_vs_original_at_fast_scale"] = agree(sc_of["fast"], sc_of["original_at_fast_scale"])
    res["agreement"]["fast_vs_original"] = agree(sc_of["fast"], sc_of["original"])
    res["s_test_rel_error_vs_reference"] = {
        k: float(((v - s_ref).norm(dim=1) / s_ref.norm(dim=1)).mean()) for k, v in s_lissa.items()
    }
    res["s_test_norm_ratio_vs_reference"] = {
        k: float((v.norm(dim=1) / s_ref.norm(dim=1)).mean()) for k, v in s_lissa.items()
    }
    res["lissa_diagnostics"] = diags
    res["num_queries"] = n_queries
    return res | {"_prob": prob, "_gq": gq}


def exact_amortised(prob: dict[str, Any], n: int) -> dict[str, Any]:
    """ExactSolver over ``n`` queries one at a time (first includes Hessian + Cholesky), and all ``n`` at once."""
    xq, yq = prob["x_test"][:n], prob["y_test"][:n]
    gq = per_example_grads(prob["loss"], prob["theta"], prob["spec"], (xq, yq))
    solver = ExactSolver(DAMPING)
    times = []
    for i in range(n):
        start = time.perf_counter()
        solver.solve(prob["curv"], gq[i : i + 1])
        times.append(time.perf_counter() - start)
    batched = time_interleaved({"all": lambda: solver.solve(prob["curv"], gq)}, 3, warmup=1)["all"][
        "median_s"
    ]
    cg = CGSolver(DAMPING, max_iter=300, tol=1e-5)
    start = time.perf_counter()
    cg.solve(prob["curv"], gq[:1])
    cg_one = time.perf_counter() - start
    return {
        "queries": n,
        "first_query_s": times[0],
        "later_query_median_s": sorted(times[1:])[len(times[1:]) // 2] if n > 1 else None,
        "per_query_amortised_s": sum(times) / n,
        "all_at_once_cached_s": batched,
        "cg_one_query_s": cg_one,
        "cg_iterations": cg.diagnostics.iterations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="about 30 s: digits only, depth 200, fewer queries"
    )
    args = parser.parse_args()
    threads = set_threads()
    started = time.perf_counter()
    problems = ["digits"] if args.quick else ["digits", "mnist10k"]
    depth = 200 if args.quick else 1000
    repeats = 1 if args.quick else 3
    results = []
    for name in problems:
        results.append(
            run_problem(name, args.quick, n_queries=4 if args.quick else 8, depth=depth, repeats=repeats)
        )
    dig = results[0]
    amort = exact_amortised(dig["_prob"], 20 if args.quick else 100)
    dig["exact_amortised"] = amort
    for r in results:
        r.pop("_prob")
        r.pop("_gq")

    rows = []
    for r in results:
        for key in ("original", "original_at_fast_scale", "fast", "fast_at_original_scale"):
            if f"{key}_vs_reference" not in r["agreement"]:
                rows.append([r["problem"], key, r["scale_choice"]["scale_original"], None, "diverged", None, None,
                             None, None, None, None])  # fmt: skip
                continue
            a, dg = r["agreement"][f"{key}_vs_reference"], r["lissa_diagnostics"][key]
            rows.append([r["problem"], key, r["scales"][key], r["lissa_truncation_factor"][key], a["spearman"],
                         a["spearman_min"], a["pearson"], a["topk"], r["s_test_rel_error_vs_reference"][key],
                         r["s_test_norm_ratio_vs_reference"][key],
                         f"{'yes' if dg['converged'] else 'no'} ({dg['residual_norm']:.1e})"])  # fmt: skip
        for key in ("fast_vs_original_at_fast_scale", "fast_vs_original"):
            a = r["agreement"][key]
            rows.append([r["problem"], key.replace("_vs_", " vs "), None, None, a["spearman"], a["spearman_min"],
                         a["pearson"], a["topk"], None, None, None])  # fmt: skip
    print_table(
        f"LiSSA (depth {depth}) against the reference: influence over the whole training set, mean over queries",
        ["problem", "setting", "scale", "(1-lam/s)^depth", "spearman", "min", "pearson", "top-10", "|s-ref|/|ref|",
         "|s|/|ref|", "LiSSA says converged (last step)"],
        rows,
    )  # fmt: skip
    rows = [[r["problem"], r["one_query_seconds"]["original"], r["one_query_seconds"]["fast"],
             r["fast_over_original_time"], r["fast_over_original_cpu_time"]] for r in results]  # fmt: skip
    print_table(
        "time of one query's s_test (median of round-robin runs); paper: fast / original = 0.5",
        ["problem", "original s", "fast s", "fast/original", "same, CPU time"],
        rows,
    )
    rows = [[r["problem"], h["batch_size"], h["auto_ms"], h["double_backward_ms"], h["forward_over_reverse_ms"],
             h["forward_over_reverse_ms"] / h["double_backward_ms"], f"{h['rel_error_fwd_rev_vs_double_backward']:.1e}"]
            for r in results for h in r["hvp_cost"]]  # fmt: skip
    print_table(
        "one HVP (the unit of LiSSA), ms: library batch_hvp as LiSSA calls it (auto), double backward, jvp(grad)",
        ["problem", "batch", "auto", "double bwd", "fwd-over-rev", "fwd/dbl", "rel err"],
        rows,
    )
    lq = {st: dig["one_query_seconds"][st] for st in SETTINGS}
    rows = [
        ["exact, first query (Hessian + Cholesky)", amort["first_query_s"]],
        ["exact, later query (cached factor)", amort["later_query_median_s"]],
        [f"exact, amortised over {amort['queries']} queries", amort["per_query_amortised_s"]],
        [
            f"exact, {amort['queries']} queries in one call, per query",
            amort["all_at_once_cached_s"] / amort["queries"],
        ],
        [f"CG (tol 1e-5, {amort['cg_iterations']} iterations), one query", amort["cg_one_query_s"]],
        ["LiSSA original, one query", lq["original"]],
        ["LiSSA fast, one query", lq["fast"]],
    ]
    print_table("digits: seconds per query's s_test", ["solver", "s / query"], rows)

    verdicts = []
    for r in results:
        a = r["agreement"]["fast_vs_original_at_fast_scale"]
        verdicts.append(
            {"problem": r["problem"], "fast_over_original_time": r["fast_over_original_time"],
             "halves_time": r["fast_over_original_time"] <= 0.55, "fast_vs_original_spearman": a["spearman"],
             "fast_vs_original_pearson": a["pearson"], "spearman_0_998_holds": a["spearman"] >= 0.998}
        )  # fmt: skip
        print(
            f"{r['problem']}: fast/original time = {r['fast_over_original_time']:.2f}x (paper 0.5x), "
            f"fast vs original (same scale) Spearman {a['spearman']:.3f} / Pearson {a['pearson']:.3f} "
            "(paper 0.998 / 0.999)"
        )
    payload = {
        "benchmark": "stest_settings",
        "machine": machine_info(),
        "config": {
            "quick": args.quick,
            "depth": depth,
            "timing_repeats": repeats,
            "settings": SETTINGS,
            "damping": DAMPING,
            "weight_decay": WEIGHT_DECAY,
            "lissa_seed": 0,
            "dtype": "float32",
            "torch_threads": threads,
        },
        "problems": results,
        "verdicts": verdicts,
        "wall_s": time.perf_counter() - started,
    }
    path = save_json("stest_settings" + ("-quick" if args.quick else ""), payload)
    print(f"\nsaved {path.relative_to(path.parents[2])} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
