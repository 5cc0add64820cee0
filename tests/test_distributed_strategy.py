"""InfluenceStrategy with 2 processes on CPU (gloo): results equal one process; queries split; index; failures.

The DDP runs use ``start_method="fork"`` (about a second each, imports shared with pytest); every rank writes its
results to ``tmp_path``. The failing-rank test launches a standalone script with ``start_method="popen"`` (each rank
its own interpreter, as under torchrun) in a subprocess with a timeout, so a hang cannot stall the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_fastif as lf
from lightning_fastif import errors as lf_errors
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.retrieval.store import load_arrays, load_index
from lightning_fastif.trainer.strategy import InfluenceStrategy

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _clean_distributed_state():
    """Restore environment variables (MASTER_PORT, LOCAL_RANK, ...) and drop any process group after each test."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


class TinyNet(nn.Module):
    """A smooth float64 MLP on the 64 digit pixels (610 parameters: small enough for the exact solver)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 8), nn.Tanh())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def problem():
    from _problems import fit_lbfgs, load_digits_tensors

    torch.manual_seed(0)
    x, y, xt, yt = load_digits_tensors(n_train=300)
    model = TinyNet().double()
    fit_lbfgs(model, x, y, l2=1e-2, max_iter=60)
    return {"model": model, "train": TensorDataset(x, y), "queries": TensorDataset(xt[:40], yt[:40])}


SOLVERS = {
    "exact": lambda: lf.ExactSolver(damping=1e-2),
    "cg": lambda: lf.CGSolver(damping=3e-2, max_iter=200, tol=1e-9),
    "lissa": lambda: lf.LiSSASolver(damping=1e-2, scale=20.0, depth=40, repeats=4, batch_size=16, seed=3),
}


def _module(problem, solver: str, num_candidates: int | None, top_k: int = 5) -> lf.InfluenceModule:
    return lf.InfluenceModule(
        problem["model"],
        problem["train"],
        solver=SOLVERS[solver](),
        num_candidates=num_candidates,
        top_k=top_k,
        batch_size=64,
    )


class _Collect(pl.Callback):
    """Each rank saves its results (as plain dicts) to ``folder/rank<r>.json`` at the end of predict."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.results: list[dict] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self.results = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.results.extend(r.to_dict() for r in outputs)

    def on_predict_end(self, trainer, pl_module) -> None:
        rank, world, _ = pl_module._collectives()
        diagnostics = pl_module.solver.diagnostics
        chains = diagnostics.extra.get("chains") if diagnostics is not None else None
        info = {"rank": rank, "world": world, "chains": chains}
        (self.folder / f"info{trainer.global_rank}.json").write_text(json.dumps(info))
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.results))

    def load(self) -> dict[int, list[dict]]:
        return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(self.folder.glob("rank*.json"))}

    def info(self) -> dict[int, dict]:
        return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(self.folder.glob("info*.json"))}


def _trainer(devices: int, strategy=None, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy if strategy is not None else "auto",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
        **kwargs,
    )


