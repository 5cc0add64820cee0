"""Linear datamodeling score (LDS) of the library's solvers on the digits demo and an MNIST MLP.

For each problem: train the model through Lightning, draw M random half-size subsets of the training set (seeded),
retrain the model on each through Lightning from ONE seeded initialisation (cold start, the standard protocol of
TRAK / dattri / kronfluence), record the loss of Q test queries, and correlate (Spearman over subsets, mean over
queries, 95% bootstrap CI) with each solver's predicted group effect ``-(1/N) sum_{i not in S} I(z_i, q)``.
The retrained models are shared by every solver (one retraining per subset, resumed from the per-subset files).

Solvers: Exact (Gauss-Newton curvature where the library has it), CG, LiSSA, EK-FAC (when ``lf.EKFACSolver``
exists) and the identity (gradient dot product, no curvature). Published for reference (dattri benchmark, MNIST
MLP, cold retraining, 50 subsets): CG ~0.26, TRAK-50 ~0.45 (also EK-FAC ~0.3 in kronfluence-style runs).

    python benchmarks/lds.py            # digits demo + MNIST 5k MLP, M = 20 (about 10 minutes on 2 shared cores)
    python benchmarks/lds.py --quick    # digits only, M = 6, fewer epochs
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import MNIST, load_mnist, machine_info, print_table, save_json, set_threads

import lightning_fastif as lf
from lightning_fastif.evaluation.lds.settings import IdentitySolver, LDSSettings
from lightning_fastif.evaluation.lds.task import lds_check

PUBLISHED = "dattri (MNIST MLP, cold retraining): CG ~0.26, TRAK-50 ~0.45"


def _gn(cls: Any, *args: Any, **kwargs: Any) -> Any:
    """The solver on Gauss-Newton curvature where the library has it (PSD: no saddle-point failures)."""
    try:
        return cls(*args, curvature="gauss_newton", **kwargs)
    except TypeError:
        return cls(*args, **kwargs)


def solvers(damping: float, exact_params: list[str] | None, quick: bool) -> list[tuple[str, Any, Any]]:
    out: list[tuple[str, Any, Any]] = [
        ("Exact (GN)" + (" head only" if exact_params else ""), _gn(lf.ExactSolver, damping), exact_params),
        ("CG (GN)", _gn(lf.CGSolver, damping, max_iter=20 if quick else 50, tol=1e-4), None),
        (
            "LiSSA",
            _gn(lf.LiSSASolver, damping, scale=25.0, depth=200 if quick else 1000, repeats=1, batch_size=32),
            None,
        ),
        ("identity (grad dot)", IdentitySolver(), None),
    ]
    if hasattr(lf, "EKFACSolver"):
        out.insert(1, ("EK-FAC", lf.EKFACSolver(damping), None))
    return out


def train(model: Any, train_set: Any, epochs: int, batch_size: int, seed: int) -> Any:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    pl.seed_everything(seed, verbose=False)
    pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, DataLoader(train_set, batch_size=batch_size, shuffle=True))
    return model.eval()


def run_problem(
    name: str,
    model: Any,
    train_set: Any,
    query: Any,
    settings: LDSSettings,
    configs,
    cache: Path,
    warm: LDSSettings | None = None,
):
    out_dir = cache / name.replace(" ", "_")
    rows, record = [], {"problem": name, "settings": settings.__dict__, "solvers": {}}
    for label, solver, params in configs:
        im = lf.InfluenceModule(
            model,
            train_set,
            params=params,
            solver=solver,
            num_candidates=None,
            batch_size=256,
            progress=False,
        )
        start = time.perf_counter()
        try:
            scores = im.influence(query)
        except Exception as err:  # keep the other solvers' rows
            print(f"  {label}: skipped ({type(err).__name__}: {str(err)[:200]})")
            record["solvers"][label] = {"skipped": f"{type(err).__name__}: {err}"}
            continue
        seconds = time.perf_counter() - start
        rep = lds_check(im, query, settings, out_dir, scores=scores)
        record["solvers"][label] = {**rep.to_dict(), "influence_seconds": seconds}
        row = [label, rep.lds, f"[{rep.ci_low:.3f}, {rep.ci_high:.3f}]"]
        if warm is not None:  # the same scores against warm-started retraining (less retraining noise)
            wrep = lds_check(im, query, warm, out_dir, scores=scores)
            record["solvers"][label]["warm_start"] = wrep.to_dict()
            row += [wrep.lds, f"[{wrep.ci_low:.3f}, {wrep.ci_high:.3f}]"]
        rows.append([*row, seconds])
        print(
            f"  {label}: LDS {rep.lds:.3f} [{rep.ci_low:.3f}, {rep.ci_high:.3f}] (influence {seconds:.1f}s)"
        )
    heads = ["solver", "LDS cold", "95% CI"]
    if warm is not None:
        heads += [f"LDS warm ({warm.max_epochs} ep.)", "95% CI"]
    print_table(
        f"{name}: LDS over M = {settings.subsets} subsets of {settings.fraction:g} of {len(train_set)} training "
        f"examples, {settings.num_queries} test queries; cold = retrained {settings.max_epochs} epochs from one "
        f"seeded initialisation; warm = from the trained weights; published: {PUBLISHED}",
        [*heads, "influence s"],
        rows,
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits only, M = 6, fewer epochs")
    parser.add_argument("--subsets", type=int, default=None, help="M (default 20, quick 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "lightning_fastif_lds",
        help="folder of the per-subset retraining results (a rerun resumes from it)",
    )
    args = parser.parse_args()
    threads = set_threads()
    m = args.subsets or (6 if args.quick else 20)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "threads": threads,
        "quick": args.quick,
        "problems": [],
    }
    from torch.utils.data import TensorDataset

    from lightning_fastif.zoo.digits import DigitsClassifier, DigitsDataModule, MLPClassifier

    # the digits demo: configs/digits.yaml's model and data (hidden 64, lr 0.01, weight decay 1e-3, 30 epochs)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    epochs = 10 if args.quick else 30
    torch.manual_seed(args.seed)
    model = train(
        DigitsClassifier(hidden=64, lr=0.01, weight_decay=1e-3), dm.train_set, epochs, 64, args.seed
    )
    x_test, y_test = dm.test_set.tensors
    settings = LDSSettings(
        subsets=m, fraction=0.5, seed=args.seed, max_epochs=epochs, batch_size=64, num_queries=100
    )
    query = (x_test[:100], y_test[:100])
    results["problems"].append(
        run_problem(
            "digits demo",
            model,
            dm.train_set,
            query,
            settings,
            solvers(1e-2, None, args.quick),
            args.cache,
            None if args.quick else dataclasses.replace(settings, warm_start=True, max_epochs=5),
        )
    )
    if not args.quick and MNIST.is_file():
        x, y, xt, yt = load_mnist(n_train=5000, n_test=100, seed=args.seed)
        train_set = TensorDataset(x, y)
        torch.manual_seed(args.seed)
        mlp = MLPClassifier(in_features=784, hidden=32, num_classes=10, lr=3e-3, weight_decay=1e-3)
        model = train(mlp, train_set, 20, 64, args.seed)
        settings = LDSSettings(
            subsets=m, fraction=0.5, seed=args.seed, max_epochs=20, batch_size=64, num_queries=100
        )
        results["problems"].append(
            run_problem(
                "MNIST 5k MLP",
                model,
                train_set,
                (xt, yt),
                settings,
                solvers(1e-2, ["head.*"], False),
                args.cache,
                dataclasses.replace(settings, warm_start=True, max_epochs=5),
            )
        )
    path = save_json("lds-quick" if args.quick else "lds", results)
    print(f"\nsaved {path} (2 shared CPU cores, loaded by other jobs: seconds are indicative only)")


if __name__ == "__main__":
    main()
