"""FastIF's speed-up over a full scan, per query, end to end (s_test + kNN search + scoring), with the recall of the
full-scan top-10 among the candidates beside each speed-up.

Data: MNIST (60,000 training images, ``../shared/data/mnist``) and a generated set of 200,000 (a Gaussian mixture,
32-d, 10 classes). Model: a tanh MLP trained for a few epochs; the differentiated parameters are its final Linear
layer (as FastIF differentiated only BERT's top layers); s_test by ExactSolver, factorised once and cached (the
one-time cost is reported apart). Each query is explained alone (batch of one). Two scoring paths:
``jvp`` (forward mode through the whole network for every candidate, the general path) and ``head`` (the head fast
path from cached features and logits). Target: speed-up >= 0.8 x N/k.

Run: ``python benchmarks/fastif_speedup.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MNIST, load_mnist, machine_info, mlp, print_table, save_json, set_threads

import lightning_fastif as lf
from lightning_fastif.retrieval.build import build_index


def generated(n: int, d: int = 32, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes * 4, d, generator=g) * 2.5
    comp = torch.randint(0, classes * 4, (n + 2000,), generator=g)
    x = centers[comp] + torch.randn(n + 2000, d, generator=g)
    y = comp % classes
    return x[:n], y[:n], x[n:], y[n:]


def train(model: nn.Module, x, y, epochs: int, batch: int = 256, lr: float = 2e-3) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return float((model(x[:5000]).argmax(1) == y[:5000]).float().mean())


def run_dataset(name: str, x, y, xq, yq, sizes, epochs: int, ks, n_queries: int, factories) -> dict:
    model = mlp(sizes)
    t = time.perf_counter()
    acc = train(model, x, y, epochs)
    train_s = time.perf_counter() - t
    model.eval()
    head = f"{len(model) - 1}.*"
    ds = TensorDataset(x, y)
    n = len(ds)
    t = time.perf_counter()
    built = build_index(model, ds, factory="Flat", batch_size=4096)
    feature_s = time.perf_counter() - t
    indexes = {"Flat": built.index}
    build_s = {}
    for factory, kwargs in factories.items():
        from lightning_fastif.retrieval.factory import make_index

        t = time.perf_counter()
        idx = make_index(factory, **kwargs)
        idx.add(built.features, torch.arange(n))
        build_s[factory] = time.perf_counter() - t
        indexes[factory] = idx
    solver = lf.ExactSolver(damping=1e-3)

    def module(method: str, index) -> lf.InfluenceModule:
        im = lf.InfluenceModule(
            model,
            ds,
            params=[head],
            solver=solver,
            num_candidates=max(ks),
            index=index,
            batch_size=4096,
            score_method=method,
        )
        im._candidates, im._feature_layer_name = index, built.meta["feature_layer"]
        im._cache = {"features": built.features, "logits": built.logits}
        return im

    with torch.no_grad():
        wrong = (model(xq).argmax(1) != yq).nonzero().flatten()
    qids = (wrong.tolist() + list(range(len(xq))))[:n_queries]
    t = time.perf_counter()
    module("jvp", indexes["Flat"]).s_test((xq[:1], yq[:1]))  # factorise once (cached in the solver)
    factor_s = time.perf_counter() - t
    rows = []
    stage_medians: dict[str, dict[str, float]] = {}
    for method in ("jvp", "head"):
        per: dict[str, list[float]] = {}
        recall: dict[str, list[float]] = {}
        stages: dict[str, list[float]] = {}
        for q in qids:
            batch = (xq[q : q + 1], yq[q : q + 1])
            for index_name, index in indexes.items():
                im = module(method, index)
                t0 = time.perf_counter()
                s = im.s_test(batch)
                stest_s = time.perf_counter() - t0
                stages.setdefault("s_test", []).append(stest_s)
                if index_name == "Flat":
                    t3 = time.perf_counter()
                    full = im.score(s)[0]
                    score_all = time.perf_counter() - t3
                    per.setdefault("full", []).append(stest_s + score_all)
                    stages.setdefault("full scan scoring", []).append(score_all)
                    top = set(full.abs().argsort(descending=True)[:10].tolist())
                for k in ks:  # each k searched on its own: a search for more neighbours costs more
                    key = f"{index_name} k={k}"
                    t1 = time.perf_counter()
                    _, cand = index.search(im.query_features(batch), k)
                    t2 = time.perf_counter()
                    im.score(s, cand[0])
                    t3 = time.perf_counter()
                    per.setdefault(key, []).append(stest_s + t3 - t1)
                    stages.setdefault(f"{key} features+search", []).append(t2 - t1)
                    stages.setdefault(f"{key} scoring", []).append(t3 - t2)
                    recall.setdefault(key, []).append(len(top & set(cand[0].tolist())) / 10)
        stage_medians[method] = {k: statistics.median(v) for k, v in stages.items()}
        full = statistics.median(per["full"])
        for key, times in per.items():
            if key == "full":
                rows.append(
                    {
                        "dataset": name,
                        "scoring": method,
                        "setting": "full scan",
                        "k": n,
                        "seconds_per_query": full,
                        "speedup": 1.0,
                        "target": 1.0,
                        "recall_top10": 1.0,
                    }
                )
                continue
            k = int(key.split("k=")[1])
            med = statistics.median(times)
            rows.append(
                {
                    "dataset": name,
                    "scoring": method,
                    "setting": key,
                    "k": k,
                    "seconds_per_query": med,
                    "speedup": full / med,
                    "target": 0.8 * n / k,
                    "recall_top10": statistics.mean(recall[key]),
                }
            )
    return {
        "dataset": name,
        "N": n,
        "train_accuracy": acc,
        "train_s": train_s,
        "feature_pass_s": feature_s,
        "index_build_s": build_s,
        "factorisation_s": factor_s,
        "queries": len(qids),
        "rows": rows,
        "stage_medians_s": stage_medians,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    threads = set_threads()
    n_queries = 3 if args.quick else 10
    out = {"machine": machine_info(), "threads": threads, "datasets": []}
    if MNIST.is_file():
        xtr, ytr, xte, yte = load_mnist(n_train=10000 if args.quick else None)
        out["datasets"].append(
            run_dataset(
                "mnist",
                xtr,
                ytr,
                xte,
                yte,
                [784, 256, 256, 10],
                1 if args.quick else 2,
                (1000, 10000),
                n_queries,
                {"IVF1024,Flat": {"nprobe": 64}} if not args.quick else {"IVF100,Flat": {"nprobe": 10}},
            )
        )
    n = 20000 if args.quick else 200_000
    x, y, xq, yq = generated(n)
    out["datasets"].append(
        run_dataset(
            f"generated-{n // 1000}k",
            x,
            y,
            xq,
            yq,
            [32, 128, 128, 10],
            1,
            (1000, 10000),
            n_queries,
            {"IVF2048,Flat": {"nprobe": 64}} if not args.quick else {"IVF128,Flat": {"nprobe": 8}},
        )
    )
    rows = [r for d in out["datasets"] for r in d["rows"]]
    print_table(
        "FastIF speed-up over a full scan (per query: s_test + search + scoring; ExactSolver cached)",
        ["dataset", "scoring", "setting", "s/query", "speed-up", "target 0.8N/k", "recall top-10"],
        [
            [
                r["dataset"],
                r["scoring"],
                r["setting"],
                f"{r['seconds_per_query']:.4f}",
                f"{r['speedup']:.1f}x",
                f"{r['target']:.1f}x",
                f"{r['recall_top10']:.2f}",
            ]
            for r in rows
        ],
    )
    for d in out["datasets"]:
        print(
            f"{d['dataset']}: N={d['N']}, train acc {d['train_accuracy']:.3f}, feature pass {d['feature_pass_s']:.2f}s, "
            f"index builds {d['index_build_s']}, one-time factorisation {d['factorisation_s']:.2f}s"
        )
        for method, stages in d["stage_medians_s"].items():
            print(
                f"  {method} stage medians (ms): "
                + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in stages.items())
            )
    print(f"saved {save_json('fastif_speedup' + ('-quick' if args.quick else ''), out)}")


if __name__ == "__main__":
    main()
