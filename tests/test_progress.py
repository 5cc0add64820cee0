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
