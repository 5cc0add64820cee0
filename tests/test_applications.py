"""FastIF's applications: group queries, candidate pools, the correction loop (Python API and CLI), the influence map."""

import copy
import glob
import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf
from lightning_fastif.applications.correct.loop import CorrectionSettings, correct, sgd_step
from lightning_fastif.applications.correct.report import render_correction_report
from lightning_fastif.applications.correct.slice import SliceSpec, select_slice
from lightning_fastif.applications.influence_map import influence_map_svg, map_layout
from lightning_fastif.applications.pool import with_pool
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.losses import resolve_loss
from lightning_fastif.influence.group import explain_group, group_influence, group_s_test
from lightning_fastif.results import InfluenceResult

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUIET = ["--trainer.enable_progress_bar=false"]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def exact(digits_l2_1e3):
    """One ExactSolver for the module: its factorisation is cached per (weights, dataset), so it is built once."""
    return lf.ExactSolver(damping=digits_l2_1e3.l2)


# ------------------------------------------------------------------------------------------------ group queries
def test_group_s_test_is_the_mean_of_per_query_rows_exact_float64(digits_l2_1e3, exact):
    p = digits_l2_1e3
    im = lf.InfluenceModule(p.model, p.train, solver=exact, num_candidates=None, progress=False)
    batch = (p.x_test[:7], p.y_test[:7])
    rows = im.s_test(batch)  # [7, P], one solve per query
    group = group_s_test(im, batch)  # [1, P], one solve of the mean gradient
    assert group.shape == (1, rows.shape[1]) and group.dtype == torch.float64
    torch.testing.assert_close(group[0], rows.mean(0), rtol=1e-10, atol=1e-12)
    ids = torch.arange(0, len(p.train), 7)
    torch.testing.assert_close(
        group_influence(im, batch, ids), im.influence(batch, ids).mean(0), rtol=1e-10, atol=1e-12
    )
    # and against a dense solve of the regularised objective's Hessian, computed here from scratch
    w = torch.cat([p.model.weight.detach().flatten(), p.model.bias.detach()])

    def objective(theta):
        wt, bt = theta[:640].reshape(10, 64), theta[640:]
        return nn.functional.cross_entropy(p.x_train @ wt.T + bt, p.y_train)

    def query(theta):
        wt, bt = theta[:640].reshape(10, 64), theta[640:]
        return nn.functional.cross_entropy(batch[0] @ wt.T + bt, batch[1])

    h = torch.autograd.functional.hessian(objective, w) + p.l2 * torch.eye(w.numel(), dtype=w.dtype)
    g = torch.autograd.functional.jacobian(query, w)
    torch.testing.assert_close(group[0], torch.linalg.solve(h, g), rtol=1e-7, atol=1e-9)


def test_explain_group_ranks_the_group_influence_and_lists_its_members(digits_l2_1e3, exact):
    p = digits_l2_1e3
    im = lf.InfluenceModule(p.model, p.train, solver=exact, num_candidates=None, top_k=5, progress=False)
    batch = (p.x_test[:4], p.y_test[:4])
    res = im.explain_group(batch, [10, 11, 12, 13])
    scores = group_influence(im, batch)
    assert res.group == [10, 11, 12, 13] and res.query_id == 10
    assert res.helpful_ids == torch.argsort(scores)[:5].tolist()
    assert res.harmful_ids == torch.argsort(scores, descending=True)[:5].tolist()
    torch.testing.assert_close(torch.tensor(res.helpful_scores, dtype=torch.float64), scores[res.helpful_ids])
    assert res.extra["group_labels"] == p.y_test[:4].tolist()
    assert res.to_dict()["group"] == [10, 11, 12, 13]
    with pytest.raises(ConfigurationError, match="query_ids"):
        explain_group(im, batch, [1, 2])
    # kNN candidates: the union of the members' candidates is what is scored
    knn = lf.InfluenceModule(p.model, p.train, solver=exact, num_candidates=20, top_k=5, progress=False)
    union = torch.unique(knn.search(batch)[1].flatten())
    res = knn.explain_group(batch)
    assert res.num_candidates == union.numel() and set(res.helpful_ids) <= set(union.tolist())
    sub = group_influence(knn, batch, union)
    assert res.helpful_ids == union[torch.argsort(sub)[:5]].tolist()


