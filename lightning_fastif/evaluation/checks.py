"""Checks of the influence approximations on the user's own model: solver agreement and leave-one-out retraining.

Leave-one-out here retrains only the *selected* parameters (the others are constants, exactly as in the influence
computation), in float64, from the trained weights: first to a stationary point of
``R(theta) + damping/2 |theta|^2``, then once per removed example. The damping therefore plays the role of the L2
term, and the predicted change of the test loss, ``-I / N``, is first-order exact for that objective.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.regression import pearson_corrcoef, spearman_corrcoef

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import move_to
from lightning_fastif.functional.grads import flat_loss
from lightning_fastif.functional.params import ParamSpec, select_params

__all__ = ["LeaveOneOutReport", "SolverAgreement", "leave_one_out_check", "solver_agreement"]


@dataclass
class SolverAgreement:
    """Agreement of two solvers' influence values over the same training examples (one query)."""

    solver: str
    reference: str
    spearman: float
    pearson: float
    top10_overlap: float
    seconds: float
    reference_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _corr(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> float:
    return float(fn(a.double().flatten(), b.double().flatten()))


def solver_agreement(module: Any, reference_solver: Any, batch: Any) -> SolverAgreement:
    """Influence of every training example on the first query of ``batch`` by ``module.solver`` and by a reference.

    Returns:
        Spearman and Pearson correlations and the overlap of the top-10 by |influence| (mean over queries when the
        batch holds several).
    """
    import time

    start = time.perf_counter()
    a = module.influence(batch)
    t_a = time.perf_counter() - start
    original = module.solver
    module.solver = reference_solver
    try:
        start = time.perf_counter()
        b = module.influence(batch)
        t_b = time.perf_counter() - start
    finally:
        module.solver = original
    sp, pe, ov = [], [], []
    for x, y in zip(a, b):
        sp.append(_corr(spearman_corrcoef, x, y))
        pe.append(_corr(pearson_corrcoef, x, y))
        top = lambda v: set(v.abs().argsort(descending=True)[:10].tolist())  # noqa: E731
        ov.append(len(top(x) & top(y)) / 10)
    return SolverAgreement(
        repr(original),
        repr(reference_solver),
        sum(sp) / len(sp),
        sum(pe) / len(pe),
        sum(ov) / len(ov),
        t_a,
        t_b,
    )


@dataclass
class LeaveOneOutReport:
    """Predicted (``-I/N``) against actual change of the test loss after removing each training example."""

    removed: list[int]
    predicted: list[float]
    actual: list[float]
    pearson: float
    spearman: float
    damping: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Objective:
    """Full-batch ``(1/N) sum_i w_i L_i(theta) + damping/2 |theta|^2`` over the selected parameters, float64."""

    def __init__(self, module: Any, damping: float, batch_size: int = 1024) -> None:
        self.model = (
            copy.deepcopy(module.model).double().eval().requires_grad_(False)
        )  # our copy; theta is explicit
        from lightning_fastif.functional.losses import PerExampleLoss

        self.loss = PerExampleLoss(self.model, module.loss.loss_fn)
        # the names selected on the user's model (the copy has requires_grad off everywhere)
        self.names = list(select_params(module.model, module.param_patterns))
        params = select_params(self.model, self.names)
        self.spec = ParamSpec.of(params)
        self.theta = self.spec.flatten(params).detach().clone()
        self.n = len(module.train_dataset)
        loader = torch.utils.data.DataLoader(
            module.train_dataset, batch_size=batch_size, collate_fn=module.collate_fn
        )
        device = self.theta.device
        self.batches = [move_to(b, device, torch.float64) for b in loader]
        self.damping = damping

    def value(self, theta: Tensor, weights: Tensor | None = None) -> Tensor:
        total = theta.new_zeros(())
        start = 0
        for b in self.batches:
            losses = flat_loss(self.loss, self.spec, b, "none")(theta)
            w = None if weights is None else weights[start : start + len(losses)]
            total = total + (losses.sum() if w is None else (losses * w).sum())
            start += len(losses)
        return total / self.n + 0.5 * self.damping * (theta * theta).sum()

    def minimise(self, theta0: Tensor, weights: Tensor | None = None, max_iter: int = 500) -> Tensor:
        theta = theta0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [theta],
            max_iter=max_iter,
            tolerance_grad=1e-11,
            tolerance_change=1e-14,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            with torch.enable_grad():
                loss = self.value(theta, weights)
                loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        return theta.detach()

    def install(self, theta: Tensor) -> None:
        with torch.no_grad():
            named = dict(self.model.named_parameters())
            for name, t in self.spec.unflatten(theta).items():
                named[name].copy_(t)


def leave_one_out_check(
    module: Any, query: Any, removals: int = 10, damping: float | None = None
) -> LeaveOneOutReport:
    """Compare influence with actual leave-one-out retraining of the selected parameters, for one query.

    Args:
        module: an ``InfluenceModule`` (not changed: a float64 copy of its model is retrained).
        query: a batch holding one query example (the first is used).
        removals: how many training examples to remove, one at a time: those with the largest |influence|.
        damping: L2 strength of the retraining objective and the solver's damping (default: the module's).

    Returns:
        A :class:`LeaveOneOutReport` (Pearson and Spearman of predicted against actual changes).
    """
    if isinstance(removals, bool) or not isinstance(removals, int) or removals < 2:
        raise ConfigurationError(f"Expected `removals` to be an int >= 2, but got {removals!r}.")
    if damping is None:  # the damping the solver actually used ("auto" resolves on its first solve)
        if getattr(module.solver, "damping_used", None) is None and module.solver.damping == "auto":
            module.s_test(query)
        damping = getattr(module.solver, "damping_used", None) or module.solver.damping
    damping = float(damping)
    if not damping > 0:
        raise ConfigurationError(
            f"Expected a positive `damping` for leave-one-out retraining (it is the L2 term that makes the retrained "
            f"optimum unique), but got {damping}."
        )
    from lightning_fastif.functional.solvers.exact_cg import CGSolver, ExactSolver

    obj = _Objective(module, damping)
    theta_star = obj.minimise(obj.theta)
    obj.install(theta_star)
    solver = ExactSolver(damping) if obj.spec.numel <= 4000 else CGSolver(damping, max_iter=500, tol=1e-10)
    from lightning_fastif.influence.module import InfluenceModule

    im = InfluenceModule(
        obj.model,
        module.train_dataset,
        loss_fn=obj.loss.loss_fn,
        params=obj.names,
        solver=solver,
        num_candidates=None,
        batch_size=module.score_batch_size,
        collate_fn=module.collate_fn,
    )
    q = move_to(query, theta_star.device, torch.float64)
    from lightning_fastif.functional.batch import slice_batch

    q = slice_batch(q, slice(0, 1))
    scores = im.influence(q)[0]

    def test_loss(th: Tensor) -> float:
        with torch.no_grad():
            return float(flat_loss(obj.loss, obj.spec, q, "mean")(th))

    base = test_loss(theta_star)
    chosen = scores.abs().argsort(descending=True)[:removals].tolist()
    predicted, actual = [], []
    for i in chosen:
        w = torch.ones(obj.n, dtype=torch.float64, device=theta_star.device)
        w[i] = 0.0
        actual.append(test_loss(obj.minimise(theta_star, w)) - base)
        predicted.append(-float(scores[i]) / obj.n)
    p, a = torch.tensor(predicted), torch.tensor(actual)
    pe, sp = _corr(pearson_corrcoef, p, a), _corr(spearman_corrcoef, p, a)
    return LeaveOneOutReport(
        chosen, predicted, actual, pe if math.isfinite(pe) else float("nan"), sp, damping
    )
