"""K-FAC / EK-FAC against float64 ground truth: factors, the eigenvalue correction, the inverse, conv, persistence.

References are computed independently of the hooks: activations and pre-activation gradients by plain autograd,
per-example gradients by the library's ``per_example_grads`` (vmap), patches by explicit slicing, and the damped
inverse by ``torch.linalg.solve`` of the dense Kronecker-structured matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import (
    ConfigurationError,
    IndexMismatchError,
    SolverConvergenceWarning,
    UnsupportedModelError,
)
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.grads import per_example_grads
from lightning_fastif.functional.kfac.layers import kfac_layers, kfac_unsupported
from lightning_fastif.functional.kfac.solve import solve_kfac
from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, select_params
from lightning_fastif.solvers.kronecker import EKFACSolver, KFACSolver


def _curvature(model, ds, patterns=None, batch_size=16, loss_fn=None, **kw):
    loss = PerExampleLoss(model, loss_fn)
    params = select_params(model, patterns)
    spec = ParamSpec.of(params)
    return TrainingCurvature(loss, spec.flatten(params), spec, ds, batch_size=batch_size, **kw)


def _fit(solver_cls, cur, **kw):
    solver = solver_cls(damping=1e-3, **kw)
    return solver.fit(cur), solver


def _layer_grads(cur, slot):
    """Per-example gradient matrices ``[N, out, a_dim]`` of one layer (weight columns, then bias), float64 loop."""
    batch = tuple(t for t in cur.dataset.tensors)
    g = per_example_grads(cur.loss, cur.theta, cur.spec, batch)
    parts = cur.spec.unflatten(g)
    n = g.shape[0]
    cols = []
    if slot.weight is not None:
        cols.append(parts[slot.weight].reshape(n, slot.out_dim, -1))
    if slot.bias is not None:
        cols.append(parts[slot.bias].reshape(n, slot.out_dim, 1))
    return torch.cat(cols, -1)


def _assert_correction_exact(cur, factors):
    """EK-FAC's eigenvalues = the exact diagonal of the (empirical) Fisher block in the Kronecker eigenbasis."""
    for slot in factors.slots:
        d = _layer_grads(cur, slot)  # [N, out, a]
        qg, qa = factors.g_evec[slot.module], factors.a_evec[slot.module]
        q = torch.kron(qg, qa)  # row-major vec: vec(Q_G^T D Q_A) = (Q_G (x) Q_A)^T vec(D)
        fisher = torch.einsum("ni,nj->ij", d.flatten(1), d.flatten(1)) / d.shape[0]
        want = torch.diagonal(q.T @ fisher @ q).reshape(slot.out_dim, slot.a_dim)
        torch.testing.assert_close(factors.corrected[slot.module], want, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------------------------ Linear factors
def test_linear_factors_equal_explicit_float64_covariances():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(37, 5, dtype=torch.float64), torch.randint(0, 3, (37,))
    cur = _curvature(model, TensorDataset(x, y), batch_size=8)
    factors, _ = _fit(KFACSolver, cur, fisher="empirical")
    ones = torch.cat([x, torch.ones(37, 1, dtype=torch.float64)], 1)
    g = torch.softmax(model(x), 1).detach() - F.one_hot(y, 3).double()  # dCE/dlogits, the real labels
    torch.testing.assert_close(factors.a_cov[""], ones.T @ ones / 37, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factors.g_cov[""], g.T @ g / 37, rtol=1e-10, atol=1e-12)


def test_true_fisher_samples_labels_from_the_model():
    # 3 distinct inputs, each 800 times: G -> mean_x (diag(p) - p p^T) as the sampled labels average out
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    base = torch.randn(3, 4, dtype=torch.float64) * 2
    x = base.repeat(800, 1)
    y = torch.zeros(len(x), dtype=torch.long)  # the real labels are all 0: the true Fisher must not use them
    cur = _curvature(model, TensorDataset(x, y), batch_size=600)
    factors, _ = _fit(KFACSolver, cur, fisher="true", seed=3)
    p = torch.softmax(model(base), 1).detach()
    want = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    assert (factors.g_cov[""] - want).abs().max() < 0.02
    empirical, _ = _fit(KFACSolver, cur, fisher="empirical")
    assert (empirical.g_cov[""] - want).abs().max() > 0.1  # the real (constant) labels give another matrix
    again, _ = _fit(KFACSolver, cur, fisher="true", seed=3)
    torch.testing.assert_close(again.g_cov[""], factors.g_cov[""], rtol=0, atol=0)  # seeded


def test_exact_fisher_is_the_gauss_newton_matrix_diagonal_in_the_kronecker_basis():
    # fisher="exact": the expectation over labels in closed form, so K-FAC's G of a single Linear layer is
    # mean_x (diag(p) - p p^T) exactly, and EK-FAC's eigenvalues are the diagonal of the Gauss-Newton block
    # J^T (diag(p) - p p^T) J in the Kronecker eigenbasis (J by torch.func.jacrev, per example, float64)
    from torch.func import functional_call, jacrev

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(25, 5, dtype=torch.float64), torch.randint(0, 3, (25,))
    cur = _curvature(model, TensorDataset(x, y), batch_size=10)
    factors, _ = _fit(EKFACSolver, cur, fisher="exact")
    p = torch.softmax(model(x), 1).detach()
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    h = torch.cat([torch.tanh(model[0](x)), torch.ones(25, 1, dtype=torch.float64)], 1).detach()
    torch.testing.assert_close(factors.g_cov["2"], hess.mean(0))
    torch.testing.assert_close(factors.a_cov["2"], h.T @ h / 25)
    params = {n: t.detach() for n, t in model.named_parameters()}
    jac = jacrev(lambda prm: functional_call(model, prm, (x,)))(params)  # {name: [N, C, *shape]}
    for slot in factors.slots:
        j = torch.cat([jac[slot.weight], jac[slot.bias][..., None]], -1).flatten(2)  # [N, C, out * a]
        ggn = torch.einsum("nci,ncd,ndj->ij", j, hess, j) / 25
        q = torch.kron(factors.g_evec[slot.module], factors.a_evec[slot.module])
        want = torch.diagonal(q.T @ ggn @ q).reshape(slot.out_dim, slot.a_dim)
        torch.testing.assert_close(factors.corrected[slot.module], want, rtol=1e-8, atol=1e-13)


@pytest.fixture(scope="module")
def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 4, (30,))
    return model, TensorDataset(x, y)


