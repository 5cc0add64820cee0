"""The GPU-readiness measurements on CUDA: the Gauss-Newton product (first vs fused implementation) per vector
against a forward+backward, EK-FAC factor fitting in float32 vs float64, the dense gradient projection (first call
vs cached blocks) and the weights' fingerprint (first vs cached). Timings wait for the device
(``torch.cuda.synchronize``).

Run: ``python benchmarks/gpu.py`` (exits 0 saying it was skipped when no CUDA device is present);
``--device cpu`` runs the same measurements on the CPU (to check the script, or to compare); ``--quick`` runs a
smaller model. Saves ``benchmarks/results/gpu-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import machine_info, mlp, print_table, save_json, set_threads
from torch.utils.data import TensorDataset

from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, fingerprint, select_params
from lightning_fastif.retrieval.gradients.sketch import DenseProjection
from lightning_fastif.solvers.kronecker import EKFACSolver


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` (after one warm-up), waiting for the device before and after each run."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: skipped (no CUDA device present; `--device cpu` runs it on the CPU)")
        sys.exit(0)
    device = torch.device(args.device)
    set_threads()
    sizes = [784, 128, 10] if args.quick else [784, 1024, 1024, 10]
    n, batch_size = (2048, 256) if args.quick else (16384, 1024)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    ds = TensorDataset(x.to(device), y.to(device))
    model = mlp(sizes, activation="relu").to(device).eval()
    loss = PerExampleLoss(model)
    sel = select_params(model)
    spec = ParamSpec.of(sel)
    theta = spec.flatten(sel).detach()
    curv = TrainingCurvature(loss, theta, spec, ds, batch_size=batch_size, mode="gauss_newton")
    old = TrainingCurvature(loss, theta, spec, ds, batch_size=batch_size, mode="gauss_newton")
    old.ggn_method = "functorch"
    record: dict[str, Any] = {"device": str(device), "sizes": sizes, "n": n, "p": spec.numel}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)

    def forward_backward() -> None:
        for batch in curv.shard_batches():
            t = theta.detach().requires_grad_(True)
            torch.autograd.grad(loss(spec.unflatten(t), batch).sum(), t)

    fb = timed(forward_backward, device)
    rows = []
    for k in (1, 8, 32):
        v = torch.randn(k, spec.numel, device=device)
        t_old, t_new = timed(lambda v=v: old.hvp(v), device), timed(lambda v=v: curv.hvp(v), device)
        rows.append([k, fb, t_old / (k * fb), t_new / (k * fb), t_old / t_new])
        record[f"ggn_k{k}"] = {"fb_s": fb, "old_s": t_old, "new_s": t_new}
    print_table(
        f"Gauss-Newton product on {record.get('gpu', device)}: MLP {sizes} (P={spec.numel}), N={n}, batch "
        f"{batch_size}: time per vector / one forward+backward",
        ["k", "fwd+bwd s", "old (functorch)", "new (fused)", "speed-up"],
        rows,
    )

    fits = {}
    for dt in ("float32", "float64"):
        solver = EKFACSolver(damping=1e-3, fisher="true", dtype=dt, residual="none")
        fits[dt] = timed(lambda s=solver: (setattr(s, "factors", None), s.fit(curv)), device, repeats=3)
    record["ekfac_fit_s"] = fits
    print_table(
        "EK-FAC factors (two passes) by math dtype", ["dtype", "seconds"], [[k, v] for k, v in fits.items()]
    )

    proj_rows = []
    for p in (65_536, 262_144):
        proj = DenseProjection(p, 1024, seed=0)
        xs = torch.randn(64, p, device=device)
        sync_start = time.perf_counter()
        proj(xs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = time.perf_counter() - sync_start
        again = timed(lambda proj=proj, xs=xs: proj(xs), device)
        proj_rows.append([p, first, again, bool(proj._blocks)])
        record[f"projection_p{p}"] = {"first_s": first, "cached_s": again, "cached": bool(proj._blocks)}
    print_table(
        "Dense projection of 64 vectors to D=1024", ["P", "first call s", "next calls s", "cached"], proj_rows
    )

    start = time.perf_counter()
    fingerprint(model)
    first = time.perf_counter() - start
    again = timed(lambda: fingerprint(model), device)
    record["fingerprint"] = {"first_s": first, "cached_s": again}
    print_table("Weights' fingerprint", ["first s", "cached s"], [[first, again]])
    path = save_json(f"gpu-{device.type}", {**record, "machine": machine_info()})
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
