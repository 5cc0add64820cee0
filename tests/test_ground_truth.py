"""Influence against actual leave-one-out retraining, and LiSSA against the exact solve, on digits."""

import copy

import pytest
import torch
from _problems import fit_lbfgs
from scipy.stats import pearsonr, spearmanr
from torch.nn import functional as F

import lightning_fastif as lf


def _hardest_test_point(p):
    with torch.no_grad():
        losses = F.cross_entropy(p.model(p.x_test), p.y_test, reduction="none")
    q = int(losses.argmax())
    return (p.x_test[q : q + 1], p.y_test[q : q + 1]), float(losses[q])


@pytest.mark.slow
def test_influence_predicts_leave_one_out_retraining(digits_l2_1e3):
    """Multinomial logistic regression, L2 = damping = 1e-3, 40 removals with the largest |influence|.

    Retraining minimises (1/N) sum_{j != i} L_j + l2/2 |theta|^2 from the trained weights (float64 L-BFGS), which is
    exactly up-weighting z_i by -1/N, so the predicted change of the test loss is -I(z_i, z_test) / N.
    """
    p = digits_l2_1e3
    batch, base = _hardest_test_point(p)
    im = lf.InfluenceModule(p.model, p.train, solver=lf.ExactSolver(damping=p.l2), num_candidates=None)
    scores = im.influence(batch)[0]
    n = len(p.x_train)
    removed = scores.abs().argsort(descending=True)[:40].tolist()
    predicted, actual = [], []
    for i in removed:
        m = copy.deepcopy(p.model)
        w = torch.ones(n, dtype=torch.float64)
        w[i] = 0.0
        fit_lbfgs(m, p.x_train, p.y_train, p.l2, weights=w)
        with torch.no_grad():
            actual.append(float(F.cross_entropy(m(batch[0]), batch[1])) - base)
        predicted.append(-float(scores[i]) / n)
    r, rho = pearsonr(predicted, actual).statistic, spearmanr(predicted, actual).statistic
    print(f"LOO digits logistic l2=1e-3: Pearson {r:.4f}, Spearman {rho:.4f}")
    assert r >= 0.9 and rho >= 0.9
    # the signs carry meaning: removing a harmful example (I > 0) lowers the test loss
    harmful = [a for a, i in zip(actual, removed) if scores[i] > 0]
    assert harmful and all(a < 0 for a in harmful)


def test_cg_agrees_with_exact_on_digits(digits_l2_1e2):
    p = digits_l2_1e2
    batch, _ = _hardest_test_point(p)
    exact = lf.InfluenceModule(p.model, p.train, solver=lf.ExactSolver(damping=p.l2), num_candidates=None)
    cg = lf.InfluenceModule(
        p.model, p.train, solver=lf.CGSolver(damping=p.l2, tol=1e-10), num_candidates=None
    )
    torch.testing.assert_close(cg.s_test(batch), exact.s_test(batch), rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_lissa_with_sensible_settings_agrees_with_exact(digits_l2_1e2):
    p = digits_l2_1e2
    batch, _ = _hardest_test_point(p)
    exact = lf.InfluenceModule(p.model, p.train, solver=lf.ExactSolver(damping=p.l2), num_candidates=None)
    lissa = lf.InfluenceModule(
        p.model,
        p.train,
        solver=lf.LiSSASolver(damping=p.l2, scale=5.0, depth=1500, repeats=1, batch_size=64),
        num_candidates=None,
    )
    a, b = exact.influence(batch)[0], lissa.influence(batch)[0]
    rho = spearmanr(a, b).statistic
    print(f"LiSSA vs Exact Spearman {rho:.4f}, Pearson {pearsonr(a, b).statistic:.4f}")
    assert rho >= 0.95
    top_exact = set(a.argsort()[:10].tolist())
    assert len(top_exact & set(b.argsort()[:10].tolist())) >= 7