def test_group_s_test_on_a_batchnorm_cnn_keeps_the_running_statistics():
    from _models import bn_cnn

    model, train, (xq, yq) = bn_cnn()
    before = _state(model)
    im = lf.InfluenceModule(
        model,
        train,
        params=["layer1.bn2.*", "fc.*"],
        solver=lf.ExactSolver(damping=1.0),
        num_candidates=None,
        progress=False,
    )
    rows = im.s_test((xq, yq))
    group = group_s_test(im, (xq, yq))
    torch.testing.assert_close(group[0], rows.mean(0), rtol=1e-3, atol=1e-5)
    res = im.explain_group((xq, yq))
    assert res.group == list(range(len(yq))) and len(res.helpful_ids) == 10
    assert _same_state(before, _state(model)) and not model.training


def test_group_query_on_a_hugging_face_bert_with_dict_batches():
    from _models import hf_bert

    model, train, query = hf_bert("eager", n_train=24, n_query=3, steps=3)
    im = lf.InfluenceModule(
        model,
        train,
        params=["classifier.*"],
        solver=lf.ExactSolver(damping=0.1),
        num_candidates=None,
        top_k=3,
        progress=False,
    )
    torch.testing.assert_close(group_s_test(im, query)[0], im.s_test(query).mean(0), rtol=1e-4, atol=1e-6)
    res = im.explain_group(query, [5, 6, 7])
    scores = group_influence(im, query)
    assert res.group == [5, 6, 7] and res.helpful_ids == torch.argsort(scores)[:3].tolist()
    assert res.extra["group_labels"] == query["labels"].tolist() and len(res.extra["group_predictions"]) == 3


# ------------------------------------------------------------------------------------------------ pools
def test_pool_scores_other_data_with_the_training_curvature(digits_l2_1e3, exact):
    p = digits_l2_1e3
    im = lf.InfluenceModule(p.model, p.train, solver=exact, num_candidates=30, top_k=4, progress=False)
    pool = TensorDataset(p.x_test[100:400], p.y_test[100:400])
    pim = with_pool(im, pool, "unseen")
    batch = (p.x_test[:3], p.y_test[:3])
    s = im.s_test(batch)
    torch.testing.assert_close(pim.s_test(batch), s)  # the curvature is still the training set's
    reference = -(
        im.query_grads((pool.tensors[0], pool.tensors[1])) @ s.T
    ).T  # [3, 300], by per-example grads
    torch.testing.assert_close(pim.influence(batch), reference, rtol=1e-8, atol=1e-10)
    results = pim.explain(batch)
    assert all(r.extra["pool"] == "unseen" and r.num_candidates == 30 for r in results)
    for q, r in enumerate(results):
        cand = pim.search(batch)[1][q]
        assert max(cand.tolist()) < len(pool)  # ids are positions in the pool
        best = cand[torch.argsort(reference[q, cand])[:4]]
        assert r.helpful_ids == best.tolist()
    group = pim.explain_group(batch)
    assert group.extra["pool"] == "unseen" and group.group == [0, 1, 2]
    with pytest.raises(ConfigurationError, match="pool"):
        with_pool(im, TensorDataset(p.x_test[:0], p.y_test[:0]))


# ------------------------------------------------------------------------------------------------ correction
def _mlp_problem(n=400):
    from _models import _digits

    torch.manual_seed(0)
    x, y = _digits(n + 200)
    y = y.clone()
    y[(y[:n] == 3).nonzero().flatten()[::2]] = 8  # half of the training 3s relabelled as 8
    model = nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    model.eval()
    return model, TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


def test_sgd_step_moves_only_the_selected_parameters():
    model, train, _ = _mlp_problem(120)
    model.append(nn.BatchNorm1d(10)).eval()  # a buffer that must not move either
    before = _state(model)
    batch = (train.tensors[0][:8], train.tensors[1][:8])
    ref = copy.deepcopy(model)
    loss = nn.functional.cross_entropy(ref(batch[0]), batch[1])
    g = torch.autograd.grad(loss, [ref[2].weight, ref[2].bias])
    value = sgd_step(model, resolve_loss(model), ["2.*"], batch, lr=0.3)
    assert value == pytest.approx(float(loss))
    after = _state(model)
    for k in before:
        if k.startswith("2."):
            continue
        assert torch.equal(before[k], after[k]), k
    torch.testing.assert_close(after["2.weight"], before["2.weight"] - 0.3 * g[0])
    torch.testing.assert_close(after["2.bias"], before["2.bias"] - 0.3 * g[1])


