"""A two-minute tour on scikit-learn's bundled digits (no network, no data files).

Trains L2-regularised multinomial logistic regression to convergence, then prints the most helpful and most
harmful training examples of a few misclassified test digits, computed with the exact solver.

Run: ``python -m lightning_fastif.cli.demo``
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf


def _digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return TensorDataset(x[perm[:cut]], y[perm[:cut]]), TensorDataset(x[perm[cut:]], y[perm[cut:]])


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float) -> None:
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 0.5 * l2 * sum(
            (p**2).sum() for p in model.parameters()
        )
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)


def _ascii(x: torch.Tensor) -> list[str]:
    shades = " .:-=+*#%@"
    img = x.reshape(8, 8)
    return ["".join(shades[min(9, int(v * 9.99))] for v in row) for row in img]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=3, help="misclassified test digits to explain")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 strength, used as the solver's damping")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train, test = _digits()
    model = nn.Linear(64, 10).double()
    start = time.perf_counter()
    _fit(model, *train.tensors, args.l2)
    x_test, y_test = test.tensors
    with torch.no_grad():
        pred = model(x_test).argmax(1)
    wrong = (pred != y_test).nonzero().flatten()[: args.queries]
    print(
        f"trained logistic regression on {len(train)} digits in {time.perf_counter() - start:.1f}s; "
        f"test accuracy {(pred == y_test).double().mean():.3f}; explaining {len(wrong)} misclassified digits"
    )
    im = lf.InfluenceModule(model, train, solver=lf.ExactSolver(damping=args.l2), num_candidates=None)
    scores = im.influence((x_test[wrong], y_test[wrong]))
    y_train = train.tensors[1]
    for row, q in enumerate(wrong.tolist()):
        s = scores[row]
        helpful = s.argsort()[: args.top_k].tolist()
        harmful = s.argsort(descending=True)[: args.top_k].tolist()
        print(f"\nquery {q}: label {int(y_test[q])}, predicted {int(pred[q])}")
        print("\n".join("    " + line for line in _ascii(x_test[q])))
        print("  most helpful (negative = lowers the test loss):")
        for i in helpful:
            print(f"    train id {i:5d}  label {int(y_train[i])}  influence {float(s[i]):+.4f}")
        print("  most harmful (positive = raises the test loss):")
        for i in harmful:
            print(f"    train id {i:5d}  label {int(y_train[i])}  influence {float(s[i]):+.4f}")
    print(f"\nsolver: {im.solver} {im.solver.diagnostics}")


if __name__ == "__main__":
    main()