def test_ekfac_correction_is_the_exact_fisher_diagonal_in_the_kronecker_basis(mlp_problem):
    model, ds = mlp_problem
    cur = _curvature(model, ds, batch_size=7)
    factors, _ = _fit(EKFACSolver, cur, fisher="empirical")
    _assert_correction_exact(cur, factors)
    # and it is the best diagonal in that basis: closer to the true block (Frobenius) than K-FAC's eigenvalues
    kfac = factors.eigenvalues("kfac")
    for slot in factors.slots:
        d = _layer_grads(cur, slot).flatten(1)
        fisher = d.T @ d / d.shape[0]
        q = torch.kron(factors.g_evec[slot.module], factors.a_evec[slot.module])
        err = {k: (q @ torch.diag(lam[slot.module].flatten()) @ q.T - fisher).norm() for k, lam in
               (("ekfac", factors.corrected), ("kfac", kfac))}  # fmt: skip
        assert err["ekfac"] < err["kfac"]


def test_inverse_equals_a_dense_solve_of_the_kronecker_matrix(mlp_problem):
    model, ds = mlp_problem
    cur = _curvature(model, ds, batch_size=7)
    factors, _ = _fit(EKFACSolver, cur, fisher="true")
    v = torch.randn(3, cur.spec.numel, dtype=torch.float64)
    damping = 0.05
    for kind in ("kfac", "ekfac"):
        blocks = []
        for slot in factors.slots:
            if kind == "kfac":
                block = torch.kron(factors.g_cov[slot.module], factors.a_cov[slot.module])
            else:
                q = torch.kron(factors.g_evec[slot.module], factors.a_evec[slot.module])
                block = q @ torch.diag(factors.corrected[slot.module].flatten()) @ q.T
            blocks.append(block)
        # the dense matrix in the [W | b] row-major layout of each layer, then permuted to the flat vector's
        dense = torch.block_diag(*blocks) + damping * torch.eye(
            sum(b.shape[0] for b in blocks), dtype=torch.float64
        )
        from lightning_fastif.functional.kfac.solve import layer_matrices

        mats = layer_matrices(cur.spec, factors.slots, v)
        stacked = torch.cat([mats[s.module].flatten(1) for s in factors.slots], 1)
        want_stacked = torch.linalg.solve(dense, stacked.T).T
        got = solve_kfac(factors, cur.spec, v, damping, kind)
        got_mats = layer_matrices(cur.spec, factors.slots, got)
        got_stacked = torch.cat([got_mats[s.module].flatten(1) for s in factors.slots], 1)
        torch.testing.assert_close(got_stacked, want_stacked, rtol=1e-9, atol=1e-12)


