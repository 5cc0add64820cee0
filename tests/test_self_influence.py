"""Self-influence: against a float64 reference loop, any solver, DDP equal to one process, ranking/AUC, the CLI."""

from __future__ import annotations

import copy
import glob
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.evaluation.self_influence import (
    SelfInfluenceTask,
    mislabel_detection,
    rank_by_self_influence,
    self_influence,
)

ROOT = Path(__file__).resolve().parents[1]


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _reference_self_influence(model, train, damping, params=None):
    """grad L(z_i) . (H + damping I)^-1 grad L(z_i) by the float64 per-example loop of tests/_models.py."""
    from _models import reference_influence

    x, y = train.tensors
    inf = reference_influence(model, train, (x, y), _ce, params=params, damping=damping)  # [n, n]
    return -torch.diagonal(inf)


@pytest.fixture(scope="module")
def bn_problem():
    from _models import bn_cnn

    model, train, _ = bn_cnn(n_train=40)
    return copy.deepcopy(model).double().eval(), TensorDataset(
        *(t.double() if t.is_floating_point() else t for t in train.tensors)
    )


@pytest.mark.filterwarnings("ignore:vmap over examples failed", "ignore:ExactSolver.*not positive definite")
def test_self_influence_equals_float64_reference_on_a_batchnorm_cnn(bn_problem):
    # the few-step CNN sits at a saddle (indefinite Hessian): the values match the reference, signs may be mixed
    model, train = bn_problem
    params = ["layer1.conv2.weight", "fc.weight", "fc.bias"]
    want = _reference_self_influence(model, train, 1e-2, params=params)
    im = lf.InfluenceModule(model, train, params=params, solver=lf.ExactSolver(1e-2), num_candidates=None)
    got = self_influence(im, chunk_size=7)  # uneven chunks: 7 x 5 + 5
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    # the library's I(z, z) has the opposite sign (positive = harmful): self-influence = -I(z, z)
    x, y = train.tensors
    diag = torch.stack([im.influence((x[i : i + 1], y[i : i + 1]), [i])[0, 0] for i in (0, 13, 39)])
    torch.testing.assert_close(diag, -got[[0, 13, 39]], rtol=1e-7, atol=1e-10)
    # a given subset of ids, in the given order, with losses
    vals, losses = self_influence(im, ids=[39, 2, 17], return_losses=True)
    torch.testing.assert_close(vals, want[[39, 2, 17]], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(losses, _ce(model, (x[[39, 2, 17]], y[[39, 2, 17]])).detach())


def test_iterative_solvers_reach_the_same_self_influence(digits_l2_1e2):
    p = digits_l2_1e2
    train = TensorDataset(p.x_train[:200], p.y_train[:200])
    im = lf.InfluenceModule(p.model, train, solver=lf.ExactSolver(0.1), num_candidates=None, batch_size=64)
    exact = self_influence(im)
    assert bool((exact > 0).all())  # the positive convention: grad . (H + lambda I)^-1 grad, H convex here
    im.solver = lf.CGSolver(0.1, max_iter=300, tol=1e-10)
    torch.testing.assert_close(self_influence(im), exact, rtol=1e-6, atol=1e-8)
    # a full-batch LiSSA (batch = the training set) is a deterministic Richardson iteration
    im.solver = lf.LiSSASolver(0.1, scale=4.0, depth=500, repeats=1, batch_size=10_000)
    torch.testing.assert_close(self_influence(im, ids=range(10)), exact[:10], rtol=1e-4, atol=1e-8)


def test_bad_arguments_name_the_argument(digits_l2_1e2):
    p = digits_l2_1e2
    im = lf.InfluenceModule(p.model, p.train, solver=lf.ExactSolver(1e-2), num_candidates=None)
    with pytest.raises(ConfigurationError, match=r"`ids`.*\[0, 1200\).*1200"):
        self_influence(im, ids=[0, 1200])
    with pytest.raises(ConfigurationError, match="`chunk_size`.*positive int.*0"):
        self_influence(im, chunk_size=0)


# ------------------------------------------------------------------------------------------------ ranking
def test_mislabel_detection_on_a_constructed_ranking():
    flipped = torch.zeros(100, dtype=torch.bool)
    flipped[[3, 10, 50, 70, 90]] = True
    perfect = flipped.double() + torch.linspace(0, 0.5, 100)  # every flipped example above every clean one
    res = mislabel_detection(perfect, flipped)
    assert res["found@5%"] == 1.0 and res["found@10%"] == 1.0 and res["auc"] == pytest.approx(1.0)
    assert mislabel_detection(-perfect, flipped)["auc"] == pytest.approx(0.0)
    # hand-made: flipped examples at ranks 1, 2 (top), 30, 60, 100 (bottom) of 100
    scores = torch.arange(100, 0, -1).double()  # id i has rank i + 1
    flipped = torch.zeros(100, dtype=torch.bool)
    flipped[[0, 1, 29, 59, 99]] = True
    res = mislabel_detection(scores, flipped, fractions=(0.05, 0.3))
    assert res["found@5%"] == pytest.approx(2 / 5) and res["found@30%"] == pytest.approx(3 / 5)
    # AUC = P(flipped above clean): clean below each flipped = 95, 95, 95-27=68, 95-56=39, 0  -> sum / (5 * 95)
    assert res["auc"] == pytest.approx((95 + 95 + 68 + 39 + 0) / (5 * 95))
    with pytest.raises(ConfigurationError, match="`flipped`.*both"):
        mislabel_detection(scores, torch.zeros(100, dtype=torch.bool))


def test_ranking_orders_by_decreasing_self_influence_with_ties_by_id():
    recs = rank_by_self_influence(
        torch.tensor([5, 2, 9, 1]), torch.tensor([0.5, 3.0, 0.5, 1.0]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    )
    assert [r["train_id"] for r in recs] == [2, 1, 5, 9] and [r["rank"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["loss"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.distributed
def test_ddp_self_influence_equals_one_process(digits_l2_1e2, tmp_path):
    import lightning.pytorch as pl

    p = digits_l2_1e2
    train = TensorDataset(p.x_train[:101], p.y_train[:101])

    def run(devices, strategy):
        im = lf.InfluenceModule(
            p.model, train, solver=lf.ExactSolver(1e-2), num_candidates=None, batch_size=16
        )

        def save(ids, values, losses, trainer):  # on every rank, after the gather
            per_rank = sum(len(x[0]) for x in task._parts)
            torch.save(
                {"ids": ids, "values": values, "mine": per_rank},
                tmp_path / f"{devices}_{trainer.global_rank}.pt",
            )

        task = SelfInfluenceTask(im, on_done=save)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy=strategy,
            inference_mode=False,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.predict(task, DataLoader(torch.arange(101), batch_size=16), return_predictions=False)

    saved = dict(os.environ)
    try:
        run(1, "auto")
        run(2, lf.InfluenceStrategy(timeout=60, start_method="fork"))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
    one = torch.load(tmp_path / "1_0.pt")
    assert one["ids"].tolist() == list(range(101))
    for rank in (0, 1):  # every rank holds every id once, equal to one process
        got = torch.load(tmp_path / f"2_{rank}.pt")
        assert got["ids"].tolist() == list(range(101))
        torch.testing.assert_close(got["values"], one["values"], rtol=1e-6, atol=1e-9)
    # the work was split: rank 0 scored ids 0::2 of each batch (8 per full batch), rank 1 ids 1::2
    assert torch.load(tmp_path / "2_0.pt")["mine"] == 51 and torch.load(tmp_path / "2_1.pt")["mine"] == 50


# ------------------------------------------------------------------------------------------------ CLI
def test_self_influence_subcommand_end_to_end_on_digits(tmp_path):
    from lightning_fastif.cli.app import main

    os.environ["WANDB_MODE"] = "offline"
    main(
        [
            "self-influence",
            "-c",
            str(ROOT / "configs" / "digits.yaml"),
            "-c",
            str(ROOT / "configs" / "digits_self_influence.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--ckpt_path=null",  # the seeded initial weights: a smoke test, not a trained model
            "--params=[head.*]",
            "--top=12",
            "--trainer.enable_progress_bar=false",
        ]
    )
    lines = [
        json.loads(x) for x in (tmp_path / "self_influence" / "self_influence.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 1258 and [r["rank"] for r in lines[:3]] == [1, 2, 3]
    values = [r["self_influence"] for r in lines]
    assert values == sorted(values, reverse=True) and sorted(r["train_id"] for r in lines) == list(
        range(1258)
    )
    html = (tmp_path / "self_influence" / "self_influence.html").read_text()
    assert "Training examples most likely mislabelled or atypical" in html
    assert html.count("data:image/png;base64") == 12 and f'data-train-id="{lines[0]["train_id"]}"' in html
    tables = glob.glob(
        str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "self_influence_*.json")
    )
    assert tables
    table = json.loads(Path(tables[-1]).read_text())
    assert table["columns"][:2] == ["rank", "train_id"] and table["data"][0][1] == lines[0]["train_id"]
