"""The checks of :class:`~lightning_fastif.InfluenceModule`: its constructor arguments (each error names the argument,
what was expected and what was got) and, on the error path of ``s_test``, the training examples whose loss is not
finite or whose labels do not fit the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_fastif._runtime import check_positive_int, eval_mode
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import fetch, slice_batch
from lightning_fastif.functional.losses import check_finite
from lightning_fastif.functional.params import ParamSpec
from lightning_fastif.functional.solvers.base import Solver


def check_arguments(
    model: nn.Module,
    train_dataset: Dataset,
    solver: Solver | str | None,
    num_candidates: int | None,
    top_k: int,
    batch_size: int,
    candidates: str,
    score_method: str,
    sketch: dict[str, Any] | None,
    curvature: str | None,
) -> tuple[Solver, dict[str, Any]]:
    """Check :class:`~lightning_fastif.InfluenceModule`'s arguments: ``(solver, sketch settings)`` resolved, or a
    :class:`ConfigurationError` naming the argument."""
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    if not (hasattr(train_dataset, "__getitem__") and hasattr(train_dataset, "__len__")):
        raise ConfigurationError(
            f"Expected `train_dataset` to be a map-style Dataset (with __len__ and __getitem__), but got "
            f"{type(train_dataset).__name__}."
        )
    from lightning_fastif.solvers.auto import AutoSolver

    solver = AutoSolver() if solver is None or (isinstance(solver, str) and solver == "auto") else solver
    if curvature not in (None, "hessian", "gauss_newton"):
        raise ConfigurationError(
            f"Expected `curvature` to be 'hessian', 'gauss_newton' or None (the solver decides: Hessian for "
            f"ExactSolver/CGSolver/LiSSASolver, the auto solver's choice), but got {curvature!r}."
        )
    if not isinstance(solver, Solver):
        raise ConfigurationError(
            f"Expected `solver` to be 'auto' or a Solver (AutoSolver, ExactSolver, CGSolver, LiSSASolver...), "
            f"but got {solver!r}."
            if isinstance(solver, str)
            else f"Expected `solver` to be 'auto' or a Solver "
            f"(AutoSolver, ExactSolver, CGSolver, LiSSASolver...), but got {type(solver).__name__}."
        )
    check_positive_int("num_candidates", num_candidates, allow_none=True)
    check_positive_int("top_k", top_k)
    check_positive_int("batch_size", batch_size)
    if candidates not in ("features", "gradients"):
        raise ConfigurationError(
            f"Expected `candidates` to be 'features' or 'gradients', but got {candidates!r}."
        )
    from lightning_fastif.retrieval.gradients.settings import check_sketch_settings

    sketch = check_sketch_settings(sketch)
    if score_method not in ("auto", "jvp", "grad", "head"):
        raise ConfigurationError(
            f"Expected `score_method` to be 'auto', 'jvp', 'grad' or 'head', but got {score_method!r}."
        )
    n = len(train_dataset)  # type: ignore[arg-type]
    if num_candidates is not None and num_candidates > n:
        raise ConfigurationError(
            f"Expected `num_candidates` to be at most the training set size {n} (or None for a full scan), "
            f"but got {num_candidates}."
        )
    return solver, sketch


def check_training_finite(module: Any, theta: Tensor, spec: ParamSpec) -> None:
    """Raise an error naming the training ids whose loss is NaN or inf (:class:`NonFiniteError`) or whose labels
    do not fit the loss (:class:`ConfigurationError`): one forward pass, on the error path only."""
    params = spec.unflatten(theta)
    n = len(module.train_dataset)  # type: ignore[arg-type]
    with eval_mode(module.model), torch.no_grad():
        for at in range(0, n, module.score_batch_size):
            ids = list(range(at, min(n, at + module.score_batch_size)))
            batch = module._prepare(fetch(module.train_dataset, ids, module._user_collate))
            try:
                losses = module.loss(params, batch)
            except ConfigurationError as err:  # find the examples one by one
                bad = []
                for j, i in enumerate(ids):
                    try:
                        module.loss(params, slice_batch(batch, slice(j, j + 1)))
                    except ConfigurationError:
                        bad.append(i)
                raise ConfigurationError(
                    f"Expected the training examples' `labels` to fit the loss ({module.loss.description}), but "
                    f"training example id(s) {bad[:20]} do not: {err}"
                ) from err
            check_finite(losses, "training loss", ids)