def test_sequence_positions_fold_into_the_batch_and_the_correction_stays_exact():
    class Tokens(nn.Module):  # a Linear on [B, T, d], mean-pooled: the weight is shared by the T positions
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.proj(x)).mean(1))

    torch.manual_seed(2)
    model = Tokens().double()
    x, y = torch.randn(20, 6, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    cur = _curvature(model, TensorDataset(x, y), batch_size=8)
    factors, _ = _fit(EKFACSolver, cur, fisher="empirical")
    _assert_correction_exact(cur, factors)
    a = torch.cat([x, torch.ones(20, 6, 1, dtype=torch.float64)], -1).reshape(-1, 5)
    torch.testing.assert_close(factors.a_cov["proj"], a.T @ a / 20)  # per example: sum over the positions


# ------------------------------------------------------------------------------------------------ Conv2d
class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_conv2d_factors_equal_an_explicit_patch_reference():
    torch.manual_seed(3)
    model = TinyConv().double()
    x, y = torch.randn(12, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (12,))
    cur = _curvature(model, TensorDataset(x, y), batch_size=5)
    factors, _ = _fit(EKFACSolver, cur, fisher="empirical")
    # patches by explicit slicing of the zero-padded input (3x3 windows at stride 2: 3x3 output positions)
    xp = F.pad(x, (1, 1, 1, 1))
    patches = torch.stack(
        [xp[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(12, -1) for i in range(3) for j in range(3)],
        1,
    )  # [N, 9, C*3*3] in (c, kh, kw) order, as the weight's columns
    a = torch.cat([patches, torch.ones(12, 9, 1, dtype=torch.float64)], -1).reshape(-1, 19)
    torch.testing.assert_close(factors.a_cov["conv"], a.T @ a / 12)
    out = model.conv(x).detach().requires_grad_(True)
    losses = F.cross_entropy(model.head(torch.tanh(out).flatten(1)), y, reduction="sum")
    (g,) = torch.autograd.grad(losses, out)
    g = g.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(factors.g_cov["conv"], g.T @ g / (12 * 9))  # G per position
    _assert_correction_exact(cur, factors)


# ------------------------------------------------------------------------------------------------ errors
def test_unsupported_parameters_are_named():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)
            self.scale = nn.Parameter(torch.ones(()))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.norm(self.emb(x)).mean(1)) * self.scale

    model = Mixed()
    names = [n for n, _ in model.named_parameters()]
    bad = kfac_unsupported(model, names)
    assert bad == ["scale (a free nn.Parameter of Mixed)", "emb.weight (Embedding)", "norm.weight (LayerNorm)",
                   "norm.bias (LayerNorm)"]  # fmt: skip
    assert kfac_unsupported(model, ["head.weight", "head.bias"]) == []
    assert EKFACSolver.supports(model, ["head.weight"]) and not EKFACSolver.supports(model, names)
    with pytest.raises(
        UnsupportedModelError, match=r"scale \(a free nn.Parameter of Mixed\), emb\.weight \(Embedding\)"
    ):
        kfac_layers(model, names)
    x, y = torch.randint(0, 10, (8, 3)), torch.randint(0, 2, (8,))
    with pytest.raises(UnsupportedModelError, match="norm.weight"):
        EKFACSolver(damping=0.1).solve(_curvature(model, TensorDataset(x, y)), torch.zeros(1, 51))
    with pytest.raises(ConfigurationError, match="`fisher`.*'true', 'exact' or 'empirical'.*'sampled'"):
        EKFACSolver(damping=0.1, fisher="sampled")
    with pytest.raises(ConfigurationError, match="`damping`"):
        KFACSolver(damping=-1.0)


