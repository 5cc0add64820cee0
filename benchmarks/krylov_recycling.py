"""Does carrying the Krylov space across query batches pay? Block CG on batches of 8 queries, fresh vs recycled.

MNIST MLP 784-128-10 (ReLU, P = 101,770) on 2,000 training images (``--n-train``), Gauss-Newton at the auto damping;
four batches of 8 queries, each solved by block CG from zero ("fresh") and from the Galerkin solution in the span of
the earlier batches' search directions ("recycled", what ``CGSolver(recycle_mb=...)`` does). Reported: iterations
and curvature-vector products (the cost: each product is a pass over the data per vector) per batch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/krylov_recycling.py [--n-train 2000] [--tols 1e-3 1e-4]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import load_mnist, machine_info, mlp, print_table, save_json, set_threads
from kronfluence_vs_exact import queries, train
from torch.utils.data import TensorDataset

import lightning_fastif as lf
from lightning_fastif.functional.solvers.algorithms import block_conjugate_gradient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tols", nargs="+", type=float, default=[1e-3, 1e-4])
    args = parser.parse_args()
    set_threads()
    start = time.perf_counter()
    x, y, xt, yt = load_mnist(args.n_train, 2000)
    model = mlp([784, 128, 10], "relu")
    train(model, x, y, 5)
    model.eval()
    xq, yq, _ = queries(model, xt, yt, args.batches * args.batch)
    solver = lf.CGSolver("auto", curvature="gauss_newton")
    im = lf.InfluenceModule(model, TensorDataset(x, y), num_candidates=None, progress=False, batch_size=1000,
                            solver=solver)  # fmt: skip
    im.s_test((xq[:2], yq[:2]))
    lam = float(solver.damping_used)
    curv = im.curvature().with_mode("gauss_newton")
    rows, out = [], []
    for tol in args.tols:
        store: list[tuple[torch.Tensor, torch.Tensor]] = []
        for b in range(args.batches):
            sl = slice(b * args.batch, (b + 1) * args.batch)
            g = im.query_grads((xq[sl], yq[sl]))
            _, fresh = block_conjugate_gradient(curv.hvp, g, lam, 300, tol)
            rec = (torch.cat([s[0] for s in store]), torch.cat([s[1] for s in store])) if store else None
            keep: list[tuple[torch.Tensor, torch.Tensor]] = []
            _, recycled = block_conjugate_gradient(curv.hvp, g, lam, 300, tol, recycle=rec, keep=keep)
            store += keep
            r = {
                "tol": tol,
                "batch": b,
                "basis": 0 if rec is None else int(rec[0].shape[0]),
                "fresh_iterations": fresh.iterations,
                "fresh_products": fresh.extra["vector_products"],
                "recycled_iterations": recycled.iterations,
                "recycled_products": recycled.extra["vector_products"],
                "recycled_converged": recycled.converged,
            }
            out.append(r)
            rows.append([f"{tol:g}", b, r["basis"], r["fresh_iterations"], r["fresh_products"],
                         r["recycled_iterations"], r["recycled_products"],
                         r["recycled_products"] / r["fresh_products"]])  # fmt: skip
    print_table(
        f"Block CG, batches of {args.batch} queries, N = {args.n_train}, damping {lam:.3g}",
        [
            "tol",
            "batch",
            "recycled basis",
            "fresh it",
            "fresh products",
            "recycled it",
            "recycled products",
            "ratio",
        ],
        rows,
    )
    path = save_json("krylov_recycling", {"machine": machine_info(), "args": vars(args), "damping": lam,
                                          "rows": out, "seconds": time.perf_counter() - start})  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
