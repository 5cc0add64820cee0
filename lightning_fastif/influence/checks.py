"""The checks of :class:`~lightning_fastif.InfluenceModule`: its constructor arguments (each error names the argument,
what was expected and what was got) and, on the error path of ``s_test``, the training examples whose loss is not
finite or whose labels do not fit the loss.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_fastif._runtime import check_bool, check_positive_int, eval_mode
from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.batch import fetch, slice_batch
from lightning_fastif.functional.grads import per_example_grads_and_losses
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
    *,
    params: Any = None,
    collate_fn: Any = None,
    progress: Any = True,
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
    check_model_device(model)
    check_params(params)
    if collate_fn is not None and not callable(collate_fn):
        raise ConfigurationError(
            f"Expected `collate_fn` to be a callable (a list of examples -> a batch) or None, but got "
            f"{collate_fn!r}."
        )
    check_bool("progress", progress)
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
    n = check_dataset_length(train_dataset, "train_dataset")
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
            # an inf input can give a finite loss and a NaN gradient (inf * 0 in tanh's backward): check those too
            grads, _ = per_example_grads_and_losses(module.loss, theta, spec, batch)
            check_finite(grads, "training gradient", ids)


def check_params(params: Any) -> None:
    """``params``: None or a non-empty list of glob patterns (a bare string would be read one character at a time)."""
    if params is None:
        return
    if isinstance(params, (str, bytes)):
        raise ConfigurationError(
            f"Expected `params` to be a list of glob patterns of parameter names (e.g. [{params!r}]) or None, but "
            f"got the string {params!r} (a string is not a list: it would be read one character at a time)."
        )
    try:
        patterns = list(params)
    except TypeError:
        raise ConfigurationError(
            f"Expected `params` to be a list of glob patterns of parameter names or None, but got "
            f"{type(params).__name__}."
        ) from None
    if not patterns:
        raise ConfigurationError(
            "Expected `params` to hold at least one glob pattern of parameter names (or None for every "
            "parameter with requires_grad), but got an empty list []."
        )


def check_model_device(model: nn.Module) -> None:
    """A model on the ``meta`` device has no weights to explain (``from_pretrained(..., device_map="meta")``)."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ConfigurationError(
            f"Expected `model`'s parameters to hold real weights, but got {len(meta)} parameter(s) on the 'meta' "
            f"device (e.g. {meta[0]!r}): load the weights first (`model.to_empty(device=...)` then "
            "`load_state_dict`, or load the checkpoint without device_map='meta')."
        )


def check_dataset_length(dataset: Any, name: str) -> int:
    """``len(dataset)``, after checking that its last example can be read (a ``__len__`` that overstates the
    dataset would otherwise fail deep inside a full pass, with an IndexError from the dataset)."""
    n = len(dataset)
    if n > 0:
        try:
            dataset[n - 1]
        except (IndexError, KeyError) as err:
            raise ConfigurationError(
                f"Expected `{name}` to hold len({name}) = {n} examples, but reading its last example (id {n - 1}) "
                f"raised {type(err).__name__}: {err}. Its `__len__` overstates what `__getitem__` can read."
            ) from err
    return n


def check_query_ids(query_ids: Any, n: int) -> list[int]:
    """``query_ids``: one distinct int per query of the batch (``n``); returned as a list of ints."""
    if isinstance(query_ids, Tensor):
        if query_ids.is_floating_point() or query_ids.is_complex() or query_ids.dtype == torch.bool:
            raise ConfigurationError(
                f"Expected `query_ids` to hold ints (dataset positions), but got a {query_ids.dtype} tensor."
            )
        query_ids = query_ids.reshape(-1).tolist()
    ids = [_as_int("query_ids", v) for v in query_ids]
    if len(ids) != n:
        raise ConfigurationError(
            f"Expected `query_ids` to hold one id per query of the batch ({n}), but got {len(ids)} id(s)."
        )
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ConfigurationError(
            f"Expected `query_ids` to be distinct (one per query), but got the repeated id(s) {duplicated[:10]}."
        )
    return ids


def check_train_indices(train_indices: Any, n: int) -> Tensor:
    """``train_indices``: distinct int training ids in ``[0, n)``, as an int64 tensor ``[k]``."""
    if isinstance(train_indices, Tensor):
        if (
            train_indices.is_floating_point()
            or train_indices.is_complex()
            or train_indices.dtype == torch.bool
        ):
            raise ConfigurationError(
                f"Expected `train_indices` to hold int training ids, but got a {train_indices.dtype} tensor."
            )
        ids = train_indices.reshape(-1).to(torch.long)
    else:
        ids = torch.as_tensor([_as_int("train_indices", v) for v in train_indices], dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ConfigurationError(
            f"Expected `train_indices` to lie in [0, {n}), but got values from {int(ids.min())} to {int(ids.max())}."
        )
    unique, counts = torch.unique(ids, return_counts=True)
    if bool((counts > 1).any()):
        raise ConfigurationError(
            f"Expected `train_indices` to be distinct, but got the repeated id(s) {unique[counts > 1][:10].tolist()}."
        )
    return ids


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool):
        raise ConfigurationError(f"Expected `{name}` to hold ints, but got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigurationError(f"Expected `{name}` to hold ints, but got {value!r}.") from None


def model_call_error(
    module: Any, err: BaseException, batch: Any, what: str, ids: list[int] | None = None
) -> Exception | None:
    """A clearer error for a model or loss that failed on ``batch`` (``err``): bad labels of training examples
    (named by id) or inputs of the wrong shape (the shapes named); None when there is none (re-raise ``err``).

    The loss is called once more, plainly (no vmap, no gradients), on the error path only."""
    theta, spec = module._theta()
    try:
        with eval_mode(module.model), torch.no_grad():
            module.loss(spec.unflatten(theta), batch)
    except ConfigurationError as plain:  # labels out of range...: name the examples one by one
        if ids is None:
            return plain
        bad = []
        for j, i in enumerate(ids):
            try:
                with eval_mode(module.model), torch.no_grad():
                    module.loss(spec.unflatten(theta), slice_batch(batch, slice(j, j + 1)))
            except (ConfigurationError, RuntimeError, IndexError):
                bad.append(i)
        return ConfigurationError(
            f"Expected the `labels` of {what} to fit the loss ({module.loss.description}), but example id(s) "
            f"{bad[:20]} (positions in `{module.dataset_argument}`) do not: {plain}"
        )
    except RuntimeError as plain:  # the plain call fails too: is it the inputs' shape?
        if "shape" not in str(plain) and "size" not in str(plain):
            return None
        shapes = _input_shapes(batch)
        expected_shapes = _input_shapes(fetch(module.train_dataset, [0], module._user_collate))
        return ConfigurationError(
            f"Expected the inputs of {what} to fit the model like the training set's (one example's inputs: "
            f"{expected_shapes}), but got inputs {shapes} and calling the model raised {type(plain).__name__}: "
            f"{str(plain)[:200]}"
        )
    except Exception:  # anything else: the original error is the clearest
        return None
    return None


def _input_shapes(batch: Any) -> str:
    """The shapes of a batch's inputs (every tensor but the last of a tuple, every key but ``labels``)."""
    if isinstance(batch, dict):
        items = [(k, v) for k, v in batch.items() if k != "labels"]
    elif isinstance(batch, (tuple, list)):
        items = [(f"[{i}]", v) for i, v in enumerate(batch[:-1] if len(batch) > 1 else batch)]
    else:
        items = [("x", batch)]
    return ", ".join(f"{k}: {list(v.shape)}" for k, v in items if isinstance(v, Tensor)) or "none"