# ------------------------------------------------------------------------------------------------ persistence
def test_factors_are_saved_reused_and_refused_for_other_model_or_data(mlp_problem, tmp_path):
    import copy

    model, ds = mlp_problem
    folder = tmp_path / "factors"
    cur = _curvature(model, ds, batch_size=7)
    v = torch.randn(2, cur.spec.numel, dtype=torch.float64)
    first = EKFACSolver(damping=1e-2, factors_dir=folder)
    with pytest.warns(SolverConvergenceWarning, match="did not converge"):
        x1 = first.solve(cur, v)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["kind"] == "ekfac" and meta["dataset_length"] == 30 and meta["fisher"] == "true"
    second = EKFACSolver(damping=1e-2, factors_dir=folder)
    second.fit_seconds = -1.0
    with pytest.warns(SolverConvergenceWarning, match="did not converge"):
        x2 = second.solve(cur, v)
    assert second.fit_seconds == -1.0  # loaded, not refitted
    torch.testing.assert_close(x2, x1, rtol=1e-12, atol=0)
    # K-FAC reuses an EK-FAC folder (it holds K-FAC's factors too); other weights or data are refused
    with pytest.warns(SolverConvergenceWarning, match="did not converge"):
        torch.testing.assert_close(
            KFACSolver(damping=1e-2, factors_dir=folder).solve(cur, v),
            KFACSolver(damping=1e-2).solve(cur, v),
            rtol=1e-12,
            atol=0,
        )
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    with pytest.raises(IndexMismatchError, match="model_fingerprint differs"):
        EKFACSolver(damping=1e-2, factors_dir=folder).solve(_curvature(other, ds, batch_size=7), v)
    x, y = ds.tensors
    shuffled = TensorDataset(x.flip(0), y.flip(0))  # same length, other order: other data
    with pytest.raises(IndexMismatchError, match="data_fingerprint differs"):
        EKFACSolver(damping=1e-2, factors_dir=folder).solve(_curvature(model, shuffled, batch_size=7), v)
    refit = EKFACSolver(damping=1e-2, factors_dir=folder, overwrite=True)
    with pytest.warns(SolverConvergenceWarning, match="did not converge"):
        refit.solve(_curvature(other, ds, batch_size=7), v)
    assert json.loads((folder / "meta.json").read_text())["model_fingerprint"] != meta["model_fingerprint"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


# ------------------------------------------------------------------------------------------------ real models
def test_real_models_bn_cnn_and_tiny_bert_corrections_are_exact():
    from _models import bn_cnn, hf_bert

    cnn, train, _ = bn_cnn(n_train=24)
    cnn = cnn.double()
    names = [n for n, _ in cnn.named_parameters()]
    assert any("bn" in b or "stem.1" in b for b in kfac_unsupported(cnn, names))  # BatchNorm is refused
    conv_params = [n for n in names if not kfac_unsupported(cnn, [n])]
    ds = TensorDataset(train.tensors[0].double(), train.tensors[1])
    cur = _curvature(cnn.eval(), ds, patterns=conv_params, batch_size=10)
    factors, _ = _fit(EKFACSolver, cur, fisher="empirical")
    assert {s.module for s in factors.slots} == {"stem.0", "layer1.conv1", "layer1.conv2", "fc"}
    _assert_correction_exact(cur, factors)

    bert, btrain, _ = hf_bert("eager", n_train=12)
    bert = bert.double().eval()
    linear = [n for n, m in bert.named_modules() if isinstance(m, nn.Linear)]
    patterns = [f"{n}.*" for n in linear]
    cur = _curvature(bert, btrain, patterns=patterns, batch_size=5)
    factors, _ = _fit(EKFACSolver, cur, fisher="empirical")
    assert len(factors.slots) == len(linear)  # query/key/value/dense... and the classifier
    batch = {k: v for k, v in btrain.tensors.items()}
    g = per_example_grads(cur.loss, cur.theta, cur.spec, batch)
    parts = cur.spec.unflatten(g)
    for slot in factors.slots:
        d = torch.cat(
            [parts[slot.weight].reshape(12, slot.out_dim, -1), parts[slot.bias].reshape(12, -1, 1)], -1
        )
        qg, qa = factors.g_evec[slot.module], factors.a_evec[slot.module]
        want = torch.einsum("og,ngi,ia->noa", qg.T, d, qa).square().mean(0)
        torch.testing.assert_close(factors.corrected[slot.module], want, rtol=1e-7, atol=1e-14)
    # the true Fisher (sampled labels) solves too, and a query's s_test is finite
    with pytest.warns(SolverConvergenceWarning, match="did not converge"):
        s = EKFACSolver(damping=1e-3).solve(cur, g[:2])
    assert torch.isfinite(s).all() and s.shape == (2, cur.spec.numel)


def test_regression_loss_fn_uses_the_output_hessian():
    from _models import regression_net

    model, train, _ = regression_net(outputs=2, n_train=40)
    model = model.double().eval()
    ds = TensorDataset(train.tensors[0].double(), train.tensors[1].double())

    def mse(out, batch):
        return ((out - batch[1]) ** 2).sum(-1)

    cur = _curvature(model, ds, loss_fn=mse, batch_size=40)
    factors, _ = _fit(KFACSolver, cur, fisher="true", seed=0)
    # for the sum of squares the output Hessian is 2 I: G of the head -> 2 I on average (Monte Carlo, 40 draws)
    assert factors.g_cov["head"].diagonal().mean().item() == pytest.approx(2.0, rel=0.35)
    est = torch.stack(
        [_fit(KFACSolver, cur, fisher="true", seed=s)[0].g_cov["head"] for s in range(30)]
    ).mean(0)
    torch.testing.assert_close(est, 2 * torch.eye(2, dtype=torch.float64), atol=0.15, rtol=0)


# ------------------------------------------------------------------------------------------------ DDP
class _Record(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: list[dict] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows.extend(r.to_dict() for r in outputs)

    def on_predict_end(self, trainer, pl_module) -> None:
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


@pytest.mark.distributed
def test_ddp_factors_equal_one_process(tmp_path):
    from lightning_fastif.trainer.strategy import InfluenceStrategy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(41, 6, dtype=torch.float64), torch.randint(0, 3, (41,))
    train, queries = TensorDataset(x, y), TensorDataset(x[:4] + 0.1, y[:4])

    def run(folder: Path, strategy) -> list[dict]:
        folder.mkdir()
        im = lf.InfluenceModule(model, train, solver=EKFACSolver(damping=1e-2, factors_dir=folder / "f"),
                                num_candidates=None, top_k=5, batch_size=8)  # fmt: skip
        rec = _Record(folder)
        trainer = pl.Trainer(accelerator="cpu", devices=1 if strategy is None else 2, strategy=strategy or "auto",
                             inference_mode=False, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, callbacks=[rec])  # fmt: skip
        trainer.predict(im, DataLoader(queries, batch_size=2), return_predictions=False)
        return json.loads((folder / "rank0.json").read_text())

    one = run(tmp_path / "one", None)
    ddp = run(tmp_path / "ddp", InfluenceStrategy(shard="candidates", timeout=60.0, start_method="fork"))
    saved_one = torch.load(tmp_path / "one" / "f" / "factors.pt", weights_only=True)
    saved_ddp = torch.load(tmp_path / "ddp" / "f" / "factors.pt", weights_only=True)
    for key in saved_one:
        if "evec" not in key:  # eigenvectors are defined up to sign; the matrices and eigenvalues must agree
            torch.testing.assert_close(saved_ddp[key], saved_one[key], rtol=1e-10, atol=1e-13)
    for got, want in zip(ddp, one):
        assert got["harmful_ids"] == want["harmful_ids"] and got["helpful_ids"] == want["helpful_ids"]
        torch.testing.assert_close(torch.tensor(got["harmful_scores"]), torch.tensor(want["harmful_scores"]),
                                   rtol=1e-6, atol=1e-12)  # fmt: skip


def test_refine_runs_preconditioned_cg_to_the_exact_gauss_newton_solution(mlp_problem):
    model, ds = mlp_problem
    cur = _curvature(model, ds, batch_size=30)
    v = torch.randn(3, cur.spec.numel, dtype=torch.float64)
    ggn = cur.with_mode("gauss_newton").matrix()
    want = torch.linalg.solve(ggn + 0.05 * torch.eye(cur.spec.numel, dtype=torch.float64), v.T).T
    solver = EKFACSolver(damping=0.05, refine=100, tol=1e-10)
    got = solver.solve(cur, v)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    d = solver.diagnostics
    assert d.converged and d.residual_norm <= 1e-8 and 1 < d.iterations < 100
    assert d.extra["relative_residual"] == d.residual_norm
    with pytest.warns(SolverConvergenceWarning, match="did not converge"):
        plain = EKFACSolver(damping=0.05).solve(cur, v)
    assert (plain - want).norm() > 1e-3 * want.norm()  # the structured inverse alone is not exact


def test_a_models_own_per_example_loss_falls_back_to_the_empirical_fisher():
    class OwnLoss(nn.Module):  # the loss is a closed box: no outputs to sample labels from
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x)

        def per_example_loss(self, batch):
            return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    torch.manual_seed(5)
    model = OwnLoss().double()
    ds = TensorDataset(torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,)))
    cur = _curvature(model, ds)
    true, _ = _fit(EKFACSolver, cur, fisher="true")
    empirical, _ = _fit(EKFACSolver, cur, fisher="empirical")
    torch.testing.assert_close(true.corrected["lin"], empirical.corrected["lin"], rtol=0, atol=0)
    solver = EKFACSolver(damping=0.1, residual="none")
    solver.solve(cur, torch.zeros(1, 15, dtype=torch.float64))
    assert "empirical" in solver.diagnostics.extra["curvature"]