def _predict(im, queries, folder: Path, strategy=None, batch_size: int = 3, callbacks=()) -> dict[int, list]:
    """Results by rank (``{0: [...]}`` for one process); what each rank ran is in ``folder/info<r>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    collect = _Collect(folder)
    devices = 1 if strategy is None else 2
    trainer = _trainer(devices, strategy, [collect, *callbacks])
    trainer.predict(im, DataLoader(queries, batch_size=batch_size), return_predictions=False)
    return collect.load()


def _fork(shard: str = "candidates", timeout: float = 60.0) -> InfluenceStrategy:
    return InfluenceStrategy(shard=shard, timeout=timeout, start_method="fork")


def _assert_same_ranking(got: dict, want: dict) -> None:
    assert got["query_id"] == want["query_id"]
    for side in ("helpful", "harmful"):
        assert got[f"{side}_ids"] == want[f"{side}_ids"], (side, got["query_id"])
        torch.testing.assert_close(
            torch.tensor(got[f"{side}_scores"]), torch.tensor(want[f"{side}_scores"]), rtol=1e-5, atol=1e-12
        )


# ------------------------------------------------------------------------------------------------ registration
def test_strategy_is_registered_and_checks_its_arguments():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["ddp_influence"]["strategy"] is InfluenceStrategy
    trainer = pl.Trainer(strategy="ddp_influence", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, InfluenceStrategy)
    assert trainer.strategy.shard == "candidates" and trainer.strategy.timeout_s == 120.0
    with pytest.raises(ConfigurationError, match="`shard`.*'candidates' or 'queries'.*'rows'"):
        InfluenceStrategy(shard="rows")
    with pytest.raises(ConfigurationError, match="`timeout`.*positive.*-1"):
        InfluenceStrategy(timeout=-1)


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize(
    ("solver", "num_candidates"),
    [("exact", None), ("exact", 9), ("cg", None), ("cg", 9), ("lissa", None), ("lissa", 9)],
)
def test_ddp_ranking_equals_one_process(problem, tmp_path, solver, num_candidates):
    # 5 queries in batches of 3 + 2; with 9 candidates the shards hold 5 and 4, so rank 1 keeps only 4 of top 5
    queries = Subset(problem["queries"], [3, 1, 4, 15, 9])
    one = _predict(_module(problem, solver, num_candidates), queries, tmp_path / "one")[0]
    writer = lf.InfluenceWriter(tmp_path / "written")
    ddp = _predict(
        _module(problem, solver, num_candidates), queries, tmp_path / "ddp", _fork(), callbacks=[writer]
    )
    assert sorted(ddp) == [0, 1]
    info = _Collect(tmp_path / "ddp").info()
    assert [(info[r]["rank"], info[r]["world"]) for r in (0, 1)] == [(0, 2), (1, 2)]  # the work was split
    if solver == "lissa":
        assert [info[r]["chains"] for r in (0, 1)] == [[0, 2], [1, 3]]  # chain c on rank c mod 2
    assert [r["query_id"] for r in one] == [3, 1, 4, 15, 9]
    for rank_results in ddp.values():  # every rank holds the merged (global) answer
        assert len(rank_results) == len(one)
        for got, want in zip(rank_results, one):
            _assert_same_ranking(got, want)
            assert got["num_candidates"] == want["num_candidates"]
    lines = (tmp_path / "written" / "influence.jsonl").read_text().splitlines()
    assert [json.loads(line)["query_id"] for line in lines] == [
        3,
        1,
        4,
        15,
        9,
    ]  # rank 0 wrote each query once


def test_query_sharding_explains_every_query_exactly_once(problem, tmp_path):
    # 7 queries in batches of 3: rank 0 gets 4 (2 batches), rank 1 gets 3 (1 batch), so no collective may run
    queries = Subset(problem["queries"], list(range(2, 9)))
    one = _predict(_module(problem, "lissa", 9), queries, tmp_path / "one")[0]
    writer, report = lf.InfluenceWriter(tmp_path / "out"), lf.InfluenceReport(tmp_path / "out", wandb=False)
    ddp = _predict(
        _module(problem, "lissa", 9), queries, tmp_path / "ddp", _fork("queries"), callbacks=[writer, report]
    )
    info = _Collect(tmp_path / "ddp").info()
    # the writer merges every rank's records into one file, ordered by query id; the report shows them all
    lines = [json.loads(line) for line in (tmp_path / "out" / "influence.jsonl").read_text().splitlines()]
    assert [r["query_id"] for r in lines] == list(range(2, 9))
    assert not list((tmp_path / "out").glob("influence.rank*.jsonl"))
    html = (tmp_path / "out" / "report.html").read_text()
    assert all(f"Query {q}" in html for q in range(2, 9))
    assert [(info[r]["world"], info[r]["chains"]) for r in (0, 1)] == [
        (1, [0, 1, 2, 3])
    ] * 2  # one-process math
    ids = {rank: [r["query_id"] for r in results] for rank, results in ddp.items()}
    assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])  # both ranks worked, on different queries
    assert sorted(ids[0] + ids[1]) == list(range(2, 9))  # none duplicated, none dropped
    by_id = {r["query_id"]: r for results in ddp.values() for r in results}
    for want in one:  # each rank runs the one-process math (all 4 LiSSA chains) on its queries
        _assert_same_ranking(by_id[want["query_id"]], want)


def test_candidate_mode_rejects_a_query_loader_split_across_ranks(problem, tmp_path):
    from torch.utils.data.distributed import DistributedSampler

    class SplitQueries(lf.InfluenceModule):
        def predict_dataloader(self):
            q = problem["queries"]
            return DataLoader(q, batch_size=4, sampler=DistributedSampler(q, num_replicas=2, rank=0))

    im = SplitQueries(problem["model"], problem["train"], solver=SOLVERS["exact"](), num_candidates=None)
    with pytest.raises(Exception, match="same queries.*DistributedSampler over 2 replicas"):
        _trainer(2, _fork()).predict(im, return_predictions=False)


class _RankDependent(TensorDataset):
    """Queries that differ by rank (a rank-seeded augmentation, say): the ranks would explain different things."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return x + 0.01 * rank, y


def test_ranks_holding_different_query_batches_raise(problem):
    im = _module(problem, "exact", None)
    queries = _RankDependent(*problem["queries"].tensors)
    with pytest.raises(Exception, match="DistributedError.*same query batch"):
        _trainer(2, _fork()).predict(im, DataLoader(queries, batch_size=4), return_predictions=False)


