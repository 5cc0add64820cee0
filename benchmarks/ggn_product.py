"""Cost of one Gauss-Newton product over the data, as a multiple of a forward+backward per vector: the first
implementation (``torch.func`` vjp + jvp + forward-over-reverse) and the fused one, side by side in one run.

The model is the MNIST MLP 784-128-10 (ReLU, all 101,770 parameters, cross-entropy), the data ``N`` MNIST training
images (generated ones when ``/work/shared/data/mnist`` is absent), the batch size of full passes 256 (the
library's default). For ``k`` vectors the ratio is ``time(G V over the data) / (k * time(forward+backward over the
data))`` in process CPU time (one thread: robust to other jobs on a shared machine; wall-clock is saved too);
the contenders are timed round-robin and the medians compared.

Run: ``python benchmarks/ggn_product.py [N] [repeats]`` (defaults 4096 and 7; about a minute).
Saves ``benchmarks/results/ggn_product.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _common import (
    MNIST,
    load_mnist,
    machine_info,
    mlp,
    print_table,
    save_json,
    set_threads,
    time_interleaved,
)
from torch.utils.data import TensorDataset

from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.ggn import batch_ggn_vp, output_hessian_of
from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, select_params

SHARED_MNIST = Path("/work/shared/data/mnist/mnist.npz")


def data(n: int) -> tuple[TensorDataset, str]:
    if not MNIST.exists() and SHARED_MNIST.exists():
        import _common

        _common.MNIST = SHARED_MNIST  # a git worktree sits one level deeper than the main checkout
    if _common_mnist().exists():
        x, y, _, _ = load_mnist(n_train=n)
        return TensorDataset(x, y), "MNIST"
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    ), "generated"


def _common_mnist() -> Path:
    import _common

    return _common.MNIST


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    set_threads()
    ds, source = data(n)
    model = mlp([784, 128, 10], activation="relu").eval()
    loss = PerExampleLoss(model)
    sel = select_params(model)
    spec = ParamSpec.of(sel)
    theta = spec.flatten(sel).detach()
    old = TrainingCurvature(loss, theta, spec, ds, batch_size=256, mode="gauss_newton")
    old.ggn_method = "functorch"
    new = TrainingCurvature(loss, theta, spec, ds, batch_size=256, mode="gauss_newton")

    def forward_backward() -> None:
        for batch in new.shard_batches():
            t = theta.detach().requires_grad_(True)
            torch.autograd.grad(loss(spec.unflatten(t), batch).sum(), t)

    rows, records = [], []
    g = torch.Generator().manual_seed(1)
    for k in (1, 4, 32):
        v = torch.randn(k, spec.numel, generator=g)
        gap = float((new.hvp(v) - old.hvp(v)).norm() / old.hvp(v).norm())
        t = time_interleaved(
            {"fb": forward_backward, "old": lambda v=v: old.hvp(v), "new": lambda v=v: new.hvp(v)}, repeats
        )
        fb = t["fb"]["cpu_median_s"]
        r_old, r_new = t["old"]["cpu_median_s"] / (k * fb), t["new"]["cpu_median_s"] / (k * fb)
        rows.append([k, fb, r_old, r_new, r_old / r_new, gap])
        records.append({"k": k, "timings": t, "ratio_old": r_old, "ratio_new": r_new, "relative_gap": gap})
    # one in-memory batch of 256: the arithmetic without data loading
    batch = new._to_device(tuple(t[:256] for t in ds.tensors))
    outputs_fn, loss_of_outputs = loss.split()
    h_o = output_hessian_of(loss)

    def fb_batch() -> None:
        t = theta.detach().requires_grad_(True)
        torch.autograd.grad(loss(spec.unflatten(t), batch).sum(), t)

    def product(v: torch.Tensor, method: str) -> torch.Tensor:
        return batch_ggn_vp(outputs_fn, loss_of_outputs, theta, spec, batch, v, "sum", h_o, method)

    batch_rows = []
    for k in (1, 4, 32):
        v = torch.randn(k, spec.numel, generator=g)
        t = time_interleaved(
            {
                "fb": fb_batch,
                "old": lambda v=v: product(v, "functorch"),
                "new": lambda v=v: product(v, "fused"),
            },
            3 * repeats,
        )
        fb = t["fb"]["cpu_median_s"]
        r_old, r_new = t["old"]["cpu_median_s"] / (k * fb), t["new"]["cpu_median_s"] / (k * fb)
        batch_rows.append([k, fb, r_old, r_new, r_old / r_new])
        records.append({"k": k, "one_batch": True, "timings": t, "ratio_old": r_old, "ratio_new": r_new})
    print_table(
        f"Gauss-Newton product over N={n} ({source}), MLP 784-128-10 (P={spec.numel}), batch 256, "
        f"{torch.get_num_threads()} thread(s): CPU time per vector / one forward+backward (medians of {repeats})",
        ["k vectors", "fwd+bwd CPU s", "old (functorch)", "new (fused)", "speed-up", "rel. gap"],
        rows,
    )
    print_table(
        f"The same on one in-memory batch of 256 (no data loading; medians of {3 * repeats})",
        ["k vectors", "fwd+bwd CPU s", "old (functorch)", "new (fused)", "speed-up"],
        batch_rows,
    )
    save_json(
        "ggn_product", {"n": n, "source": source, "p": spec.numel, "rows": records, "machine": machine_info()}
    )


if __name__ == "__main__":
    main()