# ------------------------------------------------------------------------------------------------ GPT-2 Conv1D
def _tiny_gpt2(n=10, seq=5, seed=0):
    """A tiny HF ``GPT2ForSequenceClassification`` built from a config (no download), float64, eval mode."""
    from _models import DictDataset
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=12, num_labels=3, pad_token_id=0,
        use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2ForSequenceClassification(cfg).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, 20, (n, seq), generator=g)
    ds = DictDataset(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(0, 3, (n,), generator=g)
    )
    return model, ds


def _loop_layer_grads(loss, theta, spec, ds, slot):
    """Per-example ``[N, out, a_dim]`` gradients of one layer by a float64 loop (a Conv1D weight transposed)."""
    from torch.utils.data.dataloader import default_collate

    rows = []
    for i in range(len(ds)):
        g = torch.func.grad(lambda t, b: loss(spec.unflatten(t), b).sum())(theta, default_collate([ds[i]]))
        parts = spec.unflatten(g)
        cols = [parts[slot.weight].T] if slot.weight is not None else []
        if slot.bias is not None:
            cols.append(parts[slot.bias][:, None])
        rows.append(torch.cat(cols, -1))
    return torch.stack(rows)


def test_gpt2_conv1d_layers_get_exact_ekfac_corrections():
    from transformers.pytorch_utils import Conv1D

    model, ds = _tiny_gpt2()
    patterns = [
        "transformer.h.0.attn.c_attn.*",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.*",
    ]
    assert kfac_unsupported(model, select_params(model, patterns)) == []
    cur = _curvature(model, ds, patterns, batch_size=4)
    slots = kfac_layers(model, cur.spec.names)
    assert [(s.module, s.kind, s.out_dim, s.in_dim) for s in slots] == [
        ("transformer.h.0.attn.c_attn", "conv1d", 24, 8),
        ("transformer.h.0.mlp.c_fc", "conv1d", 12, 8),
        ("transformer.h.0.mlp.c_proj", "conv1d", 8, 12),
    ]
    assert isinstance(model.get_submodule(slots[0].module), Conv1D)
    factors, _ = _fit(EKFACSolver, cur, fisher="empirical")
    for slot in factors.slots:  # the correction = the exact Fisher diagonal in the Kronecker eigenbasis
        d = _loop_layer_grads(cur.loss, cur.theta, cur.spec, ds, slot)
        assert d.abs().max() > 1e-6
        q = torch.kron(factors.g_evec[slot.module], factors.a_evec[slot.module])
        fisher = d.flatten(1).T @ d.flatten(1) / d.shape[0]
        want = torch.diagonal(q.T @ fisher @ q).reshape(slot.out_dim, slot.a_dim)
        torch.testing.assert_close(factors.corrected[slot.module], want, rtol=1e-8, atol=1e-12)


