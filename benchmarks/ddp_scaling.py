"""DDP scaling of one influence run: 1 versus 2 processes on the same queries (DESIGN section 5, issue 4).

Setting: an MLP (784 -> 128 -> 10, tanh, 101,770 parameters, all selected) trained briefly on a 20,000-image MNIST
subset; 8 MNIST test queries in one batch; s_test by LiSSA with 4 repeats; every query scored against all 20,000
training examples (forward-mode jvp), top 10 kept. Contenders, each a fresh interpreter:

- ``1 process x 1 thread``: the baseline;
- ``2 processes x 1 thread``: ``InfluenceStrategy`` (shard="candidates", popen): 2 LiSSA chains and 10,000
  candidates per rank;
- ``1 process x 2 threads``: the same 2 cores used by torch's intra-op threads instead, for honesty.

Each rank times its stages itself (``InfluenceModule.timings``, after a warm-up outside the Trainer); a stage's
wall time is that of its slowest rank. The run also checks that the 2-process rankings equal the 1-process ones.

Usage:
    python benchmarks/ddp_scaling.py            # the full setting (about 2 minutes on an idle 2-core machine)
    python benchmarks/ddp_scaling.py --quick    # a smoke test (4,000 candidates, shallow LiSSA)

Writes ``benchmarks/results/ddp_scaling.json`` (``ddp_scaling-quick.json`` with ``--quick``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MNIST = ROOT.parent / "shared" / "data" / "mnist" / "mnist.npz"
CONTENDERS = [
    ("1 process x 1 thread", 1, 1),
    ("2 processes x 1 thread", 2, 1),
    ("1 process x 2 threads", 1, 2),
]


# ------------------------------------------------------------------------------------------------ problem
def load_problem(n_train: int, n_queries: int) -> tuple[TensorDataset, TensorDataset]:
    """The first ``n_train`` MNIST training images (normalised, flattened) and ``n_queries`` test images."""
    if not MNIST.exists():
        raise SystemExit(f"MNIST not found at {MNIST}: this benchmark reads the shared mnist.npz")
    data = np.load(MNIST)

    def prep(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x.reshape(len(x), -1).astype(np.float32)) / 255.0 - 0.1307) / 0.3081

    train = TensorDataset(
        prep(data["x_train"][:n_train]), torch.from_numpy(data["y_train"][:n_train].astype(np.int64))
    )
    queries = TensorDataset(
        prep(data["x_test"][:n_queries]), torch.from_numpy(data["y_test"][:n_queries].astype(np.int64))
    )
    return train, queries


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def train_model(train: TensorDataset, hidden: int, epochs: int, path: Path) -> dict[str, Any]:
    """A short Adam fit with weight decay (the solvers' damping stands in for it); saves the weights."""
    torch.manual_seed(0)
    model = make_model(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in DataLoader(train, batch_size=128, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    x, y = train.tensors
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    torch.save(model.state_dict(), path)
    return {"epochs": epochs, "train_accuracy": acc, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> None:
    """One contender: every rank of it runs this (popen DDP re-runs the same command line for rank 1)."""
    import lightning.pytorch as pl

    import lightning_fastif as lf

    torch.set_num_threads(args.threads)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    train, queries = load_problem(args.n_train, args.queries)
    model = make_model(args.hidden)
    model.load_state_dict(torch.load(args.weights))
    solver = lf.LiSSASolver(
        damping=args.damping,
        scale=args.scale,
        depth=args.depth,
        repeats=4,
        batch_size=args.lissa_batch,
        seed=0,
    )

    class CpuTimed(lf.InfluenceModule):
        """Also records each stage's CPU time: with one thread per process, a rank's CPU time is what the stage
        would take on a core of its own, whatever else runs on the machine."""

        cpu_timings: dict[str, float]

        def on_predict_start(self) -> None:
            super().on_predict_start()
            self.cpu_timings = {}

        def _cpu(self, stage: str, start: float) -> None:
            self.cpu_timings[stage] = self.cpu_timings.get(stage, 0.0) + time.process_time() - start

        def s_test(self, batch: Any) -> torch.Tensor:
            start = time.process_time()
            try:
                return super().s_test(batch)
            finally:
                self._cpu("s_test", start)

        def score(self, s_test: torch.Tensor, train_indices: Any = None) -> torch.Tensor:
            start = time.process_time()
            try:
                return super().score(s_test, train_indices)
            finally:
                self._cpu("scoring", start)

    im = CpuTimed(model, train, solver=solver, num_candidates=None, top_k=10, batch_size=args.score_batch)
    # warm-up outside the Trainer (one process, no collective): first-call allocations, torch.func set-up
    warm = lf.InfluenceModule(
        model,
        train,
        solver=lf.LiSSASolver(damping=args.damping, scale=args.scale, depth=3, batch_size=args.lissa_batch),
        num_candidates=None,
        batch_size=args.score_batch,
    )
    warm.score(warm.s_test(queries[:2]), torch.arange(2 * args.score_batch))

    class Clock(pl.Callback):
        """Wall and CPU seconds of this rank's predict loop (CPU time: robust to other jobs on the machine)."""

        def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.start_cpu

    clock = Clock()
    strategy: Any = lf.InfluenceStrategy(start_method="popen") if args.devices > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[clock],
    )
    repeats, out = [], []
    for _ in range(args.inner):  # the same Trainer again: the processes and the process group are reused
        out = trainer.predict(im, DataLoader(queries, batch_size=args.queries))
        repeats.append(
            {
                "timings_s": dict(im.timings),
                "cpu_timings_s": dict(im.cpu_timings),
                "predict_s": clock.seconds,
                "cpu_s": clock.cpu_seconds,
            }
        )
    record = {
        "rank": rank,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "results": [r.to_dict() for batch in out for r in batch],
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))


# ------------------------------------------------------------------------------------------------ driver
def run_contender(args: argparse.Namespace, devices: int, threads: int, weights: Path, folder: Path) -> dict:
    """Run one contender in fresh interpreter(s); per repeat, each stage's wall time is its slowest rank's."""
    folder.mkdir(parents=True, exist_ok=True)
    drop = ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"--devices={devices}",
        f"--threads={threads}",
        f"--weights={weights}",
        f"--out={folder}",
        *args.setting_flags,
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"contender devices={devices} threads={threads} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    if len(ranks) != devices:
        raise SystemExit(f"expected {devices} rank records in {folder}, got {len(ranks)}")
    per_repeat = []
    for i in range(len(ranks[0]["repeats"])):
        reps = [r["repeats"][i] for r in ranks]
        per_repeat.append(
            {
                "s_test": max(r["timings_s"].get("s_test", 0.0) for r in reps),
                "scoring": max(r["timings_s"].get("scoring", 0.0) for r in reps),
                "predict": max(r["predict_s"] for r in reps),
                "cpu_total": sum(r["cpu_s"] for r in reps),  # the work done, summed over ranks
                # the slowest rank's CPU time: the stage's wall time on free cores (1 thread per process)
                "s_test_cpu": max(r["cpu_timings_s"].get("s_test", 0.0) for r in reps),
                "scoring_cpu": max(r["cpu_timings_s"].get("scoring", 0.0) for r in reps),
            }
        )
    return {
        "per_repeat_s": per_repeat,
        "load_average_1min_after": os.getloadavg()[0],
        "results": ranks[0]["results"],
    }


def summarise(runs: list[dict]) -> dict[str, float]:
    """Median over every repeat of every round of one contender."""
    reps = [rep for run in runs for rep in run["per_repeat_s"]]
    return {key: float(statistics.median(rep[key] for rep in reps)) for key in reps[0]}


def agreement(a: list[dict], b: list[dict]) -> dict[str, Any]:
    """Whether two runs ranked the same training ids, and the largest relative score difference."""
    same, worst = True, 0.0
    for x, y in zip(a, b):
        for side in ("helpful", "harmful"):
            same &= x[f"{side}_ids"] == y[f"{side}_ids"]
            sx, sy = np.array(x[f"{side}_scores"]), np.array(y[f"{side}_scores"])
            worst = max(worst, float(np.max(np.abs(sx - sy) / np.maximum(np.abs(sy), 1e-30))))
    return {"same_ids": bool(same and len(a) == len(b)), "max_relative_score_difference": worst}


def machine() -> dict[str, Any]:
    """The machine facts every benchmark saves (shared helper in ``_common.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine_info

    return machine_info()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke setting")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--lissa-batch", type=int, default=32)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--scale", type=float, default=50.0)
    parser.add_argument("--score-batch", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--inner", type=int, default=3, help="predict calls per process (the median is kept)")
    parser.add_argument("--rounds", type=int, default=2, help="round-robin rounds over the three contenders")
    args = parser.parse_args()
    if args.quick and not args.worker:
        args.n_train, args.depth, args.epochs, args.inner, args.rounds = 4_000, 20, 1, 2, 1
    if args.worker:
        worker(args)
        return
    args.setting_flags = [
        f"--n-train={args.n_train}",
        f"--queries={args.queries}",
        f"--hidden={args.hidden}",
        f"--depth={args.depth}",
        f"--lissa-batch={args.lissa_batch}",
        f"--damping={args.damping}",
        f"--scale={args.scale}",
        f"--score-batch={args.score_batch}",
        f"--inner={args.inner}",
    ]
    torch.set_num_threads(2)
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="ddp_scaling-") as tmp:
        train, _ = load_problem(args.n_train, args.queries)
        weights = Path(tmp, "weights.pt")
        fit = train_model(train, args.hidden, args.epochs, weights)
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONTENDERS}
        for round_ in range(args.rounds):  # round-robin: load from other jobs hits every contender alike
            for name, devices, threads in CONTENDERS:
                print(f"round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
                folder = Path(tmp, f"r{round_}d{devices}t{threads}")
                runs[name].append(run_contender(args, devices, threads, weights, folder))
    base_name = CONTENDERS[0][0]
    medians = {name: summarise(rs) for name, rs in runs.items()}
    base, base_results = medians[base_name], runs[base_name][0]["results"]
    summary = {}
    threads_of = {name: threads for name, _, threads in CONTENDERS}
    for name, med in medians.items():
        one_thread = threads_of[name] == 1  # CPU time of a 2-thread process is not its critical path
        summary[name] = {
            "median_s": med,
            "speedup_vs_1_process_1_thread": {
                k: base[k] / max(med[k], 1e-12) for k in ("s_test", "scoring", "predict")
            },
            "cpu_critical_path_speedup_vs_1_process_1_thread": {
                k: (base[f"{k}_cpu"] / max(med[f"{k}_cpu"], 1e-12) if one_thread else None)
                for k in ("s_test", "scoring")
            },
            "cpu_efficiency_vs_1_process_1_thread": base["cpu_total"] / max(med["cpu_total"], 1e-12),
            "agreement_with_1_process_1_thread": agreement(runs[name][0]["results"], base_results),
            "rounds": [{k: v for k, v in run.items() if k != "results"} for run in runs[name]],
        }
    n_params = sum(p.numel() for p in make_model(args.hidden).parameters())
    payload = {
        "benchmark": "ddp_scaling",
        "setting": {
            "data": f"MNIST train[:{args.n_train}] (candidates: all of them), test[:{args.queries}] as queries",
            "model": f"MLP 784-{args.hidden}-10 tanh, all {n_params:,} parameters selected",
            "fit": fit,
            "solver": {
                "name": "lissa",
                "repeats": 4,
                "depth": args.depth,
                "batch_size": args.lissa_batch,
                "damping": args.damping,
                "scale": args.scale,
            },
            "scoring": {"method": "jvp (auto)", "batch_size": args.score_batch, "top_k": 10},
            "strategy": "InfluenceStrategy(shard='candidates', start_method='popen')",
            "timing": "per-rank InfluenceModule.timings after a warm-up; a stage's wall time is its slowest rank's; "
            f"medians over {args.rounds} round(s) x {args.inner} predict call(s), contenders round-robin; "
            "cpu_total = process CPU time summed over ranks; *_cpu = the slowest rank's CPU time in the stage, "
            "i.e. the stage's wall time on free cores with 1 thread per process (other jobs shared this machine)",
        },
        "machine": {
            **machine(),
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
        },
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("ddp_scaling-quick.json" if args.quick else "ddp_scaling.json")
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(payload, indent=2) + "\n")
    tmp_path.replace(path)
    print()
    print("wall time (slowest rank), median; x = speed-up over 1 process x 1 thread")
    print(
        f"{'contender':<24}{'s_test s':>9}{'scoring s':>10}{'predict s':>10}"
        f"{'x s_test':>9}{'x scoring':>10}{'x predict':>10}  same ids as 1 process"
    )
    for name, row in summary.items():
        med, sp = row["median_s"], row["speedup_vs_1_process_1_thread"]
        agree = row["agreement_with_1_process_1_thread"]
        print(
            f"{name:<24}{med['s_test']:>9.2f}{med['scoring']:>10.2f}{med['predict']:>10.2f}"
            f"{sp['s_test']:>9.2f}{sp['scoring']:>10.2f}{sp['predict']:>10.2f}"
            f"  {agree['same_ids']} (rel diff {agree['max_relative_score_difference']:.0e})"
        )
    print(
        "\nCPU time of the slowest rank (= wall on free cores, 1 thread per process), and total CPU over ranks"
    )
    print(
        f"{'contender':<24}{'s_test s':>9}{'scoring s':>10}{'x s_test':>9}{'x scoring':>10}{'total CPU s':>12}"
    )
    for name, row in summary.items():
        med, cp = row["median_s"], row["cpu_critical_path_speedup_vs_1_process_1_thread"]
        if cp["s_test"] is None:
            continue
        print(
            f"{name:<24}{med['s_test_cpu']:>9.2f}{med['scoring_cpu']:>10.2f}{cp['s_test']:>9.2f}"
            f"{cp['scoring']:>10.2f}{med['cpu_total']:>12.2f}"
        )
    print(
        f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
