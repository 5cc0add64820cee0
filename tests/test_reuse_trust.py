"""Issue 17: a resumed record is reused only when everything that made it is equal (settings, query input and
label, the record's own digest); output, index and factor folders are locked while written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_fastif as lf
from lightning_fastif._files import FolderLock, FolderLockedError, folder_lock
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.reporting._signature import changed_settings, run_signature

ROOT = Path(__file__).resolve().parents[1]


class Counting(lf.InfluenceModule):
    """Records the query ids it explains (to tell reused records from recomputed ones)."""

    def explain(self, batch, query_ids=None):
        self.explained = [*getattr(self, "explained", []), *(query_ids or [])]
        return super().explain(batch, query_ids)


def _data():
    torch.manual_seed(0)
    x, y = torch.randn(60, 5, dtype=torch.float64), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    return model, TensorDataset(x, y), x, y


def _module(**kw):
    model, train, x, y = _data()
    settings = {"solver": lf.ExactSolver(damping=0.5), "num_candidates": None, "top_k": 4, **kw}
    return Counting(model, train, **settings), x, y


def _loader(x, y, shift=0.1, ids=range(6)):
    return DataLoader(Subset(TensorDataset(x[:6] + shift, y[:6]), list(ids)), batch_size=3)


def _predict(im, loader, out, **writer):
    """One influence run into ``out``; returns the messages (info lines and warnings) it printed."""
    im.explained = []
    trainer = pl.Trainer(
        accelerator="cpu",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lf.InfluenceWriter(out, **writer)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import logging

        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda rec: records.append(rec.getMessage())  # type: ignore[method-assign]
        log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        log.addHandler(handler)
        old = log.level
        log.setLevel(logging.INFO)
        try:
            trainer.predict(im, loader, return_predictions=False)
        finally:
            log.removeHandler(handler)
            log.setLevel(old)
    return "\n".join([*records, *(str(w.message) for w in caught)])


def _records(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "influence.jsonl").read_text().splitlines() if line.strip()]
    by_id = {r["query_id"]: r for r in lines}
    assert len(by_id) == len(lines), "a query id was written twice"
    return by_id


def _same_answers(a: dict, b: dict) -> bool:
    return a["helpful_ids"] == b["helpful_ids"] and a["helpful_scores"] == pytest.approx(b["helpful_scores"])


# ------------------------------------------------------------------------------------------------ settings
def test_a_rerun_with_the_same_settings_reuses_and_says_so(tmp_path):
    im, x, y = _module()
    _predict(im, _loader(x, y), tmp_path)
    assert sorted(im.explained) == list(range(6))
    said = _predict(im, _loader(x, y), tmp_path, overwrite_hint="--overwrite")
    assert im.explained == []
    assert "reusing 6 records made with the same settings; --overwrite to recompute" in said


@pytest.mark.parametrize("change", ["params", "candidates"])
def test_the_readme_case_other_params_or_candidates_recompute_and_say_which(tmp_path, change):
    """After a run into a folder, a second run with other `params` (head only) or other candidates recomputes
    every query and says which setting changed (it handed back the first run's records before)."""
    first = {"num_candidates": 20} if change == "candidates" else {}
    im, x, y = _module(**first)
    _predict(im, _loader(x, y), tmp_path)
    before = _records(tmp_path)
    second = {"params": ["2.*"]} if change == "params" else {"num_candidates": 20, "candidates": "gradients"}
    im2, _, _ = _module(**second)
    said = _predict(im2, _loader(x, y), tmp_path)
    assert sorted(im2.explained) == list(range(6)), "records of other settings were handed back"
    assert f"settings changed: {change} -> recomputing" in said
    fresh_dir = tmp_path / "fresh"
    im3, _, _ = _module(**second)
    _predict(im3, _loader(x, y), fresh_dir)
    got, want = _records(tmp_path), _records(fresh_dir)
    assert all(_same_answers(got[q], want[q]) for q in want)
    if change == "params":  # the head-only answer is not the all-parameter one
        assert any(got[q]["helpful_scores"] != pytest.approx(before[q]["helpful_scores"]) for q in got)


def test_every_setting_that_determines_a_record_is_in_the_signature(tmp_path):
    """loss, forward_fn, curvature, index folder, pool, params, candidates, model and data: each change is named."""
    from lightning_fastif.applications.pool import with_pool

    im, x, y = _module()
    base = run_signature(im)

    def diff(other):
        return changed_settings(base, run_signature(other))

    assert diff(_module()[0]) == []
    assert diff(_module(params=["2.*"])[0]) == ["params"]
    assert diff(_module(curvature="gauss_newton")[0]) == ["curvature"]
    assert "loss" in diff(
        _module(loss_fn=lambda out, batch: nn.functional.cross_entropy(out, batch[1], reduction="none") * 2)[
            0
        ]
    )
    assert diff(_module(forward_fn=lambda model, batch: model(batch[0]))[0]) == ["forward_fn"]
    assert diff(_module(num_candidates=20, candidates="gradients")[0]) == ["candidates", "num_candidates"]
    assert "pool" in diff(with_pool(im, TensorDataset(x[10:30], y[10:30]), "val"))
    changed = _module()[0]
    with torch.no_grad():
        changed.model[0].weight[0, 0] += 1e-3
    assert diff(changed) == ["model"]
    model, train, _, _ = _data()
    other_data = TensorDataset(train.tensors[0].clone(), train.tensors[1].roll(1))
    assert diff(
        Counting(model, other_data, solver=lf.ExactSolver(damping=0.5), num_candidates=None, top_k=4)
    ) == ["train_data"]
    # an index folder: its path and meta.json (a rebuilt index changes it)
    from lightning_fastif.retrieval.index import TorchIndex
    from lightning_fastif.retrieval.store import save_index

    index = TorchIndex()
    index.add(torch.randn(60, 4))
    save_index(index, tmp_path / "index", {"dataset_length": 60})
    a = run_signature(_module(num_candidates=5, index=str(tmp_path / "index"))[0])
    save_index(index, tmp_path / "index", {"dataset_length": 60, "feature_layer": "2"})
    b = run_signature(_module(num_candidates=5, index=str(tmp_path / "index"))[0])
    assert changed_settings(a, b) == ["index"]


def test_records_without_their_run_file_are_of_unknown_settings_and_recomputed(tmp_path):
    im, x, y = _module()
    _predict(im, _loader(x, y), tmp_path)
    (tmp_path / "influence.run.json").unlink()
    said = _predict(im, _loader(x, y), tmp_path)
    assert sorted(im.explained) == list(range(6))
    assert "settings unknown" in said and "-> recomputing" in said


def test_other_query_inputs_with_the_same_ids_are_recomputed(tmp_path):
    im, x, y = _module()
    _predict(im, _loader(x, y, shift=0.1), tmp_path)
    # ids 0..5 again, but the inputs of 3..5 moved and the label of 1 changed
    y2 = y.clone()
    y2[1] = (y2[1] + 1) % 3
    x2 = x.clone()
    x2[3:6] += 0.5
    said = _predict(im, _loader(x2, y2, shift=0.1), tmp_path)
    assert sorted(im.explained) == [1, 3, 4, 5]
    assert "recomputed 4 queries whose input or label differ" in said
    fresh = tmp_path / "fresh"
    _predict(im, _loader(x2, y2, shift=0.1), fresh)
    got, want = _records(tmp_path), _records(fresh)
    assert sorted(got) == list(range(6))
    assert all(_same_answers(got[q], want[q]) and got[q]["label"] == want[q]["label"] for q in want)
    assert _predict(im, _loader(x2, y2, shift=0.1), tmp_path) and im.explained == []  # now all reused


# ------------------------------------------------------------------------------------------------ digests
def test_a_hand_edited_or_foreign_record_is_recomputed(tmp_path):
    im, x, y = _module()
    _predict(im, _loader(x, y), tmp_path)
    want = _records(tmp_path)
    lines = (tmp_path / "influence.jsonl").read_text().splitlines()
    edited = json.loads(lines[2])
    edited["helpful_scores"] = [s * 1000 for s in edited["helpful_scores"]]  # still valid JSON
    lines[2] = json.dumps(edited)
    other, _, _ = _module(solver=lf.ExactSolver(damping=2.0))  # a record of another run, pasted in for id 4
    _predict(other, _loader(x, y), tmp_path / "other")
    lines[4] = json.dumps(_records(tmp_path / "other")[4])
    (tmp_path / "influence.jsonl").write_text("\n".join(lines) + "\n")
    said = _predict(im, _loader(x, y), tmp_path)
    assert sorted(im.explained) == [2, 4]
    assert "2 records of" in said and "fail their digest check" in said and "[2, 4]" in said
    got = _records(tmp_path)
    assert all(_same_answers(got[q], want[q]) for q in want)


# ------------------------------------------------------------------------------------------------ locks
def test_two_writers_on_one_folder_in_one_trainer_is_an_error(tmp_path):
    im, x, y = _module()
    trainer = pl.Trainer(
        accelerator="cpu",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        callbacks=[lf.InfluenceWriter(tmp_path), lf.InfluenceWriter(tmp_path)],
    )
    with pytest.raises(ConfigurationError, match="another writer of this process is writing it"):
        trainer.predict(im, _loader(x, y), return_predictions=False)
    assert not (tmp_path / "influence.jsonl").exists()
    assert not (tmp_path / ".influence.lock").exists()  # released on the error
    _predict(im, _loader(x, y), tmp_path)  # and the folder is usable afterwards
    assert sorted(_records(tmp_path)) == list(range(6))


_HOLD = """
import sys, time
from lightning_fastif._files import FolderLock
lock = FolderLock(sys.argv[1], "test").acquire()
print("held", flush=True)
time.sleep(60)
"""


def _hold(path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


_SLOW_RUN = """
import sys, time
import lightning.pytorch as pl
sys.path.insert(0, sys.argv[2])
import lightning_fastif as lf
from test_reuse_trust import _loader, _module

class Pause(pl.Callback):  # a long run: it is still writing when the second one starts
    def on_predict_batch_end(self, *args, **kwargs):
        print("writing", flush=True)
        time.sleep(60)

im, x, y = _module()
trainer = pl.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False,
                     callbacks=[lf.InfluenceWriter(sys.argv[1]), Pause()])
trainer.predict(im, _loader(x, y), return_predictions=False)
"""


@pytest.mark.slow
def test_two_influence_runs_on_one_folder_at_once_the_second_fails_naming_the_owner(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, str(tmp_path), str(ROOT / "tests")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "writing"
        written = (tmp_path / "influence.jsonl").read_bytes()
        im, x, y = _module()
        with pytest.raises(
            ConfigurationError, match=rf"output folder .*process {first.pid} on .*pid {first.pid}"
        ):
            _predict(im, _loader(x, y), tmp_path)
        assert im.explained == [] and (tmp_path / "influence.jsonl").read_bytes() == written  # untouched
    finally:
        first.kill()
        first.wait()
    said = _predict(
        im, _loader(x, y), tmp_path
    )  # the owner died (SIGKILL): its lock is free, its records reused
    assert "reusing 3 records" in said and sorted(im.explained) == [3, 4, 5]
    assert sorted(_records(tmp_path)) == list(range(6))


def test_a_lock_held_elsewhere_is_refused_and_freed_when_its_owner_dies(tmp_path):
    proc = _hold(tmp_path / ".lock")
    try:
        with pytest.raises(FolderLockedError, match=rf"process {proc.pid} on "):
            FolderLock(tmp_path / ".lock", "output folder").acquire()
    finally:
        proc.kill()
        proc.wait()
    with FolderLock(tmp_path / ".lock", "output folder") as lock:
        assert lock.held


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / ".out.lock"
    path.write_text(json.dumps({"pid": 2**22 + 12345, "host": "gone", "since": 0}))
    with FolderLock(path, "output folder") as lock:
        assert lock.held and json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_without_flock_the_lock_file_is_exclusive_and_a_dead_owner_is_taken_over(tmp_path, monkeypatch):
    import socket

    monkeypatch.setitem(sys.modules, "fcntl", None)  # a platform without flock: O_EXCL lock files
    path = tmp_path / ".out.lock"
    with FolderLock(path, "output folder") as lock:
        assert lock.held
        with pytest.raises(FolderLockedError, match="another writer of this process"):
            FolderLock(path, "output folder").acquire()
    assert not path.exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": 0}))
    with FolderLock(path, "output folder") as lock:  # its owner is gone: taken over
        assert json.loads(path.read_text())["pid"] == os.getpid()
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": "another-host", "since": 0}))
    with pytest.raises(FolderLockedError, match=f"process {int(dead.stdout)} on another-host"):
        FolderLock(path, "output folder").acquire()  # a pid of another host cannot be checked: refused


def test_index_and_factor_folders_are_locked_while_written(tmp_path):
    from lightning_fastif.retrieval.index import TorchIndex
    from lightning_fastif.retrieval.store import save_index

    index = TorchIndex()
    index.add(torch.randn(5, 3))
    with (
        folder_lock(tmp_path / "index", "index folder"),  # another writer of the folder
        pytest.raises(FolderLockedError, match="index folder .*index"),
    ):
        save_index(index, tmp_path / "index", {"dataset_length": 5})
    assert not (tmp_path / "index").exists()
    save_index(index, tmp_path / "index", {"dataset_length": 5})
    assert (tmp_path / "index" / "meta.json").is_file() and not (tmp_path / ".index.lock").exists()

    from lightning_fastif.functional.kfac.factors import KFACFactors
    from lightning_fastif.solvers.factors_store import save_factors

    with (
        folder_lock(tmp_path / "factors", "factors folder"),
        pytest.raises(FolderLockedError, match="factors folder"),
    ):
        save_factors(tmp_path / "factors", KFACFactors.__new__(KFACFactors), {})
    assert not (tmp_path / "factors").exists()


# ------------------------------------------------------------------------------------------------ correct --pool
def test_correct_over_another_pool_does_not_overwrite_the_previous_output(tmp_path):
    from _models import _digits

    from lightning_fastif.applications.correct.loop import CorrectionSettings
    from lightning_fastif.applications.correct.slice import SliceSpec
    from lightning_fastif.cli.correct import run_correct

    torch.manual_seed(0)
    x, y = _digits(300)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:150]), y[:150]).backward()
        opt.step()
    model.eval()
    splits = {
        "train": TensorDataset(x[:150], y[:150]),
        "val": TensorDataset(x[150:220], y[150:220]),
        "test": TensorDataset(x[220:], y[220:]),
    }

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(splits["train"], batch_size=32)

        def val_dataloader(self):
            return DataLoader(splits["val"], batch_size=32)

        def test_dataloader(self):
            return DataLoader(splits["test"], batch_size=32)

    with torch.no_grad():
        wrong = (model(x[220:]).argmax(1) != y[220:]).nonzero().flatten().tolist()
    assert len(wrong) >= 4
    settings = CorrectionSettings(
        steps=1, anchors_per_step=2, examples_per_step=3, lr=0.05, seeds=[0], methods=["helpful"]
    )
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    im = lf.InfluenceModule(
        model, splits["train"], params=["2.*"], solver=lf.ExactSolver(damping=0.01), num_candidates=20
    )
    spec = SliceSpec(kind="ids", ids=wrong[:6], split="test")
    out = tmp_path / "correct"
    run_correct(trainer, im, Data(), spec, settings, None, str(out), report=False)
    first = (out / "correction.json").read_bytes()
    run_correct(trainer, im, Data(), spec, settings, "val", str(out), report=False)
    assert (out / "correction.json").read_bytes() == first, (
        "correct --pool=val overwrote the train-pool output"
    )
    pooled = json.loads((out / "pool-val" / "correction.json").read_text())
    assert (out / "pool-val" / "corrected.ckpt").is_file() and pooled["summary"]
