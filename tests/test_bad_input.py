"""Bad input fails loudly (issue 9): a clear error naming the argument, what was expected and what was got, or a flag
in the results; never silent. One parametrised battery across the library, then the issue's specific cases."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import (
    ConfigurationError,
    FastIFError,
    IndexCorruptError,
    LossResolutionError,
    ModelCallError,
    NonFiniteError,
)
from lightning_fastif.functional.params import select_params
from lightning_fastif.functional.scores import PAD_ID, merge_topk, split_topk
from lightning_fastif.retrieval.features import ordered_loader
from lightning_fastif.retrieval.store import load_index

N, D, C = 20, 4, 3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C))


def _data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g))


def _query(y=None):
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
    return x, (torch.tensor([0, 1, 2]) if y is None else y)


def _im(**kw):
    args = dict(solver=lf.ExactSolver(damping=0.1), num_candidates=None, progress=False)
    args.update(kw)
    model = args.pop("model", None) or _net()
    train = args.pop("train", None) or _data()
    return lf.InfluenceModule(model, train, **args)


class _TwoLosses(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()
        self.ce = nn.CrossEntropyLoss()
        self.aux = nn.MSELoss()

    def forward(self, x):
        return self.net(x)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)

    def forward(self, x, y):
        return self.lin(x) + 0 * y[:, None]


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(D, 5)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        f = torch.tanh(self.body(x))
        return f, self.head(f)


class _Reg(nn.Module):
    def __init__(self, out: int):
        super().__init__()
        self.lin = nn.Linear(D, out)
        self.criterion = nn.MSELoss()

    def forward(self, x):
        return self.lin(x)


def _nan_train(at: int = 5) -> TensorDataset:
    ds = _data()
    x = ds.tensors[0].clone()
    x[at, 0] = float("nan")
    return TensorDataset(x, ds.tensors[1])


def _bad_label_train(at: int = 4) -> TensorDataset:
    ds = _data()
    y = ds.tensors[1].clone()
    y[at] = 7
    return TensorDataset(ds.tensors[0], y)


def _writer(**kw):
    return lf.InfluenceWriter("out", **kw)


# (kind, thunk, error type, regex the message must match)
CASES = [
    ("model_not_module", lambda: lf.InfluenceModule("net", _data()), ConfigurationError, "`model`"),
    ("train_not_map_style", lambda: lf.InfluenceModule(_net(), 5), ConfigurationError, "`train_dataset`"),
    ("solver_wrong_type", lambda: _im(solver="exact"), ConfigurationError, "`solver`"),
    ("num_candidates_negative", lambda: _im(num_candidates=-3), ConfigurationError, "`num_candidates`.*-3"),
    ("num_candidates_zero", lambda: _im(num_candidates=0), ConfigurationError, "`num_candidates`"),
    ("num_candidates_above_n", lambda: _im(num_candidates=N + 1), ConfigurationError, "`num_candidates`.*21"),
    ("top_k_zero", lambda: _im(top_k=0), ConfigurationError, "`top_k`"),
    ("top_k_string", lambda: _im(top_k="5"), ConfigurationError, "`top_k`"),
    ("batch_size_zero", lambda: _im(batch_size=0), ConfigurationError, "`batch_size`"),
    ("score_method_unknown", lambda: _im(score_method="fast"), ConfigurationError, "`score_method`.*fast"),
    ("params_match_nothing", lambda: _im(params=["head.*"]), ConfigurationError, "`params`.*head"),
    ("params_not_strings", lambda: _im(params=[1]), ConfigurationError, "`params`"),
    ("loss_fn_not_callable", lambda: _im(loss_fn="ce"), ConfigurationError, "`loss_fn`"),
    ("forward_fn_not_callable", lambda: _im(forward_fn="call"), ConfigurationError, "`forward_fn`"),
    (
        "index_wrong_type",
        lambda: _im(num_candidates=5, index=5).candidate_index(),
        ConfigurationError,
        "`index`",
    ),
    ("index_folder_missing", lambda: load_index("/nonexistent/index"), IndexCorruptError, "nonexistent"),
    (
        "feature_layer_unknown",
        lambda: _im(num_candidates=5, feature_layer="nope").explain(_query()),
        ConfigurationError,
        "`feature_layer`.*nope",
    ),
    ("exact_damping_negative", lambda: lf.ExactSolver(damping=-1.0), ConfigurationError, "`damping`"),
    ("lissa_scale_zero", lambda: lf.LiSSASolver(scale=0.0), ConfigurationError, "`scale`"),
    ("lissa_depth_zero", lambda: lf.LiSSASolver(depth=0), ConfigurationError, "`depth`"),
    ("lissa_repeats_zero", lambda: lf.LiSSASolver(repeats=0), ConfigurationError, "`repeats`"),
    ("cg_max_iter_zero", lambda: lf.CGSolver(max_iter=0), ConfigurationError, "`max_iter`"),
    ("cg_tol_negative", lambda: lf.CGSolver(tol=-1.0), ConfigurationError, "`tol`"),
    ("index_cb_dirpath_empty", lambda: lf.FeatureIndexCallback(""), ConfigurationError, "`dirpath`"),
    (
        "index_cb_train_not_dataset",
        lambda: lf.FeatureIndexCallback("i", train_dataset=5),
        ConfigurationError,
        "`train_dataset`",
    ),
    (
        "index_cb_batch_size_zero",
        lambda: lf.FeatureIndexCallback("i", batch_size=0),
        ConfigurationError,
        "`batch_size`",
    ),
    (
        "index_cb_forward_fn",
        lambda: lf.FeatureIndexCallback("i", forward_fn=3),
        ConfigurationError,
        "`forward_fn`",
    ),
    ("writer_output_dir_empty", lambda: lf.InfluenceWriter(""), ConfigurationError, "`output_dir`"),
    ("writer_filename_path", lambda: _writer(filename="a/b.jsonl"), ConfigurationError, "`filename`"),
    (
        "ordered_loader_batch_size",
        lambda: ordered_loader(_data(), batch_size=0),
        ConfigurationError,
        "`batch_size`",
    ),
    (
        "no_trainable_params",
        lambda: select_params(nn.Linear(2, 2).requires_grad_(False)),
        ConfigurationError,
        "requires_grad",
    ),
    # labels (item 10)
    (
        "labels_out_of_range",
        lambda: _im().explain(_query(torch.tensor([0, 3, 1]))),
        ConfigurationError,
        r"`labels`.*\[0, 3\).*\[3\] at batch position\(s\) \[1\]",
    ),
    (
        "labels_negative",
        lambda: _im().explain(_query(torch.tensor([0, -1, 1]))),
        ConfigurationError,
        r"`labels`.*\[-1\]",
    ),
    (
        "labels_ignore_index_default_ce",
        lambda: _im().explain(_query(torch.tensor([0, -100, 1]))),
        ConfigurationError,
        r"`labels`.*-100.*ignore value",
    ),
    (
        "labels_out_of_range_in_training_set",
        lambda: _im(train=TensorDataset(_data().tensors[0], torch.full((N,), 7))).influence(_query()),
        ConfigurationError,
        r"`labels`.*\[7\]",
    ),
    (
        "labels_float_for_classifier",
        lambda: _im().explain(_query(torch.tensor([0.0, 1.0, 2.0]))),
        LossResolutionError,
        r"`labels`.*torch.float32",
    ),
    ("batch_without_labels", lambda: _im().explain(torch.randn(3, D)), LossResolutionError, "no labels"),
    (
        "empty_query_batch",
        lambda: _im().explain((torch.randn(0, D), torch.zeros(0, dtype=torch.long))),
        ConfigurationError,
        "`batch`",
    ),
    (
        "train_indices_out_of_range",
        lambda: _im().influence(_query(), train_indices=[0, N]),
        ConfigurationError,
        "`train_indices`",
    ),
    # outputs and losses (items 2, 4, 5, 6)
    (
        "tuple_output_ambiguous",
        lambda: _im(model=_Pair()).explain(_query()),
        LossResolutionError,
        r"ambiguous.*\[1\]",
    ),
    (
        "forward_needs_two_inputs",
        lambda: _im(model=_TwoInputs()).explain(_query()),
        ModelCallError,
        "model.*TypeError.*`forward_fn=callable",
    ),
    (
        "loss_fn_returns_scalar",
        lambda: _im(loss_fn=lambda out, b: F.cross_entropy(out, b[1])).explain(_query()),
        LossResolutionError,
        r"shape \[B\]",
    ),
    (
        "regression_output_shape_mismatch",
        lambda: _im(model=_Reg(2), train=TensorDataset(torch.randn(N, D), torch.randn(N))).explain(
            (torch.randn(3, D), torch.randn(3))
        ),
        ConfigurationError,
        r"`labels` \[3\].*\[3, 2\]",
    ),
    (
        "several_loss_modules",
        lambda: _im(model=_TwoLosses()),
        LossResolutionError,
        "several.*model.ce.*model.aux.*`loss_fn=",
    ),
    (
        "head_not_on_loss_path",
        lambda: _im(model=_Pair(), params=["head.*"], loss_fn=lambda out, b: (out[0] ** 2).sum(1)).explain(
            _query()
        ),
        ConfigurationError,
        "depend on the selected parameters `params`",
    ),
    # non-finite values (item 9)
    (
        "nan_training_example_exact",
        lambda: _im(train=_nan_train()).explain(_query()),
        NonFiniteError,
        r"training example id\(s\) \[5\]",
    ),
    (
        "nan_training_example_lissa",
        lambda: _im(
            train=_nan_train(), solver=lf.LiSSASolver(damping=0.1, scale=50.0, depth=20, batch_size=4)
        ).explain(_query()),
        NonFiniteError,
        r"training example id\(s\) \[5\]",
    ),
    (
        "nan_training_example_cg",
        lambda: _im(train=_nan_train(), solver=lf.CGSolver(damping=0.1)).explain(_query()),
        NonFiniteError,
        r"training example id\(s\) \[5\]",
    ),
    (
        "labels_out_of_range_training_head_path",
        lambda: _im(train=_bad_label_train(), params=["2.*"], num_candidates=N).explain(_query()),
        ConfigurationError,
        r"`labels`.*training example id\(s\) \[4\]",
    ),
    (
        "labels_out_of_range_training_lissa_head_path",
        lambda: _im(
            train=_bad_label_train(),
            params=["2.*"],
            num_candidates=N,
            solver=lf.LiSSASolver(damping=0.1, scale=50.0, depth=5, batch_size=2),
        ).explain(_query()),
        ConfigurationError,
        r"`labels`.*training example id\(s\) \[4\]",
    ),
    (
        "nan_query_input",
        lambda: _im().explain((torch.full((3, D), float("nan")), torch.tensor([0, 1, 2]))),
        NonFiniteError,
        "query loss",
    ),
]


@pytest.mark.parametrize(("kind", "thunk", "error", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(kind, thunk, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        thunk()
    assert isinstance(info.value, FastIFError)  # the library's own type, not torch's


def test_the_battery_covers_at_least_40_kinds():
    assert len({c[0] for c in CASES}) >= 40


def test_int32_labels_are_cast_and_give_the_int64_scores():
    im = _im()
    x, y = _query()
    assert torch.allclose(im.influence((x, y.int())), im.influence((x, y)))


def test_ignore_index_of_a_loss_on_the_model_gives_loss_0_and_a_flag():
    model = _TwoLosses()
    del model.aux  # one loss on the model: CrossEntropyLoss, ignore_index=-100 (its default)
    im = _im(model=model)
    assert im.loss.description == "CrossEntropyLoss() from model.ce"
    results = im.explain(_query(torch.tensor([0, -100, 1])))
    assert results[1].query_loss == 0.0 and results[1].helpful_ids == results[1].harmful_ids == []
    assert results[1].flags and results[1].flags[0].startswith("saturated_query")
    assert results[0].flags == [] and results[0].helpful_ids


# ---------------------------------------------------------------------------------------------- item 8
def test_top_k_over_half_the_candidates_lists_never_share_an_id_and_keep_their_sign():
    torch.manual_seed(4)
    scores = torch.randn(3, 10)
    ids = torch.arange(50, 60)
    h_ids, h_sc, x_ids, x_sc = split_topk(scores, ids, 8)
    for q in range(3):
        h = h_ids[q][h_ids[q] != PAD_ID].tolist()
        x = x_ids[q][x_ids[q] != PAD_ID].tolist()
        assert not set(h) & set(x)
        assert len(h) == int((scores[q] < 0).sum()) and len(x) == int((scores[q] > 0).sum())
        assert bool((h_sc[q][: len(h)] < 0).all()) and bool((x_sc[q][: len(x)] > 0).all())
    # the DDP merge of shards equals one pass, padding included
    parts = [split_topk(scores[:, a:b], ids[a:b], 8) for a, b in [(0, 3), (3, 4), (4, 10)]]
    merged = merge_topk(parts, 8)
    for a, b in zip(merged, (h_ids, h_sc, x_ids, x_sc)):
        assert torch.equal(a.nan_to_num(123.0), b.nan_to_num(123.0))


def test_top_k_over_half_end_to_end():
    im = _im(num_candidates=10, top_k=8)
    for r in im.explain(_query()):
        assert not set(r.helpful_ids) & set(r.harmful_ids)
        assert all(s < 0 for s in r.helpful_scores) and all(s > 0 for s in r.harmful_scores)
        assert len(r.helpful_ids) + len(r.harmful_ids) <= 10


# ---------------------------------------------------------------------------------------------- item 11
def test_saturated_query_is_flagged_and_the_flag_is_serialised(tmp_path):
    model = _net()
    with torch.no_grad():
        model[2].weight.mul_(0).add_(torch.eye(C, 6) * 1e4)  # logits ~1e4 apart: softmax is exactly one-hot
    x = torch.zeros(1, D)
    h = torch.tanh(model[0](x))
    y = model[2](h).argmax(-1)
    im = _im(model=model)
    (r,) = im.explain((x, y))
    assert r.query_loss == 0.0
    assert r.flags == [
        f for f in r.flags if f.startswith("saturated_query: loss 0, gradient 0, every score is 0")
    ]
    assert r.flags and r.helpful_ids == [] and r.harmful_ids == []
    line = json.loads(json.dumps(r.to_dict()))
    assert (
        line["flags"] == r.flags
        and line["loss"] == "cross-entropy on the logits (the default: the model stores no loss module)"
    )
    assert lf.InfluenceResult.from_dict(line).flags == r.flags