def test_correct_runs_every_baseline_on_copies_under_the_same_anchors():
    model, train, test = _mlp_problem()
    ids = select_slice(model, test, SliceSpec(kind="class", label=3))
    assert len(ids) >= 4
    before = _state(model)
    im = lf.InfluenceModule(
        model, train, params=["2.*"], solver=lf.ExactSolver(damping=0.01), num_candidates=40, progress=False
    )
    st = CorrectionSettings(steps=2, anchors_per_step=2, examples_per_step=5, lr=0.1, seeds=[0, 1, 2])
    res = correct(im, test, ids, st, slice_name="3")
    assert _same_state(before, _state(model))  # the user's model is never changed
    assert set(res.curves) == {"helpful", "random", "harmful", "anchors"}
    for c in res.curves.values():
        assert len(c["slice"]) == 3 and all(len(run) == 3 for run in c["slice"] + c["test"])
        assert all(run[0] == 0.0 for run in c["slice"])  # the slice is what the model gets wrong
    assert res.selected["anchors"] == res.anchors  # the anchors baseline steps on exactly the shared anchors
    for s_i in range(3):
        held = set(res.heldout[s_i])
        assert held and held.isdisjoint(a for step in res.anchors[s_i] for a in step)
        assert held | {a for step in res.anchors[s_i] for a in step} <= set(ids)
    # step 0 of every seed: the helpful / harmful picks are the extremes of the anchors' group influence among the
    # union of their candidates (the model is untouched before the first step)
    for s_i in range(3):
        anchors = res.anchors[s_i][0]
        batch = (test.tensors[0][anchors], test.tensors[1][anchors])
        union = torch.unique(im.search(batch)[1].flatten())
        scores = im.influence(batch, union).mean(0)
        assert res.selected["helpful"][s_i][0] == union[torch.argsort(scores)[:5]].tolist()
        assert res.selected["harmful"][s_i][0] == union[torch.argsort(scores, descending=True)[:5]].tolist()
    assert res.model is not model and not _same_state(before, _state(res.model))
    corrected = _state(res.model)  # only the selected parameters (the head, "2.*") moved
    assert all(torch.equal(before[k], corrected[k]) for k in before if not k.startswith("2."))
    rows = {r["method"]: r for r in res.rows()}
    assert rows["helpful"]["seeds"] == 3 and rows["helpful"]["slice_before"] == 0.0
    html = render_correction_report(res)
    assert html.count('class="series"') == 2 * 4 and "http" not in html.replace(
        "http://www.w3.org/2000/svg", ""
    )
    json.dumps(res.to_dict())


def test_correction_settings_and_slices_are_checked():
    with pytest.raises(ConfigurationError, match="anchors_per_step"):
        CorrectionSettings(anchors_per_step=0)
    with pytest.raises(ConfigurationError, match="methods"):
        CorrectionSettings(methods=["helpfull"])
    with pytest.raises(ConfigurationError, match=r"slice.predicted"):
        SliceSpec(kind="pair", label=3)
    with pytest.raises(ConfigurationError, match=r"slice.kind"):
        SliceSpec(kind="cluster")


# ------------------------------------------------------------------------------------------------ influence map
def _results():
    return [
        InfluenceResult(0, 3, 8, [10, 11], [-2.0, -1.0], [20], [0.5], 50),
        InfluenceResult(1, 3, 8, [10, 12], [-1.0, -0.5], [20, 21], [1.5, 0.2], 50),
        InfluenceResult(2, 5, 5, [13], [-0.25], [21], [0.1], 50),
    ]


