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
    UnknownArgumentError,
    UnsupportedModelError,
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


# ---------------------------------------------------------------------------------------------- issue 17
# Item 7 (truthy strings as bools, bad ids, pools, class names, decoders) and the 25 unclear errors: each is now an
# error of the library's own, naming the argument, what was expected and what was got.
class _RandomForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)

    def forward(self, x):
        return self.lin(x) + torch.rand_like(x[:, :1])


class _AlwaysDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)

    def forward(self, x):
        return F.dropout(self.lin(x), 0.5, training=True)  # ignores eval mode


class _Overstated(torch.utils.data.Dataset):
    """``__len__`` says 25, ``__getitem__`` reads 20."""

    def __init__(self):
        self.data = _data()

    def __len__(self):
        return N + 5

    def __getitem__(self, i):
        return self.data[i]


def _dead_unit_net() -> nn.Module:
    """A ReLU unit that never fires: its outgoing weights have zero gradient and zero curvature (a singular H)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 6), nn.ReLU(), nn.Linear(6, C))
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = -5.0
    return model


def _inf_train(at: int = 3) -> TensorDataset:
    """An inf input: tanh saturates, the loss stays finite, the gradient is NaN (inf * 0)."""
    ds = _data()
    x = ds.tensors[0].clone()
    x[at, 0] = float("inf")
    return TensorDataset(x, ds.tensors[1])


def _pool(x=None, y=None):
    from lightning_fastif.applications.pool import with_pool

    x = torch.randn(5, D) if x is None else x
    y = torch.zeros(5, dtype=torch.long) if y is None else y
    return with_pool(_im(), TensorDataset(x, y))


def _result(**kw):
    args = dict(
        query_id=0,
        label=3,
        prediction=2,
        helpful_ids=[1],
        helpful_scores=[-1.0],
        harmful_ids=[2],
        harmful_scores=[1.0],
        num_candidates=3,
    )
    args.update(kw)
    return lf.InfluenceResult(**args)


def _html(**kw):
    from lightning_fastif.reporting.html import render_html_report

    return render_html_report([_result()], **kw)


ISSUE17_CASES = [
    # item 7: truthy strings are not bools
    ("progress_string", lambda: _im(progress="no"), ConfigurationError, "`progress`.*bool.*'no'"),
    (
        "gradient_callback_float16_string",
        lambda: lf.GradientIndexCallback("i", float16="no"),
        ConfigurationError,
        "`float16`.*bool.*'no'",
    ),
    (
        "gradient_callback_progress_string",
        lambda: lf.GradientIndexCallback("i", progress="no"),
        ConfigurationError,
        "`progress`",
    ),
    (
        "index_callback_progress_string",
        lambda: lf.FeatureIndexCallback("i", progress="no"),
        ConfigurationError,
        "`progress`",
    ),
    ("report_html_string", lambda: lf.InfluenceReport("r", html="no"), ConfigurationError, "`html`"),
    ("report_wandb_string", lambda: lf.InfluenceReport("r", wandb="false"), ConfigurationError, "`wandb`"),
    ("ekfac_overwrite_string", lambda: lf.EKFACSolver(overwrite="no"), ConfigurationError, "`overwrite`"),
    (
        "sketch_float16_string",
        lambda: _im(sketch={"float16": "no"}),
        ConfigurationError,
        r"`sketch\['float16'\]`.*'no'",
    ),
    (
        "lds_warm_start_string",
        lambda: lf.LDSSettings(warm_start="no"),
        ConfigurationError,
        "`lds.warm_start`",
    ),
    # item 7: ids
    (
        "query_ids_duplicated",
        lambda: _im().explain(_query(), query_ids=[0, 0, 1]),
        ConfigurationError,
        r"`query_ids`.*distinct.*\[0\]",
    ),
    (
        "query_ids_float",
        lambda: _im().explain(_query(), query_ids=[0.5, 1, 2]),
        ConfigurationError,
        "`query_ids`.*ints.*0.5",
    ),
    (
        "query_ids_float_tensor",
        lambda: _im().explain(_query(), query_ids=torch.tensor([0.0, 1.0, 2.0])),
        ConfigurationError,
        "`query_ids`.*float32",
    ),
    (
        "group_query_ids_float",
        lambda: _im().explain_group(_query(), query_ids=[0.5, 1, 2]),
        ConfigurationError,
        "`query_ids`.*0.5",
    ),
    (
        "train_indices_duplicated",
        lambda: _im().influence(_query(), train_indices=[0, 0, 1]),
        ConfigurationError,
        r"`train_indices`.*distinct.*\[0\]",
    ),
    (
        "train_indices_float",
        lambda: _im().influence(_query(), train_indices=[0.5, 1.0]),
        ConfigurationError,
        "`train_indices`.*ints.*0.5",
    ),
    (
        "train_indices_float_tensor",
        lambda: _im().influence(_query(), train_indices=torch.tensor([0.0, 1.0])),
        ConfigurationError,
        "`train_indices`.*float32",
    ),
    # item 7: pools, class names, decoders
    (
        "with_pool_name_not_a_string",
        lambda: __import__("lightning_fastif").with_pool(_im(), _data(), 5),
        ConfigurationError,
        "`name`.*str.*5",
    ),
    (
        "class_names_shorter_than_the_classes",
        lambda: _html(class_names=["a", "b", "c"]),
        ConfigurationError,
        r"`class_names`.*classes 0 to 3.*4 names.*got 3",
    ),
    (
        "decoder_unknown_report",
        lambda: lf.InfluenceReport("r", decoder="bert"),
        ConfigurationError,
        "`decoder`.*'bert'",
    ),
    ("decoder_unknown_html", lambda: _html(decoder=3), ConfigurationError, "`decoder`.*3"),
    # the 25 unclear errors
    (
        "exact_damping_0_on_a_singular_hessian",
        lambda: _im(model=_dead_unit_net(), solver=lf.ExactSolver(damping=0, curvature="hessian")).s_test(
            _query()
        ),
        ConfigurationError,
        r"`damping` = 0 it is singular.*`damping` > 0",
    ),
    (
        "forward_draws_random_numbers",
        lambda: _im(model=_RandomForward()).explain(_query()),
        UnsupportedModelError,
        "deterministic in eval mode.*torch.rand",
    ),
    (
        "forward_draws_random_numbers_s_test",
        lambda: _im(model=_RandomForward()).s_test(_query()),
        UnsupportedModelError,
        "deterministic in eval mode",
    ),
    (
        "dropout_ignoring_eval_mode",
        lambda: _im(model=_AlwaysDropout()).explain(_query()),
        UnsupportedModelError,
        "deterministic in eval mode.*dropout",
    ),
    ("meta_device_model", lambda: _im(model=_net().to("meta")), ConfigurationError, "`model`.*'meta' device"),
    (
        "query_inputs_wrong_width",
        lambda: _im().explain((torch.randn(3, D + 1), torch.tensor([0, 1, 2]))),
        ConfigurationError,
        r"query `batch`.*\[1, 4\].*\[3, 5\]",
    ),
    (
        "query_inputs_wrong_width_s_test",
        lambda: _im().s_test((torch.randn(3, D + 1), torch.tensor([0, 1, 2]))),
        ConfigurationError,
        r"query `batch`.*\[3, 5\]",
    ),
    (
        "pool_inputs_wrong_width",
        lambda: _pool(x=torch.randn(5, D + 1)),
        ConfigurationError,
        r"`pool`.*train_dataset\[0\]\[0\] has shape \[4\].*pool\[0\]\[0\] of shape \[5\]",
    ),
    (
        "pool_labels_out_of_range",
        lambda: _pool(y=torch.tensor([0, 9, 1, 0, 2])).explain(_query()),
        ConfigurationError,
        r"`labels` of the `pool` examples.*id\(s\) \[1\] \(positions in `pool`\).*\[9\]",
    ),
    (
        "loss_fn_returns_the_wrong_length",
        lambda: _im(loss_fn=lambda out, b: F.cross_entropy(out, b[1], reduction="none")[:2]).explain(
            _query()
        ),
        LossResolutionError,
        r"one loss per example.*shape \[3\].*got shape \[2\]",
    ),
    ("params_empty_list", lambda: _im(params=[]), ConfigurationError, r"`params`.*empty list \[\]"),
    (
        "params_a_string",
        lambda: _im(params="2.*"),
        ConfigurationError,
        r"`params`.*\['2.\*'\].*the string '2.\*'",
    ),
    (
        "query_ids_shorter_than_the_batch",
        lambda: _im().explain(_query(), query_ids=[0]),
        ConfigurationError,
        r"`query_ids`.*one id per query of the batch \(3\).*1 id",
    ),
    ("collate_fn_not_callable", lambda: _im(collate_fn=5), ConfigurationError, "`collate_fn`.*callable.*5"),
    (
        "unknown_keyword_solver",
        lambda: lf.ExactSolver(dampnig=0.1),
        UnknownArgumentError,
        "ExactSolver.*`dampnig` \\(did you mean `damping`\\?\\)",
    ),
    (
        "unknown_keyword_ekfac",
        lambda: lf.EKFACSolver(factor_dir="f"),
        UnknownArgumentError,
        "EKFACSolver.*`factor_dir` \\(did you mean `factors_dir`\\?\\)",
    ),
    (
        "unknown_keyword_module",
        lambda: _im(num_candidate=3),
        UnknownArgumentError,
        "InfluenceModule.*`num_candidate` \\(did you mean `num_candidates`\\?\\)",
    ),
    (
        "unknown_keyword_callback",
        lambda: lf.FeatureIndexCallback("i", batchsize=3),
        UnknownArgumentError,
        "`batchsize` \\(did you mean `batch_size`\\?\\)",
    ),
    (
        "result_from_dict_missing_keys",
        lambda: lf.InfluenceResult.from_dict({"query_id": 1, "label": 0}),
        ConfigurationError,
        "`data`.*without prediction, helpful_ids",
    ),
    (
        "report_title_not_a_string",
        lambda: lf.InfluenceReport("r", title=5),
        ConfigurationError,
        "`title`.*str.*5",
    ),
    ("html_title_not_a_string", lambda: _html(title=["x"]), ConfigurationError, "`title`.*str"),
    (
        "dataset_len_overstates",
        lambda: _im(train=_Overstated()),
        ConfigurationError,
        r"`train_dataset`.*25 examples.*id 24.*IndexError",
    ),
    (
        "pool_len_overstates",
        lambda: lf.with_pool(_im(), _Overstated()),
        ConfigurationError,
        r"`pool`.*25 examples.*id 24",
    ),
    (
        "inf_training_input_exact",
        lambda: _im(train=_inf_train()).explain(_query()),
        NonFiniteError,
        r"training gradient.*training example id\(s\) \[3\]",
    ),
    (
        "inf_training_input_cg",
        lambda: _im(train=_inf_train(), solver=lf.CGSolver(damping=0.1)).explain(_query()),
        NonFiniteError,
        r"training example id\(s\) \[3\]",
    ),
    (
        "inf_training_input_auto",
        lambda: _im(train=_inf_train(), solver="auto").explain(_query()),
        NonFiniteError,
        r"training example id\(s\) \[3\]",
    ),
]


@pytest.mark.parametrize(
    ("kind", "thunk", "error", "pattern"), ISSUE17_CASES, ids=[c[0] for c in ISSUE17_CASES]
)
def test_issue17_bad_input_is_a_clear_error(kind, thunk, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        thunk()
    assert isinstance(info.value, FastIFError)


def test_unknown_keyword_is_still_a_type_error_and_keeps_the_signature():
    import inspect

    with pytest.raises(TypeError, match="dampnig"):
        lf.CGSolver(dampnig=0.1)
    assert "damping" in inspect.signature(lf.ExactSolver).parameters
    assert "num_candidates" in inspect.signature(lf.InfluenceModule).parameters
    assert lf.ExactSolver(damping=0.5).damping == 0.5  # the wrapper passes every known keyword on


def test_real_bools_and_dropout_in_eval_mode_still_work():
    im = _im(progress=False)
    assert im.progress is False
    model = nn.Sequential(nn.Linear(D, C), nn.Dropout(0.5))  # dropout that follows eval mode is deterministic
    scores = _im(model=model).influence(_query())
    assert torch.equal(scores, _im(model=model).influence(_query()))
    assert lf.GradientIndexCallback("i", float16=True).float16 is True


def test_a_pool_of_the_training_format_is_accepted_and_named():
    pool = _pool()
    (r, *_) = pool.explain(_query())
    assert r.extra["pool"] == "pool" and all(0 <= i < 5 for i in r.helpful_ids + r.harmful_ids)


def test_class_names_that_cover_every_class_are_shown():
    html = _html(class_names=["a", "b", "c", "d"])
    assert "3 (d)" in html and "2 (c)" in html


def test_invalid_json_in_a_factors_meta_is_a_clear_error(tmp_path):
    folder = tmp_path / "factors"
    folder.mkdir()
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match=r"meta.json.*not valid JSON.*`overwrite=True`"):
        _im(solver=lf.EKFACSolver(damping=0.1, factors_dir=folder)).s_test(_query())
    (folder / "meta.json").write_text("[1, 2]")
    with pytest.raises(IndexCorruptError, match="JSON object.*list"):
        _im(solver=lf.EKFACSolver(damping=0.1, factors_dir=folder)).s_test(_query())
    # overwrite=True refits over it, as the message says
    _im(solver=lf.EKFACSolver(damping=0.1, factors_dir=folder, overwrite=True)).s_test(_query())
    assert json.loads((folder / "meta.json").read_text())["kind"] == "ekfac"


def _records(n: int, start: int = 0) -> list:
    return [
        _result(query_id=start + i, helpful_ids=list(range(40)), helpful_scores=[-0.5] * 40) for i in range(n)
    ]


def test_a_full_disk_while_writing_results_is_one_line_and_keeps_earlier_records(tmp_path, monkeypatch):
    import errno
    import os

    from lightning_fastif.errors import ResultsWriteError
    from lightning_fastif.reporting.jsonl import JsonlWriter, read_jsonl

    path = tmp_path / "influence.jsonl"
    writer = JsonlWriter(path, fsync=False)
    writer.write_many(_records(2))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    writer.fsync = True
    with pytest.raises(ResultsWriteError) as info:
        writer.write_many(_records(2, start=2))
    message = str(info.value)
    assert "\n" not in message and "No space left on device (ENOSPC)" in message
    assert "the 2 record(s) written before are kept" in message and str(path) in message
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert [r.query_id for r in read_jsonl(path)] == [0, 1]  # no partial third record
    writer.write_many(_records(1, start=2))  # space is back: the same writer goes on
    assert [r.query_id for r in read_jsonl(path)] == [0, 1, 2]


_FSIZE_SCRIPT = """
import os, resource, sys
sys.path.insert(0, sys.argv[2])
from test_bad_input import _records
from lightning_fastif.reporting.jsonl import JsonlWriter
path = sys.argv[1]
writer = JsonlWriter(path, fsync=False)
writer.write_many(_records(2))
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 300, resource.RLIM_INFINITY))
try:
    writer.write_many(_records(3, start=2))
