"""Progress of long stages: a bar on a terminal, a few lines (not one per step) in a log file."""

import io
import sys
import time


def test_progress_to_a_log_file_writes_a_few_lines_not_one_per_step(monkeypatch):
    from lightning_fastif._runtime import StageProgress

    log = io.StringIO()  # not a terminal, like a CI log or `> run.log 2>&1`
    monkeypatch.setattr(sys, "stderr", log)
    progress = StageProgress()
    start = time.perf_counter()
    steps = 0
    while time.perf_counter() - start < 3.0:  # past tqdm's 2 s delay, with many steps
        steps += 1
        progress("hessian", steps, 10**9)
    progress("hessian", 10**9, 10**9)
    updates = log.getvalue().count("lightning_fastif hessian")
    assert steps > 1000
    assert updates <= 3, f"{updates} progress updates for {steps} steps"


def test_stage_timings_wait_for_cuda_work_and_do_nothing_on_the_cpu(monkeypatch):
    import torch
    from torch import nn

    from lightning_fastif._runtime import StageProgress, synchronize

    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    synchronize(torch.device("cpu"))
    synchronize(nn.Linear(2, 2))  # a CPU module
    synchronize(torch.zeros(1))
    assert waits == []
    synchronize("cuda:0")
    assert waits == [torch.device("cuda", 0)]
    bar = StageProgress(device="cuda:0")
    for done in range(1, 4):
        bar("hvp", done, 3)
    assert len(waits) == 2  # once, when the stage ends: not at every step
