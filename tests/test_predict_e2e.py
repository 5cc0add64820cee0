"""FastIF end to end: fit with FeatureIndexCallback, then trainer.predict ranks training examples."""

import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import ConfigurationError, IndexCorruptError, IndexMismatchError
from lightning_fastif.retrieval.index import TorchIndex
from lightning_fastif.retrieval.store import load_arrays
from lightning_fastif.zoo.digits import DigitsClassifier, DigitsDataModule


def _trainer(**kw):
    return pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    pl.seed_everything(0)
    folder = tmp_path_factory.mktemp("fit") / "index"
    dm = DigitsDataModule()
    model = DigitsClassifier()
    cb = lf.FeatureIndexCallback(folder)
    _trainer(max_epochs=15, callbacks=[cb]).fit(model, datamodule=dm)
    test = dm.split("test")
    x, y = test.tensors
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).nonzero().flatten()
    return {"model": model, "dm": dm, "index": folder, "callback": cb, "wrong": wrong[:6].tolist()}


def _module(f, **kw):
    kw.setdefault("num_candidates", 100)
    kw.setdefault("index", f["index"])
    return lf.InfluenceModule(
        f["model"], f["dm"].split("train"), params=["head.*"], solver=lf.ExactSolver(damping=1e-3), **kw
    )


def _predict(f, im, writer_dir=None):
    queries = Subset(f["dm"].split("test"), f["wrong"])
    callbacks = [lf.InfluenceWriter(writer_dir)] if writer_dir else []
    out = _trainer(inference_mode=False, callbacks=callbacks).predict(im, DataLoader(queries, batch_size=4))
    return [r for batch in out for r in batch]


def test_knn_results_come_from_each_querys_neighbours_and_are_written(fitted, tmp_path):
    im = _module(fitted)
    results = _predict(fitted, im, tmp_path / "out")
    assert [r.query_id for r in results] == fitted["wrong"]  # ids of the test set, not of the Subset
    feats = load_arrays(fitted["index"], ["features"])["features"]
    oracle = TorchIndex(compute_dtype=torch.float64)
    oracle.add(torch.as_tensor(feats))
    x, y = fitted["dm"].split("test").tensors
    qf = im.query_features((x[fitted["wrong"]], y[fitted["wrong"]]))
    _, neighbours = oracle.search(qf, 100)
    for r, nn_ids in zip(results, neighbours):
        allowed = set(nn_ids.tolist())
        assert r.num_candidates == 100
        assert set(r.helpful_ids) <= allowed and set(r.harmful_ids) <= allowed
        # up to 10 of each sign (issue 9: a helpful score is negative, a harmful one positive, never the same id)
        assert 0 < len(r.helpful_ids) <= 10 and len(r.harmful_ids) == 10
        assert all(s < 0 for s in r.helpful_scores) and all(s > 0 for s in r.harmful_scores)
        assert not set(r.helpful_ids) & set(r.harmful_ids)
        assert (
            r.helpful_scores == sorted(r.helpful_scores)
            and r.harmful_scores == sorted(r.harmful_scores)[::-1]
        )
        assert r.label == int(y[r.query_id]) and r.prediction != r.label
        assert len(r.helpful_distances) == len(r.helpful_ids)
    lines = (tmp_path / "out" / "influence.jsonl").read_text().splitlines()
    assert [json.loads(line)["query_id"] for line in lines] == fitted["wrong"]
    assert json.loads(lines[0]) == results[0].to_dict()


def test_full_scan_predict_equals_influence_ranking(fitted):
    im = _module(fitted, num_candidates=None)
    results = _predict(fitted, im)
    x, y = fitted["dm"].split("test").tensors
    scores = im.influence((x[fitted["wrong"]], y[fitted["wrong"]]))
    for r, s in zip(results, scores):
        assert r.num_candidates == len(fitted["dm"].split("train"))
        assert r.helpful_ids == s.argsort()[:10].tolist()
        assert r.harmful_ids == s.argsort(descending=True)[:10].tolist()
        torch.testing.assert_close(torch.tensor(r.helpful_scores), s.sort().values[:10], rtol=1e-4, atol=1e-4)


def test_knn_with_all_n_candidates_equals_full_scan(fitted):
    n = len(fitted["dm"].split("train"))
    full = _predict(fitted, _module(fitted, num_candidates=None))
    knn = _predict(fitted, _module(fitted, num_candidates=n))
    for a, b in zip(full, knn):
        assert a.helpful_ids == b.helpful_ids and a.harmful_ids == b.harmful_ids
        # the kNN run scores by the head fast path, the full scan by jvp: float32 rounding differs
        torch.testing.assert_close(
            torch.tensor(a.harmful_scores), torch.tensor(b.harmful_scores), rtol=1e-4, atol=1e-4
        )


def test_index_is_built_in_memory_when_none_is_given(fitted):
    a = _predict(fitted, _module(fitted, index=None))
    b = _predict(fitted, _module(fitted))
    assert [r.helpful_ids for r in a] == [r.helpful_ids for r in b]


