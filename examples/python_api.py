"""The Python API without a Trainer: s_test, influence scores, and ranked results for a batch.

Trains L2-regularised logistic regression on scikit-learn's digits (float64, to convergence), then uses each
solver (the default ``AutoSolver``, Exact, CG, self-tuned LiSSA) and prints whether each converged.

Run: ``python examples/python_api.py``
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16
    y = torch.tensor(digits.target)
    train, (x_test, y_test) = TensorDataset(x[:1400], y[:1400]), (x[1400:], y[1400:])
    model = nn.Linear(64, 10).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:1400]), y[:1400]) + 0.5e-3 * sum(
            (p**2).sum() for p in model.parameters()
        )
        loss.backward()
        return loss

    opt.step(closure)
    queries = (x_test[:3], y_test[:3])

    # The default solver is lf.AutoSolver(): Exact here (650 parameters), damping "auto". This model was trained with
    # L2 = 1e-3, so the damping that matches its objective is 1e-3: every solver below solves the same system.
    for solver in (
        lf.AutoSolver(damping=1e-3),
        lf.ExactSolver(damping=1e-3),
        lf.CGSolver(damping=1e-3),
        # self-tuning LiSSA: scale by power iteration on batches of 64, depth so that (1 - damping/scale)^depth <= 0.01
        lf.LiSSASolver(damping=1e-3, scale="auto", depth="auto", batch_size=64, max_depth=50_000),
    ):
        im = lf.InfluenceModule(model, train, solver=solver, num_candidates=None, progress=False)
        s = im.s_test(queries)  # [3, 650]
        scores = im.influence(queries)  # [3, 1400]; positive = harmful
        print(
            f"{solver}: |s_test| = {[round(v, 2) for v in s.norm(dim=1).tolist()]}, most helpful of query 0: "
            f"{scores[0].argsort()[:5].tolist()}"
        )
        d = (
            solver.diagnostics
        )  # converged + the measure (relative residual; LiSSA: (1 - damping/scale)^depth)
        print(
            f"    converged={d.converged} {d.measure}={d.value:.3g} (tolerance {d.tolerance:g}), {d.seconds:.2f}s"
        )

    im = lf.InfluenceModule(model, train, solver=lf.ExactSolver(damping=1e-3), num_candidates=300, top_k=5)
    for r in im.explain(queries):  # kNN candidates from an index built in memory
        print(r.to_dict())


if __name__ == "__main__":
    main()
