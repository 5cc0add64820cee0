"""What the report and the JSONL say (issue 9, item 18): "dist" and a score's size explained, the solver string
never wrapped inside a number, details with the full settings, flags shown, training labels and the query split
in every JSONL record, and the W&B table's flags column."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_fastif as lf
from lightning_fastif.reporting.html import render_html_report
from lightning_fastif.reporting.wandb_table import WANDB_COLUMNS, build_rows
from lightning_fastif.results import InfluenceResult

SOLVER = "LiSSASolver(damping=0.01, scale=25.0, depth=1000, repeats=4, batch_size=8, seed=0)"


def _result(**kw) -> InfluenceResult:
    base = dict(
        query_id=0,
        label=3,
        prediction=5,
        helpful_ids=[1, 2],
        helpful_scores=[-40.0, -2.0],
        harmful_ids=[7],
        harmful_scores=[3.0],
        num_candidates=9,
        query_loss=0.7,
        loss="CrossEntropyLoss(label_smoothing=0.1) from model.criterion",
        flags=["saturated_query: loss 0, gradient 0, every score is 0"],
        extra={"solver": "lissa", "solver_config": SOLVER, "curvature": "hessian", "damping": 0.01},
    )
    base.update(kw)
    return InfluenceResult(**base)


def _text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def test_report_explains_dist_and_the_size_of_a_score():
    summary = {"training examples": 1000, "solver": SOLVER}
    with_knn = render_html_report(
        [_result(helpful_distances=[0.5, 0.7], harmful_distances=[1.2])], summary=summary
    )
    text = _text(with_knn)
    assert (
        "−I/N" in text and "N = 1,000" in text and "a score of −50 means removing z raises the loss" in text
    )
    assert "dist: the L2 distance between the features of the query and of the training example" in text
    full_scan = _text(render_html_report([_result()], summary=summary))
    assert "−I/N" in full_scan and "dist:" not in full_scan  # no distances: nothing to explain


def test_solver_string_wraps_only_between_its_arguments():
    html = render_html_report([_result()], summary={"solver": SOLVER})
    (cell,) = re.findall(r"<dt>solver</dt><dd>(.*?)</dd>", html)
    spans = re.findall(r'<span class="nw">([^<]*)</span>', cell)
    tidy = SOLVER.replace("scale=25.0", "scale=25")  # numbers for people (issue 20)
    assert " ".join(spans) == tidy  # every piece between spaces is unbreakable: no number is ever split
    assert all(re.fullmatch(r"[^ ]+", s) for s in spans) and "scale=25," in spans
    css = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    assert "overflow-wrap:anywhere" not in css.split(".summary dd")[1].split("}")[0]
    assert re.search(r'<div class="wide"><dt>solver</dt>', html)  # the long value takes a whole row


def test_the_header_answers_in_words_and_the_details_hold_only_the_querys_own():
    summary = {"seconds/s_test": 1.25, "seconds/scoring": 0.5, "solver": SOLVER, "training examples": 1258}
    extra = {
        "solver": "cg",
        "solver_config": "AutoSolver(damping='auto', cg_budget=100000000000.0, tol=9.999999999999999e-06)",
        "curvature": "gauss_newton",
        "damping": 0.00205,
        "converged": True,
        "convergence": {"measure": "relative_residual", "value": 3.1e-06, "tolerance": 9.999999999999999e-06},
        "solver_choice": "cg (gauss_newton): 8,970 parameters > exact_max_params 5,000",
        "candidates": "features",
    }
    records = [_result(query_split="test", extra=extra), _result(query_id=1, label=5, flags=[], extra=extra)]
    html = render_html_report(records, summary=summary)
    overview = _text(re.search(r"<dl class=\"overview\">(.*?)</dl>", html, re.S).group(1)).replace(
        "&#x27;", "'"
    )
    for words in (
        "What was explained2 queries of the test split, 1 of them predicted wrong: each query's 9 nearest training "
        "examples of 1,258 in feature space (FastIF's kNN) scored exactly.",
        "the influence of the loss CrossEntropyLoss(label_smoothing=0.1) from model.criterion",
        "by CG, the auto solver's choice, on the Gauss-Newton matrix of the training loss, damping 0.00205",
        "converged every solve converged (worst relative residual 3.1e-06, tolerance 1e-05).",
        "1 query carries a note (on its card).",
        "How long1.75 s (s_test 1.25 s, scoring 0.5 s)",
    ):
        assert words in overview, (words, overview)
    settings = re.search(r'<details class="settings">(.*?)</details>', html, re.S).group(1)
    assert "time of s test (s)" in settings and "scale=25," in settings  # numbers and keys for people
    assert "9.999999999999999e-06" not in html and "100000000000.0" not in html
    (details, _) = re.findall(r"<details><summary>details</summary><pre>(.*?)</pre></details>", html, re.S)
    details = details.replace("&#x27;", "'")
    assert "query split: test" in details and "flags: saturated_query: loss 0" in details
    assert "converged: True" in details and "convergence/value: 3.1e-06" in details
    for run_wide in ("solver_config", "curvature", "seconds", "CrossEntropyLoss"):  # said once, in the header
        assert run_wide not in details, run_wide
    assert '<span class="flags">saturated_query' in html  # the flag is shown on the card, not only in details


def test_wandb_rows_carry_the_query_flags():
    rows = build_rows([_result(), _result(query_id=1, flags=[])])
    by_col = [dict(zip(WANDB_COLUMNS, r)) for r in rows]
    assert WANDB_COLUMNS[-1] == "query_flags"
    assert {r["query_flags"] for r in by_col if r["query_id"] == 0} == {
        "saturated_query: loss 0, gradient 0, every score is 0"
    }
    assert {r["query_flags"] for r in by_col if r["query_id"] == 1} == {""}


@pytest.mark.parametrize("dataset", ["tensor", "list"])
def test_jsonl_records_carry_training_labels_and_the_query_split(tmp_path: Path, dataset: str):
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    train = TensorDataset(x, y) if dataset == "tensor" else [(x[i], y[i]) for i in range(40)]
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    im = lf.InfluenceModule(model, train, solver=lf.ExactSolver(damping=0.1), num_candidates=None, top_k=3)
    trainer = pl.Trainer(
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        callbacks=[lf.InfluenceWriter(tmp_path, query_split="val")],
    )
    trainer.predict(
        im, DataLoader(Subset(TensorDataset(x, y), [4, 9]), batch_size=2), return_predictions=False
    )
    records = [json.loads(line) for line in (tmp_path / "influence.jsonl").read_text().splitlines()]
    assert [r["query_id"] for r in records] == [4, 9]
    for r in records:
        assert r["query_split"] == "val"
        assert r["helpful_ids"] or r["harmful_ids"]
        assert r["helpful_labels"] == [int(y[i]) for i in r["helpful_ids"]]
        assert r["harmful_labels"] == [int(y[i]) for i in r["harmful_ids"]]


def test_self_influence_header_gives_long_values_a_whole_row_and_numbers_for_people():
    from lightning_fastif.reporting.self_influence_html import render_self_influence_html

    records = [{"rank": 1, "train_id": 4, "self_influence": 2.5, "loss": 0.3, "label": 1}]
    long = "AutoSolver(damping='auto', cg_budget=100000000000.0, tol=9.999999999999999e-06)"
    html = render_self_influence_html(records, summary={"solver settings": long, "seconds/solve": 1.5})
    assert re.search(r'<div class="wide"><dt>solver settings</dt>', html)  # no overlap with its neighbours
    assert "cg_budget=1e+11," in html and "tol=1e-05)" in html and "time of solve (s)" in html
