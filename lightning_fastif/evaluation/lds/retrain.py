"""Retraining the LDS subsets through Lightning, each from the same initialisation, with resumable result files.

Each finished subset's query losses go to ``<output_dir>/lds-<fingerprint>/subset_<m>.json``; the fingerprint
covers the subsets, the settings, the initial weights and the queries, and a rerun loads finished subsets instead of
retraining them. Part of ``lightning_fastif.evaluation.lds``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.evaluation.lds.core import shard_subsets
from lightning_fastif.evaluation.lds.settings import LDSSettings
from lightning_fastif.functional.batch import move_to

__all__ = ["retrain_subsets"]


def _copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of the user's module that does not drag its Trainer along (the user's model is never touched)."""
    trainer = getattr(model, "_trainer", None)
    memo = {} if trainer is None else {id(trainer): None}
    return copy.deepcopy(model, memo)


def _seeded_init(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """The state dict after re-initialising every submodule that has ``reset_parameters`` (seeded)."""
    fresh = _copy_model(model)
    covered: set[str] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prefix, module in fresh.named_modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(
                    f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)
                )
    kept = [n for n, _ in fresh.named_parameters() if n not in covered]
    if kept:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"LDS: {len(kept)} parameter tensor(s) belong to modules without `reset_parameters` and keep their "
            f"trained values in every retraining (e.g. {kept[:3]}); the rest are re-initialised (seeded)."
        )
    return {k: v.detach().clone() for k, v in fresh.state_dict().items()}


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Tensor):
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(p, dict):
            for k in sorted(p):
                h.update(k.encode())
                h.update(_digest(p[k]).encode())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


def _query_losses(model: nn.Module, loss_fn: Any, query: Any) -> Tensor:
    from lightning_fastif.functional.losses import resolve_loss

    loss = resolve_loss(model, loss_fn)
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            params = {n: p.detach() for n, p in model.named_parameters()}
            ref = next(iter(params.values()))
            return loss(params, move_to(query, ref.device, ref.dtype)).detach().cpu().double()
    finally:
        for m, mode in was.items():
            m.training = mode


def retrain_subsets(
    model: nn.Module,
    train_dataset: Any,
    subsets: Tensor,
    query: Any,
    settings: LDSSettings,
    output_dir: str | Path,
    *,
    loss_fn: Any = None,
    collate_fn: Any = None,
    trainer_kwargs: dict[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    only: list[int] | None = None,
) -> tuple[dict[int, Tensor], list[int], list[int], Path]:
    """Retrain this rank's subsets (``rank::world_size``, or exactly ``only``) through Lightning; record query losses.

    Each subset: a deep copy of ``model`` loaded with the common initial state (seeded re-initialisation, or the
    trained weights with ``settings.warm_start``), ``pl.Trainer(max_epochs=...).fit`` on a shuffled
    ``DataLoader(Subset(train_dataset, ids))`` (order seeded by ``(seed, m)``), then the per-example query losses.
    A finished subset is saved at once to ``<output_dir>/lds-<fingerprint>/subset_<m>.json``; finished subsets are
    loaded, not retrained.

    Returns:
        ``({m: query losses [Q]}, retrained ids, resumed ids, folder)`` for this rank's subsets.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info
    from torch.utils.data import DataLoader, Subset

    from lightning_fastif._files import atomic_write_text
    from lightning_fastif.functional.losses import resolve_loss

    init = (
        {k: v.detach().clone() for k, v in model.state_dict().items()}
        if settings.warm_start
        else _seeded_init(model, settings.seed)
    )
    base_losses = _query_losses(model, loss_fn, query)  # also checks the loss resolves before any retraining
    resolve_loss(model, loss_fn)
    batch_size = settings.batch_size or 64
    key = _digest(
        subsets,
        init,
        base_losses,
        (settings.max_epochs, batch_size, settings.warm_start, settings.seed, len(train_dataset)),
        sorted((trainer_kwargs or {}).items()),
    )
    folder = Path(output_dir) / f"lds-{key[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(
        json.dumps(
            {**asdict(settings), "batch_size": batch_size, "num_subsets": int(subsets.shape[0])}, indent=2
        )
    )
    results: dict[int, Tensor] = {}
    retrained: list[int] = []
    resumed: list[int] = []
    for m in shard_subsets(int(subsets.shape[0]), rank, world_size) if only is None else only:
        path = folder / f"subset_{m:04d}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                results[m] = torch.tensor(saved["query_losses"], dtype=torch.float64)
                resumed.append(m)
                continue
        start = time.perf_counter()
        trained = _copy_model(model)
        trained.load_state_dict(init)
        trained.train()  # the user's model may sit in eval mode (influence runs there); training starts in train mode
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + m + 1)
        loader = DataLoader(
            Subset(train_dataset, subsets[m].tolist()),
            batch_size=batch_size,
            shuffle=True,
            generator=gen,
            collate_fn=collate_fn,
        )
        kwargs = {
            "max_epochs": settings.max_epochs,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
        }
        kwargs.update(trainer_kwargs or {})
        quiet = logging.getLogger("lightning.pytorch")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # M fits would print M copies of Lightning's banner
        try:
            with torch.random.fork_rng(
                devices=[]
            ):  # dropout etc. seeded per subset; the caller's RNG untouched
                torch.manual_seed(settings.seed * 1_000_003 + m + 1)
                pl.Trainer(**kwargs).fit(trained, train_dataloaders=loader)
        finally:
            quiet.setLevel(level)
        losses = _query_losses(trained, loss_fn, query)
        record = {
            "key": key,
            "subset": m,
            "query_losses": losses.tolist(),
            "seconds": time.perf_counter() - start,
        }
        atomic_write_text(path, json.dumps(record))
        results[m] = losses
        retrained.append(m)
        rank_zero_info(
            f"lightning_fastif: LDS subset {m + 1}/{subsets.shape[0]} retrained in {record['seconds']:.1f}s "
            f"({len(subsets[m])} examples, {settings.max_epochs} epochs); saved to {path}"
        )
    return results, retrained, resumed, folder
