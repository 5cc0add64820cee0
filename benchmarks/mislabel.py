"""Mislabelled-example detection by self-influence, against ranking by training loss and at random.

Protocol (Koh & Liang 2017, section 5.4; kronfluence; dattri): flip 10% of the training labels at random (each to
another class), train the model ON THE NOISY LABELS through Lightning, then rank the training set by self-influence
``grad L(z) . (C + damping I)^-1 grad L(z)`` (computed on that noisy-label model) and report the share of flipped
labels found when inspecting the top 5 / 10 / 20% of the ranking, and the ROC AUC. Baselines on the same model:
the training loss, and a random order (expected share found = the share inspected, AUC 0.5).

Problems: scikit-learn's digits (1,437 training images, tanh MLP 64-32-32-10) and an MNIST subset (5,000 images,
tanh MLP 784-32-32-10, /work/shared/data/mnist/mnist.npz). Solvers: Exact (Gauss-Newton curvature where the library
has it; all parameters on digits, the head only on MNIST where the dense matrix would not fit), EK-FAC (all
parameters, when ``lf.EKFACSolver`` exists) and the identity (no curvature: the squared gradient norm, TracIn's
self-influence).

    python benchmarks/mislabel.py            # digits + MNIST 5,000 (a few minutes on 2 shared cores)
    python benchmarks/mislabel.py --quick    # digits only, fewer epochs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import MNIST, load_digits_split, load_mnist, machine_info, print_table, save_json, set_threads

import lightning_fastif as lf
from lightning_fastif.evaluation.lds.settings import IdentitySolver
from lightning_fastif.evaluation.self_influence import mislabel_detection, self_influence

FRACTIONS = (0.05, 0.1, 0.2)


def flip_labels(
    y: torch.Tensor, share: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy labels, flipped mask)``: ``share`` of the labels moved to a different class, uniformly."""
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    ids = torch.randperm(n, generator=g)[: round(share * n)]
    noisy = y.clone()
    noisy[ids] = (y[ids] + torch.randint(1, num_classes, (len(ids),), generator=g)) % num_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[ids] = True
    return noisy, flipped


def train(model: Any, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, seed: int) -> Any:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True))
    return model.eval()


def _solver(kind: str, damping: float) -> Any:
    if kind == "identity":
        return IdentitySolver()
    if kind == "ekfac":
        return lf.EKFACSolver(damping)
    try:  # Gauss-Newton (PSD) where the library has it: self-influence is then >= 0 for every example
        return lf.ExactSolver(damping, curvature="gauss_newton")
    except TypeError:
        return lf.ExactSolver(damping)


