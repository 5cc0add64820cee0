"""kNN recall of pooled sequence features against a full influence scan, on a tiny GPT-2 (issue 19, item 4).

Trains the tiny GPT-2 of ``examples/language_model.py`` on its stdlib passages, builds one candidate index per
``feature_pooling`` (``mean``, ``last``, ``flatten``) and measures, with
:func:`lightning_fastif.evaluation.diagnostics.approximation_diagnostics`, the recall of the full scan's top-m most
helpful / harmful / largest-|influence| passages among the k nearest candidates. Queries are held-out passages padded
to the training length (so ``flatten`` can run) and the same passages unpadded (another length: pooled only).

Run: ``python benchmarks/sequence_feature_recall.py [--passages 200 --queries 8]``; prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

import lightning_fastif as lf
from lightning_fastif.evaluation.diagnostics import approximation_diagnostics

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location(
        "language_model_example", ROOT / "examples" / "language_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--passages", type=int, default=200)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--top-m", type=int, default=10)
    p.add_argument("--output", default="benchmarks/results/sequence_feature_recall.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    ex = _example()
    rows = ex.passages(ex.stdlib_text(), 16)
    train_rows, query_rows = rows[: args.passages], rows[args.passages : args.passages + args.queries]
    vocab_list = [ex.PAD, ex.UNK, *sorted({w for r in rows for w in r})]
    vocab = {w: i for i, w in enumerate(vocab_list)}
    train = ex.Passages(train_rows, vocab, 16)
    model = ex.TinyGPT(len(vocab_list), 16, 32, 2)
    pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, DataLoader(train, batch_size=32, shuffle=True))
    padded = ex.Passages(query_rows, vocab, 16)
    padded_batch = {k: getattr(padded, k) for k in ("input_ids", "attention_mask", "labels")}
    n = len(train)
    ks = (n // 8, n // 4, n // 2)
    table = []
    for pooling in ("mean", "last", "flatten"):
        im = lf.InfluenceModule(
            model,
            train,
            loss_fn=ex.TokenCrossEntropy(),
            params=["model.transformer.ln_f.*"],
            solver=lf.ExactSolver(damping=0.01),
            curvature="gauss_newton",
            num_candidates=ks[0],
            feature_pooling=pooling,
            batch_size=64,
            progress=False,
        )
        start = time.perf_counter()
        report = approximation_diagnostics(im, padded_batch, ks=ks, top_m=args.top_m)
        seconds = time.perf_counter() - start
        for r in report.rows:
            table.append({"pooling": pooling, "queries": "padded to 16", **r, "seconds": seconds})
        if pooling != "flatten":  # queries of another length: each passage alone, unpadded
            for q in range(len(query_rows)):
                length = int(padded.attention_mask[q].sum())
                one = {k: v[q : q + 1, :length] for k, v in padded_batch.items()}
                rep = approximation_diagnostics(im, one, ks=ks, top_m=args.top_m)
                for r in rep.rows:
                    table.append({"pooling": pooling, "queries": f"unpadded #{q}", **r})
    summary = []
    for pooling in ("mean", "last", "flatten"):
        for kind in ("padded to 16", "unpadded"):
            for k in ks:
                chosen = [
                    r
                    for r in table
                    if r["pooling"] == pooling and r["k"] == k and r["queries"].startswith(kind)
                ]
                if chosen:
                    summary.append(
                        {
                            "pooling": pooling,
                            "queries": kind,
                            "k": k,
                            "k/N": k / n,
                            **{
                                f"recall_{m}": sum(r[f"recall_{m}"] for r in chosen) / len(chosen)
                                for m in ("helpful", "harmful", "abs")
                            },
                        }
                    )
    print(
        f"N = {n} training passages, {len(query_rows)} queries, top-{args.top_m} of a full scan (ln_f, Exact GN)"
    )
    print("| pooling | queries | k | k/N | recall helpful | harmful | abs |")
    print("|---|---|---|---|---|---|---|")
    for r in summary:
        print(
            f"| {r['pooling']} | {r['queries']} | {r['k']} | {r['k/N']:.3f} | {r['recall_helpful']:.3f} | "
            f"{r['recall_harmful']:.3f} | {r['recall_abs']:.3f} |"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