# ------------------------------------------------------------------------------------------------ index
class _IndexOnFit(pl.LightningModule):
    """Fits nothing (lr 0) so the DDP fit leaves the weights as they are; FeatureIndexCallback runs at fit end."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_index_built_under_ddp_equals_one_process_index_and_loads_on_every_rank(problem, tmp_path):
    train, wrapped = problem["train"], _IndexOnFit(problem["model"])
    single = lf.FeatureIndexCallback(tmp_path / "single", progress=False).build(wrapped, train)
    callback = lf.FeatureIndexCallback(tmp_path / "ddp", progress=False)  # indexes the fit's own dataset
    trainer = _trainer(2, _fork(), [callback], max_epochs=1, limit_train_batches=1)
    trainer.fit(wrapped, DataLoader(train, batch_size=100, shuffle=True))
    _, meta_one = load_index(single)
    index, meta = load_index(tmp_path / "ddp", expected={"dataset_length": len(train)})
    for key in ("ntotal", "dim", "feature_layer", "dataset_length", "model_fingerprint", "factory"):
        assert getattr(meta, key) == getattr(meta_one, key), key
    one, ddp = load_arrays(single), load_arrays(tmp_path / "ddp")
    assert sorted(one) == sorted(ddp) == ["features", "logits"]
    for name in one:  # rank 0 put every training id back in dataset order, exactly once
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-6, atol=1e-6)
    _, nearest = index.search(one["features"][:20], 5)
    assert nearest[:, 0].tolist() == list(range(20))
    # every rank loads the folder in predict: kNN results equal one process with the in-memory index
    queries = Subset(problem["queries"], [0, 5, 7])
    im = lf.InfluenceModule(
        wrapped, train, solver=SOLVERS["exact"](), num_candidates=9, top_k=5, index=tmp_path / "ddp"
    )
    ddp_results = _predict(im, queries, tmp_path / "pred", _fork())
    one_results = _predict(_module(problem, "exact", 9), queries, tmp_path / "pred1")[0]
    for rank_results in ddp_results.values():
        for got, want in zip(rank_results, one_results):
            _assert_same_ranking(got, want)


# ------------------------------------------------------------------------------------------------ failures
class _Stalls(lf.InfluenceModule):
    def predict_step(self, batch, batch_idx=0, dataloader_idx=0):
        if self.trainer.global_rank == 1:
            time.sleep(30)  # far beyond the timeout: rank 0 must not wait for it
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_a_stalled_rank_makes_the_others_raise_after_the_timeout(problem):
    im = _Stalls(problem["model"], problem["train"], solver=SOLVERS["cg"](), num_candidates=None)
    start = time.perf_counter()
    with pytest.raises(Exception, match="DistributedError") as err:
        _trainer(2, _fork(timeout=2.0)).predict(im, DataLoader(problem["queries"], batch_size=4))
    assert "timeout` = 2 s" in str(err.value)
    assert time.perf_counter() - start < 20  # the launcher then stops the stalled rank


FAILING_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import lightning_fastif as lf

    out = sys.argv[1]
    rank = int(os.environ.get("LOCAL_RANK", 0))

    class Fails(lf.InfluenceModule):
        def predict_step(self, batch, batch_idx=0, dataloader_idx=0):
            if self.trainer.global_rank == 1 and batch_idx == 1:
                raise ValueError("injected failure on rank 1")
            return super().predict_step(batch, batch_idx, dataloader_idx)

    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    im = Fails(model, TensorDataset(x, y), solver=lf.CGSolver(damping=1.0), num_candidates=None)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=lf.InfluenceStrategy(timeout=90, start_method="popen"),
        inference_mode=False, logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    try:
        trainer.predict(im, DataLoader(TensorDataset(x[:12], y[:12]), batch_size=4))
        outcome = {"error": None}
    except BaseException as e:
        outcome = {"error": type(e).__name__, "message": str(e)[:2000], "time": time.time()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    if rank == 1:  # a process that lingers after its error (a notebook, slow clean-up) must not hold rank 0
        time.sleep(120)
    sys.exit(1 if outcome["error"] else 0)
    """
)


