"""Peers: other influence libraries from PyPI against ours (ExactSolver), on the same model, data and damping.

Model: a tanh MLP 64-32-10 (P = 2,410) on scikit-learn's digits (1,437 training images), trained to a stationary
point (Adam then full-batch L-BFGS, weight decay 1e-3). Damping lambda = 1e-2 everywhere. For each peer, in one run:

- setup time (what does not depend on the query: Hessian, factors, caches) and time per query to retrieve the
  top-10 training examples, one query at a time (median over several queries after a warm-up query);
- agreement of its scores over the whole training set with ours, per query: Spearman, Pearson, top-10 overlap
  (harmful and helpful sets), averaged over the queries.

Sign and scale. Ours: I = -grad L(z) . (H + lambda I)^-1 grad L(z_test), positive = harmful. Each peer's scores are
multiplied by the sign its documentation and code give (``sign`` in the JSON) so that positive = harmful before any
metric is computed; the least-squares factor ``a`` in peer ~ a * ours (before the sign flip) is also recorded, so a
sign mistake shows as a negative factor. Scale does not enter Spearman or top-k; it is stated per peer below.

Peers (each is tried; a peer that does not install or run is recorded with its error and skipped):
captum ``NaiveInfluenceFunction`` (dense Hessian of the *summed* loss, eigendecomposition; hessian_reg = N lambda,
all P eigenpairs kept, so it equals ours times -1/N), captum ``TracInCPFast`` (last-layer gradient dot products,
no Hessian: a different quantity, shown for reference), dattri ``IFAttributorExplicit`` and ``IFAttributorCG``,
pyDVL ``DirectInfluence`` and ``CgInfluence``, kronfluence EK-FAC (an approximation of the Gauss-Newton Hessian).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import io
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    agreement,
    kronfluence_classification_task,
    load_digits_split,
    machine_info,
    mean_agreement,
    mlp,
    print_table,
    save_json,
    set_threads,
    train_lbfgs,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

DAMPING = 1e-2
WEIGHT_DECAY = 1e-3
TOP_K = 10


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Problem:
    """The trained model, the data and the queries shared by every contender."""

    def __init__(self, n_queries: int) -> None:
        xtr, ytr, xte, yte = load_digits_split(seed=0)
        self.model = mlp([64, 32, 10], "tanh", seed=0)
        start = time.perf_counter()
        self.train_info = train_lbfgs(self.model, xtr, ytr, WEIGHT_DECAY)
        self.train_info["seconds"] = time.perf_counter() - start
        self.model.eval()
        self.x, self.y = xtr, ytr
        self.train_ds = TensorDataset(xtr, ytr)
        self.xq, self.yq = xte[:n_queries], yte[:n_queries]
        self.n = len(xtr)
        self.p = sum(p.numel() for p in self.model.parameters())
        self.tmp = Path(tempfile.mkdtemp(prefix="peers_"))
        self.ckpt = self.tmp / "model.pt"
        torch.save(self.model.state_dict(), self.ckpt)

    def fresh_model(self) -> nn.Module:
        return copy.deepcopy(self.model).eval()


# ---------------------------------------------------------------------------------------------- contenders
# Each returns (setup(), query(i) -> top-10 ids, all_scores() -> raw scores [Q, N], sign, note).


def ours(pb: Problem) -> dict[str, Any]:
    from lightning_fastif import ExactSolver, InfluenceModule
    from lightning_fastif.functional.scores import split_topk

    im = InfluenceModule(
        pb.fresh_model(), pb.train_ds, solver=ExactSolver(DAMPING), num_candidates=None, batch_size=2048
    )

    def setup() -> None:
        im.solver.factorise(im.curvature())

    def query(i: int) -> Tensor:
        scores = im.influence((pb.xq[i : i + 1], pb.yq[i : i + 1]))
        return split_topk(scores, torch.arange(pb.n), TOP_K)[2]

    return {"setup": setup, "query": query, "all_scores": lambda: im.influence((pb.xq, pb.yq)), "sign": 1.0,
            "package": "lightning_fastif", "note": "ExactSolver (dense Hessian of the mean loss, Cholesky, cached), "
            "jvp scoring over all N"}  # fmt: skip


def captum_naive(pb: Problem) -> dict[str, Any]:
    from captum.influence import NaiveInfluenceFunction

    state: dict[str, Any] = {}

    def setup() -> None:
        state["if"] = NaiveInfluenceFunction(
            pb.fresh_model(), pb.train_ds, str(pb.ckpt), loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=2048, hessian_reg=pb.n * DAMPING, hessian_inverse_tol=1e-9, projection_dim=pb.p,
        )  # fmt: skip

    def query(i: int) -> Tensor:
        return state["if"].influence((pb.xq[i : i + 1], pb.yq[i : i + 1]), k=TOP_K, proponents=False).indices

    return {"setup": setup, "query": query, "all_scores": lambda: state["if"].influence((pb.xq, pb.yq)),
            "sign": -1.0, "package": "captum", "expected_factor": -1.0 / pb.n,
            "note": "score = g_test' (H_sum + reg I)^-1 g_train with H_sum the Hessian of the summed loss; "
            "hessian_reg = N*lambda and all P eigenpairs kept make it -ours/N; proponents = helpful, so "
            "opponents (proponents=False) are our harmful top-10"}  # fmt: skip


def captum_tracin_fast(pb: Problem) -> dict[str, Any]:
    from captum.influence import TracInCPFast

    state: dict[str, Any] = {}

    def setup() -> None:
        model = pb.fresh_model()
        state["if"] = TracInCPFast(
            model, model[-1], pb.train_ds, [str(pb.ckpt)], loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=2048,
        )  # fmt: skip

    def query(i: int) -> Tensor:
        return state["if"].influence((pb.xq[i : i + 1], pb.yq[i : i + 1]), k=TOP_K, proponents=False).indices

    return {"setup": setup, "query": query, "all_scores": lambda: state["if"].influence((pb.xq, pb.yq)),
            "sign": -1.0, "package": "captum",
            "note": "TracIn with one checkpoint: last-layer g_test . g_train, no Hessian (a different quantity); "
            "positive = proponent (helpful)"}  # fmt: skip


def _dattri(pb: Problem, kind: str) -> dict[str, Any]:
    from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit
    from dattri.task import AttributionTask

    model = pb.fresh_model()

    def loss_func(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    if kind == "explicit":
        attr: Any = IFAttributorExplicit(task, regularization=DAMPING, device="cpu")
    else:
        attr = IFAttributorCG(task, regularization=DAMPING, device="cpu", max_iter=100, tol=1e-7)
    full = DataLoader(pb.train_ds, batch_size=pb.n)  # one batch: the Hessian of the mean over all N

    def setup() -> None:
        attr.cache(full)

    def scores(lo: int, hi: int) -> Tensor:
        q = DataLoader(TensorDataset(pb.xq[lo:hi], pb.yq[lo:hi]), batch_size=hi - lo)
        return attr.attribute(full, q).T  # dattri returns [N, Q]

    def query(i: int) -> Tensor:
        return torch.topk(-scores(i, i + 1), TOP_K, dim=1).indices

    return {"setup": setup, "query": query, "all_scores": lambda: scores(0, len(pb.xq)), "sign": -1.0,
            "package": "dattri", "note": f"IFAttributor{kind.capitalize()}: g_train . (H + reg I)^-1 g_test of the "
            "mean loss, reg = lambda; positive = helpful; the inverse-Hessian transform is redone for every "
            "attribute() call (no cache), the training loader is one batch of N"}  # fmt: skip


def dattri_explicit(pb: Problem) -> dict[str, Any]:
    return _dattri(pb, "explicit")


def dattri_cg(pb: Problem) -> dict[str, Any]:
    return _dattri(pb, "cg")


def _pydvl(pb: Problem, kind: str) -> dict[str, Any]:
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import CgInfluence, DirectInfluence

    model = pb.fresh_model()
    if kind == "direct":
        inf: Any = DirectInfluence(model, F.cross_entropy, regularization=DAMPING)
    else:
        inf = CgInfluence(model, F.cross_entropy, regularization=DAMPING, rtol=1e-7, atol=1e-7, maxiter=100)
    state: dict[str, Any] = {}

    def setup() -> None:
        state["fit"] = inf.fit(DataLoader(pb.train_ds, batch_size=pb.n))

    def scores(lo: int, hi: int) -> Tensor:
        return state["fit"].influences(pb.xq[lo:hi], pb.yq[lo:hi], pb.x, pb.y, mode=InfluenceMode.Up)

    def query(i: int) -> Tensor:
        return torch.topk(-scores(i, i + 1), TOP_K, dim=1).indices

    return {"setup": setup, "query": query, "all_scores": lambda: scores(0, len(pb.xq)), "sign": -1.0,
            "package": "pyDVL", "note": f"{'DirectInfluence' if kind == 'direct' else 'CgInfluence'}: "
            "<(H + reg I)^-1 g_test, g_train> of the mean loss, reg = lambda; positive = helpful"}  # fmt: skip


def pydvl_direct(pb: Problem) -> dict[str, Any]:
    return _pydvl(pb, "direct")


def pydvl_cg(pb: Problem) -> dict[str, Any]:
    return _pydvl(pb, "cg")


def kronfluence_ekfac(pb: Problem) -> dict[str, Any]:
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = kronfluence_classification_task()
    model = prepare_model(pb.fresh_model(), task)
    analyzer = Analyzer(
        "bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=str(pb.tmp / "kron"),
        log_level=logging.WARNING,
    )  # fmt: skip
    score_args = ScoreArguments(damping_factor=DAMPING)
    counter = iter(range(10**6))

    def setup() -> None:
        torch.manual_seed(0)
        analyzer.fit_all_factors(
            "ekfac", dataset=pb.train_ds, per_device_batch_size=256, factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )  # fmt: skip

    def scores(lo: int, hi: int) -> Tensor:
        name = f"scores{next(counter)}"
        analyzer.compute_pairwise_scores(
            name, factors_name="ekfac", query_dataset=TensorDataset(pb.xq[lo:hi], pb.yq[lo:hi]),
            train_dataset=pb.train_ds, per_device_query_batch_size=hi - lo, per_device_train_batch_size=512,
            score_args=score_args, overwrite_output_dir=True,
        )  # fmt: skip
        return analyzer.load_pairwise_scores(name)["all_modules"]

    def query(i: int) -> Tensor:
        return torch.topk(-scores(i, i + 1), TOP_K, dim=1).indices

    return {"setup": setup, "query": query, "all_scores": lambda: scores(0, len(pb.xq)), "sign": -1.0,
            "package": "kronfluence", "note": "EK-FAC (true Fisher, labels sampled from the model), damping_factor "
            "= lambda; score = g_test' (G_ekfac + lambda I)^-1 g_train, positive = helpful; an approximation of "
            "the Gauss-Newton Hessian, so agreement is limited by design; writes factors and scores to disk"}  # fmt: skip


CONTENDERS: dict[str, Callable[[Problem], dict[str, Any]]] = {
    "ours (ExactSolver)": ours,
    "captum NaiveInfluenceFunction": captum_naive,
    "captum TracInCPFast": captum_tracin_fast,
    "dattri IFAttributorExplicit": dattri_explicit,
    "dattri IFAttributorCG": dattri_cg,
    "pyDVL DirectInfluence": pydvl_direct,
    "pyDVL CgInfluence": pydvl_cg,
    "kronfluence EK-FAC": kronfluence_ekfac,
}
DISTS = {"lightning_fastif": "lightning-fastif", "captum": "captum", "dattri": "dattri", "pyDVL": "pyDVL",
         "kronfluence": "kronfluence"}  # fmt: skip
PACKAGE_OF = {"ours (ExactSolver)": "lightning-fastif", "captum NaiveInfluenceFunction": "captum",
              "captum TracInCPFast": "captum", "dattri IFAttributorExplicit": "dattri",
              "dattri IFAttributorCG": "dattri", "pyDVL DirectInfluence": "pyDVL", "pyDVL CgInfluence": "pyDVL",
              "kronfluence EK-FAC": "kronfluence"}  # fmt: skip


def run_contender(name: str, pb: Problem, n_time: int, reference: Tensor | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "package": PACKAGE_OF[name], "version": version(PACKAGE_OF[name])}
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # peers' progress bars (dattri) would flood the table
            _run(name, pb, n_time, reference, out)
        out["status"] = "ok"
    except Exception as err:
        out["status"] = "failed"
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
    return out


def _run(name: str, pb: Problem, n_time: int, reference: Tensor | None, out: dict[str, Any]) -> None:
    """Set up, time and score one contender, filling ``out`` (raises on failure)."""
    c = CONTENDERS[name](pb)
    out["note"] = c["note"]
    out["sign"] = c["sign"]
    start = time.perf_counter()
    c["setup"]()
    out["setup_s"] = time.perf_counter() - start
    c["query"](0)  # warm-up (not counted)
    times, tops = [], []
    for i in range(1, 1 + n_time):
        start = time.perf_counter()
        tops.append(c["query"](i % len(pb.xq)))
        times.append(time.perf_counter() - start)
    out["per_query_s"] = statistics.median(times)
    out["per_query_runs_s"] = times
    out["top10_ids_first_timed_query"] = tops[0].flatten().tolist()
    raw = c["all_scores"]().detach().float()
    if raw.shape != (len(pb.xq), pb.n):
        raise RuntimeError(f"expected scores of shape {(len(pb.xq), pb.n)}, got {tuple(raw.shape)}")
    out["raw_scores"] = raw
    if reference is not None:
        factors = [float((raw[q] @ reference[q]) / (reference[q] @ reference[q])) for q in range(len(pb.xq))]
        out["lsq_factor_vs_ours"] = statistics.median(factors)
        if "expected_factor" in c:
            out["expected_factor"] = c["expected_factor"]
        signed = c["sign"] * raw
        out["agreement"] = mean_agreement(
            [agreement(signed[q], reference[q], TOP_K) for q in range(len(pb.xq))]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="about 30 s: 3 queries; ours, captum TracInCPFast, dattri CG"
    )
    parser.add_argument("--only", nargs="*", help="run only these contenders (names as in the table)")
    args = parser.parse_args()
    threads = set_threads()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    n_queries, n_time = (3, 1) if args.quick else (10, 5)
    pb = Problem(n_queries)
    print(f"digits tanh MLP 64-32-10: P = {pb.p:,}, N = {pb.n:,}, {n_queries} queries, lambda = {DAMPING:g}")
    names = list(CONTENDERS)
    if args.only:
        names = [n for n in names if n in args.only or n == "ours (ExactSolver)"]
    elif args.quick:
        names = ["ours (ExactSolver)", "captum TracInCPFast", "dattri IFAttributorCG"]
    results, reference = [], None
    for name in names:
        print(f"  {name} ...", flush=True)
        r = run_contender(name, pb, n_time, reference)
        if name == "ours (ExactSolver)":
            if r["status"] != "ok":
                raise SystemExit(f"our own ExactSolver failed: {r['error']}")
            reference = r["raw_scores"]
            r["agreement"] = mean_agreement([agreement(reference[q], reference[q]) for q in range(n_queries)])
            r["lsq_factor_vs_ours"] = 1.0
        r.pop("raw_scores", None)
        if r["status"] != "ok":
            print(f"    failed: {r['error']}", flush=True)
        results.append(r)

    ours_r = results[0]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append(
                [
                    r["name"],
                    r["version"],
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    "failed: " + r["error"][:60],
                ]
            )
            continue
        a = r["agreement"]
        rows.append([r["name"], r["version"], r["setup_s"], r["per_query_s"], r["per_query_s"] / ours_r["per_query_s"],
                     a["spearman"], a["pearson"], a["topk"], f"{r['lsq_factor_vs_ours']:.3g}", "ok"])  # fmt: skip
    print_table(
        f"digits, lambda = {DAMPING:g}: top-{TOP_K} retrieval per query and agreement with ours (signs aligned)",
        [
            "contender",
            "version",
            "setup s",
            "s / query",
            "x ours",
            "spearman",
            "pearson",
            "top-10",
            "a (peer~a*ours)",
            "status",
        ],
        rows,
    )
    installs = {
        "captum": "pip install captum (no torch change)",
        "dattri": "pip install dattri (no torch change)",
        "kronfluence": "pip install --no-deps kronfluence accelerate einops einconv opt-einsum safetensors psutil "
        "(its torch>=2.1 + torchvision pin would pull torch 2.14 with CUDA wheels)",
        "pyDVL": "pip install --no-deps pyDVL pyDeprecate more-itertools, then pip install dask distributed zarr "
        "pandas (pyDVL pins numpy<2, which would downgrade numpy 2.4)",
        "torch-influence": "not on PyPI (pip: 'No matching distribution found for torch-influence'): not run",
    }
    payload = {
        "benchmark": "peers",
        "machine": machine_info(),
        "config": {
            "quick": args.quick,
            "model": "64-32-10 tanh",
            "num_params": pb.p,
            "num_train": pb.n,
            "num_queries": n_queries,
            "timed_queries_per_contender": n_time,
            "damping": DAMPING,
            "weight_decay": WEIGHT_DECAY,
            "top_k": TOP_K,
            "torch_threads": threads,
            "train": pb.train_info,
        },
        "sign_and_scale": "every peer's scores are multiplied by `sign` (from its docs/code) so positive = harmful; "
        "`lsq_factor_vs_ours` is the median over queries of the least-squares a in raw_peer ~ a * ours",
        "installs": installs,
        "versions": {k: version(v) for k, v in DISTS.items()} | {"torch": torch.__version__},
        "contenders": results,
        "wall_s": time.perf_counter() - started,
    }
    path = save_json("peers" + ("-quick" if args.quick else ""), payload)
    print(f"\nsaved {path.relative_to(path.parents[2])} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
