"""Threads from Python (issue 20): an ``InfluenceModule`` built on a busy machine lowers torch's oversubscribed
threads to the CLI's ``--threads auto`` choice and says so once; a count the user chose is left alone."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf
from lightning_fastif import threads


@pytest.fixture
def busy_two_cores(monkeypatch):
    """Two cores, 1.6 of them busy, nobody chose a thread count, torch at its default of one per core."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_GUARDED", False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("os.getloadavg", lambda: (1.6, 1.0, 1.0))
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _module() -> lf.InfluenceModule:
    data = TensorDataset(torch.randn(12, 3), torch.randint(0, 2, (12,)))
    return lf.InfluenceModule(nn.Linear(3, 2), data, num_candidates=None, progress=False)


def test_influence_module_lowers_oversubscribed_threads_once_and_says_how_to_choose(busy_two_cores, caplog):
    with caplog.at_level(logging.INFO):
        _module()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)  # later modules leave the process alone: the message was said once
        _module()
    assert torch.get_num_threads() == 2
    lines = [r.getMessage() for r in caplog.records if "CPU threads" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "torch would use 2 CPU threads but only 1 of this machine's 2 cores are free" in lines[0]
    assert "lf.set_num_threads(n)" in lines[0] and "OMP_NUM_THREADS" in lines[0]


def test_a_thread_count_the_user_chose_is_left_alone(busy_two_cores, monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what lf.set_num_threads(2) and the CLI's --threads 2 set
    with caplog.at_level(logging.INFO):
        _module()
    assert torch.get_num_threads() == 2
    assert not [r for r in caplog.records if "CPU threads" in r.getMessage()]


def test_free_cores_mean_no_change(busy_two_cores, monkeypatch, caplog):
    monkeypatch.setattr("os.getloadavg", lambda: (0.1, 0.1, 0.1))
    with caplog.at_level(logging.INFO):
        assert threads.guard_oversubscription() is None
    assert torch.get_num_threads() == 2
