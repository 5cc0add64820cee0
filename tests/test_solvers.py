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


# ---------------------------------------------------------------------------------------------- block CG
def _solve(a, lam, b):
    return torch.linalg.solve(a + lam * torch.eye(a.shape[0], dtype=a.dtype), b.T).T


@pytest.mark.parametrize("cond", [50.0, 1e6], ids=["well", "ill-conditioned"])
def test_block_cg_matches_linalg_solve_and_shares_one_krylov_space(cond):
    from lightning_fastif.functional.solvers.algorithms import block_conjugate_gradient

    a = _spd(p=120, seed=1, cond=cond)
    b = torch.randn(10, 120, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x, d = block_conjugate_gradient(lambda v: v @ a, b, damping=1e-4, max_iter=500, tol=1e-11)
    torch.testing.assert_close(x, _solve(a, 1e-4, b), rtol=1e-8, atol=1e-9)
    assert d.converged and d.value <= 1e-11
    _, single = conjugate_gradient(lambda v: v @ a, b, damping=1e-4, max_iter=2000, tol=1e-11)
    # 10 queries share a 10-wide block: far fewer iterations than one CG per query needs
    assert d.iterations * 2 <= single.iterations
    assert len(d.extra["per_query_residual"]) == 10 and max(d.extra["per_query_residual"]) <= 1e-11


def test_block_cg_drops_dependent_right_hand_sides_and_solves_them_too():
    from lightning_fastif.functional.solvers.algorithms import block_conjugate_gradient

    a = _spd(p=60, seed=3, cond=100.0)
    g = torch.Generator().manual_seed(4)
    b = torch.randn(6, 60, generator=g, dtype=torch.float64)
    b[2] = 3.0 * b[0]  # repeated direction
    b[4] = b[0] - 2.0 * b[1]  # a combination
    b[5] = 0.0  # a zero right-hand side: x = 0, converged at once
    x, d = block_conjugate_gradient(lambda v: v @ a, b, damping=0.01, max_iter=200, tol=1e-11)
    assert d.extra["block_sizes"][0] == 3  # rank 3: the dependent rows left the block
    torch.testing.assert_close(x, _solve(a, 0.01, b), rtol=1e-8, atol=1e-10)
    assert d.converged and torch.equal(x[5], torch.zeros(60, dtype=torch.float64))


def test_block_cg_with_one_query_is_plain_cg():
    from lightning_fastif.functional.solvers.algorithms import block_conjugate_gradient

    a = _spd(p=40, seed=5, cond=30.0)
    b = torch.randn(1, 40, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x, d = block_conjugate_gradient(lambda v: v @ a, b, damping=0.0, max_iter=200, tol=1e-12)
    x1, d1 = conjugate_gradient(lambda v: v @ a, b, damping=0.0, max_iter=200, tol=1e-12)
    torch.testing.assert_close(x, x1, rtol=1e-9, atol=1e-11)
    assert abs(d.iterations - d1.iterations) <= 1 and set(d.extra["block_sizes"]) == {1}


def test_block_cg_stops_each_query_at_its_tolerance_and_reports_it():
    from lightning_fastif.functional.solvers.algorithms import block_conjugate_gradient

    a = _spd(p=80, seed=7, cond=1e3)
    b = torch.randn(4, 80, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    b[1] = a[0] * 1e-3 + b[1] * 1e-9  # nearly an eigen-mix: converges sooner than the others
    x, d = block_conjugate_gradient(lambda v: v @ a, b, damping=1e-3, max_iter=3, tol=1e-10)
    true = ((x @ a + 1e-3 * x - b).norm(dim=1) / b.norm(dim=1)).tolist()
    assert not d.converged and d.iterations == 3 and d.value == pytest.approx(max(true), rel=1e-6)
    assert d.extra["per_query_residual"] == pytest.approx(true, rel=1e-6)


def test_block_cg_refuses_an_indefinite_system():
    from lightning_fastif.functional.solvers.algorithms import block_conjugate_gradient

    a = _spd(p=20, seed=9) - 0.5 * torch.eye(20, dtype=torch.float64)
    with pytest.raises(SolverDivergenceError, match="`damping`"):
        block_conjugate_gradient(lambda v: v @ a, torch.randn(3, 20, dtype=torch.float64), max_iter=50)


def test_block_cg_solver_equals_per_query_cg_on_a_real_model_and_reports_each_query():
    from _models import bn_cnn

    model, train, (xq, yq) = bn_cnn(n_train=16, n_query=4, steps=3)
    model = model.double()
    train = TensorDataset(train.tensors[0].double(), train.tensors[1])
    xq = xq.double()
    block = lf.CGSolver(damping=0.5, max_iter=300, tol=1e-9, curvature="gauss_newton")
    single = lf.CGSolver(damping=0.5, max_iter=300, tol=1e-9, curvature="gauss_newton", block=False)
    im = lf.InfluenceModule(model, train, solver=block, num_candidates=None, top_k=3, progress=False)
    s_block = im.s_test((xq, yq))
    im.solver = single
    s_single = im.s_test((xq, yq))
    torch.testing.assert_close(s_block, s_single, rtol=1e-6, atol=1e-9)
    d = block.diagnostics
    assert d.extra["algorithm"] == "block_cg" and single.diagnostics.extra["algorithm"] == "cg"
    assert d.iterations < single.diagnostics.iterations
    assert len(d.extra["per_query_residual"]) == 4 and all(d.extra["per_query_converged"])
    im.solver = block
    rec = im.explain((xq, yq))[2].to_dict()["extra"]
    assert rec["converged"] is True and rec["query_converged"] is True
    assert rec["query_residual"] == pytest.approx(block.diagnostics.extra["per_query_residual"][2])
    assert rec["convergence"]["measure"] == "relative_residual"


def test_block_cg_recycles_an_earlier_krylov_space_and_still_solves_exactly():
    from lightning_fastif.functional.solvers.algorithms import block_conjugate_gradient

    # a few large eigenvalues over a flat bulk: what a network's Gauss-Newton matrix looks like
    g = torch.Generator().manual_seed(10)
    q, _ = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))
    eig = torch.cat(
        [torch.logspace(1, 3, 30, dtype=torch.float64), torch.linspace(0.01, 1.0, 120, dtype=torch.float64)]
    )
    a = q @ torch.diag(eig) @ q.T
    first = torch.randn(6, 150, generator=g, dtype=torch.float64)
    # later queries share most of their directions with earlier ones (as query gradients of one model do)
    second = torch.randn(6, 6, generator=g, dtype=torch.float64) @ first
    second += 1e-4 * torch.randn(6, 150, generator=g, dtype=torch.float64)
    keep = []
    block_conjugate_gradient(lambda v: v @ a, first, 0.1, 300, 1e-10, keep=keep)
    w, aw = torch.cat([k[0] for k in keep]), torch.cat([k[1] for k in keep])
    torch.testing.assert_close(aw, w @ a + 0.1 * w)  # what is kept is each direction and its damped product
    x, d = block_conjugate_gradient(lambda v: v @ a, second, 0.1, 300, 1e-6, recycle=(w, aw))
    _, fresh = block_conjugate_gradient(lambda v: v @ a, second, 0.1, 300, 1e-6)
    assert d.converged and max(d.extra["per_query_residual"]) <= 1e-6
    torch.testing.assert_close(x, _solve(a, 0.1, second), rtol=1e-4, atol=1e-6)
    assert d.extra["vector_products"] < 0.8 * fresh.extra["vector_products"]


def test_cg_solver_carries_its_krylov_space_across_query_batches_of_one_model_state():
    curv, h = _linreg_problem(n=40, d=5)
    solver = lf.CGSolver(damping=0.1, max_iter=50, tol=1e-12)
    v = torch.randn(3, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    solver.solve(curv, v[:2])
    assert solver.diagnostics.extra["recycled_directions"] == 0
    x = solver.solve(curv, v[1:])
    assert solver.diagnostics.extra["recycled_directions"] > 0
    torch.testing.assert_close(x, _solve(h, 0.1, v[1:]), rtol=1e-8, atol=1e-10)
    off = lf.CGSolver(damping=0.1, max_iter=50, tol=1e-12, recycle_mb=0)
    off.solve(curv, v[:2])
    off.solve(curv, v[1:])
    assert off.diagnostics.extra["recycled_directions"] == 0
    other = lf.CGSolver(damping=0.2, max_iter=50, tol=1e-12)  # another damping: nothing carried over
    other._krylov = solver._krylov
    other.solve(curv, v[1:])
    assert other.diagnostics.extra["recycled_directions"] == 0