def test_influence_map_has_a_node_per_query_and_the_expected_edges():
    svg = influence_map_svg(_results(), train_labels=lambda i: i % 10)
    for kind, edges, train in (
        ("helpful", {("q:0", 10), ("q:0", 11), ("q:1", 10), ("q:1", 12), ("q:2", 13)}, {10, 11, 12, 13}),
        ("harmful", {("q:0", 20), ("q:1", 20), ("q:1", 21), ("q:2", 21)}, {20, 21}),
    ):
        panel = re.search(rf'<g class="panel {kind}".*?</g>', svg).group(0)
        assert sorted(re.findall(r'<circle class="query" data-query="([^"]+)"', panel)) == [
            "q:0",
            "q:1",
            "q:2",
        ]
        got = set(re.findall(rf'<line class="edge {kind}" data-query="([^"]+)" data-train="(\d+)"', panel))
        assert {(q, int(t)) for q, t in got} == edges
        assert {int(t) for t in re.findall(r'<circle class="train [a-z]+" data-id="(\d+)"', panel)} == train
    assert "<title>train 10, label 0; helpful to q:0 -2, q:1 -1</title>" in svg
    # an example pulled by two queries sits between them, weighted by |influence|, inside the circle
    lay = map_layout(_results(), "helpful")
    q = {k: (x, y) for k, x, y, _, _ in lay["queries"]}
    x, y, w = lay["train"][10]
    ex = (2 * q["q:0"][0] + q["q:1"][0]) / 3 * 0.72
    assert w == 3.0 and abs(x - ex) < 0.07 and x * x + y * y < 1


def test_html_report_shows_the_map_and_group_members(tmp_path):
    from lightning_fastif.reporting.html import render_html_report

    group = InfluenceResult(4, None, None, [1, 2], [-1.0, -0.5], [3], [0.2], 9, group=[4, 7, 9])
    html = render_html_report([*_results(), group])
    assert 'class="influence-map"' in html and "Group of 3 queries" in html and "4, 7, 9" in html
    assert html.count('<circle class="query"') == 2 * 4


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_cli_correct_end_to_end_and_group_influence_over_an_unseen_pool(tmp_path):
    from lightning_fastif.cli.app import main

    os.environ["WANDB_MODE"] = "offline"
    common = [
        "-c",
        CONFIGS / "digits.yaml",
        "-c",
        CONFIGS / "digits_confused.yaml",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    main(
        [
            str(a)
            for a in ["fit", *common, "-c", CONFIGS / "digits_fit.yaml", "--trainer.max_epochs=6", *QUIET]
        ]
    )
    main(
        [
            str(a)
            for a in [
                "correct",
                *common,
                "-c",
                CONFIGS / "digits_correct.yaml",
                "--slice.kind=class",
                "--steps=1",
                "--anchors_per_step=2",
                "--examples_per_step=4",
                "--num_candidates=20",
                *QUIET,
            ]
        ]
    )
    out = tmp_path / "correct"
    data = json.loads((out / "correction.json").read_text())
    assert {r["method"] for r in data["summary"]} == {"helpful", "random", "harmful", "anchors"}
    assert all(r["seeds"] == 3 and r["slice_before"] == 0.0 for r in data["summary"])
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 2 and "helpful" in html
    ckpt = torch.load(out / "corrected.ckpt", weights_only=False)
    assert "head.weight" in ckpt["state_dict"] and ckpt["correction"]["summary"]
    tables = glob.glob(
        str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "correction_*.table.json")
    )
    assert tables, "the correction table is in the offline W&B run"
    # influence of the corrected model: the misclassified test queries as one group, candidates from `val`
    main(
        [
            str(a)
            for a in [
                "influence",
                *common,
                "-c",
                CONFIGS / "digits_influence.yaml",
                f"--ckpt_path={out / 'corrected.ckpt'}",
                "--queries.group=true",
                "--queries.select=first",
                "--queries.n=5",
                "--pool=val",
                "--num_candidates=30",
                "--params=[head.*]",
                "--solver=lightning_fastif.ExactSolver",
                "--solver.init_args.damping=0.01",
                "--trainer.logger=false",
                *QUIET,
            ]
        ]
    )
    lines = (tmp_path / "influence" / "influence.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["group"] == [0, 1, 2, 3, 4] and rec["extra"]["pool"] == "val"
    assert max(rec["helpful_ids"] + rec["harmful_ids"]) < 180  # ids of the validation split
    assert "Group of 5 queries" in (tmp_path / "influence" / "report.html").read_text()