def test_a_rank_that_raises_makes_every_rank_raise_promptly(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(FAILING_SCRIPT)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    outcomes = {r: tmp_path / f"rank{r}.json" for r in (0, 1)}
    with open(tmp_path / "log.txt", "w") as log:
        # a session of its own, so both ranks (rank 1 is rank 0's child) are killed together at the end
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 150  # the process group timeout is 90 s: a hang ends here
            while not all(p.exists() for p in outcomes.values()) and time.monotonic() < deadline:
                if proc.poll() is not None and not outcomes[1].exists():
                    break
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, 9)  # rank 1 lingers after its error (see FAILING_SCRIPT)
            proc.wait()
    log_text = (tmp_path / "log.txt").read_text()
    assert all(p.exists() for p in outcomes.values()), log_text[-3000:]
    got = {r: json.loads(p.read_text()) for r, p in outcomes.items()}
    assert got[1]["error"] == "ValueError" and "injected failure" in got[1]["message"]
    assert got[0]["error"] == "DistributedError", got[0]
    assert "Another rank raised or exited" in got[0]["message"]
    # rank 1 is still alive (lingering): rank 0 was freed by the strategy tearing rank 1's process group down
    assert got[0]["time"] - got[1]["time"] < 15, "rank 0 waited for the timeout instead of failing at once"


HANGING_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import lightning_fastif as lf

    out = sys.argv[1]
    rank = int(os.environ.get("LOCAL_RANK", 0))

    class Hangs(lf.InfluenceModule):
        def predict_step(self, batch, batch_idx=0, dataloader_idx=0):
            if self.trainer.global_rank == 1:
                with open(os.path.join(out, "hang_started"), "w") as f:
                    f.write(str(time.time()))
                time.sleep(600)  # a rank that hangs outside any collective (a stuck data loader, a deadlock)
            return super().predict_step(batch, batch_idx, dataloader_idx)

    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    im = Hangs(model, TensorDataset(x, y), solver=lf.CGSolver(damping=1.0), num_candidates=None)
    strategy = lf.InfluenceStrategy(timeout=3, connect_timeout=120, start_method="popen")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, inference_mode=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    try:
        trainer.predict(im, DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4))
        outcome = {"error": None}
    except BaseException as e:
        outcome = {"error": type(e).__name__, "message": str(e)[:2000]}
    outcome["time"] = time.time()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    sys.exit(1 if outcome["error"] else 0)
    """
)


@pytest.mark.slow  # two interpreters start (popen, as under torchrun): ~15 s idle, ~40 s on a loaded machine
def test_a_rank_that_hangs_does_not_outlive_rank_0s_timeout(tmp_path):
    script = tmp_path / "hangs.py"
    script.write_text(HANGING_SCRIPT)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    outcomes = {r: tmp_path / f"rank{r}.json" for r in (0, 1)}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=300)  # before: rank 1 stayed alive for its whole 600 s sleep
            time.sleep(1.0)
            try:
                os.killpg(proc.pid, 0)  # anyone left in the session (the hung rank 1)?
                survivors = True
            except ProcessLookupError:
                survivors = False
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
    assert not survivors, "a rank outlived the launcher"
    log_text = (tmp_path / "log.txt").read_text()
    assert all(p.exists() for p in outcomes.values()), log_text[-3000:]
    got = {r: json.loads(p.read_text()) for r, p in outcomes.items()}
    hang = float((tmp_path / "hang_started").read_text())
    assert got[0]["error"] == "DistributedError" and "`timeout` = 3 s" in got[0]["message"], got[0]
    assert got[1]["error"] == "DistributedError", got[1]  # the hung rank ended with the library's error
    assert "rank 1 was stopped because rank 0 failed" in got[1]["message"]
    # both ended within the timeout plus a bound (the stop grace), far from the 600 s the rank would hang
    assert got[0]["time"] - hang < 3 + 20 and got[1]["time"] - hang < 3 + 20, (hang, got)


def test_a_rendezvous_that_times_out_is_a_distributed_error(monkeypatch):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # rank 0 of 2 whose rank 1 never starts (processes created externally, as under torchrun)
    for key, value in dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0", NODE_RANK="0", WORLD_SIZE="2"
    ).items():
        monkeypatch.setenv(key, value)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    model = nn.Sequential(nn.Linear(5, 3)).double()
    im = lf.InfluenceModule(
        model, TensorDataset(x, y), solver=lf.ExactSolver(damping=1.0), num_candidates=None
    )
    strategy = InfluenceStrategy(timeout=30, connect_timeout=2, start_method="popen")
    start = time.perf_counter()
    with pytest.raises(
        lf_errors.DistributedError, match=r"did not all meet at the rendezvous.*connect_timeout` = 2 s"
    ):
        _trainer(2, strategy).predict(im, DataLoader(TensorDataset(x, y), batch_size=4))
    assert time.perf_counter() - start < 30


def test_connect_timeout_is_checked_and_kept_apart_from_the_collective_timeout():
    strategy = InfluenceStrategy(timeout=5, connect_timeout=60)
    assert (strategy.timeout_s, strategy.connect_timeout_s) == (5.0, 60.0)
    assert InfluenceStrategy(timeout=7).connect_timeout_s == 7.0
    with pytest.raises(ConfigurationError, match="`connect_timeout`.*positive.*0"):
        InfluenceStrategy(connect_timeout=0)
