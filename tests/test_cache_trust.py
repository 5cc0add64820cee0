"""Every reused answer matches the question (issue 17): solver caches shared by modules, training data changed in
place after a cache was built, and factor folders that never touch what the library did not write."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, select_params
from lightning_fastif.solvers.kronecker import EKFACSolver


def _mlp_problem(n: int = 30, seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, TensorDataset(x, y)


def _curvature(model, ds, loss_fn=None, forward_fn=None, batch_size=7):
    loss = PerExampleLoss(model, loss_fn, forward_fn)
    params = select_params(model)
    spec = ParamSpec.of(params)
    return TrainingCurvature(loss, spec.flatten(params), spec, ds, batch_size=batch_size)


# ------------------------------------------------------------------------------------------------ item 6
def test_factors_dir_that_is_a_file_is_refused_and_left_untouched(tmp_path):
    target = tmp_path / "factors"
    target.write_text("the user's notes")
    with pytest.raises(ConfigurationError, match="`factors_dir`.*is a file"):
        EKFACSolver(damping=1e-2, factors_dir=target)
    # the file appears after the solver was made: still refused at the solve, before any pass, and kept as is
    later = tmp_path / "later"
    solver = EKFACSolver(damping=1e-2, factors_dir=later)
    later.write_text("made meanwhile")
    model, ds = _mlp_problem()
    cur = _curvature(model, ds)
    for overwrite in (False, True):
        solver.overwrite = overwrite
        with pytest.raises(ConfigurationError, match="`factors_dir`.*is a file"):
            solver.solve(cur, torch.randn(1, cur.spec.numel, dtype=torch.float64))
    assert target.read_text() == "the user's notes" and later.read_text() == "made meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors", "later"]  # nothing hidden, nothing added


def test_factors_dir_holding_other_files_is_refused_with_overwrite(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "results.csv").write_text("1,2,3")
    model, ds = _mlp_problem()
    cur = _curvature(model, ds)
    with pytest.raises(ConfigurationError, match="holds other files \\(results.csv\\)"):
        EKFACSolver(damping=1e-2, factors_dir=target, overwrite=True).solve(
            cur, torch.randn(1, cur.spec.numel, dtype=torch.float64)
        )
    assert (target / "results.csv").read_text() == "1,2,3"


def test_temporary_folders_of_a_killed_factor_save_are_cleaned(tmp_path):
    folder = tmp_path / "factors"
    # a writer that died mid-save: its pid no longer runs
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(proc.stdout)
    stale = tmp_path / f".factors.tmp-{dead}-0badc0de"
    stale.mkdir()
    (stale / "factors.pt").write_bytes(b"half")
    # a live writer's temp (this process) and a folder that only looks like one (holds a foreign file) are kept
    live = tmp_path / f".factors.tmp-{os.getpid()}-1234abcd"
    live.mkdir()
    foreign = tmp_path / f".factors.old-{dead}-feedbeef"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    model, ds = _mlp_problem()
    cur = _curvature(model, ds)
    v = torch.randn(2, cur.spec.numel, dtype=torch.float64)
    x = EKFACSolver(damping=1e-2, factors_dir=folder, residual="none").solve(cur, v)
    assert not stale.exists()
    assert live.exists() and (foreign / "keep.txt").exists()
    assert (folder / "meta.json").is_file()
    # and a load (no save) cleans too
    stale.mkdir()
    again = EKFACSolver(damping=1e-2, factors_dir=folder, residual="none")
    torch.testing.assert_close(again.solve(cur, v), x, rtol=1e-12, atol=0)
    assert not stale.exists()
