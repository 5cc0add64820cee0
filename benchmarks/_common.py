"""Shared helpers of the benchmark scripts: threads, machine info, timing, data, models, agreement metrics, JSON.

Not part of the library: the scripts import it as a sibling module (``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MNIST = Path(os.environ.get("MNIST_NPZ", ROOT.parent / "shared" / "data" / "mnist" / "mnist.npz"))
"""The MNIST arrays (``/work/shared/data/mnist``); ``MNIST_NPZ`` points elsewhere (e.g. from a git worktree)."""
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def set_threads() -> int:
    """Use ``OMP_NUM_THREADS`` torch threads (1 when unset) and return the count."""
    n = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(n)
    return torch.get_num_threads()


def machine_info() -> dict[str, Any]:
    """CPU count, thread count and versions, saved with every result file."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lightning_fastif"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except OSError:
        commit, dirty = "", []
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "library_files_uncommitted": dirty,  # the working tree measured differs from the commit in these files
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_1_5_15": list(os.getloadavg()),
        "note": "a shared 2-core machine: other jobs may run; contenders are timed round-robin, medians reported",
    }


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Median, min and all times (seconds) of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Like :func:`timeit` for several functions, run round-robin (one of each per round) so that load from other
    processes on a shared machine hits every contender alike; the ratios of the medians are then comparable.
    Wall-clock (``time.perf_counter``) is the figure reported; the process CPU time is kept as a cross-check."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "runs_s": t,
            # CPU time of this process: with one thread, robust to other jobs sharing the cores
            "cpu_median_s": statistics.median(cpu[name]),
        }
        for name, t in times.items()
    }


def save_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned text table."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "-"
            if abs(v) >= 1000 or (0 < abs(v) < 0.01):
                return f"{v:.3g}"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "-" if v is None else str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


# ---------------------------------------------------------------------------------------------- data and models
def load_mnist(n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> tuple[Tensor, ...]:
    """MNIST normalised, flattened to ``[n, 784]`` float32; a random (seeded) subset when ``n_train`` is given."""
    data = np.load(MNIST)
    xtr = torch.from_numpy(data["x_train"]).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD).flatten(1)
    ytr = torch.from_numpy(data["y_train"]).long()
    xte = torch.from_numpy(data["x_test"]).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD).flatten(1)
    yte = torch.from_numpy(data["y_test"]).long()
    g = torch.Generator().manual_seed(seed)
    if n_train is not None:
        idx = torch.randperm(len(xtr), generator=g)[:n_train]
        xtr, ytr = xtr[idx], ytr[idx]
    if n_test is not None:
        xte, yte = xte[:n_test], yte[:n_test]
    return xtr, ytr, xte, yte


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, ...]:
    """scikit-learn's digits (1,797 8x8 images) scaled to [0, 1], float32 ``[n, 64]``, split by a fixed permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(x))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def mlp(sizes: Sequence[int], activation: str = "tanh", seed: int = 0) -> nn.Sequential:
    """``Linear`` layers of the given widths with ``tanh`` or ``relu`` in between."""
    torch.manual_seed(seed)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def train_lbfgs(
    model: nn.Module, x: Tensor, y: Tensor, weight_decay: float, adam_steps: int = 200, lbfgs_steps: int = 200
) -> dict[str, float]:
    """Full-batch Adam then L-BFGS on mean cross-entropy + ``weight_decay/2 * |theta|^2``, towards a stationary point.

    Returns the final loss, accuracy and gradient norm (of the regularised objective).
    """
    params = list(model.parameters())

    def objective() -> Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        return loss + 0.5 * weight_decay * sum((p * p).sum() for p in params)

    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(adam_steps):
        opt.zero_grad()
        objective().backward()
        opt.step()
    lbfgs = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=lbfgs_steps,
        history_size=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
    )

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    lbfgs.step(closure)
    lbfgs.zero_grad()
    loss = objective()
    loss.backward()
    gnorm = float(torch.cat([p.grad.reshape(-1) for p in params]).norm())
    lbfgs.zero_grad(set_to_none=True)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    return {"objective": float(loss.detach()), "train_accuracy": acc, "grad_norm": gnorm}


# ---------------------------------------------------------------------------------------------- agreement
def agreement(a: Tensor, b: Tensor, k: int = 10) -> dict[str, float]:
    """How well the scores ``a [n]`` agree with the reference ``b [n]``: Spearman, Pearson, top-k overlaps.

    ``topk_harmful`` is the share of ``b``'s k most positive (harmful) examples among ``a``'s k most positive,
    ``topk_helpful`` the same for the most negative; ``topk`` their mean.
    """
    from scipy.stats import pearsonr, spearmanr

    a64, b64 = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    harm = len(set(np.argsort(-a64)[:k]) & set(np.argsort(-b64)[:k])) / k
    helpf = len(set(np.argsort(a64)[:k]) & set(np.argsort(b64)[:k])) / k
    return {
        "spearman": float(spearmanr(a64, b64).statistic),
        "pearson": float(pearsonr(a64, b64).statistic),
        "topk_harmful": harm,
        "topk_helpful": helpf,
        "topk": 0.5 * (harm + helpf),
        "rel_error": float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-300)),
    }


def mean_agreement(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean (and min, for Spearman) of :func:`agreement` over queries."""
    out = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    out["spearman_min"] = float(min(r["spearman"] for r in rows))
    return out


def train_adam(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int = 0) -> float:
    """Adam (lr 1e-3, batch 128, seeded order) on cross-entropy; returns the training accuracy."""
    import torch.nn.functional as F

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
        return float((model(x).argmax(1) == y).float().mean())


def kronfluence_classification_task() -> Any:
    """kronfluence's ``Task`` for a classifier on ``(x, y)`` batches: summed cross-entropy, labels drawn from the
    model for the true Fisher (``sample=True``), the query's summed cross-entropy as the measurement."""
    import torch.nn.functional as F
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            logits = model(x)
            if sample:  # true Fisher: labels drawn from the model
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return Classification()