def test_conv1d_ekfac_solve_equals_the_equivalent_linear_layers():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(6, 5), nn.Tanh(), Conv1D(3, 6)).double()
    lin = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for i in (0, 2):
            lin[i].weight.copy_(conv[i].weight.T)
            lin[i].bias.copy_(conv[i].bias)
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(
        torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    )
    cur_c, cur_l = _curvature(conv, ds, batch_size=8), _curvature(lin, ds, batch_size=8)
    torch.testing.assert_close(cur_c.loss(cur_c.spec.unflatten(cur_c.theta), ds.tensors), cur_l.loss(
        cur_l.spec.unflatten(cur_l.theta), ds.tensors))  # fmt: skip

    def transpose_weights(spec, v):
        parts = spec.unflatten(v)
        return spec.flatten(
            {n: (t.transpose(-1, -2) if n.endswith("weight") else t) for n, t in parts.items()}
        )

    v = torch.randn(3, cur_c.spec.numel, generator=g, dtype=torch.float64)
    for kind, fisher in (("ekfac", "true"), ("kfac", "exact")):
        fc, _ = _fit(EKFACSolver, cur_c, fisher=fisher)
        fl, _ = _fit(EKFACSolver, cur_l, fisher=fisher)
        got = solve_kfac(fc, cur_c.spec, v, 0.05, kind)  # Conv1D layout [in, out]
        want = solve_kfac(fl, cur_l.spec, transpose_weights(cur_c.spec, v), 0.05, kind)
        torch.testing.assert_close(transpose_weights(cur_c.spec, got), want, rtol=1e-9, atol=1e-12)


