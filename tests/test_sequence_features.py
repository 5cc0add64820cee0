"""Sequence features for the kNN step (issue 19, item 4): a transformer's ``[B, T, d]`` feature is pooled (mean over
unmasked positions by default, or the last unmasked token), so queries of any length search the index."""

from __future__ import annotations

import json

import pytest
import torch
from _lm import TokenCrossEntropy, lm_data, tiny_gpt2

import lightning_fastif as lf
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.retrieval.features import pool_features


@pytest.fixture(scope="module")
def lm():
    return tiny_gpt2(n_train=16)


def test_pooling_against_an_explicit_loop_with_right_and_left_padding():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    mean = pool_features(x, mask, "mean")
    last = pool_features(x, mask, "last")
    for b in range(3):
        keep = [t for t in range(5) if mask[b, t]] or list(range(5))  # an all-masked row: every position
        torch.testing.assert_close(mean[b], x[b, keep].mean(0))
        torch.testing.assert_close(last[b], x[b, keep[-1]])
    torch.testing.assert_close(pool_features(x, None, "mean"), x.mean(1))
    assert pool_features(x, mask, "flatten").shape == (3, 5, 4)  # flattened to rows by the caller
    assert pool_features(x[:, 0], mask, "mean") is not None and pool_features(
        x[:, 0], mask, "last"
    ).shape == (3, 4)
    with pytest.raises(ConfigurationError, match="`feature_pooling`.*'max'"):
        pool_features(x, mask, "max")


def _hidden(model, batch):
    """The input of ``lm_head`` (the final hidden states after ``ln_f``), ``[B, T, d]``, from the model itself."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_index_holds_pooled_features_and_queries_of_another_length_search_it(lm, tmp_path, pooling):
    model, train, _ = lm
    folder = tmp_path / "index"
    lf.FeatureIndexCallback(folder, train, feature_pooling=pooling, backend="torch", progress=False).build(
        model
    )
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["extra"]["feature_pooling"] == pooling and meta["dim"] == 8
    query = lm_data(3, 5, seed=7, min_len=2)  # length 5: the training sequences have length 8
    im = lf.InfluenceModule(
        model,
        train,
        loss_fn=TokenCrossEntropy(),
        params=["transformer.h.0.attn.c_proj.*"],
        solver=lf.ExactSolver(damping=0.5),
        num_candidates=4,
        index=folder,
        batch_size=8,
        progress=False,
    )
    _, ids = im.search(query)
    assert ids.shape == (3, 4)
    # ground truth: pool the hidden states by hand, nearest neighbours by a full distance matrix
    full = {k: torch.stack([train[i][k] for i in range(len(train))]) for k in ("input_ids", "attention_mask")}
    feats_train = _pool_by_hand(_hidden(model, full), full["attention_mask"], pooling)
    feats_query = _pool_by_hand(_hidden(model, query), query["attention_mask"], pooling)
    want = torch.cdist(feats_query.double(), feats_train.double()).argsort(1)[:, :4]
    assert ids.tolist() == want.tolist()
    results = im.explain(query)  # the whole pipeline runs on queries of another length
    assert len(results) == 3 and all(r.num_candidates == 4 for r in results)


def _pool_by_hand(h, mask, pooling):
    rows = []
    for b in range(h.shape[0]):
        keep = [t for t in range(h.shape[1]) if mask[b, t]]
        rows.append(h[b, keep].mean(0) if pooling == "mean" else h[b, keep[-1]])
    return torch.stack(rows)


def test_a_flatten_index_refuses_another_pooling_and_names_both(lm, tmp_path):
    model, train, _ = lm
    folder = tmp_path / "flat"
    lf.FeatureIndexCallback(folder, train, feature_pooling="flatten", backend="torch", progress=False).build(
        model
    )
    assert json.loads((folder / "meta.json").read_text())["dim"] == 8 * 8
    im = lf.InfluenceModule(
        model, train, loss_fn=TokenCrossEntropy(), num_candidates=4, index=folder, feature_pooling="mean"
    )
    with pytest.raises(ConfigurationError, match="`feature_pooling`.*'flatten'.*'mean'"):
        im.candidate_index()
    with pytest.raises(ConfigurationError, match="`feature_pooling`"):
        lf.FeatureIndexCallback(folder, train, feature_pooling="sum")


def test_knn_recall_diagnostics_run_on_queries_of_another_length(lm):
    from lightning_fastif.evaluation.diagnostics import approximation_diagnostics

    model, train, _ = lm
    im = lf.InfluenceModule(
        model,
        train,
        loss_fn=TokenCrossEntropy(),
        params=["transformer.h.0.attn.c_proj.*"],
        solver=lf.ExactSolver(damping=0.5),
        num_candidates=8,
        batch_size=8,
        progress=False,
    )
    report = approximation_diagnostics(im, lm_data(2, 6, seed=3), ks=(8, 16), top_m=4)
    assert [r["k"] for r in report.rows] == [8, 16]
    assert report.rows[-1]["recall_abs"] == 1.0  # k = N: every training example is a candidate
    assert 0.0 <= report.rows[0]["recall_abs"] <= 1.0
