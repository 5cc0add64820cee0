"""Peak resident memory of scoring as the training set grows (10k, 50k, 200k): it must stay flat in N.

Each N runs in a fresh process: the data and model are made, a small warm-up scores 1,000 examples, then the whole
training set is scored (a full scan, jvp and per-example-gradient paths). The figure is the growth of the process's
peak RSS during the full scan over the peak after the warm-up; the data itself is reported apart. Candidates are
streamed in batches, so no N x P matrix is ever held; only the N scores are.

Run: ``python benchmarks/memory_scaling.py`` (``--quick`` for 10k and 50k only).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, save_json


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n: int, method: str) -> dict:
    import torch
    from benchmarks_mlp import make  # type: ignore[import-not-found]
    from torch.utils.data import TensorDataset

    import lightning_fastif as lf

    torch.set_num_threads(1)
    model, x, y = make(n)
    data_mb = (x.element_size() * x.numel() + y.element_size() * y.numel()) / 2**20
    im = lf.InfluenceModule(
        model,
        TensorDataset(x, y),
        solver=lf.LiSSASolver(damping=0.01, scale=10.0, depth=5),
        num_candidates=None,
        batch_size=512,
        score_method=method,
    )
    s = im.s_test((x[:4], y[:4]))
    im.score(s, torch.arange(1000))
    base = _peak_mb()
    start = time.perf_counter()
    scores = im.score(s)
    seconds = time.perf_counter() - start
    return {
        "N": n,
        "method": method,
        "data_mb": data_mb,
        "peak_before_mb": base,
        "peak_after_mb": _peak_mb(),
        "growth_mb": _peak_mb() - base,
        "seconds": seconds,
        "scores_shape": list(scores.shape),
        "P": int(s.shape[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("N", "METHOD"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1])))
        return
    sizes = (10_000, 50_000) if args.quick else (10_000, 50_000, 200_000)
    rows = []
    for method in ("jvp", "grad"):
        for n in sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), method],
                capture_output=True,
                text=True,
                env={
                    "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(Path(__file__).parent),
                    "PATH": "/usr/bin:/bin",
                },
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print_table(
        "Peak RSS growth during a full-scan scoring pass (fresh process per row; 4 queries, MLP 32-256-256-10)",
        ["N", "path", "data MB", "peak before MB", "growth MB", "seconds"],
        [
            [
                r["N"],
                r["method"],
                f"{r['data_mb']:.1f}",
                f"{r['peak_before_mb']:.0f}",
                f"{r['growth_mb']:.1f}",
                f"{r['seconds']:.2f}",
            ]
            for r in rows
        ],
    )
    print(
        f"saved {save_json('memory_scaling' + ('-quick' if args.quick else ''), {'machine': machine_info(), 'rows': rows})}"
    )


if __name__ == "__main__":
    main()