def test_factor_math_dtype_is_float64_on_cpu_float32_on_accelerators_unless_asked(mlp_problem):
    from lightning_fastif.functional.kfac import math_dtype

    assert math_dtype("cpu") == torch.float64 and math_dtype(torch.device("cuda", 0)) == torch.float32
    assert (
        math_dtype("cuda", "float64") == torch.float64 and math_dtype("cpu", torch.float32) == torch.float32
    )
    with pytest.raises(ConfigurationError, match="`dtype`.*'float16'"):
        EKFACSolver(damping=0.1, dtype="float16")
    model, ds = mlp_problem
    cur = _curvature(model, ds, batch_size=7)
    f64, _ = _fit(EKFACSolver, cur, fisher="exact")
    f32, s32 = _fit(EKFACSolver, cur, fisher="exact", dtype="float32")
    assert f64.a_cov[f64.slots[0].module].dtype == torch.float64  # the CPU default
    assert (
        all(t.dtype == torch.float32 for t in f32.tensors().values()) and s32.config()["dtype"] == "float32"
    )
    for s in f64.slots:
        torch.testing.assert_close(f32.g_cov[s.module].double(), f64.g_cov[s.module], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(
            f32.corrected[s.module].double(), f64.corrected[s.module], rtol=1e-3, atol=1e-7
        )
    v = torch.randn(2, cur.spec.numel, dtype=torch.float64)
    x32 = solve_kfac(f32, cur.spec, v, 0.1, "ekfac")
    torch.testing.assert_close(x32, solve_kfac(f64, cur.spec, v, 0.1, "ekfac"), rtol=1e-3, atol=1e-5)
