"""LDS: a known answer (L2 logistic regression, small removals, retrained to convergence through Lightning), a random
attribution near 0, resume, sharding over ranks, settings checks, and `evaluate --lds.*` end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.evaluation.lds.core import (
    lds_subsets,
    linear_datamodeling_score,
    predicted_group_effects,
    shard_subsets,
)
from lightning_fastif.evaluation.lds.settings import IdentitySolver, LDSSettings
from lightning_fastif.evaluation.lds.task import lds_check

ROOT = Path(__file__).resolve().parents[1]
L2 = 1e-2


class LogReg(pl.LightningModule):
    """Multinomial logistic regression with an explicit L2 term, trained full-batch by L-BFGS in float64."""

    def __init__(self, l2: float = L2) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10).double()
        self.l2 = l2

    def forward(self, x):
        return self.lin(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        reg = sum((p**2).sum() for p in self.parameters())
        return F.cross_entropy(self(x), y) + 0.5 * self.l2 * reg

    def configure_optimizers(self):
        return torch.optim.LBFGS(
            self.parameters(),
            lr=1,
            max_iter=100,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            history_size=50,
            line_search_fn="strong_wolfe",
        )


@pytest.fixture(scope="module")
def convex():
    from _problems import fit_lbfgs, load_digits_tensors

    x, y, xt, yt = load_digits_tensors(n_train=200)
    model = LogReg()
    fit_lbfgs(model.lin, x, y, L2)  # the same objective as training_step: (1/N) sum CE + l2/2 |theta|^2
    im = lf.InfluenceModule(model, TensorDataset(x, y), solver=lf.ExactSolver(L2), num_candidates=None)
    return im, (xt[:24], yt[:24])


# 10% removed per subset; full-batch L-BFGS from the trained weights converges to the subset's optimum
SETTINGS = dict(subsets=16, fraction=0.9, max_epochs=2, batch_size=10_000, warm_start=True)


def test_lds_of_exact_influence_is_high_and_of_a_random_attribution_near_zero(convex, tmp_path):
    im, query = convex
    before = {k: v.clone() for k, v in im.model.state_dict().items()}
    rep = lds_check(im, query, LDSSettings(**SETTINGS), tmp_path)
    assert rep.lds >= 0.9 and rep.ci_low <= rep.lds <= rep.ci_high, rep.to_dict()
    assert rep.retrained == list(range(16)) and rep.resumed == [] and rep.num_queries == 24
    for k, v in im.model.state_dict().items():  # the user's model was copied, never changed
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # the same retrained models (resumed from the files: nothing retrained), a random attribution
    noise = torch.randn(24, 200, generator=torch.Generator().manual_seed(0))
    rand = lds_check(im, query, LDSSettings(**SETTINGS), tmp_path, scores=noise)
    assert rand.retrained == [] and rand.resumed == list(range(16))
    assert abs(rand.lds) < 0.2 and rand.ci_low < 0 < rand.ci_high, rand.to_dict()
    # the sign matters: the negated attribution is as wrong as exact influence is right
    neg = lds_check(im, query, LDSSettings(**SETTINGS), tmp_path, scores=-im.influence(query))
    assert neg.lds == pytest.approx(-rep.lds)
    # the gradient dot product (no curvature) ranks subsets worse than the exact solve on this problem
    im_id = lf.InfluenceModule(im.model, im.train_dataset, solver=IdentitySolver(), num_candidates=None)
    ident = lds_check(im_id, query, LDSSettings(**SETTINGS), tmp_path)
    assert ident.resumed == list(range(16)) and ident.lds < rep.lds


def test_resume_skips_finished_subsets_and_retrains_a_missing_one(convex, tmp_path):
    im, query = convex
    settings = LDSSettings(subsets=4, fraction=0.9, max_epochs=1, batch_size=10_000, warm_start=True)
    first = lds_check(im, query, settings, tmp_path)
    files = sorted(Path(first.folder).glob("subset_*.json"))
    assert [f.name for f in files] == [f"subset_{m:04d}.json" for m in range(4)]
    files[2].unlink()
    again = lds_check(im, query, settings, tmp_path)
    assert again.retrained == [2] and again.resumed == [0, 1, 3]
    assert again.lds == pytest.approx(first.lds) and again.per_query == pytest.approx(first.per_query)
    # other settings never reuse these files (another fingerprint, another folder)
    other = lds_check(im, query, LDSSettings(**{**settings.__dict__, "seed": 1}), tmp_path)
    assert other.folder != first.folder and other.retrained == [0, 1, 2, 3]


def test_two_ranks_cover_every_subset_once_and_agree_with_one_process(convex, tmp_path):
    im, query = convex
    settings = LDSSettings(subsets=5, fraction=0.9, max_epochs=1, batch_size=10_000, warm_start=True)
    assert shard_subsets(5, 0, 2) == [0, 2, 4] and shard_subsets(5, 1, 2) == [1, 3]
    r1 = lds_check(im, query, settings, tmp_path / "ddp", rank=1, world_size=2)
    assert r1 is None  # rank 0's subsets are not there yet
    r0 = lds_check(im, query, settings, tmp_path / "ddp", rank=0, world_size=2)
    assert r0.retrained == [0, 2, 4]
    done = lds_check(im, query, settings, tmp_path / "ddp", rank=1, world_size=2)
    assert done.retrained == [] and done.resumed == [1, 3]
    one = lds_check(im, query, settings, tmp_path / "one")
    assert one.retrained == [0, 1, 2, 3, 4] and done.lds == pytest.approx(one.lds)
    with pytest.raises(ConfigurationError, match="`rank`"):
        shard_subsets(5, 2, 2)


def test_predicted_group_effect_and_spearman_on_a_hand_made_case():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # N = 4
    subsets = torch.tensor([[0, 1], [2, 3], [0, 3]])
    # -(1/N) sum over the REMOVED examples: removed {2,3} -> -7/4, {0,1} -> -3/4, {1,2} -> -5/4
    torch.testing.assert_close(
        predicted_group_effects(scores, subsets), torch.tensor([[-1.75, -0.75, -1.25]])
    )
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    actual = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    mean, low, high, per = linear_datamodeling_score(pred, actual)
    assert per == pytest.approx([1.0, -1.0]) and mean == pytest.approx(0.0) and low <= 0 <= high
    s = lds_subsets(10, 3, 0.5, seed=4)
    assert s.shape == (3, 5) and all(len(set(r.tolist())) == 5 for r in s)
    assert torch.equal(s, lds_subsets(10, 3, 0.5, seed=4))


def test_settings_are_checked_with_messages_naming_the_argument():
    with pytest.raises(ConfigurationError, match="`lds.fraction`.*between 0 and 1.*1.5"):
        LDSSettings(subsets=4, fraction=1.5)
    with pytest.raises(ConfigurationError, match="`lds.subsets`.*at least 2"):
        LDSSettings(subsets=1)
    with pytest.raises(ConfigurationError, match="`lds.max_epochs`"):
        LDSSettings(subsets=4, max_epochs=0)


def test_evaluate_with_lds_end_to_end_on_digits(tmp_path):
    from lightning_fastif.cli.app import main

    os.environ["WANDB_MODE"] = "offline"
    args = [
        "evaluate",
        "-c",
        str(ROOT / "configs" / "digits.yaml"),
        "-c",
        str(ROOT / "configs" / "digits_evaluate.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--ckpt_path=null",  # seeded initial weights: a smoke test of the plumbing
        "--index_dir=null",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--queries.select=first",
        "--queries.n=2",
        "--ks=[10]",
        "--loo_removals=0",
        "--solver=lightning_fastif.ExactSolver",
        "--solver.damping=0.01",
        "--lds.subsets=3",
        "--lds.max_epochs=1",
        "--lds.num_queries=10",
    ]
    main(args)
    result = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())
    lds = result["lds"]
    assert lds["num_subsets"] == 3 and lds["num_queries"] == 10 and lds["retrained"] == [0, 1, 2]
    assert lds["solver"].startswith("ExactSolver") and -1.0 <= lds["lds"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "evaluate" / "lds").glob("lds-*/subset_*.json")) == [
        "subset_0000.json",
        "subset_0001.json",
        "subset_0002.json",
    ]  # resumable: what a rerun loads instead of retraining


@pytest.mark.distributed
def test_lds_under_ddp_spreads_subsets_over_two_processes_and_equals_one_process(convex, tmp_path):
    from lightning_fastif.evaluation.lds.task import run_lds

    im, query = convex
    settings = LDSSettings(subsets=5, fraction=0.9, max_epochs=1, batch_size=10_000, warm_start=True)
    one = lds_check(im, query, settings, tmp_path / "one")

    def save(report, trainer):  # on every rank, after the barrier
        (tmp_path / f"rank{trainer.global_rank}.json").write_text(json.dumps(report.to_dict()))

    saved = dict(os.environ)
    try:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=lf.InfluenceStrategy(shard="queries", timeout=60, start_method="fork"),
            inference_mode=False,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        assert run_lds(trainer, im, query, settings, tmp_path / "ddp", on_done=save) is None  # the parent
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["retrained"] == [0, 2, 4] and reports[1]["retrained"] == [1, 3]  # each subset once
    for rep in reports:  # every rank computed the same LDS from all five files, equal to one process
        assert rep["per_query"] == pytest.approx(one.per_query, abs=1e-9) and rep["lds"] == pytest.approx(
            one.lds
        )


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.gain = nn.Parameter(torch.full((4,), 2.0))  # no reset_parameters: kept, with a warning

    def forward(self, x):
        return self.lin(x) * self.gain


def test_seeded_initialisation_is_shared_and_leaves_the_model_alone():
    from lightning_fastif.evaluation.lds.retrain import _seeded_init

    model = _Scaled()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="1 parameter tensor.*gain"):
        a = _seeded_init(model, seed=3)
    b = _seeded_init(model, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same initialisation for every subset
    assert not torch.equal(a["lin.weight"], before["lin.weight"]) and torch.equal(a["gain"], before["gain"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