def test_inference_mode_trainer_is_told_what_to_pass(fitted):
    im = _module(fitted)
    queries = Subset(fitted["dm"].split("test"), fitted["wrong"])
    with pytest.raises(ConfigurationError, match=r"Trainer\(inference_mode=False\)"):
        _trainer().predict(im, DataLoader(queries, batch_size=4))


def test_empty_query_batch_is_a_clear_error(fitted):
    with pytest.raises(ConfigurationError, match="`batch`.*empty"):
        _module(fitted).predict_step((torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), 0)


def test_num_candidates_out_of_range(fitted):
    n = len(fitted["dm"].split("train"))
    for bad in (0, -1, n + 1):
        with pytest.raises(ConfigurationError, match="`num_candidates`"):
            _module(fitted, num_candidates=bad)


def test_index_from_another_model_is_refused(fitted):
    other = DigitsClassifier()
    im = lf.InfluenceModule(
        other, fitted["dm"].split("train"), params=["head.*"], num_candidates=10, index=fitted["index"]
    )
    with pytest.raises(IndexMismatchError, match="model_fingerprint"):
        im.candidate_index()


def test_dataset_whose_length_changed_is_refused(fitted):
    x, y = fitted["dm"].split("train").tensors
    shorter = TensorDataset(x[:-5], y[:-5])
    im = lf.InfluenceModule(
        fitted["model"], shorter, params=["head.*"], num_candidates=10, index=fitted["index"]
    )
    with pytest.raises(IndexMismatchError, match="dataset_length"):
        im.candidate_index()


def test_missing_or_truncated_index_files(fitted, tmp_path):
    im = _module(fitted, index=tmp_path / "nowhere")
    with pytest.raises(IndexCorruptError):
        im.candidate_index()
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fitted["index"], copy)
    data = (copy / "index.faiss").read_bytes()
    (copy / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexCorruptError):
        _module(fitted, index=copy).candidate_index()
    (copy / "index.faiss").unlink()
    with pytest.raises(IndexCorruptError):
        _module(fitted, index=copy).candidate_index()


def test_unknown_feature_layer_lists_the_modules(fitted, tmp_path):
    cb = lf.FeatureIndexCallback(tmp_path / "idx", feature_layer="penultimate")
    with pytest.raises(ConfigurationError, match=r"`feature_layer`.*body"):
        cb.build(fitted["model"], fitted["dm"].split("train"))


def test_on_demand_build_equals_the_fit_time_index_and_state_round_trips(fitted, tmp_path):
    cb = lf.FeatureIndexCallback(tmp_path / "again", backend="torch")
    cb.build(fitted["model"], fitted["dm"].split("train"))
    a = load_arrays(fitted["index"], ["features"])["features"]
    b = load_arrays(tmp_path / "again", ["features"])["features"]
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b))
    state = fitted["callback"].state_dict()
    fresh = lf.FeatureIndexCallback(tmp_path / "elsewhere")
    fresh.load_state_dict(state)
    assert fresh.dirpath == fitted["index"] and fresh.built_meta["ntotal"] == len(a)


def test_diagnostics_recall_grows_with_k_and_reaches_one_at_n(fitted):
    im = _module(fitted)
    x, y = fitted["dm"].split("test").tensors
    n = len(fitted["dm"].split("train"))
    rep = lf.approximation_diagnostics(
        im, (x[fitted["wrong"]], y[fitted["wrong"]]), ks=(10, 100, n), top_m=10
    )
    recalls = [r["recall_abs"] for r in rep.rows]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0
    assert 0.0 <= rep.rows[0]["recall_helpful"] <= 1.0
    assert "recall@k" in rep.to_table()
    with pytest.raises(ConfigurationError, match="`ks`"):
        lf.approximation_diagnostics(im, (x[:2], y[:2]), ks=(0,))


def test_head_fast_path_from_cached_features_equals_jvp_scoring(fitted):
    fast = _module(fitted, score_method="auto")
    slow = _module(fitted, score_method="jvp")
    x, y = fitted["dm"].split("test").tensors
    batch = (x[fitted["wrong"]], y[fitted["wrong"]])
    s = fast.s_test(batch)
    fast.candidate_index()
    assert fast._head_fast_path(fast._theta()[1]) == ("head.weight", "head.bias")
    ids = torch.arange(0, 1200, 7)
    a, b = fast.score(s, ids), slow.score(s, ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))  # float32 rounding
    whole = lf.InfluenceModule(
        fitted["model"],
        fitted["dm"].split("train"),
        solver=lf.ExactSolver(damping=1e-3),
        num_candidates=10,
        index=fitted["index"],
        params=["body.*", "head.*"],
    )
    whole.candidate_index()
    assert whole._head_fast_path(whole._theta()[1]) is None  # more than the head selected: jvp
