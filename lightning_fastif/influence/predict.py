"""Predict-time bookkeeping of :class:`~lightning_fastif.InfluenceModule`: the dataset ids of a batch's queries and
the assembly of its :class:`~lightning_fastif.results.InfluenceResult` records (label, prediction, flags...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.utils.data import Subset

from lightning_fastif.functional.batch import logits_of
from lightning_fastif.functional.scores import PAD_ID
from lightning_fastif.results import InfluenceResult
from lightning_fastif.solvers.auto import solver_record


def batch_query_ids(module: Any, batch_idx: int, dataloader_idx: int, n: int) -> list[int]:
    """Dataset positions of the ``n`` queries of this batch (ids of the underlying dataset for a ``Subset``).

    Lightning wraps every predict loader's batch sampler to record the indices it yields (also on each rank
    when queries are split); fall back to counting positions for loaders it could not wrap.
    """
    trainer = module._trainer
    indices = list(getattr(trainer.predict_loop, "current_batch_indices", []) or []) if trainer else []
    loader = None
    if trainer is not None:
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, Sequence) else loaders
    if len(indices) != n:  # no prediction writer attached: read the wrapped batch sampler's record
        seen = getattr(getattr(loader, "batch_sampler", None), "seen_batch_indices", None)
        if isinstance(seen, list) and batch_idx < len(seen) and len(seen[batch_idx]) == n:
            indices = [int(i) for i in seen[batch_idx]]
    if len(indices) != n:  # not a DataLoader: count positions (predict loaders are unshuffled)
        start = module._query_offsets.get(dataloader_idx, 0)
        indices = list(range(start, start + n))
    module._query_offsets[dataloader_idx] = max(module._query_offsets.get(dataloader_idx, 0), indices[-1] + 1)
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, Subset):  # report ids of the underlying dataset (e.g. the test set)
        indices = [int(dataset.indices[i]) for i in indices]
    return indices


def assemble_results(
    module: Any,
    ranked: list[tuple[Tensor, Tensor, Tensor, Tensor]],
    query_ids: list[int],
    labels: Tensor | None,
    preds: list[Any] | None,
    losses: Tensor,
    candidates: Tensor | None,
    distances: Tensor | None,
) -> list[InfluenceResult]:
    """One :class:`InfluenceResult` per query from its ranked ``(helpful ids, scores, harmful ids, scores)``."""
    results = []
    for q in range(len(ranked)):
        h_ids, h_sc, x_ids, x_sc = ranked[q]
        h_ids, h_sc = h_ids[h_ids != PAD_ID], h_sc[h_ids != PAD_ID]  # slots no candidate of that sign filled
        x_ids, x_sc = x_ids[x_ids != PAD_ID], x_sc[x_ids != PAD_ID]
        dist = {}
        if candidates is not None and distances is not None:
            dist = dict(zip(candidates[q].tolist(), distances[q].tolist()))
        results.append(
            InfluenceResult(
                query_id=int(query_ids[q]),
                label=None if labels is None else plain_value(labels[q]),
                prediction=None if preds is None else preds[q],
                helpful_ids=h_ids.tolist(),
                helpful_scores=h_sc.tolist(),
                harmful_ids=x_ids.tolist(),
                harmful_scores=x_sc.tolist(),
                loss=module.loss.description,
                flags=result_flags(float(losses[q]), h_ids, x_ids),
                num_candidates=len(module.train_dataset) if candidates is None else int(candidates.shape[1]),  # type: ignore[arg-type]
                query_loss=float(losses[q]),
                helpful_distances=[dist[i] for i in h_ids.tolist()] if dist else [],
                harmful_distances=[dist[i] for i in x_ids.tolist()] if dist else [],
                extra={**solver_record(module.solver, q), "candidates": module.candidates},
            )
        )
    return results


def plain_value(value: Tensor) -> int | float | list[Any]:
    """A label or target as it is: an int class id, a float target, a (nested) list for a vector target."""
    if value.dim() == 0:
        return value.item()
    return value.tolist()


def predictions(outputs: Any, loss: Any, n: int, labels: Tensor | None = None) -> list[Any] | None:
    """Per query: the predicted class (argmax of ``[B, C]`` logits) for a classification loss; the model's output
    (a float, or a list for a vector output) for a regression (a regression loss on the model, or float targets);
    None when the output cannot be read."""
    if outputs is None:
        return None
    out = logits_of(outputs)
    if out is None or out.dim() == 0 or out.shape[0] != n or not out.is_floating_point():
        return None
    classes = loss.source == "classification" or (loss.module_loss is not None and loss.module_loss.classes)
    regression = (loss.module_loss is not None and not loss.module_loss.classes) or (
        labels is not None and labels.is_floating_point() and not classes
    )
    if regression:  # the output is the prediction
        return [
            plain_value(out[i].squeeze(-1) if out.dim() == 2 and out.shape[1] == 1 else out[i])
            for i in range(n)
        ]
    if out.dim() == 2 and (classes or loss.source == "loss_fn"):  # logits [B, C]
        return [int(i) for i in out.argmax(-1).tolist()]
    return None


def result_flags(query_loss: float, helpful_ids: Tensor, harmful_ids: Tensor) -> list[str]:
    """Warnings about one query's result (``InfluenceResult.flags``)."""
    flags = []
    if query_loss == 0.0:
        flags.append(
            "saturated_query: loss 0, gradient 0, every score is 0 (the model is certain of this query's label: "
            "no training example can change its loss to first order)"
        )
    elif helpful_ids.numel() == 0 and harmful_ids.numel() == 0:
        flags.append("no_influence: every candidate's score is 0 (the query's gradient is 0)")
    elif harmful_ids.numel() == 0:
        flags.append(
            "no_harmful: no candidate has a positive score: every candidate scored helps this query (common for "
            "a confident, correct prediction whose candidates are its own class; more candidates may find some)"
        )
    elif helpful_ids.numel() == 0:
        flags.append("no_helpful: no candidate has a negative score: every candidate scored hurts this query")
    return flags
