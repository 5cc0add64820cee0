import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def digits_l2_1e3():
    from _problems import digits_logistic

    return digits_logistic(1e-3)


@pytest.fixture(scope="session")
def digits_l2_1e2():
    from _problems import digits_logistic

    return digits_logistic(1e-2)


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """Lightning never calls ``wandb.finish()``: a run left open by one test would be reused by the next test's
    WandbLogger, which would then write its files into the first test's folder."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
