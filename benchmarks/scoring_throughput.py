"""Scoring throughput: forward-mode (jvp) scoring against per-example gradients and a per-example backward loop.

On an MNIST-sized MLP (784-256-128-10, tanh by default), for candidate batches of 64, 256 and 1024 real MNIST
images, in one run:

(a) a plain forward pass of the per-example losses (no grad): the floor;
(b) ``jvp_scores`` (Q = 1): the library's scoring, one forward-mode pass;
(c) ``grad_scores``: per-example gradients by ``vmap(grad)`` (chunks of 64) times s_test;
(d) a per-example backward loop (``loss_i.backward()``, flatten the grads, dot with s_test), as FastIF's code and
    torch-influence do.

Ratios: jvp / forward (target <= 3x) and loop / jvp (target >= 20x at batch 256). A second table sweeps the number
of s_test vectors Q (1, 8, 32, 64, 128) at batch 256 for the jvp and grad paths, to check where ``score_batch``'s
"auto" rule (jvp up to 32 queries, grad beyond) should switch. Scores of (b), (c) and (d) are checked against each
other (relative error <= 1e-4) before anything is timed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scoring_throughput.py [--quick] [--activation relu]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from _common import load_mnist, machine_info, mlp, print_table, save_json, set_threads, time_interleaved
from torch.func import functional_call, jvp

from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, select_params
from lightning_fastif.functional.scores import JVP_BLOCK, grad_scores, jvp_scores


def loop_scores(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, s_test: torch.Tensor
) -> torch.Tensor:
    """Scores ``[B, Q]`` by one backward pass per example (FastIF / torch-influence style)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.empty(x.shape[0], s_test.shape[0], dtype=s_test.dtype)
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        out[i] = -(s_test @ g)
    model.zero_grad(set_to_none=True)
    return out


def bare_jvp_scores(
    model: torch.nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, s_test: torch.Tensor
):
    """Reference: plain ``torch.func.jvp`` over the parameter dict (no flat vector, no loss resolution), Q = 1."""
    tangents = ParamSpec.of(params).unflatten(s_test[0])

    def f(p: dict) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")

    return -jvp(f, (params,), (tangents,))[1][:, None]


