"""What the ``lightning-fastif`` subcommands read: the query selection, datamodule splits, checkpoints and the
:class:`InfluenceModule` they all build (weights loaded, training set from the datamodule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.solvers.base import Solver
from lightning_fastif.influence.module import InfluenceModule


@dataclass
class QuerySelection:
    """Which examples to explain.

    Attributes:
        split: dataset of the datamodule the queries come from: ``train``, ``val``, ``test`` or ``predict``.
        select: ``misclassified`` (examples the model gets wrong, in order), ``ids`` (the given ``ids``) or
            ``first`` (the first ``n``).
        ids: query ids (positions in the split), for ``select: ids``.
        n: at most this many queries (for ``misclassified`` and ``first``).
        batch_size: queries per predict batch.
        group: explain the selected queries as one group: one s_test for their mean loss, one result whose
            ``group`` lists the members (all queries in one batch).
    """

    split: str = "test"
    select: str = "misclassified"
    ids: list[int] | None = None
    n: int = 10
    batch_size: int = 16
    group: bool = False

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test", "predict"):
            raise ConfigurationError(
                f"Expected `queries.split` to be train, val, test or predict, but got {self.split!r}."
            )
        if self.select not in ("misclassified", "ids", "first"):
            raise ConfigurationError(
                f"Expected `queries.select` to be misclassified, ids or first, but got {self.select!r}."
            )
        if self.select == "ids" and not self.ids:
            raise ConfigurationError(
                "Expected `queries.ids` to be a non-empty list with `select: ids`, but got none."
            )
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigurationError(f"Expected `queries.n` to be a positive int, but got {self.n!r}.")


def _dataset_of(datamodule: pl.LightningDataModule | None, split: str) -> tuple[Any, Any]:
    """(dataset, collate_fn) of a datamodule split, read from its dataloader (not iterated)."""
    if datamodule is None:
        raise ConfigurationError("Expected a `data` (LightningDataModule) in the config, but got none.")
    stage = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split]
    datamodule.setup(stage)
    method = {
        "train": "train_dataloader",
        "val": "val_dataloader",
        "test": "test_dataloader",
        "predict": "predict_dataloader",
    }[split]
    loader = getattr(datamodule, method)()
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ConfigurationError(
            f"Expected the datamodule's {method}() to wrap a map-style dataset, but got {type(dataset).__name__}."
        )
    return dataset, getattr(loader, "collate_fn", None)


def check_checkpoint_file(ckpt_path: str | os.PathLike[str]) -> Path:
    """``ckpt_path`` as a ``Path`` when it is a file ``torch.save`` wrote (zip, or a legacy pickle), else a clear
    ConfigurationError (torch's own error for a text file is ``KeyError: 101`` or an unpickling message)."""
    import zipfile

    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigurationError(
            f"Expected `ckpt_path` to be an existing checkpoint file, but got {str(ckpt_path)!r}"
            + (" (a folder)." if path.is_dir() else " (no such file).")
        )
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        shown = head[:40].decode("utf-8", "replace").splitlines()[0] if head else "an empty file"
        raise ConfigurationError(
            f"Expected `ckpt_path` to be a checkpoint written by Lightning or torch.save (a .ckpt), but "
            f"{str(ckpt_path)!r} is not one (it starts with {shown!r})."
        )
    return path


def _index_readable(index_dir: str | os.PathLike[str]) -> bool:
    """Whether ``load_index`` can read ``index_dir``: the folder, or the complete leftover of an interrupted swap."""
    from lightning_fastif._files import leftovers

    path = Path(index_dir)
    return path.exists() or bool(leftovers(path))


def _check_run_arguments(output_dir: str | None = None, **positive: Any) -> None:
    """Model-free arguments of a subcommand, checked before the checkpoint, data or index are loaded."""
    from lightning_fastif._runtime import check_positive_int
    from lightning_fastif.reporting._paths import check_output_dir

    for name, value in positive.items():
        check_positive_int(name, value)
    if output_dir is not None:
        check_output_dir(output_dir, "output_dir")


def load_weights(model: torch.nn.Module, ckpt_path: str | os.PathLike[str] | None) -> None:
    """Load a Lightning checkpoint's weights into ``model``, with an error that says what does not match."""
    if ckpt_path is None:
        return
    path = check_checkpoint_file(ckpt_path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigurationError(
            f"Expected `ckpt_path` to be a readable checkpoint, but reading {path} failed: {err}"
        ) from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConfigurationError(f"Expected `ckpt_path` to hold a state_dict, but got {type(ckpt).__name__}.")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ConfigurationError(
            f"The checkpoint {path} does not match the model {type(model).__name__}: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]}, shape mismatches {shapes[:8]}. Check `model` and `ckpt_path`."
        )
    model.load_state_dict(state)


def _select_queries(
    model: torch.nn.Module, dataset: Any, collate_fn: Any, sel: QuerySelection, forward_fn: Any = None
) -> list[int]:
    n = len(dataset)
    if sel.select == "ids":
        bad = [i for i in sel.ids or [] if not 0 <= int(i) < n]
        if bad:
            raise ConfigurationError(f"Expected `queries.ids` to lie in [0, {n}), but got {bad[:10]}.")
        return [int(i) for i in sel.ids or []]
    if sel.select == "first":
        return list(range(min(sel.n, n)))
    from lightning_fastif.functional.batch import call_model, labels_of, logits_of, move_to

    wrong: list[int] = []
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=512, collate_fn=collate_fn)
    was = model.training
    model.eval()
    with torch.no_grad():
        start = 0
        for batch in loader:
            batch = move_to(batch, device)
            logits, labels = logits_of(call_model(model, batch, forward_fn)), labels_of(batch)
            if logits is None or labels is None or logits.dim() != 2 or labels.dim() != 1:
                raise ConfigurationError(
                    "Expected `queries.select: misclassified` to see logits [B, C] and labels [B] (a classifier); "
                    "use `select: ids` or `select: first`."
                )
            wrong += (start + (logits.argmax(-1) != labels).nonzero().flatten()).tolist()
            start += len(labels)
            if len(wrong) >= sel.n:
                break
    model.train(was)
    if len(wrong) < sel.n:  # fewer queries than asked for is not silent
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(
            f"lightning_fastif: queries.n={sel.n} asked for, but the model gets only {len(wrong)} of the {n} "
            f"{sel.split} examples wrong: explaining those {len(wrong)} (`--queries.select=first` or "
            "`--queries.select=ids` explains correct ones too)."
        )
    return wrong[: sel.n]


LOSS_PRESETS = (
    "causal_lm",
    "causal_lm_sum",
    "sequence",
    "sequence_sum",
    "token_classification",
    "sequence_classification",
)
"""Named losses the CLI's ``loss`` takes besides import paths (see :func:`resolve_loss_setting`)."""


def _import_object(path: str, what: str) -> Any:
    """The object at a dotted import path (``mypkg.losses.my_loss``), with an error naming ``what`` otherwise."""
    import importlib

    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigurationError(
            f"Expected `{what}` to be a preset or an import path `package.module.name`, but got {path!r}."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigurationError(
            f"Expected `{what}` = {path!r} to be importable, but importing {module_name!r} failed ({err}). The module "
            "must be on the Python path: install your package, or run with PYTHONPATH set to the folder that holds it."
        ) from err
    if not hasattr(module, attr):
        raise ConfigurationError(
            f"Expected `{what}` = {path!r} to name an object, but {module_name} has no {attr!r}."
        )
    return getattr(module, attr)


def resolve_loss_setting(loss: Any) -> Any:
    """The ``loss_fn`` of a subcommand's ``loss`` setting: None (the default resolution), a preset name, an import
    path of a ``callable(outputs, batch) -> [B]`` (a class is instantiated without arguments), or a callable.

    Presets: ``causal_lm`` (Hugging Face causal LM batches: token cross-entropy, shifted, mean over each sequence's
    tokens; ``causal_lm_sum``: summed over them), ``sequence`` (logits ``[B, T, V]`` against labels ``[B, T]`` already aligned, e.g. LitGPT
    ``(input_ids, targets)``), ``sequence_sum`` (the same, summed over the tokens), ``token_classification``
    (= ``sequence``), ``sequence_classification`` (cross-entropy of logits ``[B, C]`` against ``labels [B]``).
    """
    from lightning_fastif.functional.sequence import SequenceCrossEntropy

    if loss is None or callable(loss):
        return loss
    if not isinstance(loss, str):
        raise ConfigurationError(
            f"Expected `loss` to be one of {', '.join(LOSS_PRESETS)} or an import path, but got {loss!r}."
        )
    if loss in ("causal_lm", "causal_lm_sum"):
        return SequenceCrossEntropy(reduction="sum" if loss.endswith("_sum") else "mean", shift=True)
    if loss in ("sequence", "token_classification"):
        return SequenceCrossEntropy(shift=False)
    if loss == "sequence_sum":
        return SequenceCrossEntropy(reduction="sum", shift=False)
    if loss == "sequence_classification":
        return _classification_cross_entropy
    if "." not in loss:
        raise ConfigurationError(
            f"Expected `loss` to be one of {', '.join(LOSS_PRESETS)} or an import path `package.module.name`, but "
            f"got {loss!r}."
        )
    found = _import_object(loss, "loss")
    found = found() if isinstance(found, type) else found
    if not callable(found):
        raise ConfigurationError(
            f"Expected `loss` = {loss!r} to be a callable(outputs, batch) -> [B], but got {found!r}."
        )
    return found


def _classification_cross_entropy(outputs: Any, batch: Any) -> torch.Tensor:
    """Cross-entropy of ``[B, C]`` logits (the output, ``.logits`` or ``"logits"``) against ``labels [B]``."""
    import torch.nn.functional as F

    from lightning_fastif.functional.batch import labels_of
    from lightning_fastif.functional.losses import check_class_labels, output_tensor

    logits = output_tensor(outputs)
    labels = labels_of(batch)
    if labels is None:
        raise ConfigurationError(
            "Expected `loss: sequence_classification` batches to carry `labels`, but got none."
        )
    return F.cross_entropy(logits, check_class_labels(labels, logits), reduction="none")


def resolve_forward_setting(forward_fn: Any) -> Any:
    """The ``forward_fn`` of a subcommand's ``forward_fn`` setting: None (the default call), an import path of a
    ``callable(model, batch) -> outputs``, or a callable."""
    if forward_fn is None or callable(forward_fn):
        return forward_fn
    if not isinstance(forward_fn, str):
        raise ConfigurationError(f"Expected `forward_fn` to be an import path, but got {forward_fn!r}.")
    found = _import_object(forward_fn, "forward_fn")
    if not callable(found):
        raise ConfigurationError(
            f"Expected `forward_fn` = {forward_fn!r} to be a callable(model, batch) -> outputs, but got {found!r}."
        )
    return found


def _default_solver() -> Solver:
    from lightning_fastif.solvers.auto import AutoSolver

    return AutoSolver()  # Exact if it fits, else EK-FAC, else CG on Gauss-Newton; damping "auto"


def influence_module(
    model: pl.LightningModule,
    datamodule: Any,
    ckpt_path: str | None,
    index_dir: str | None,
    solver: Solver | None,
    params: list[str] | None,
    num_candidates: int | None,
    top_k: int,
    batch_size: int,
    candidates: str = "features",
    loss: Any = None,
    forward_fn: Any = None,
    curvature: str | None = None,
) -> InfluenceModule:
    """The :class:`InfluenceModule` of a subcommand: weights loaded, training set from the datamodule; ``loss``,
    ``forward_fn`` (presets or import paths, see :func:`resolve_loss_setting`) and ``curvature`` as configured."""
    loss_fn = resolve_loss_setting(loss)
    forward = resolve_forward_setting(forward_fn)
    load_weights(model, ckpt_path)
    train, collate = _dataset_of(datamodule, "train")
    if index_dir is not None and num_candidates is not None and not _index_readable(index_dir):
        raise ConfigurationError(
            f"Expected `index_dir` to be an index folder (run `lightning-fastif index` or fit with "
            f"FeatureIndexCallback first), but {index_dir!r} does not exist."
        )
    return InfluenceModule(
        model,
        train,
        params=params,
        solver=solver or _default_solver(),
        num_candidates=num_candidates,
        top_k=top_k,
        index=index_dir if num_candidates is not None else None,
        batch_size=batch_size,
        collate_fn=collate,
        candidates=candidates,
        loss_fn=loss_fn,
        forward_fn=forward,
        curvature=curvature,
    )
