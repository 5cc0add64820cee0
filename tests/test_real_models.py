"""Real models as their ecosystems write them (issue 9): BatchNorm CNN, HF BERT, tuple outputs, regression, label
smoothing, ``forward(inputs, target)``. Each runs the library's paths and agrees with a float64 reference loop."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _models import (
    bn_cnn,
    hf_bert,
    hf_bert_lightning,
    reference_influence,
    regression_net,
    smoothed_net,
    tuple_net,
    two_input_forward,
    two_input_loss,
    two_input_net,
)
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import (
    IndexMismatchError,
    LossResolutionError,
    ModelCallError,
    UnsupportedModelError,
)
from lightning_fastif.functional.params import fingerprint

DAMP = 1e-2


def _trainer(**kw):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        **kw,
    )


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _close(a, b, rtol=2e-3):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def _check_results_agree(results, ref_of_ids):
    """Every listed helpful/harmful score equals the float64 reference of its (query, id)."""
    for q, r in enumerate(results):
        ids = r.helpful_ids + r.harmful_ids
        assert ids, "no ranked examples"
        assert not set(r.helpful_ids) & set(r.harmful_ids)
        ref = ref_of_ids(q, ids)
        assert _close(r.helpful_scores + r.harmful_scores, ref)


# -------------------------------------------------------------------------------- (a) BatchNorm CNN, item 1
def test_fingerprint_reads_zero_dim_buffers_of_batchnorm():
    model, _, _ = bn_cnn(n_train=32, steps=2)
    a = fingerprint(model)
    model.stem[1].num_batches_tracked += 1  # a 0-dim buffer: part of the fingerprint
    assert fingerprint(model) != a


def test_bn_cnn_index_at_fit_end_then_knn_predict_agrees_with_float64_reference(tmp_path):
    model, train, query = bn_cnn(n_train=40, steps=3)
    cb = lf.FeatureIndexCallback(tmp_path / "index", progress=False)
    _trainer(max_epochs=1, callbacks=[cb]).fit(model, DataLoader(train, batch_size=16))
    assert (tmp_path / "index" / "meta.json").exists()
    im = lf.InfluenceModule(
        model,
        train,
        params=["fc.*"],
        solver=lf.ExactSolver(damping=DAMP),
        num_candidates=12,
        top_k=3,
        index=tmp_path / "index",
        progress=False,
    )
    results = [r for b in _trainer().predict(im, DataLoader(TensorDataset(*query), batch_size=4)) for r in b]
    assert len(results) == 4 and all(r.num_candidates == 12 for r in results)
    assert results[0].loss == "cross-entropy on the logits (the default: the model stores no loss module)"
    names = ["fc.weight", "fc.bias"]
    _check_results_agree(
        results,
        lambda q, ids: reference_influence(
            model, train, tuple(t[q : q + 1] for t in query), _ce, names, DAMP, ids
        )[0],
    )


def test_bn_cnn_in_memory_candidates():
    model, train, query = bn_cnn(n_train=32, steps=2)
    im = lf.InfluenceModule(
        model, train, params=["fc.*"], solver=lf.ExactSolver(damping=DAMP), num_candidates=8, progress=False
    )
    results = im.explain(query)
    assert len(results) == 4 and results[0].num_candidates == 8


# -------------------------------------------------------------------------------- (b) Hugging Face BERT
def _bert_ce(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits, batch["labels"], reduction="none")


def test_hf_bert_eager_index_at_fit_end_and_knn_predict_agree_with_reference(tmp_path):
    lit, train, query = hf_bert_lightning("eager", n_train=24, steps=3)
    cb = lf.FeatureIndexCallback(tmp_path / "index", progress=False)
    _trainer(max_epochs=1, callbacks=[cb]).fit(lit, DataLoader(train, batch_size=8))
    im = lf.InfluenceModule(  # the fitted LightningModule itself (the index fingerprints its weights)
        lit,
        train,
        params=["model.classifier.*"],
        solver=lf.ExactSolver(damping=DAMP),
        num_candidates=10,
        top_k=3,
        index=tmp_path / "index",
        progress=False,
    )
    queries = [{k: v[i] for k, v in query.items()} for i in range(3)]
    results = [r for b in _trainer().predict(im, DataLoader(queries, batch_size=3)) for r in b]
    assert len(results) == 3 and all(isinstance(r.label, int) for r in results)
    names = ["model.classifier.weight", "model.classifier.bias"]
    _check_results_agree(
        results,
        lambda q, ids: reference_influence(
            lit, train, {k: v[q : q + 1] for k, v in query.items()}, _bert_ce, names, DAMP, ids
        )[0],
    )


def test_hf_bert_sdpa_works_or_fails_with_unsupported_model_error():
    bert, train, query = hf_bert("sdpa", n_train=16, steps=2)
    im = lf.InfluenceModule(
        bert,
        train,
        params=["bert.encoder.*"],
        solver=lf.CGSolver(damping=0.1, max_iter=3),
        num_candidates=None,
    )
    try:
        scores = im.influence(query, train_indices=[0, 1, 2])
    except UnsupportedModelError as err:
        assert "eager" in str(err)
        return
    assert scores.shape == (3, 3) and bool(torch.isfinite(scores).all())


# -------------------------------------------------------------------------------- (c) tuple output, item 5
def test_tuple_output_default_loss_is_a_clear_error_naming_the_position():
    model, train, query = tuple_net(n_train=24, steps=2)
    im = lf.InfluenceModule(
        model, train, params=["head.*"], solver=lf.ExactSolver(damping=DAMP), num_candidates=None
    )
    with pytest.raises(LossResolutionError, match=r"ambiguous.*forward_fn.*\[1\].*loss_fn"):
        im.explain(query)


def test_tuple_output_with_forward_fn_or_loss_fn_agrees_with_reference():
    model, train, query = tuple_net(n_train=30, steps=10)

    def ref_loss(m, b):
        return F.cross_entropy(m(b[0])[1], b[1], reduction="none")

    ref = reference_influence(model, train, query, ref_loss, ["head.weight", "head.bias"], DAMP)
    # forward_fn: the index caches the head's logits, so the head fast path applies
    im = lf.InfluenceModule(
        model,
        train,
        params=["head.*"],
        solver=lf.ExactSolver(damping=DAMP),
        num_candidates=30,
        forward_fn=lambda m, b: m(b[0])[1],
        top_k=30,
    )
    for q, r in enumerate(im.explain(query)):
        got = dict(zip(r.helpful_ids + r.harmful_ids, r.helpful_scores + r.harmful_scores))
        assert _close([got[i] for i in sorted(got)], ref[q, sorted(got)])
        assert isinstance(r.prediction, int)
    # loss_fn alone: the index has no logits (ambiguous output); jvp scoring
    im2 = lf.InfluenceModule(
        model,
        train,
        params=["head.*"],
        solver=lf.ExactSolver(damping=DAMP),
        num_candidates=30,
        loss_fn=lambda out, b: F.cross_entropy(out[1], b[1], reduction="none"),
    )
    assert _close(im2.influence(query), ref)


# -------------------------------------------------------------------------------- (d) regression, item 6
@pytest.mark.parametrize("outputs", [1, 2])
def test_regression_loss_found_on_the_model_labels_and_predictions_are_floats(outputs, tmp_path):
    model, train, query = regression_net(outputs=outputs, n_train=30, steps=20)

    def mse(m, b):
        d = (m(b[0]) - b[1]) ** 2
        return d if d.dim() == 1 else d.mean(1)

    im = lf.InfluenceModule(
        model, train, params=["head.*"], solver=lf.ExactSolver(damping=DAMP), num_candidates=None, top_k=4
    )
    assert im.loss.description == "MSELoss() from model.criterion"
    results = im.explain(query)
    ref = reference_influence(model, train, query, mse, ["head.weight", "head.bias"], DAMP)
    for q, r in enumerate(results):
        assert _close(r.helpful_scores + r.harmful_scores, ref[q, r.helpful_ids + r.harmful_ids])
        want = query[1][q].tolist()
        assert r.label == pytest.approx(want)
        assert isinstance(r.label, float if outputs == 1 else list)
        assert r.prediction == pytest.approx(model(query[0][q : q + 1]).squeeze(0).tolist(), rel=1e-5)
    writer_line = json.loads(json.dumps(results[0].to_dict()))
    assert writer_line["label"] == pytest.approx(query[1][0].tolist())
    assert writer_line["loss"] == "MSELoss() from model.criterion"


# -------------------------------------------------------------------------------- (e) label smoothing, item 4
def test_label_smoothing_loss_found_on_the_model_matches_smoothed_reference_not_plain_ce():
    model, train, query = smoothed_net(n_train=30, steps=20)
    im = lf.InfluenceModule(
        model, train, params=["head.*"], solver=lf.ExactSolver(damping=DAMP), num_candidates=30, top_k=30
    )
    assert im.loss.description == "CrossEntropyLoss(label_smoothing=0.1) from model.criterion"
    assert not im.loss.plain_cross_entropy
    results = im.explain(
        query
    )  # the in-memory index caches features and logits: the head path must not be used
    assert all(r.loss == im.loss.description for r in results)

    def smoothed(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none", label_smoothing=0.1)

    names = ["head.weight", "head.bias"]
    ref = reference_influence(model, train, query, smoothed, names, DAMP)
    plain = reference_influence(model, train, query, _ce, names, DAMP)
    for q, r in enumerate(results):
        ids = r.helpful_ids + r.harmful_ids
        assert _close(r.helpful_scores + r.harmful_scores, ref[q, ids])
        assert not _close(r.helpful_scores + r.harmful_scores, plain[q, ids], rtol=1e-2)


# -------------------------------------------------------------------------------- (f) forward(inputs, target), item 2
def test_forward_needing_more_than_batch0_errors_name_forward_fn_on_every_path(tmp_path):
    model, train, query = two_input_net(n_train=20, steps=2)
    with pytest.raises(ModelCallError, match="forward_fn"):
        lf.FeatureIndexCallback(tmp_path / "i", progress=False).build(model, train)
    im = lf.InfluenceModule(
        model, train, loss_fn=two_input_loss, solver=lf.ExactSolver(damping=DAMP), num_candidates=None
    )
    with pytest.raises(ModelCallError, match="forward_fn"):
        im.explain(query)
    with pytest.raises(ModelCallError, match="forward_fn"):
        im.influence(query)


def test_forward_fn_is_used_by_index_explain_predict_and_agrees_with_reference(tmp_path):
    model, train, query = two_input_net(n_train=24, steps=10)
    cb = lf.FeatureIndexCallback(tmp_path / "index", forward_fn=two_input_forward, progress=False)
    _trainer(max_epochs=1, callbacks=[cb]).fit(model, DataLoader(train, batch_size=8))
    im = lf.InfluenceModule(
        model,
        train,
        loss_fn=two_input_loss,
        forward_fn=two_input_forward,
        params=["decoder.*"],
        solver=lf.ExactSolver(damping=DAMP),
        num_candidates=10,
        top_k=3,
        index=tmp_path / "index",
        progress=False,
    )
    results = [r for b in _trainer().predict(im, DataLoader(TensorDataset(*query), batch_size=3)) for r in b]
    assert len(results) == 3 and results[0].loss.startswith("loss_fn")

    def ref_loss(m, b):
        return two_input_loss(two_input_forward(m, b), b)

    _check_results_agree(
        results,
        lambda q, ids: reference_influence(
            model,
            train,
            tuple(t[q : q + 1] for t in query),
            ref_loss,
            ["decoder.weight", "decoder.bias"],
            DAMP,
            ids,
        )[0],
    )


# -------------------------------------------------------------------------------- item 7: the data fingerprint
def test_index_built_on_other_training_data_of_the_same_length_is_refused(tmp_path):
    model, train, query = smoothed_net(n_train=30, steps=2)
    lf.FeatureIndexCallback(tmp_path / "index", progress=False).build(model, train)
    x, y = train.tensors
    relabelled = TensorDataset(x, y.roll(1))
    other_inputs = TensorDataset(x.flip(0), y)
    for ds, what in ((relabelled, "labels"), (other_inputs, "inputs")):
        im = lf.InfluenceModule(model, ds, num_candidates=5, index=tmp_path / "index", progress=False)
        with pytest.raises(IndexMismatchError, match=f"training {what} differ"):
            im.explain(query)
    same = TensorDataset(x.clone(), y.clone())  # equal data, another object: accepted
    lf.InfluenceModule(
        model, same, num_candidates=5, index=tmp_path / "index", progress=False
    ).candidate_index()
    # a Subset (not a TensorDataset) of the same data: fingerprinted by its sampled examples
    sub = Subset(train, list(range(30)))
    lf.FeatureIndexCallback(tmp_path / "sub", progress=False).build(model, sub)
    sub2 = Subset(relabelled, list(range(30)))
    with pytest.raises(IndexMismatchError, match="labels differ"):
        lf.InfluenceModule(
            model, sub2, num_candidates=5, index=tmp_path / "sub", progress=False
        ).candidate_index()


def test_multi_output_regression_with_loss_fn_keeps_vectors_end_to_end():
    model, train, query = regression_net(outputs=2, n_train=24, steps=10)
    del model.criterion  # the loss comes from loss_fn alone

    def mse(out, b):
        return ((out - b[1]) ** 2).mean(1)

    im = lf.InfluenceModule(
        model,
        train,
        loss_fn=mse,
        params=["head.*"],
        solver=lf.ExactSolver(damping=DAMP),
        num_candidates=None,
        top_k=3,
    )
    ref = reference_influence(
        model, train, query, lambda m, b: mse(m(b[0]), b), ["head.weight", "head.bias"], DAMP
    )
    for q, r in enumerate(im.explain(query)):
        assert isinstance(r.label, list) and len(r.label) == 2
        assert isinstance(r.prediction, list) and all(isinstance(v, float) for v in r.prediction)
        assert _close(r.helpful_scores + r.harmful_scores, ref[q, r.helpful_ids + r.harmful_ids])


@pytest.mark.parametrize("kind", ["weighted_ce", "bce_multilabel"])
def test_other_loss_modules_on_the_model_keep_their_settings(kind):
    model, train, query = smoothed_net(n_train=24, steps=5)
    x, y = train.tensors
    if kind == "weighted_ce":
        w = torch.linspace(0.5, 2.0, 10)
        model.criterion = torch.nn.CrossEntropyLoss(weight=w)

        def ref_loss(m, b):
            return F.cross_entropy(m(b[0]), b[1], weight=w.to(torch.float64), reduction="none")

        want = "CrossEntropyLoss(weight=["
    else:
        pos = torch.full((10,), 3.0)
        model.criterion = torch.nn.BCEWithLogitsLoss(pos_weight=pos)
        train = TensorDataset(x, F.one_hot(y, 10).float())
        query = (query[0], F.one_hot(query[1], 10).float())

        def ref_loss(m, b):
            return F.binary_cross_entropy_with_logits(
                m(b[0]), b[1], pos_weight=pos.to(torch.float64), reduction="none"
            ).mean(1)

        want = "BCEWithLogitsLoss(pos_weight=["
    im = lf.InfluenceModule(
        model, train, params=["head.*"], solver=lf.ExactSolver(damping=DAMP), num_candidates=None
    )
    assert im.loss.description.startswith(want) and im.loss.description.endswith("from model.criterion")
    ref = reference_influence(model, train, query, ref_loss, ["head.weight", "head.bias"], DAMP)
    assert _close(im.influence(query), ref)


def test_a_selected_scalar_parameter_agrees_with_the_float64_reference():
    """A 0-dim parameter (a learned temperature) is selected, flattened and unflattened like any other."""
    from torch import nn

    import lightning_fastif as lf

    class Tempered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.temperature = nn.Parameter(torch.tensor(1.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.temperature

    torch.manual_seed(0)
    model = Tempered().double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    train = torch.utils.data.TensorDataset(x, y)
    im = lf.InfluenceModule(model, train, solver=lf.ExactSolver(damping=0.1), num_candidates=None)
    scores = im.influence((x[:2], y[:2]))
    # reference: explicit Hessian of the mean loss over the flat (weight, bias, temperature) vector
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def losses(flat: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        parts, at = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.Size(s).numel())
            parts[n] = flat[at : at + k].reshape(s)
            at += k
        out = torch.func.functional_call(model, parts, (xb,))
        return torch.nn.functional.cross_entropy(out, yb, reduction="none")

    h = torch.autograd.functional.hessian(lambda f: losses(f, x, y).mean(), flat0)
    gq = torch.autograd.functional.jacobian(lambda f: losses(f, x[:2], y[:2]), flat0)
    gt = torch.autograd.functional.jacobian(lambda f: losses(f, x, y), flat0)
    s = torch.linalg.solve(h + 0.1 * torch.eye(len(flat0), dtype=h.dtype), gq.T).T
    torch.testing.assert_close(scores, -(s @ gt.T), rtol=1e-6, atol=1e-9)
