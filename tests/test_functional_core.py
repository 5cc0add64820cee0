"""The math core against closed forms and slow float64 loops."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_fastif.errors import ConfigurationError, LossResolutionError
from lightning_fastif.functional.batch import move_to
from lightning_fastif.functional.grads import mean_grad, per_example_grads
from lightning_fastif.functional.hvp import batch_hessian, batch_hvp
from lightning_fastif.functional.losses import PerExampleLoss, resolve_loss
from lightning_fastif.functional.params import ParamSpec, fingerprint, select_params
from lightning_fastif.functional.scores import grad_scores, jvp_scores, merge_topk, score_batch, split_topk


def test_functional_imports_torch_only():
    """Every module of functional/ (solvers, ggn, kfac and its parts...) imports torch only."""
    code = (
        "import sys, pkgutil, importlib, lightning_fastif.functional as f\n"
        "for m in pkgutil.iter_modules(f.__path__): importlib.import_module(f'{f.__name__}.{m.name}')\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'faiss', 'wandb') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _mse_linear(d=4, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()

    def loss_fn(out, batch):
        return 0.5 * (out.squeeze(-1) - batch[1]) ** 2

    return model, x, y, PerExampleLoss(model, loss_fn)


def test_linear_regression_gradients_and_hessian_match_closed_form():
    model, x, y, loss = _mse_linear()
    params = select_params(model)
    spec = ParamSpec.of(params)
    theta = spec.flatten(params)
    w = model.weight.detach()[0]
    resid = x @ w - y
    # per-example grad of 0.5 (x.w - y)^2 is (x.w - y) x; Hessian of the mean is X^T X / n
    torch.testing.assert_close(per_example_grads(loss, theta, spec, (x, y)), resid[:, None] * x)
    torch.testing.assert_close(mean_grad(loss, theta, spec, (x, y)), (resid[:, None] * x).mean(0))
    h = x.T @ x / len(x)
    torch.testing.assert_close(batch_hessian(loss, theta, spec, (x, y)), h)
    v = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(batch_hvp(loss, theta, spec, (x, y), v), v @ h)


def _tanh_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x = torch.randn(11, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (11,))
    return model, x, y


def test_jvp_and_vmap_scores_match_a_slow_per_example_backward_loop_in_float64():
    model, x, y = _tanh_mlp()
    params = select_params(model)
    spec = ParamSpec.of(params)
    theta = spec.flatten(params)
    loss = resolve_loss(model)
    s = torch.randn(3, spec.numel, dtype=torch.float64)
    slow = torch.zeros(len(x), 3, dtype=torch.float64)
    ref = [p for p in nn.Sequential(*[m for m in model]).parameters()]
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.flatten() for p in ref])
        slow[i] = -(s @ g)
    torch.testing.assert_close(jvp_scores(loss, theta, spec, (x, y), s), slow)
    torch.testing.assert_close(grad_scores(loss, theta, spec, (x, y), s, chunk_size=4), slow)
    torch.testing.assert_close(score_batch(loss, theta, spec, (x, y), s[:1], "auto"), slow[:, :1])


def test_per_example_grads_fall_back_to_a_loop_for_non_tensor_batches():
    model, x, y = _tanh_mlp()
    loss = PerExampleLoss(
        model, lambda out, batch: nn.functional.cross_entropy(out, batch[1], reduction="none")
    )
    params = select_params(model)
    spec = ParamSpec.of(params)
    theta = spec.flatten(params)
    tags = [f"id{i}" for i in range(len(x))]
    vm = per_example_grads(loss, theta, spec, (x, y))
    loop = per_example_grads(loss, theta, spec, (x, y, tags))
    torch.testing.assert_close(vm, loop)


def test_parameter_selection_by_patterns_and_model_not_mutated():
    model, _, _ = _tanh_mlp()
    before = fingerprint(model)
    assert list(select_params(model, ["2.*"])) == ["2.weight", "2.bias"]
    assert list(select_params(model, "0.bias")) == ["0.bias"]
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in select_params(model)
    assert "0.weight" in select_params(model, ["0.*"])  # frozen weights may be selected explicitly
    model[0].weight.requires_grad_(True)
    assert fingerprint(model) == before


def test_pattern_that_matches_nothing_lists_available_names():
    model, _, _ = _tanh_mlp()
    with pytest.raises(ConfigurationError, match=r"`params`.*'head\.\*'.*0\.weight, 0\.bias, 2\.weight"):
        select_params(model, ["head.*"])


def test_param_spec_round_trip():
    model, _, _ = _tanh_mlp()
    params = select_params(model)
    spec = ParamSpec.of(params)
    flat = spec.flatten(params)
    assert flat.shape == (spec.numel,) == (6 * 8 + 8 + 8 * 4 + 4,)
    back = spec.unflatten(flat)
    for k in params:
        torch.testing.assert_close(back[k], params[k])


def test_fingerprint_changes_with_one_weight():
    model, _, _ = _tanh_mlp()
    a = fingerprint(model)
    with torch.no_grad():
        model[2].bias[0] += 1e-9
    assert fingerprint(model) != a


def test_fingerprint_is_hashed_once_per_model_state_and_follows_every_change(monkeypatch):
    from lightning_fastif.functional import params as params_mod

    calls = []
    real = params_mod._hash_tensors
    monkeypatch.setattr(params_mod, "_hash_tensors", lambda ts: calls.append(1) or real(ts))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    first = fingerprint(model)
    assert fingerprint(model) == first and len(calls) == 1  # the same state: hashed once
    seen = {first}

    def changed(m: nn.Module = model) -> str:
        fp = fingerprint(m)
        assert fp not in seen and fp == real(  # a new digest, and the true one of the new values
            list(m.named_parameters()) + [(n, b) for n, b in m.named_buffers() if b is not None]
        )
        seen.add(fp)
        return fp

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()  # in place: the version counters move
    changed()
    model[0].weight.data[0, 0] += 1.0  # through .data: no version bump, the value moments catch it
    changed()
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    changed()
    model(torch.randn(5, 4))  # train-mode BatchNorm: running statistics (buffers) move
    changed()
    # another model of the same shapes whose tensors may land at the freed addresses: never the old digest
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del model, opt
    other = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    fp = fingerprint(other)
    assert fp == real(list(other.named_parameters()) + list(other.named_buffers()))
    other.load_state_dict(state)
    assert fingerprint(other) in seen


class _WithMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1).double()

    def forward(self, x):
        return self.lin(x)

    def per_example_loss(self, batch):
        return (self(batch["x"]).squeeze(-1) - batch["target"]) ** 2


def test_loss_resolution_order():
    x = torch.randn(5, 3, dtype=torch.float64)
    m = _WithMethod()
    params = dict(m.named_parameters())
    batch = {"x": x, "target": torch.zeros(5, dtype=torch.float64)}
    loss = resolve_loss(m)
    assert loss.source == "per_example_loss"
    torch.testing.assert_close(loss(params, batch), m.per_example_loss(batch))
    explicit = resolve_loss(m, lambda out, b: out.squeeze(-1).abs())
    assert explicit.source == "loss_fn"
    torch.testing.assert_close(explicit({k: v for k, v in params.items()}, x), m(x).squeeze(-1).abs())
    lin = nn.Linear(3, 4)
    d = resolve_loss(lin)
    assert d.source == "classification"
    dict_batch = {"input": torch.randn(5, 3), "labels": torch.tensor([0, 1, 2, 3, 0])}
    out = d(dict(lin.named_parameters()), {"labels": dict_batch["labels"], "input": dict_batch["input"]})
    assert out.shape == (5,)


def test_default_loss_says_which_of_three_to_provide():
    lin = nn.Linear(3, 4)
    loss = resolve_loss(lin)
    with pytest.raises(LossResolutionError, match=r"no labels.*loss_fn.*per_example_loss.*\(x, y\)"):
        loss(dict(lin.named_parameters()), torch.randn(5, 3))
    with pytest.raises(LossResolutionError, match=r"logits \[B, C\] and integer labels"):
        loss(dict(lin.named_parameters()), (torch.randn(5, 3), torch.randn(5)))
    with pytest.raises(LossResolutionError, match=r"shape \[B\]"):
        resolve_loss(lin, lambda out, b: out.sum())(dict(lin.named_parameters()), (torch.randn(5, 3), None))
    with pytest.raises(ConfigurationError, match="`loss_fn`"):
        resolve_loss(lin, loss_fn="cross_entropy")


def test_topk_split_and_merge_equal_one_pass():
    torch.manual_seed(3)
    scores = torch.randn(2, 50)
    ids = torch.arange(100, 150)
    full = split_topk(scores, ids, 5)
    assert torch.equal(full[1][0], scores[0].sort().values[:5])
    assert torch.equal(full[3][0], scores[0].sort(descending=True).values[:5])
    parts = [split_topk(scores[:, a:b], ids[a:b], 5) for a, b in [(30, 50), (0, 13), (13, 30)]]
    merged = merge_topk(parts, 5)
    for x, y in zip(full, merged):
        assert torch.equal(x, y)


def test_move_to_casts_only_floating_tensors():
    b = move_to(
        {"x": torch.zeros(2), "y": torch.ones(2, dtype=torch.long), "t": ["a", "b"]}, "cpu", torch.float64
    )
    assert b["x"].dtype == torch.float64 and b["y"].dtype == torch.long and b["t"] == ["a", "b"]


def test_head_fast_path_equals_jvp_scores_of_the_head():
    from lightning_fastif.functional.head import head_scores

    model, x, y = _tanh_mlp()
    params = select_params(model, ["2.*"])
    spec = ParamSpec.of(params)
    theta = spec.flatten(params)
    s = torch.randn(3, spec.numel, dtype=torch.float64)
    ref = jvp_scores(resolve_loss(model), theta, spec, (x, y), s)
    with torch.no_grad():
        phi = model[1](model[0](x))
        logits = model[2](phi)
    parts = spec.unflatten(s)
    fast = head_scores(phi, logits, y, parts["2.weight"], parts["2.bias"])
    torch.testing.assert_close(fast, ref)


class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward but no forward-mode rule, like fused attention kernels."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _FusedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()

    def forward(self, x):
        return self.b(_NoForwardAD.apply(self.a(x)))


def test_jvp_scoring_falls_back_to_per_example_gradients_when_forward_mode_is_missing():
    m = _FusedNet()
    params = select_params(m)
    spec = ParamSpec.of(params)
    theta = spec.flatten(params)
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))
    s = torch.randn(2, spec.numel, dtype=torch.float64)
    with pytest.warns(UserWarning, match="Forward-mode AD is not supported"):
        out = score_batch(resolve_loss(m), theta, spec, batch, s, "jvp")
    torch.testing.assert_close(out, grad_scores(resolve_loss(m), theta, spec, batch, s))


def test_hvp_that_no_mode_supports_is_a_clear_error(monkeypatch):
    import lightning_fastif.functional.hvp as hvp_mod
    from lightning_fastif.errors import UnsupportedModelError

    def no_double_backward(*args, **kwargs):
        raise RuntimeError("derivative for fused_kernel_backward is not implemented")

    monkeypatch.setattr(hvp_mod, "_hvp_double_backward", no_double_backward)
    m = _FusedNet()
    params = select_params(m)
    spec = ParamSpec.of(params)
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1]))
    with pytest.raises(UnsupportedModelError, match="attn_implementation"):
        batch_hvp(
            resolve_loss(m),
            spec.flatten(params),
            spec,
            batch,
            torch.randn(2, spec.numel, dtype=torch.float64),
        )


def test_a_pattern_that_names_only_a_tied_weight_says_which_name_to_select():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_fastif.errors import ConfigurationError

    cfg = GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=12)
    model = GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(
        ConfigurationError,
        match=r"lm_head\.weight is tied to `transformer\.wte\.weight`.*'transformer\.wte\.weight'",
    ):
        select_params(model, ["lm_head.*"])
    with pytest.raises(ConfigurationError, match="matches none") as err:  # an unrelated typo: no tying hint
        select_params(model, ["lm_haed.*"])
    assert "tied" not in str(err.value)
    assert list(select_params(model, ["transformer.wte.weight"])) == ["transformer.wte.weight"]
