"""Candidate retrieval in feature space (FastIF's kNN) against gradient space (sketch MIPS), both re-ranked exactly.

For each query the full scan's top-10 (most helpful, most harmful, largest |influence|) is the reference; the recall
is the share of it found among the k candidates of each space (the scores of the candidates are exact, so this is
also the overlap of the returned top-10 with the true one). Misclassified and correctly classified queries are
reported apart. Also: index build time and size on disk, and the end-to-end time per query (s_test + search +
exact jvp scoring of the k candidates) against a full jvp scan.

Problems (as ``benchmarks/fastif_speedup.py``): MNIST 60,000 with a tanh MLP 784-256-256-10, and the generated
200,000 (a 32-d Gaussian mixture, MLP 32-128-128-10). Parameter sets: the head (s_test by ExactSolver, cached) and
all parameters (s_test by LiSSA with scale="auto", depth 100: the retrieval is measured against the full scan with
the same s_test, so the solver's accuracy does not enter the recall). Gradient sketches: the exact head sketch
(C (d+1) numbers), and the Kronecker (LoGra) projection at the default dimension 1024 (all parameters: also stored
as float16, and at 4096 on MNIST).

Run: ``python benchmarks/retrieval.py`` (``--quick``: 10,000 MNIST images, 20,000 generated, 4 queries).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MNIST, load_mnist, machine_info, mlp, print_table, save_json, set_threads
from fastif_speedup import generated, train

import lightning_fastif as lf
from lightning_fastif.functional.losses import resolve_loss
from lightning_fastif.retrieval.build import build_index
from lightning_fastif.retrieval.gradients.folder import build_gradient_index, save_gradient_index
from lightning_fastif.retrieval.store import save_index


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def _recall(scores: torch.Tensor, cand: torch.Tensor, m: int = 10) -> dict[str, float]:
    c = set(cand.tolist())
    tops = {
        "helpful": scores.argsort()[:m],
        "harmful": scores.argsort(descending=True)[:m],
        "abs": scores.abs().argsort(descending=True)[:m],
    }
    return {name: len(set(t.tolist()) & c) / m for name, t in tops.items()}


def run_case(name, model, ds, xq, yq, params, solver, ks, n_queries, sketches, tmp: Path) -> dict:
    n = len(ds)
    loss = resolve_loss(model)
    t = time.perf_counter()
    feat = build_index(model, ds, factory="Flat", batch_size=4096)
    build = {"features (Flat L2)": time.perf_counter() - t}
    save_index(feat.index, tmp / "features", feat.meta)
    size = {"features (Flat L2)": _folder_bytes(tmp / "features")}
    grad = {}
    for label, kwargs in sketches.items():
        t = time.perf_counter()
        gi = build_gradient_index(model, ds, loss, params, batch_size=1024, **kwargs)
        build[label] = time.perf_counter() - t
        save_gradient_index(gi, tmp / label.replace(" ", "_"))
        size[label] = _folder_bytes(tmp / label.replace(" ", "_"))
        grad[label] = gi
    im = lf.InfluenceModule(
        model,
        ds,
        params=params,
        solver=solver,
        num_candidates=max(ks),
        index=feat.index,
        batch_size=2048,
        score_method="jvp",
        progress=False,
    )
    im._feature_layer_name = feat.meta["feature_layer"]
    with torch.no_grad():
        wrong = (model(xq).argmax(1) != yq).nonzero().flatten().tolist()
        right = (model(xq).argmax(1) == yq).nonzero().flatten().tolist()
    qids = wrong[: n_queries // 2] + right[: n_queries - min(len(wrong), n_queries // 2)]
    im.s_test((xq[:1], yq[:1]))  # one-time costs (an exact factorisation) outside the per-query times
    per: dict[str, list[float]] = {}
    stage: dict[str, list[float]] = {}  # without s_test: search + scoring (or the full scan's scoring)
    rec: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for q in qids:
        batch = (xq[q : q + 1], yq[q : q + 1])
        group = "misclassified" if q in wrong else "correct"
        t0 = time.perf_counter()
        s = im.s_test(batch)
        t_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = im.score(s)[0]
        per.setdefault("full scan", []).append(t_s + time.perf_counter() - t0)
        stage.setdefault("full scan", []).append(time.perf_counter() - t0)
        stage.setdefault("s_test", []).append(t_s)
        for k in ks:
            spaces = {
                "features (Flat L2)": lambda k=k, b=batch: feat.index.search(im.query_features(b), k)[1][0]
            }
            for label, gi in grad.items():
                spaces[label] = lambda k=k, gi=gi, s=s: gi.candidates(s, k)[1][0]
            for space, find in spaces.items():
                t0 = time.perf_counter()
                cand = find()
                im.score(s, cand)
                per.setdefault(f"{space} k={k}", []).append(t_s + time.perf_counter() - t0)
                stage.setdefault(f"{space} k={k}", []).append(time.perf_counter() - t0)
                rec.setdefault((space, k, group), []).append(_recall(full, cand))
    full_s = statistics.median(per["full scan"])
    full_scoring = statistics.median(stage["full scan"])
    rows = []
    for (space, k, group), rs in sorted(rec.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        med = statistics.median(per[f"{space} k={k}"])
        rows.append(
            {
                "case": name,
                "space": space,
                "k": k,
                "queries": group,
                "n": len(rs),
                **{f"recall_{m}": statistics.mean(r[m] for r in rs) for m in ("helpful", "harmful", "abs")},
                "seconds_per_query": med,
                "speedup": full_s / med,
                "search_and_scoring_s": statistics.median(stage[f"{space} k={k}"]),
                "speedup_without_s_test": full_scoring / statistics.median(stage[f"{space} k={k}"]),
            }
        )
    return {
        "case": name,
        "N": n,
        "params": params or "all",
        "num_params": im.curvature().spec.numel,
        "build_s": build,
        "bytes_on_disk": size,
        "dims": {"features (Flat L2)": feat.index.dim, **{k: g.index.dim for k, g in grad.items()}},
        "bytes_per_million_examples": {k: v / n * 1e6 for k, v in size.items()},
        "full_scan_s_per_query": full_s,
        "s_test_s_per_query": statistics.median(stage["s_test"]),
        "full_scan_scoring_s": full_scoring,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    threads = set_threads()
    n_queries = 4 if args.quick else 10
    ks = (100, 1000) if args.quick else (100, 1000, 10000)
    out = {"machine": machine_info(), "threads": threads, "cases": []}
    problems = []
    if MNIST.is_file():
        xtr, ytr, xte, yte = load_mnist(n_train=10000 if args.quick else None)
        problems.append(("mnist", xtr, ytr, xte, yte, [784, 256, 256, 10], 1 if args.quick else 2))
    n = 20000 if args.quick else 200_000
    x, y, xq, yq = generated(n)
    problems.append((f"generated-{n // 1000}k", x, y, xq, yq, [32, 128, 128, 10], 1))
    lissa = lf.LiSSASolver(damping=1e-2, scale="auto", depth=100, repeats=1, batch_size=64, seed=0)
    for name, xtr, ytr, xte, yte, sizes, epochs in problems:
        model = mlp(sizes)
        acc = train(model, xtr, ytr, epochs)
        model.eval()
        ds = TensorDataset(xtr, ytr)
        head = [f"{len(model) - 1}.*"]
        # a 4x wider Kronecker sketch where it fits in memory (MNIST: 60k x ~4k floats = 1 GB; 200k would be 3.3 GB)
        wide = {"gradients kronecker 4096": {"method": "kronecker", "dim": 4096}} if len(ds) <= 60000 else {}
        with tempfile.TemporaryDirectory() as tmp:
            for params, solver, sketches in (
                (
                    head,
                    lf.ExactSolver(damping=1e-3),
                    {
                        "gradients head exact": {"method": "head"},
                        "gradients kronecker": {"method": "kronecker"},
                    },
                ),
                (
                    None,
                    lissa,
                    {
                        "gradients kronecker": {"method": "kronecker"},
                        "gradients kronecker fp16": {"method": "kronecker", "float16": True},
                        **wide,
                    },
                ),
            ):
                label = f"{name} {'head' if params else 'all parameters'}"
                case_dir = Path(tmp) / label.replace(" ", "_")
                case_dir.mkdir()
                case = run_case(label, model, ds, xte, yte, params, solver, ks, n_queries, sketches, case_dir)
                case["train_accuracy"] = acc
                out["cases"].append(case)
                print(f"{label}: build {case['build_s']}, bytes {case['bytes_on_disk']}, dims {case['dims']}")
    rows = [r for c in out["cases"] for r in c["rows"]]
    print_table(
        "Recall of the full scan's top-10 among k candidates, and end-to-end time per query (exact jvp scoring)",
        [
            "case",
            "space",
            "k",
            "queries",
            "n",
            "helpful",
            "harmful",
            "|I|",
            "s/query",
            "speed-up",
            "w/o s_test",
        ],
        [
            [
                r["case"],
                r["space"],
                r["k"],
                r["queries"],
                r["n"],
                r["recall_helpful"],
                r["recall_harmful"],
                r["recall_abs"],
                f"{r['seconds_per_query']:.4f}",
                f"{r['speedup']:.1f}x",
                f"{r['speedup_without_s_test']:.1f}x",
            ]
            for r in rows
        ],
    )
    path = save_json("retrieval-quick" if args.quick else "retrieval", out)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