def check_float64(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor
) -> dict[str, float]:
    """Relative errors of jvp, grad and bare-jvp scores against the loop, all in float64, on a copy of the model."""
    m64 = copy.deepcopy(model).double()
    p64 = select_params(m64)
    spec = ParamSpec.of(p64)
    theta, loss = spec.flatten(p64).detach(), PerExampleLoss(m64)
    x64, s64 = x.double(), s.double()
    with torch.no_grad():
        sj = jvp_scores(loss, theta, spec, (x64, y), s64)
        sg = grad_scores(loss, theta, spec, (x64, y), s64)
    sb = bare_jvp_scores(m64, p64, x64, y, s64) if s.shape[0] == 1 else sj
    sl = loop_scores(m64, x64, y, s64)
    return {
        "jvp_vs_loop": rel_err(sj, sl),
        "grad_vs_loop": rel_err(sg, sl),
        "bare_jvp_vs_loop": rel_err(sb, sl),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 30 s: fewer repeats, smaller sweep")
    parser.add_argument("--activation", default="tanh", choices=["tanh", "relu"])
    parser.add_argument("--hidden", default="256,128", help="hidden widths, comma-separated")
    args = parser.parse_args()
    threads = set_threads()
    started = time.perf_counter()

    sizes = [784, *(int(h) for h in args.hidden.split(",")), 10]
    model = mlp(sizes, args.activation, seed=0).eval()
    params = select_params(model)
    spec = ParamSpec.of(params)
    theta = spec.flatten(params).detach()
    loss = PerExampleLoss(model)
    x_all, y_all, _, _ = load_mnist(n_train=1024, seed=0)
    gen = torch.Generator().manual_seed(0)

    def direction(q: int) -> torch.Tensor:
        s = torch.randn(q, spec.numel, generator=gen)
        return s / s.norm(dim=1, keepdim=True)

    reps_fast, reps_slow = (10, 2) if args.quick else (50, 5)
    batch_sizes = [64, 256] if args.quick else [64, 256, 1024]
    print(
        f"model {'-'.join(map(str, sizes))} {args.activation}, P = {spec.numel:,}, torch threads = {threads}"
    )

    rows, results = [], []
    for b in batch_sizes:
        x, y = x_all[:b], y_all[:b]
        batch = (x, y)
        s1 = direction(1)
        # correctness first, in float64 (so that float32 rounding at ReLU kinks, where a batched GEMM and a
        # one-example GEMM can flip a unit's sign, does not mask or fake a disagreement); float32 errors recorded
        errs64 = check_float64(model, x, y, s1)
        if max(errs64.values()) > 1e-4:
            raise SystemExit(f"scores disagree at batch {b} (float64, relative): {errs64}")
        with torch.no_grad():
            sj = jvp_scores(loss, theta, spec, batch, s1)
            sg = grad_scores(loss, theta, spec, batch, s1)
        sl = loop_scores(model, x, y, s1)
        err_jl, err_gl = rel_err(sj, sl), rel_err(sg, sl)

        def fwd(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            with torch.no_grad():
                return F.cross_entropy(model(x), y, reduction="none")

        fast = time_interleaved(
            {
                "forward": fwd,
                "jvp": lambda batch=batch, s1=s1: jvp_scores(loss, theta, spec, batch, s1),
                "bare_jvp": lambda x=x, y=y, s1=s1: bare_jvp_scores(model, params, x, y, s1),
            },
            reps_fast,
            warmup=2,
        )
        slow = time_interleaved(
            {
                "grad": lambda batch=batch, s1=s1: grad_scores(loss, theta, spec, batch, s1),
                "loop": lambda x=x, y=y, s1=s1: loop_scores(model, x, y, s1),
                "jvp": lambda batch=batch, s1=s1: jvp_scores(loss, theta, spec, batch, s1),
            },
            reps_slow,
            warmup=1,
        )
        t_fwd, t_jvp, t_grad, t_loop = fast["forward"], fast["jvp"], slow["grad"], slow["loop"]
        t_bare = fast["bare_jvp"]
        ms = {
            k: 1e3 * t["median_s"]
            for k, t in (
                ("forward", t_fwd),
                ("jvp", t_jvp),
                ("grad", t_grad),
                ("loop", t_loop),
                ("bare_jvp", t_bare),
            )
        }
        jvp_slow_ms = 1e3 * slow["jvp"]["median_s"]  # jvp timed in the same rounds as grad and loop
        r = {
            "batch_size": b,
            "ms": ms,
            "timings": {
                "forward": t_fwd,
                "jvp": t_jvp,
                "grad": t_grad,
                "loop": t_loop,
                "jvp_with_slow": slow["jvp"],
            },
            "ratio_jvp_over_forward": ms["jvp"] / ms["forward"],
            "ratio_bare_jvp_over_forward": ms["bare_jvp"] / ms["forward"],
            "ratio_loop_over_jvp": ms["loop"] / jvp_slow_ms,
            "ratio_grad_over_jvp": ms["grad"] / jvp_slow_ms,
            # the same ratios on process CPU time (one thread: robust to other jobs on the shared cores)
            "cpu_ratio_jvp_over_forward": t_jvp["cpu_median_s"] / t_fwd["cpu_median_s"],
            "cpu_ratio_loop_over_jvp": t_loop["cpu_median_s"] / slow["jvp"]["cpu_median_s"],
            # and on the fastest run of each (least disturbed by other jobs)
            "min_ratio_jvp_over_forward": t_jvp["min_s"] / t_fwd["min_s"],
            "min_ratio_loop_over_jvp": t_loop["min_s"] / slow["jvp"]["min_s"],
            "examples_per_s_jvp": b / (ms["jvp"] / 1e3),
            "rel_error_float64": errs64,
            "rel_error_jvp_vs_loop_float32": err_jl,
            "rel_error_grad_vs_loop_float32": err_gl,
        }
        results.append(r)
        rows.append(
            [b, ms["forward"], ms["jvp"], ms["bare_jvp"], ms["grad"], ms["loop"], r["ratio_jvp_over_forward"],
             r["min_ratio_jvp_over_forward"], r["cpu_ratio_jvp_over_forward"], r["ratio_bare_jvp_over_forward"],
             r["ratio_loop_over_jvp"], r["min_ratio_loop_over_jvp"], r["cpu_ratio_loop_over_jvp"],
             r["ratio_grad_over_jvp"], f"{max(errs64.values()):.1e}", f"{err_jl:.1e}"]
        )  # fmt: skip
    print_table(
        "ms per candidate batch (median wall-clock), Q = 1; ratios of medians, of fastest runs (min) and of CPU time",
        ["batch", "forward", "jvp", "bare jvp", "grad(vmap)", "loop", "jvp/fwd", "min", "cpu", "bare/fwd",
         "loop/jvp", "min", "cpu", "grad/jvp", "err f64", "err f32"],
        rows,
    )  # fmt: skip

    # ---- queries sweep at batch 256: jvp (vmap over Q directions), per-example grads @ S^T, and the loop
    b = 256
    x, y = x_all[:b], y_all[:b]
    batch = (x, y)
    qs = [1, 8, 64] if args.quick else [1, 8, 32, 64, 128, 256]
    sweep, rows = [], []
    for q in qs:
        s = direction(q)
        errs64 = check_float64(model, x, y, s)
        if max(errs64.values()) > 1e-4:
            raise SystemExit(f"scores disagree at Q = {q} (float64, relative): {errs64}")
        err, err_loop = errs64["jvp_vs_loop"], errs64["grad_vs_loop"]
        t = time_interleaved(
            {
                "jvp": lambda s=s: jvp_scores(loss, theta, spec, batch, s),
                "grad": lambda s=s: grad_scores(loss, theta, spec, batch, s),
                "loop": lambda s=s: loop_scores(model, x, y, s),
            },
            reps_slow,
            warmup=1,
        )
        tj, tg, tl = t["jvp"], t["grad"], t["loop"]
        mj, mg, ml = (1e3 * t["median_s"] for t in (tj, tg, tl))
        auto = "jvp"  # the library's "auto" scores by jvp at every Q (in blocks of JVP_BLOCK vectors)
        best_lib = "jvp" if mj <= mg else "grad"
        sweep.append(
            {"queries": q, "jvp_ms": mj, "grad_ms": mg, "loop_ms": ml, "ratio_jvp_over_grad": mj / mg,
             "ratio_jvp_over_loop": mj / ml, "auto_picks": auto, "faster_of_jvp_and_grad": best_lib,
             "rel_error_float64_jvp_vs_loop": err, "rel_error_float64_grad_vs_loop": err_loop,
             "timings": {"jvp": tj, "grad": tg, "loop": tl}}
        )  # fmt: skip
        rows.append([q, mj, mg, ml, mj / mg, mj / q, auto, best_lib])
    print_table(
        f"batch {b}: ms per batch against the number of s_test vectors Q (auto: jvp, in blocks of {JVP_BLOCK})",
        ["Q", "jvp", "grad(vmap)", "loop", "jvp/grad", "jvp per q", "auto picks", "faster of jvp/grad"],
        rows,
    )
    crossover = next((r["queries"] for r in sweep if r["faster_of_jvp_and_grad"] == "grad"), None)
    auto_right = all(r["auto_picks"] == r["faster_of_jvp_and_grad"] for r in sweep)
    loop_cross = next((r["queries"] for r in sweep if r["loop_ms"] < r["jvp_ms"]), None)

    at256 = next(r for r in results if r["batch_size"] == 256)
    summary = {
        "jvp_over_forward_at_256": at256["ratio_jvp_over_forward"],
        "target_jvp_over_forward_max": 3.0,
        "jvp_over_forward_met": at256["ratio_jvp_over_forward"] <= 3.0,
        "loop_over_jvp_at_256": at256["ratio_loop_over_jvp"],
        "target_loop_over_jvp_min": 20.0,
        "loop_over_jvp_met": at256["ratio_loop_over_jvp"] >= 20.0,
        "cpu_jvp_over_forward_at_256": at256["cpu_ratio_jvp_over_forward"],
        "cpu_loop_over_jvp_at_256": at256["cpu_ratio_loop_over_jvp"],
        "min_jvp_over_forward_at_256": at256["min_ratio_jvp_over_forward"],
        "min_loop_over_jvp_at_256": at256["min_ratio_loop_over_jvp"],
        "grad_faster_from_queries": crossover,
        "library_auto": f"jvp in blocks of {JVP_BLOCK}",
        "auto_rule_matches_measurement": auto_right,
        "loop_faster_than_jvp_from_queries": loop_cross,
    }
    print(
        f"\nbatch 256: jvp/forward = {summary['jvp_over_forward_at_256']:.2f}x (target <= 3x: "
        f"{'met' if summary['jvp_over_forward_met'] else 'NOT met'}); loop/jvp = "
        f"{summary['loop_over_jvp_at_256']:.1f}x (target >= 20x: {'met' if summary['loop_over_jvp_met'] else 'NOT met'})"
        f"\n  same ratios on the fastest runs: {summary['min_jvp_over_forward_at_256']:.2f}x and "
        f"{summary['min_loop_over_jvp_at_256']:.1f}x; on CPU time: {summary['cpu_jvp_over_forward_at_256']:.2f}x and "
        f"{summary['cpu_loop_over_jvp_at_256']:.1f}x"
    )
    print(
        f"grad path first faster at Q = {crossover} (of {qs}); library's auto scores by jvp at every Q: "
        f"{'consistent' if auto_right else 'NOT consistent'} with this measurement"
    )
    payload = {
        "benchmark": "scoring_throughput",
        "machine": machine_info(),
        "config": {
            "model": "-".join(map(str, sizes)),
            "activation": args.activation,
            "num_params": spec.numel,
            "data": "MNIST train images (normalised), first examples of a seeded permutation",
            "quick": args.quick,
            "repeats_fast_paths": reps_fast,
            "repeats_slow_paths": reps_slow,
            "grad_chunk_size": 64,
            "dtype": "float32",
        },
        "batches": results,
        "query_sweep_batch_256": sweep,
        "summary": summary,
        "wall_s": time.perf_counter() - started,
    }
    variant = (
        ""
        if (args.activation, args.hidden) == ("tanh", "256,128")
        else f"-{args.activation}-{args.hidden.replace(',', '-')}"
    )
    path = save_json("scoring_throughput" + variant + ("-quick" if args.quick else ""), payload)
    print(f"\nsaved {path.relative_to(path.parents[2])} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