except Exception as err:
    print(type(err).__name__ + "|" + str(err))
"""


def test_a_file_size_limit_while_writing_results_is_one_line_and_keeps_earlier_records(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from lightning_fastif.reporting.jsonl import read_jsonl

    path = tmp_path / "influence.jsonl"
    out = subprocess.run(
        [sys.executable, "-c", _FSIZE_SCRIPT, str(path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    kind, message = out.split("|", 1)
    assert kind == "ResultsWriteError" and "File too large (EFBIG)" in message
    assert "the 2 record(s) written before are kept" in message
    assert [r.query_id for r in read_jsonl(path)] == [0, 1]


def test_a_file_size_limit_while_writing_a_report_is_one_line_and_keeps_the_previous_file(
    tmp_path, monkeypatch
):
    import errno
    import os

    from lightning_fastif._files import atomic_write_text
    from lightning_fastif.errors import ResultsWriteError

    path = tmp_path / "report.html"
    atomic_write_text(path, "old report")

    def too_large(fd):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(os, "fsync", too_large)
    with pytest.raises(ResultsWriteError) as info:
        atomic_write_text(path, "new report")
    assert "\n" not in str(info.value) and "File too large (EFBIG)" in str(info.value)
    assert "report.html" in str(info.value) and "previous file, if any, is unchanged" in str(info.value)
    monkeypatch.undo()
    assert path.read_text() == "old report" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_explained_in_float32_not_refused(dtype: torch.dtype) -> None:
    """A bf16/fp16 model reaches the exact solver in float32 (it raised in Cholesky, then was refused): its s_test
    equals that of a float32 model holding the same (rounded) weights, and the model keeps its dtype."""
    half = _net().to(dtype)
    full = _net()
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    s_half = _im(model=half).s_test(_query())
    s_full = _im(model=full).s_test(_query())
    assert s_half.dtype == torch.float32
    assert torch.allclose(s_half, s_full, rtol=1e-4, atol=1e-5)
    assert all(p.dtype == dtype for p in half.parameters())
