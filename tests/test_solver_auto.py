"""solver='auto', damping='auto' on indefinite networks, self-tuning LiSSA, and convergence that is never silent."""

import logging
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import (
    ConfigurationError,
    SolverConvergenceError,
    SolverConvergenceWarning,
    SolverDivergenceError,
)
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, select_params


def _relu_problem(n=60, seed=3, mode="hessian"):
    """A small trained-ish ReLU MLP whose Hessian is indefinite (checked below), float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    )
    loss = PerExampleLoss(model)
    sel = select_params(model)
    spec = ParamSpec.of(sel)
    curv = TrainingCurvature(loss, spec.flatten(sel).detach(), spec, data, batch_size=16, mode=mode)
    return model, data, curv


def _theta_spec(model):
    sel = select_params(model)
    spec = ParamSpec.of(sel)
    return spec.flatten(sel).detach(), spec


def _solve_ref(mat, lam, v):
    return torch.linalg.solve(mat + lam * torch.eye(mat.shape[0], dtype=mat.dtype), v.T).T


def test_cg_on_an_indefinite_hessian_gives_advice_that_works():
    _, _, curv = _relu_problem()
    h = curv.matrix()
    lam_min = float(torch.linalg.eigvalsh(h)[0])
    assert lam_min < 0  # the problem really is indefinite
    v = torch.randn(2, curv.spec.numel, dtype=torch.float64)
    with pytest.raises(
        SolverDivergenceError, match=r"lambda_min.*`damping` must exceed.*gauss_newton"
    ) as err:
        lf.CGSolver(damping=1e-4, max_iter=200, tol=1e-10).solve(curv, v)
    # the advice: "use at least X": X really makes the damped system positive definite, and CG then is exact
    advised = float(str(err.value).split("use at least ")[1].split(",")[0])
    assert advised > -lam_min
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverConvergenceWarning)
        x = lf.CGSolver(damping=advised, max_iter=500, tol=1e-10).solve(curv, v)
    torch.testing.assert_close(x, _solve_ref(h, advised, v), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solver_cls", [lf.ExactSolver, lf.CGSolver])
def test_auto_damping_makes_an_indefinite_hessian_solvable_and_is_recorded(solver_cls):
    _, _, curv = _relu_problem()
    h = curv.matrix()
    ev = torch.linalg.eigvalsh(h)
    v = torch.randn(3, curv.spec.numel, dtype=torch.float64)
    solver = solver_cls(damping="auto") if solver_cls is lf.ExactSolver else solver_cls("auto", 500, 1e-10)
    x = solver.solve(curv, v)
    lam = solver.damping_used
    assert lam > -float(ev[0])  # positive definite: above the most negative eigenvalue
    assert lam >= 1e-2 * float(ev[-1]) * 0.9  # and about 1% of the largest (Lanczos reaches lambda_max)
    torch.testing.assert_close(x, _solve_ref(h, lam, v), rtol=1e-6, atol=1e-8)
    d = solver.diagnostics
    assert d.converged and d.measure == "relative_residual" and d.value <= d.tolerance
    assert d.extra["damping"] == lam and d.extra["curvature"] == "hessian"


def test_residual_of_exact_and_cg_is_measured_on_the_curvature_and_tracks_the_error():
    _, _, curv = _relu_problem(mode="gauss_newton")
    g = curv.matrix()
    v = torch.randn(2, curv.spec.numel, dtype=torch.float64)
    ref = _solve_ref(g, 0.05, v)
    exact = lf.ExactSolver(damping=0.05)
    x = exact.solve(curv, v)
    assert exact.diagnostics.value < 1e-10 and exact.diagnostics.extra["curvature"] == "gauss_newton"
    torch.testing.assert_close(x, ref)
    with pytest.warns(SolverConvergenceWarning, match="relative_residual.*`max_iter`"):
        cg = lf.CGSolver(damping=0.05, max_iter=2)
        x2 = cg.solve(curv, v)
    true_rel = float(((x2 @ g + 0.05 * x2 - v).norm(dim=-1) / v.norm(dim=-1)).max())
    assert not cg.diagnostics.converged
    assert cg.diagnostics.value == pytest.approx(
        true_rel, rel=1e-6
    )  # the reported measure is the real residual
    with pytest.raises(SolverConvergenceError, match="`max_iter`"):
        lf.CGSolver(damping=0.05, max_iter=2, strict=True).solve(curv, v)


def test_self_tuning_lissa_picks_a_stable_scale_and_enough_depth():
    _, _, curv = _relu_problem(mode="gauss_newton")
    g = curv.matrix()
    ev = torch.linalg.eigvalsh(g)
    v = torch.randn(1, curv.spec.numel, dtype=torch.float64)
    lam = 0.2
    # batch_size = N: every "random batch" is the whole set, so the recursion is deterministic and exact
    solver = lf.LiSSASolver(damping=lam, scale="auto", depth="auto", batch_size=len(curv.dataset))
    x = solver.solve(curv, v)
    d = solver.diagnostics
    scale, depth = d.extra["scale_chosen"], d.extra["depth_chosen"]
    assert scale > float(ev[-1]) + lam  # stable: above the largest eigenvalue of the damped system
    assert (
        (1 - lam / scale) ** depth <= 0.01 < (1 - lam / scale) ** (depth - 1)
    )  # the fewest steps that suffice
    assert d.measure == "damped_mode_remaining" and d.value <= 0.01 and d.converged
    ref = _solve_ref(g, lam, v)
    assert float((x - ref).norm() / ref.norm()) < 0.02  # the remaining factor bounds the error


def test_lissa_depth_cap_error_says_which_setting_to_change():
    _, _, curv = _relu_problem(mode="gauss_newton")
    solver = lf.LiSSASolver(damping=1e-4, scale=10.0, depth="auto", max_depth=100)
    with pytest.raises(
        ConfigurationError, match=r"`max_depth`.*Raise `damping` to at least ([0-9.e-]+).*`max_depth`"
    ):
        solver.solve(curv, torch.ones(1, curv.spec.numel, dtype=torch.float64))
    with pytest.raises(ConfigurationError, match="`damping` > 0 with depth='auto'"):
        lf.LiSSASolver(damping=0.0, depth="auto")


def test_lissa_not_converged_warns_with_the_reason_and_strict_raises():
    _, _, curv = _relu_problem(mode="gauss_newton")
    v = torch.ones(1, curv.spec.numel, dtype=torch.float64)
    with pytest.warns(SolverConvergenceWarning, match=r"\(1 - damping/scale\)\^depth = 0\.[0-9]+.*`depth`"):
        lf.LiSSASolver(damping=0.01, scale=20.0, depth=10).solve(curv, v)
    with pytest.raises(SolverConvergenceError):
        lf.LiSSASolver(damping=0.01, scale=20.0, depth=10, strict=True).solve(curv, v)


def test_fastif_presets_are_the_papers_settings():
    fast, orig = lf.LiSSASolver.fastif_fast(), lf.LiSSASolver.fastif_original()
    assert (fast.damping, fast.scale, fast.depth, fast.repeats, fast.batch_size) == (50.0, 1e4, 1000, 4, 1)
    assert (orig.damping, orig.scale, orig.depth, orig.repeats, orig.batch_size) == (50.0, 1e4, 1000, 1, 128)
    assert lf.LiSSASolver.fastif_fast(seed=3).seed == 3


def test_auto_picks_exact_when_it_fits_and_records_the_choice_in_every_result(caplog):
    model, data, curv = _relu_problem(mode="auto")
    im = lf.InfluenceModule(model, data, num_candidates=None, top_k=3, progress=False)
    assert isinstance(im.solver, lf.AutoSolver)  # the default
    queries = data[:2]
    with caplog.at_level(logging.INFO):
        results = im.explain(queries)
        im.explain(queries)
    assert (
        sum("solver='auto' chose exact (gauss_newton)" in r.getMessage() for r in caplog.records) == 1
    )  # printed once
    rec = results[0].to_dict()["extra"]
    assert rec["solver"] == "auto" and rec["curvature"] == "gauss_newton" and rec["converged"] is True
    assert rec["convergence"]["measure"] == "relative_residual" and rec["convergence"]["value"] < 1e-8
    assert rec["solver_choice"].startswith("exact (gauss_newton)") and rec["damping"] > 0
    # the answer is the exact damped solve at the damping it recorded, on the Gauss-Newton matrix
    h = curv.with_mode("gauss_newton").matrix()
    g = im.query_grads(queries)
    torch.testing.assert_close(im.s_test(queries), _solve_ref(h, rec["damping"], g), rtol=1e-7, atol=1e-9)


def test_auto_falls_back_to_cg_on_gauss_newton_when_exact_does_not_fit():
    model, data, _ = _relu_problem(mode="gauss_newton")
    # a free nn.Parameter is in no Linear/Conv layer, so EK-FAC cannot take it: auto must pick CG
    model.register_parameter("temperature", nn.Parameter(torch.ones(1, dtype=torch.float64)))
    auto = lf.AutoSolver(expected_queries=0, cg_max_seconds=0, tol=1e-10)
    im = lf.InfluenceModule(model, data, solver=auto, num_candidates=None, progress=False)
    queries = data[:2]
    s = im.s_test(queries)
    assert (
        auto.choice.startswith("cg (gauss_newton)") and auto.diagnostics.extra["curvature"] == "gauss_newton"
    )
    g = im.curvature().with_mode("gauss_newton").matrix()  # with the temperature's (zero) row and column
    ref = _solve_ref(g, auto.damping_used, im.query_grads(queries))
    torch.testing.assert_close(s, ref, rtol=1e-6, atol=1e-8)
    # an explicit curvature is respected
    im2 = lf.InfluenceModule(
        model,
        data,
        solver=lf.AutoSolver(expected_queries=0, cg_max_seconds=0),
        curvature="hessian",
        num_candidates=None,
        progress=False,
    )
    im2.s_test(queries)
    assert im2.solver.choice.startswith("cg (hessian)")


def test_auto_picks_ekfac_for_large_linear_only_models_when_available():
    from lightning_fastif.solvers import auto as solver_choice

    if solver_choice._EKFAC is None:
        pytest.skip("EK-FAC solver not in this tree")
    model, data, _ = _relu_problem()
    auto = lf.AutoSolver(expected_queries=0, cg_max_seconds=0)
    im = lf.InfluenceModule(model, data, solver=auto, num_candidates=None, progress=False)
    im.s_test(data[:1])
    assert auto.choice.startswith("ekfac") and auto.chosen.name == "ekfac"


def test_bad_auto_and_curvature_arguments_name_the_argument():
    model, data, _ = _relu_problem()
    with pytest.raises(ConfigurationError, match="`curvature`"):
        lf.InfluenceModule(model, data, curvature="fisher", num_candidates=None)
    with pytest.raises(ConfigurationError, match="`damping`.*'auto'"):
        lf.ExactSolver(damping="big")
    with pytest.raises(ConfigurationError, match="`damping`"):
        lf.LiSSASolver(damping="auto")  # LiSSA needs a number: its recursion is defined by it
    with pytest.raises(ConfigurationError, match="`max_memory_gb`"):
        lf.AutoSolver(max_memory_gb=0)
    with pytest.raises(ConfigurationError, match="`curvature`"):
        lf.CGSolver(curvature="exact")
    assert math.isfinite(lf.AutoSolver().max_memory_gb)


def test_auto_prefers_exact_cg_to_ekfac_when_cg_is_cheap():
    model, data, _ = _relu_problem()
    auto = lf.AutoSolver(
        expected_queries=0
    )  # never Exact; CG's predicted seconds are far below cg_max_seconds
    lf.InfluenceModule(model, data, solver=auto, num_candidates=None, progress=False).s_test(data[:1])
    assert auto.choice.startswith("cg (gauss_newton)") and "CG is affordable here" in auto.choice
    assert auto.diagnostics.converged


@pytest.mark.parametrize(
    ("seconds_per_product", "expected"),
    [(1e-9, "cg"), (1.0, "ekfac")],
    ids=["cheap-product-keeps-cg", "costly-product-goes-ekfac"],
)
def test_auto_decides_cg_or_ekfac_by_the_measured_cost_not_the_parameter_count(
    monkeypatch, seconds_per_product, expected
):
    from lightning_fastif.solvers import auto as solver_choice

    if solver_choice._EKFAC is None:
        pytest.skip("EK-FAC solver not in this tree")
    measured = []

    def fake_cost(curv, *args, **kwargs):
        measured.append(curv.kind)
        return seconds_per_product

    monkeypatch.setattr(solver_choice, "measure_product_cost", fake_cost)
    model, data, _ = _relu_problem()
    auto = lf.AutoSolver(expected_queries=0, cg_max_seconds=10.0)
    lf.InfluenceModule(model, data, solver=auto, num_candidates=None, progress=False).s_test(data[:1])
    assert measured == ["gauss_newton"] and auto.chosen.name == expected
    # the prediction is in the choice line: CG_EXPECTED_ITERATIONS x N x seconds per product and example
    predicted = solver_choice.CG_EXPECTED_ITERATIONS * len(data) * seconds_per_product
    assert f"CG ~{predicted:.3g} s per query" in auto.choice


def test_auto_chooses_exact_only_when_its_build_costs_less_than_cg_for_the_expected_queries(monkeypatch):
    from lightning_fastif.solvers import auto as solver_choice

    monkeypatch.setattr(solver_choice, "measure_product_cost", lambda curv, *a, **k: 1e-3)
    model, data, _ = _relu_problem()  # P = 111: the dense build is 111 products per example, CG 20 per query
    few = lf.AutoSolver(expected_queries=5, cg_max_seconds=1e9)  # 111 > 5 * 20
    lf.InfluenceModule(model, data, solver=few, num_candidates=None, progress=False).s_test(data[:1])
    assert few.chosen.name == "cg" and "costs more than CG for 5 queries" in few.choice
    many = lf.AutoSolver(expected_queries=6, cg_max_seconds=1e9)  # 111 <= 6 * 20
    lf.InfluenceModule(model, data, solver=many, num_candidates=None, progress=False).s_test(data[:1])
    assert many.chosen.name == "exact"


def test_auto_uses_gauss_newton_for_exact_on_an_indefinite_network():
    model, data, curv = _relu_problem(mode="auto")
    h = curv.matrix()
    assert float(torch.linalg.eigvalsh(h)[0]) < 0  # the Hessian is indefinite here
    auto = lf.AutoSolver()
    im = lf.InfluenceModule(model, data, solver=auto, num_candidates=None, progress=False)
    s = im.s_test(data[:2])
    assert auto.chosen.name == "exact" and auto.diagnostics.extra["curvature"] == "gauss_newton"
    g = curv.with_mode("gauss_newton").matrix()
    ev = torch.linalg.eigvalsh(g)
    assert float(ev[0]) > -1e-10  # positive semi-definite: damping 1% of lambda_max suffices
    assert auto.damping_used == pytest.approx(1e-2 * float(ev[-1]), rel=0.05)
    torch.testing.assert_close(
        s, _solve_ref(g, auto.damping_used, im.query_grads(data[:2])), rtol=1e-7, atol=1e-9
    )
    # the Hessian is still there when asked for
    im_h = lf.InfluenceModule(model, data, solver=lf.AutoSolver(), curvature="hessian", num_candidates=None)
    im_h.s_test(data[:1])
    assert im_h.solver.diagnostics.extra["curvature"] == "hessian"


def test_the_spectrum_is_estimated_once_per_model_state_and_shared_across_modules_and_solvers():
    from lightning_fastif.functional.solvers.spectrum import clear_spectrum_cache

    clear_spectrum_cache()
    model, data, _ = _relu_problem()
    first = lf.CGSolver("auto", max_iter=300, tol=1e-10, curvature="gauss_newton")
    lf.InfluenceModule(model, data, solver=first, num_candidates=None, progress=False).s_test(data[:2])
    assert (
        first.diagnostics.extra["spectrum_cached"] is False
        and first.diagnostics.extra["spectrum_products"] > 0
    )
    second = lf.CGSolver(
        "auto", max_iter=300, tol=1e-10, curvature="gauss_newton"
    )  # another module and solver
    lf.InfluenceModule(model, data, solver=second, num_candidates=None, progress=False).s_test(data[2:5])
    assert (
        second.diagnostics.extra["spectrum_cached"] is True
        and second.diagnostics.extra["spectrum_products"] == 0
    )
    assert second.damping_used == first.damping_used
    with torch.no_grad():  # a new model state: estimated again
        model[0].weight.mul_(1.1)
    third = lf.CGSolver("auto", max_iter=300, tol=1e-10, curvature="gauss_newton")
    lf.InfluenceModule(model, data, solver=third, num_candidates=None, progress=False).s_test(data[:2])
    assert third.diagnostics.extra["spectrum_cached"] is False and third.damping_used != first.damping_used
    # the early stop changes the damping by less than its tolerance against a 30-product Lanczos
    g = TrainingCurvature(
        PerExampleLoss(model), *_theta_spec(model), data, batch_size=16, mode="gauss_newton"
    ).matrix()
    assert third.damping_used == pytest.approx(1e-2 * float(torch.linalg.eigvalsh(g)[-1]), rel=0.02)


def test_lissa_divergence_on_an_indefinite_hessian_says_damping_not_scale():
    _, _, curv = _relu_problem()
    lam_min = float(torch.linalg.eigvalsh(curv.matrix())[0])
    v = torch.randn(1, curv.spec.numel, dtype=torch.float64)
    solver = lf.LiSSASolver(damping=1e-4, scale=50.0, depth=20000, batch_size=len(curv.dataset))
    with pytest.raises(
        SolverDivergenceError, match=r"not `scale`.*indefinite.*`damping` > ([0-9.e-]+)"
    ) as err:
        solver.solve(curv, v)
    advised = float(str(err.value).split("`damping` > ")[1].split(" ")[0])
    assert advised == pytest.approx(-lam_min, rel=0.2)


def test_lissa_chain_spread_measures_the_minibatch_noise_that_the_last_step_misses():
    _, _, curv = _relu_problem(n=200, mode="gauss_newton")
    g = curv.matrix()
    v = torch.randn(1, curv.spec.numel, dtype=torch.float64)
    lam = 0.2
    ref = _solve_ref(g, lam, v)
    noisy = lf.LiSSASolver(lam, scale="auto", depth="auto", repeats=4, batch_size=4, seed=1)
    with pytest.warns(SolverConvergenceWarning, match="chains disagree"):
        x = noisy.solve(curv, v)
    d = noisy.diagnostics
    err = float((x - ref).norm() / ref.norm())
    assert not d.converged and d.extra["damped_mode_remaining"] <= 0.01
    assert 0.2 * err <= d.extra["chain_spread"] <= 5 * err  # the spread is of the size of the real error
    exact = lf.LiSSASolver(lam, scale="auto", depth="auto", repeats=2, batch_size=len(curv.dataset))
    exact.solve(curv, v)  # full batches: the chains agree exactly
    assert exact.diagnostics.extra["chain_spread"] < 1e-8
    one = lf.LiSSASolver(lam, scale="auto", depth="auto", batch_size=len(curv.dataset))
    one.solve(curv, v)
    assert one.diagnostics.extra["chain_spread"] == "not measured (repeats=1)"


def test_solver_auto_string_is_the_auto_solver_and_other_strings_are_refused():
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    train = TensorDataset(x, y)
    by_name = lf.InfluenceModule(model, train, solver="auto", num_candidates=None)
    by_object = lf.InfluenceModule(model, train, solver=lf.AutoSolver(), num_candidates=None)
    assert isinstance(by_name.solver, lf.AutoSolver)
    torch.testing.assert_close(by_name.influence((x[:2], y[:2])), by_object.influence((x[:2], y[:2])))
    from lightning_fastif.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="`solver`.*'exact'"):
        lf.InfluenceModule(model, train, solver="exact", num_candidates=None)


def test_the_measured_product_cost_is_averaged_over_ranks_so_every_rank_chooses_alike():
    from lightning_fastif.solvers.auto import measure_product_cost

    _, _, curv = _relu_problem(mode="gauss_newton")
    seen = []

    def other_rank_measured_one_second(t):  # what a sum over two ranks returns
        seen.append(t.clone())
        return t + torch.tensor([1.0, 1.0], dtype=t.dtype)

    curv.all_reduce = other_rank_measured_one_second
    cost = measure_product_cost(curv)
    assert len(seen) == 1 and seen[0][1] == 1.0 and 0 < seen[0][0] < 1.0
    assert cost == pytest.approx((float(seen[0][0]) + 1.0) / 2)
