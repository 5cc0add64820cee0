"""Gauss-Newton curvature against explicit Jacobian formulas in float64, and the dense build's chunking and memory."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, select_params


def _curvature(model, data, mode, loss_fn=None, params=None, batch_size=7):
    loss = PerExampleLoss(model, loss_fn)
    sel = select_params(model, params)
    spec = ParamSpec.of(sel)
    return TrainingCurvature(loss, spec.flatten(sel).detach(), spec, data, batch_size=batch_size, mode=mode)


def _mlp(act=nn.Tanh, d=5, h=6, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), act(), nn.Linear(h, c)).double()


def _data(n=23, d=5, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)
    )


def _explicit_ggn_ce(model, curv, x):
    """(1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i, with J from torch.autograd.functional.jacobian."""
    spec, theta = curv.spec, curv.theta

    def logits(t):
        return torch.func.functional_call(model, spec.unflatten(t), (x,))

    jac = torch.autograd.functional.jacobian(logits, theta)  # [N, C, P]
    p = torch.softmax(logits(theta), -1)
    g = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for i in range(x.shape[0]):
        h_out = torch.diag(p[i]) - torch.outer(p[i], p[i])
        g += jac[i].T @ h_out @ jac[i]
    return g / x.shape[0]


def test_gauss_newton_products_match_the_explicit_jacobian_formula_for_cross_entropy():
    model, data = _mlp(), _data()
    curv = _curvature(model, data, "gauss_newton")
    ref = _explicit_ggn_ce(model, curv, data.tensors[0])
    v = torch.randn(4, curv.spec.numel, dtype=torch.float64)
    torch.testing.assert_close(curv.hvp(v), v @ ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(curv.matrix(chunk_size=5), ref, rtol=1e-10, atol=1e-12)
    # one batch's mean
    batch = curv._to_device(data[:7])
    ref_b = _explicit_ggn_ce(model, curv, batch[0])
    torch.testing.assert_close(curv.batch_hvp(batch, v[0]), ref_b @ v[0], rtol=1e-10, atol=1e-12)


def test_gauss_newton_of_a_squared_error_loss_fn_is_jtj():
    model, data = _mlp(c=2), _data(c=2)
    targets = torch.randn(len(data), 2, dtype=torch.float64)
    data = TensorDataset(data.tensors[0], targets)
    curv = _curvature(model, data, "gauss_newton", loss_fn=lambda out, b: 0.5 * ((out - b[1]) ** 2).sum(-1))
    x = data.tensors[0]
    jac = torch.autograd.functional.jacobian(
        lambda t: torch.func.functional_call(model, curv.spec.unflatten(t), (x,)), curv.theta
    ).reshape(-1, curv.spec.numel)
    torch.testing.assert_close(curv.matrix(), jac.T @ jac / len(x), rtol=1e-10, atol=1e-12)


def test_gauss_newton_equals_the_hessian_for_logistic_regression():
    torch.manual_seed(0)
    model, data = nn.Linear(5, 3).double(), _data()
    gn = _curvature(model, data, "gauss_newton").matrix()
    h = _curvature(model, data, "hessian").matrix()
    torch.testing.assert_close(gn, h, rtol=1e-10, atol=1e-12)
    assert h.abs().max() > 1e-2  # not a trivially zero problem


def test_gauss_newton_is_positive_semidefinite_where_the_relu_hessian_is_not():
    model, data = _mlp(nn.ReLU, h=12, seed=3), _data(n=40)
    gn = _curvature(model, data, "gauss_newton").matrix()
    h = _curvature(model, data, "hessian").matrix()
    eg, eh = torch.linalg.eigvalsh(gn), torch.linalg.eigvalsh(h)
    assert eg.min() >= -1e-10 * eg.max()
    assert eh.min() < -1e-3 * eh.max()  # the Hessian of the same network is indefinite


def test_dense_build_in_chunks_equals_one_chunk_and_torch_func_hessian():
    model, data = _mlp(), _data()
    for mode in ("hessian", "gauss_newton"):
        curv = _curvature(model, data, mode)
        full = curv.matrix(chunk_size=curv.spec.numel)
        for k in (1, 4, 17):
            torch.testing.assert_close(curv.matrix(chunk_size=k), full, rtol=1e-12, atol=1e-13)
    x, y = data.tensors
    curv = _curvature(model, data, "hessian")
    ref = torch.func.hessian(lambda t: curv.loss(curv.spec.unflatten(t), (x, y)).mean())(curv.theta)
    torch.testing.assert_close(curv.matrix(chunk_size=3), ref, rtol=1e-10, atol=1e-12)


def test_gauss_newton_needs_a_splittable_loss_and_says_so():
    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3).double()

        def forward(self, x):
            return self.lin(x)

        def per_example_loss(self, batch):
            return nn.functional.cross_entropy(self(batch[0]), batch[1], reduction="none")

    with pytest.raises(ConfigurationError, match=r"`curvature`.*per_example_loss.*`loss_fn="):
        _curvature(Own(), _data(), "gauss_newton")
    with pytest.raises(ConfigurationError, match="`curvature`"):
        _curvature(_mlp(), _data(), "fisher")


def test_gauss_newton_on_real_model_fixtures_matches_the_explicit_formula():
    from _models import smoothed_net, tuple_net

    def tuple_loss(outputs, batch):  # outputs = (features, logits): the GGN goes through the whole tuple
        return nn.functional.cross_entropy(outputs[1], batch[1], reduction="none")

    for factory, loss_fn in ((tuple_net, tuple_loss), (smoothed_net, None)):
        _check_fixture_ggn(factory, loss_fn)


def _check_fixture_ggn(factory, loss_fn):
    model, train, _ = factory(n_train=12, steps=5)
    model = model.double()
    data = TensorDataset(train.tensors[0].double(), train.tensors[1])
    curv = _curvature(model, data, "gauss_newton", loss_fn=loss_fn, params=["head.*"], batch_size=5)
    outputs_fn, loss_of_outputs = curv.loss.split()
    params = curv.spec.unflatten(curv.theta)
    x, y = data.tensors
    # the split is the loss the module uses (label smoothing included)
    torch.testing.assert_close(loss_of_outputs(outputs_fn(params, (x, y)), (x, y)), curv.loss(params, (x, y)))

    def out(t, x=x):
        return outputs_fn(curv.spec.unflatten(t), (x, y))

    def logits(t):
        o = out(t)
        return o[1] if isinstance(o, tuple) else o

    def loss_of_logits(z, i):
        xi, yi = x[i : i + 1], y[i : i + 1]
        o = (torch.zeros(1, 16, dtype=z.dtype), z[None]) if loss_fn is not None else z[None]
        return loss_of_outputs(o, (xi, yi)).sum()

    jac = torch.autograd.functional.jacobian(
        logits, curv.theta, vectorize=True
    )  # [N, C, P]; features do not move with head.*
    z = logits(curv.theta).detach()
    ref = torch.zeros(curv.spec.numel, curv.spec.numel, dtype=torch.float64)
    for i in range(len(x)):
        h_out = torch.autograd.functional.hessian(lambda zi, i=i: loss_of_logits(zi, i), z[i])
        ref += jac[i].T @ h_out @ jac[i]
    torch.testing.assert_close(curv.matrix(chunk_size=64), ref / len(x), rtol=1e-9, atol=1e-11)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from lightning_fastif.functional.curvature import TrainingCurvature
    from lightning_fastif.functional.losses import PerExampleLoss
    from lightning_fastif.functional.params import ParamSpec, select_params
    from lightning_fastif.functional.solvers import ExactSolver

    mode = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)).double()  # P = 1,834
    data = TensorDataset(torch.randn(24, 64, dtype=torch.float64), torch.randint(0, 10, (24,)))
    loss = PerExampleLoss(model)
    sel = select_params(model); spec = ParamSpec.of(sel)
    curv = TrainingCurvature(loss, spec.flatten(sel).detach(), spec, data, batch_size=24, mode=mode)
    solver = ExactSolver(damping=0.1, max_memory_gb=0.5)
    plan = solver.plan(curv)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS:")
    solver.factorise(curv)
    print(json.dumps({"measured": status("VmHWM:") - base, "estimate": plan.peak_bytes,
                      "matrix": plan.matrix_bytes, "chunk": plan.chunk_size}))
    """
)