def run_problem(
    name: str,
    x,
    y,
    num_classes: int,
    hidden: int,
    epochs: int,
    batch_size: int,
    configs,
    seed: int,
    lr: float,
):
    from torch.utils.data import TensorDataset

    from lightning_fastif.zoo.digits import MLPClassifier

    noisy, flipped = flip_labels(y, 0.1, num_classes, seed)
    torch.manual_seed(seed)
    model = MLPClassifier(
        in_features=x.shape[1], hidden=hidden, num_classes=num_classes, lr=lr, weight_decay=1e-4
    )
    start = time.perf_counter()
    train(model, x, noisy, epochs, batch_size, seed)
    train_s = time.perf_counter() - start
    train_set = TensorDataset(x, noisy)  # the data the model was trained on: noisy labels
    with torch.no_grad():
        pred = model(x).argmax(1)
    fit_noisy = float(
        (pred[flipped] == noisy[flipped]).float().mean()
    )  # how much the model memorised the flips
    acc_clean = float((pred[~flipped] == y[~flipped]).float().mean())
    rows, out = (
        [],
        {
            "problem": name,
            "n": len(x),
            "flipped": int(flipped.sum()),
            "train_seconds": train_s,
            "memorised_flipped_share": fit_noisy,
            "clean_train_accuracy": acc_clean,
            "methods": {},
        },
    )
    losses = None
    for label, kind, params, damping in configs:
        im = lf.InfluenceModule(
            model,
            train_set,
            params=params,
            solver=_solver(kind, damping),
            num_candidates=None,
            batch_size=256,
            progress=False,
        )
        start = time.perf_counter()
        try:
            values, losses = self_influence(im, return_losses=True)
        except Exception as err:  # a solver the library lacks on this model: say so, keep the others
            print(f"  {label}: skipped ({type(err).__name__}: {str(err)[:160]})")
            continue
        seconds = time.perf_counter() - start
        res = mislabel_detection(values, flipped, FRACTIONS)
        res["seconds"] = seconds
        res["negative_share"] = float((values < 0).float().mean())
        out["methods"][label] = res
        rows.append([label, *(res[f"found@{f:.0%}"] for f in FRACTIONS), res["auc"], seconds])
    if losses is not None:
        res = mislabel_detection(losses, flipped, FRACTIONS)
        out["methods"]["training loss"] = res
        rows.append(["training loss", *(res[f"found@{f:.0%}"] for f in FRACTIONS), res["auc"], 0.0])
    rand = torch.rand(len(x), generator=torch.Generator().manual_seed(seed + 1))
    res = mislabel_detection(rand, flipped, FRACTIONS)
    out["methods"]["random"] = res
    rows.append(["random (one seeded order)", *(res[f"found@{f:.0%}"] for f in FRACTIONS), res["auc"], 0.0])
    print_table(
        f"{name}: {len(x)} training examples, {int(flipped.sum())} labels flipped (model trained on them for "
        f"{epochs} epochs: memorised {fit_noisy:.0%} of the flips, clean train accuracy {acc_clean:.1%})",
        ["ranking", *(f"found@{f:.0%}" for f in FRACTIONS), "AUC", "seconds"],
        rows,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits only, fewer epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    threads = set_threads()
    has_ekfac = hasattr(lf, "EKFACSolver")
    results: dict[str, Any] = {
        "machine": machine_info(),
        "threads": threads,
        "quick": args.quick,
        "problems": [],
    }
    x, y, _, _ = load_digits_split(seed=args.seed)
    digits = [
        ("self-influence, Exact (all 3,466 params)", "exact", None, 1e-3),
        ("self-influence, identity (|grad|^2)", "identity", None, 0.0),
    ]
    if has_ekfac:
        digits.insert(1, ("self-influence, EK-FAC (all params)", "ekfac", None, 1e-3))
    # two regimes: a short training run (the flips stay unlearnt: the loss already exposes them) and a long one
    # (the network memorises the flips, their loss falls, and curvature-aware self-influence should help most)
    for epochs in (30,) if args.quick else (30, 300):
        results["problems"].append(
            run_problem(f"digits, {epochs} epochs", x, y, 10, 32, epochs, 64, digits, args.seed, lr=1e-2)
        )
    if not args.quick:
        if not MNIST.is_file():
            print(f"MNIST not found at {MNIST}: skipped")
        else:
            x, y, _, _ = load_mnist(n_train=5000, seed=args.seed)
            mnist = [
                ("self-influence, Exact (head only, 330 params)", "exact", ["head.*"], 1e-3),
                ("self-influence, identity (|grad|^2, all params)", "identity", None, 0.0),
            ]
            if has_ekfac:
                mnist.insert(1, ("self-influence, EK-FAC (all 26,506 params)", "ekfac", None, 1e-3))
            for epochs in (20, 100):
                results["problems"].append(
                    run_problem(
                        f"MNIST 5k, {epochs} epochs", x, y, 10, 32, epochs, 128, mnist, args.seed, lr=1e-2
                    )
                )
    path = save_json("mislabel-quick" if args.quick else "mislabel", results)
    print(f"\nsaved {path} (2 shared CPU cores, loaded by other jobs: seconds are indicative only)")


if __name__ == "__main__":
    main()
