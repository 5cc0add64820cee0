"""Every solver against torch.linalg.solve on problems with known Hessians, and their failure modes."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import (
    ConfigurationError,
    NonFiniteError,
    SolverConvergenceWarning,
    SolverDivergenceError,
    SolverMemoryError,
)
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, select_params
from lightning_fastif.functional.solvers.algorithms import conjugate_gradient, lissa


def _spd(p=12, seed=0, cond=50.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), p, dtype=torch.float64) / cond
    return q @ torch.diag(eig) @ q.T


def test_conjugate_gradient_matches_linalg_solve():
    a = _spd()
    b = torch.randn(3, 12, dtype=torch.float64)
    x, diag = conjugate_gradient(lambda v: v @ a, b, damping=0.01, max_iter=100, tol=1e-12)
    ref = torch.linalg.solve(a + 0.01 * torch.eye(12, dtype=torch.float64), b.T).T
    torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-10)
    assert diag.converged and diag.iterations <= 16 and diag.residual_norm <= 1e-12


def test_lissa_recursion_converges_to_damped_inverse():
    a = _spd(cond=10.0)
    b = torch.randn(2, 12, dtype=torch.float64)
    lam, s = 0.05, 2.0
    total, diag = lissa(lambda c, j: lambda v: v @ a, b, lam, s, depth=2000, chains=[0, 1])
    ref = torch.linalg.solve(a + lam * torch.eye(12, dtype=torch.float64), b.T).T
    torch.testing.assert_close(total / 2, ref, rtol=1e-8, atol=1e-8)
    assert diag.iterations == 4000


def test_lissa_divergence_names_scale():
    a = _spd() * 100.0
    with pytest.raises(SolverDivergenceError, match="`scale`"):
        lissa(lambda c, j: lambda v: v @ a, torch.ones(1, 12, dtype=torch.float64), 0.0, 1.0, 500, [0])


def _linreg_problem(n=40, d=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    loss = PerExampleLoss(model, lambda out, b: 0.5 * (out.squeeze(-1) - b[1]) * (out.squeeze(-1) - b[1]))
    params = select_params(model)
    spec = ParamSpec.of(params)
    curv = TrainingCurvature(loss, spec.flatten(params), spec, TensorDataset(x, y), batch_size=7)
    return curv, x.T @ x / n


@pytest.mark.parametrize(
    "solver",
    [
        lf.ExactSolver(damping=0.1),
        lf.CGSolver(damping=0.1, max_iter=50, tol=1e-12),
        lf.LiSSASolver(damping=0.1, scale=4.0, depth=700, repeats=2, batch_size=40),
    ],
    ids=["exact", "cg", "lissa-fullbatch"],
)
def test_solver_matches_linalg_solve_on_linear_regression(solver):
    curv, h = _linreg_problem()
    v = torch.randn(3, 5, dtype=torch.float64)
    ref = torch.linalg.solve(h + 0.1 * torch.eye(5, dtype=torch.float64), v.T).T
    x = solver.solve(curv, v)
    torch.testing.assert_close(x, ref, rtol=1e-7, atol=1e-8)
    assert solver.diagnostics is not None and solver.diagnostics.solver == solver.name


def test_minibatch_lissa_is_close_but_noisy():
    curv, h = _linreg_problem(n=200)
    v = torch.randn(1, 5, dtype=torch.float64)
    ref = torch.linalg.solve(h + 0.1 * torch.eye(5, dtype=torch.float64), v.T).T
    with pytest.warns(SolverConvergenceWarning, match="did not converge"):
        x = lf.LiSSASolver(damping=0.1, scale=5.0, depth=500, repeats=4, batch_size=20).solve(curv, v)
    cos = torch.nn.functional.cosine_similarity(x, ref).item()
    assert cos > 0.99
    assert not torch.allclose(x, ref, rtol=1e-6)  # stochastic batches really are used


def test_lissa_chains_are_seeded_by_chain_index_only():
    curv, _ = _linreg_problem(n=200)
    v = torch.randn(2, 5, dtype=torch.float64)
    solver = lf.LiSSASolver(damping=0.1, scale=10.0, depth=100, repeats=3, batch_size=5, seed=7)
    with pytest.warns(SolverConvergenceWarning, match="did not converge"):
        a = solver.solve(curv, v)
        b = solver.solve(curv, v)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # two "ranks" that each run their own chains and sum give the same answer
    parts = []
    for rank in range(2):
        curv.rank, curv.world_size = rank, 2
        with pytest.warns(SolverConvergenceWarning, match="did not converge"):
            parts.append(solver.solve(curv, v) * solver.repeats)
    curv.rank, curv.world_size = 0, 1
    torch.testing.assert_close((parts[0] + parts[1]) / solver.repeats, a, rtol=1e-12, atol=1e-12)


def test_exact_solver_caches_its_factorisation_until_the_model_changes():
    curv, _ = _linreg_problem()
    solver = lf.ExactSolver(damping=0.1)
    v = torch.randn(1, 5, dtype=torch.float64)
    solver.solve(curv, v)
    assert solver.diagnostics.extra["cached_factorisation"] is False
    solver.solve(curv, v)
    assert solver.diagnostics.extra["cached_factorisation"] is True
    curv2 = TrainingCurvature(curv.loss, curv.theta + 1.0, curv.spec, curv.dataset, batch_size=7)
    solver.solve(curv2, v)
    assert solver.diagnostics.extra["cached_factorisation"] is False


def test_a_cached_exact_solve_reads_no_training_data_and_reports_the_true_residual():
    """FastIF's fast path: once factorised, a query costs matrix products only (its residual included)."""
    curv, _ = _linreg_problem()
    reads = []

    class Counting(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            reads.append(i)
            return self.inner[i]

    curv = TrainingCurvature(curv.loss, curv.theta, curv.spec, Counting(curv.dataset), batch_size=7)
    solver = lf.ExactSolver(damping=0.1)
    v = torch.randn(3, 5, dtype=torch.float64)
    solver.solve(curv, v)  # builds and factorises: reads the data
    reads.clear()
    x = solver.solve(curv, 2 * v + 1)
    assert reads == [] and solver.diagnostics.extra["cached_factorisation"] is True
    h = curv.matrix() + 0.1 * torch.eye(5, dtype=torch.float64)
    true_rel = float(((x @ h - (2 * v + 1)).norm(dim=-1) / (2 * v + 1).norm(dim=-1)).max())
    assert solver.diagnostics.value == pytest.approx(true_rel, rel=1e-6, abs=1e-15)


def test_exact_solver_refuses_too_many_parameters_and_suggests_cg_or_lissa():
    curv, _ = _linreg_problem()
    with pytest.raises(SolverMemoryError, match="CGSolver or LiSSASolver"):
        lf.ExactSolver(max_memory_gb=1e-9).solve(curv, torch.ones(1, 5, dtype=torch.float64))


def test_cg_reports_non_positive_curvature():
    a = -_spd()
    with pytest.raises(SolverDivergenceError, match="`damping`"):
        conjugate_gradient(lambda v: v @ a, torch.ones(1, 12, dtype=torch.float64))


def test_cg_non_finite_iterates_raise():
    with pytest.raises((NonFiniteError, SolverDivergenceError)):
        conjugate_gradient(lambda v: v * float("nan"), torch.ones(1, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: lf.ExactSolver(damping=-1.0), "`damping`.*>= 0.*-1.0"),
        (lambda: lf.CGSolver(damping=float("nan")), "`damping`"),
        (lambda: lf.CGSolver(max_iter=0), "`max_iter`"),
        (lambda: lf.CGSolver(tol=0.0), "`tol`"),
        (lambda: lf.LiSSASolver(scale=0.0), "`scale`"),
        (lambda: lf.LiSSASolver(depth=2.5), "`depth`"),
        (lambda: lf.LiSSASolver(repeats=0), "`repeats`"),
        (lambda: lf.LiSSASolver(batch_size=True), "`batch_size`"),
    ],
)
def test_bad_solver_arguments_name_the_argument(factory, match):
    with pytest.raises(ConfigurationError, match=match):
        factory()


def test_lissa_says_not_converged_when_depth_is_too_short_for_the_damping():
    h = torch.linspace(0, 1, 50, dtype=torch.float64)
    v = torch.ones(1, 50, dtype=torch.float64)
    x, diag = lissa(lambda c, j: lambda u: u * h, v, 1e-2, 100.0, 1000, chains=[0])
    exact = v / (h + 1e-2)
    assert float((x - exact).norm() / exact.norm()) > 0.5  # far from the answer...
    assert not diag.converged and diag.extra["damped_mode_remaining"] > 0.9  # ...and it says so
    x, diag = lissa(lambda c, j: lambda u: u * h, v, 1e-2, 2.0, 3000, chains=[0])
    assert diag.converged and float((x - exact).norm() / exact.norm()) < 1e-3