@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_exact_memory_guard_covers_the_measured_peak_of_build_and_factorisation(mode):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to measure the peak resident memory")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }  # big frees go back to the OS
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, mode], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["measured"] > r["matrix"]  # the measurement sees at least the P x P matrix (27 MB)...
    assert r["estimate"] >= r["measured"], r  # ...and the guard's estimate covers the real peak
    assert r["estimate"] <= 4 * r["measured"], r  # without being uselessly loose


# ---------------------------------------------------------------------------------------------- fused products
def _explicit_ggn(outputs_fn, loss_of_outputs, theta, spec, batch, reduction="sum"):
    """``J^T H_o J`` in float64 from explicit matrices: ``J [B*K, P]`` by ``jacobian`` and ``H_o [B*K, B*K]`` by
    ``hessian`` of the batch's loss as a function of all its (float) outputs at once."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    out = outputs_fn(spec.unflatten(theta), batch)
    leaves, tree = tree_flatten(out)
    floats = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    sizes = [leaves[i].numel() for i in floats]

    def flat_out(t):
        lv = tree_flatten(outputs_fn(spec.unflatten(t), batch))[0]
        return torch.cat([lv[i].reshape(-1) for i in floats])

    def loss_of_flat(z):
        full = list(leaves)
        for i, piece in zip(floats, torch.split(z, sizes)):
            full[i] = piece.reshape(leaves[i].shape)
        losses = loss_of_outputs(tree_unflatten(full, tree), batch)
        return losses.sum() if reduction == "sum" else losses.mean()

    jac = torch.autograd.functional.jacobian(flat_out, theta, vectorize=True)  # [B*K, P]
    h_out = torch.autograd.functional.hessian(loss_of_flat, flat_out(theta).detach())
    return jac.T @ h_out @ jac


def _check_fused(loss, params, batch, reduction="sum", ks=(1, 3), closed=None):
    """The fused product (its own code path, no fallback) against the first implementation and the explicit
    float64 matrix, for one vector and a batch of vectors."""
    from lightning_fastif.functional import ggn

    spec = ParamSpec.of(params)
    theta = spec.flatten(params).detach()
    outputs_fn, loss_of_outputs = loss.split()
    h_o = ggn.output_hessian_of(loss)
    assert (h_o is not None and h_o.kind) == (closed or False), h_o  # the closed form used where expected
    ref = _explicit_ggn(outputs_fn, loss_of_outputs, theta, spec, batch, reduction)
    assert ref.abs().max() > 1e-6  # not a trivially zero curvature
    g = torch.Generator().manual_seed(0)
    for k in ks:
        v = torch.randn(k, theta.numel(), generator=g, dtype=theta.dtype)
        fused = ggn._fused(outputs_fn, loss_of_outputs, theta, spec, batch, v, reduction, h_o)
        autodiff = ggn._fused(outputs_fn, loss_of_outputs, theta, spec, batch, v, reduction, None)
        old = ggn._functorch(outputs_fn, loss_of_outputs, theta, spec, batch, v, reduction)
        torch.testing.assert_close(fused, v @ ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(autodiff, v @ ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(fused, old, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_gauss_newton_product_matches_the_explicit_matrix_and_the_first_implementation(reduction):
    model, data = _mlp(), _data()
    batch = data[:9]
    _check_fused(PerExampleLoss(model), select_params(model), batch, reduction, closed="cross_entropy")
    # a user's loss_fn (unknown form): the output Hessian is differentiated
    loss = PerExampleLoss(model, lambda out, b: torch.logsumexp(out, -1) - out.gather(1, b[1][:, None])[:, 0])
    _check_fused(loss, select_params(model), batch, reduction)
    # a pytree output, one of whose leaves does not depend on the selected parameters
    torch.manual_seed(0)
    tup = nn.ModuleDict({"a": nn.Linear(5, 4), "b": nn.Linear(4, 3)}).double()

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = tup

        def forward(self, x):
            h = torch.tanh(self.m["a"](x))
            return h, self.m["b"](h)

    two = Two()
    loss = PerExampleLoss(two, lambda out, b: nn.functional.cross_entropy(out[1], b[1], reduction="none"))
    _check_fused(loss, select_params(two, ["m.b.*"]), batch, reduction)


def test_closed_form_output_hessians_cover_smoothing_ignore_index_and_mse():
    torch.manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, -100, 1, 0, -100, 2])

    class WithLoss(nn.Module):
        def __init__(self, crit, c=3):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, c))
            self.criterion = crit

        def forward(self, x):
            return self.net(x)

    m = WithLoss(nn.CrossEntropyLoss(label_smoothing=0.2, ignore_index=-100)).double()
    _check_fused(PerExampleLoss(m), select_params(m), (x, y), closed="cross_entropy")
    m = WithLoss(nn.MSELoss(), c=2).double()
    _check_fused(
        PerExampleLoss(m), select_params(m), (x, torch.randn(8, 2, dtype=torch.float64)), closed="mse"
    )
    # class weights: no closed form (differentiated instead)
    from lightning_fastif.functional.ggn import output_hessian_of

    m = WithLoss(nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64))).double()
    assert output_hessian_of(PerExampleLoss(m)) is None


def test_fused_gauss_newton_product_on_real_model_fixtures():
    from _models import bn_cnn, hf_bert, regression_net, smoothed_net

    def as64(factory, **kw):
        model, train, _ = factory(**kw)
        model = model.double().eval()
        x = train.tensors[0][:6].double() if hasattr(train, "tensors") else None
        return model, train, x

    # BatchNorm CNN in eval mode (running statistics), every parameter; in-place ReLUs
    model, train, x = as64(bn_cnn, n_train=12, steps=3)
    _check_fused(
        PerExampleLoss(model), select_params(model), (x, train.tensors[1][:6]), closed="cross_entropy"
    )
    # regression (MSE module on the model, [B] outputs) and label smoothing
    model, train, x = as64(regression_net, n_train=12, steps=3)
    _check_fused(
        PerExampleLoss(model), select_params(model), (x, train.tensors[1][:6].double()), closed="mse"
    )
    model, train, x = as64(smoothed_net, n_train=12, steps=3)
    _check_fused(
        PerExampleLoss(model), select_params(model), (x, train.tensors[1][:6]), closed="cross_entropy"
    )
    # Hugging Face BERT (eager attention), a parameter subset through the encoder's last dense layer
    model, train, _ = hf_bert(n_train=6, steps=2)
    model = model.double().eval()
    from torch.utils.data.dataloader import default_collate

    batch = default_collate([train[i] for i in range(4)])
    params = select_params(model, ["bert.encoder.layer.0.output.dense.*", "classifier.*"])
    _check_fused(PerExampleLoss(model), params, batch, ks=(1, 2), closed="cross_entropy")


def test_fused_gauss_newton_product_with_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight  # tied, as a language model's input and output embeddings

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids).mean(1)))

    torch.manual_seed(0)
    model = Tied().double()
    ids = torch.randint(0, 7, (6, 3))
    params = select_params(model)
    assert list(params) == ["emb.weight"]  # one tensor, used twice
    _check_fused(PerExampleLoss(model), params, (ids, torch.randint(0, 7, (6,))), closed="cross_entropy")


def test_fused_and_first_gauss_newton_products_agree_through_training_curvature():
    model, data = _mlp(), _data()
    curv = _curvature(model, data, "gauss_newton")
    v = torch.randn(5, curv.spec.numel, dtype=torch.float64)
    new = curv.hvp(v)
    curv.ggn_method = "functorch"
    torch.testing.assert_close(new, curv.hvp(v), rtol=1e-10, atol=1e-12)
    curv.ggn_method = "fast"
    with pytest.raises(ConfigurationError, match="`ggn_method`"):
        curv.hvp(v)


def test_a_model_the_fused_product_cannot_take_falls_back_once_and_is_remembered(monkeypatch):
    from lightning_fastif.functional import ggn

    model, data = _mlp(), _data()
    curv = _curvature(model, data, "gauss_newton")
    v = torch.randn(3, curv.spec.numel, dtype=torch.float64)
    want = curv.hvp(v)
    calls = []

    def no_double_backward(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("derivative for aten::some_op is not implemented")

    monkeypatch.setattr(ggn, "_fused", no_double_backward)
    torch.testing.assert_close(curv.hvp(v), want, rtol=1e-10, atol=1e-12)  # the first implementation's answer
    assert curv.ggn_method == "functorch" and len(calls) == 1  # tried once, not once per batch
    torch.testing.assert_close(curv.hvp(v), want, rtol=1e-10, atol=1e-12)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="some_op"):  # without fallback the failure propagates
        ggn.batch_ggn_vp(*curv._split, curv.theta, curv.spec, data[:4], v, fallback=False)
