"""What :class:`~lightning_fastif.InfluenceModule` re-checks before it reuses a cached answer.

The solver's cached curvature (factorisation, factors, eigenvalue estimates) and the candidate index with its cached
features and logits were computed from the model's weights and the training data as they were then. Every public
call (the outermost one: ``influence`` calling ``s_test`` and ``score`` checks once) fingerprints both: the model's
parameters and buffers, and the training set (every in-memory byte, see
:func:`~lightning_fastif.functional.params.dataset_fingerprint`). When either changed since the last call, one line
says what changed and the caches are rebuilt: the solver's key includes both fingerprints, an index built in memory
is rebuilt, an index folder is loaded again and checked (a clear ``IndexMismatchError`` telling to rebuild it), and
an index object passed as ``index`` is refused (it cannot be rebuilt here).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

from lightning.pytorch.utilities import rank_zero_info

from lightning_fastif.errors import IndexMismatchError
from lightning_fastif.functional.params import dataset_fingerprint, dataset_fingerprint_diffs, fingerprint

__all__ = ["current_state", "curvature_state", "trusted"]

F = TypeVar("F", bound=Callable[..., Any])


def _token(state: dict[str, Any]) -> str:
    return hashlib.sha256(repr((state["model"], sorted(state["data"].items()))).encode()).hexdigest()


def current_state(im: Any) -> dict[str, Any]:
    """``{"model": fingerprint, "data": dataset_fingerprint}`` of ``im``'s model and training set: from the
    enclosing public call when inside one, else computed now."""
    state = getattr(im, "_trust_state", None)
    if state is not None:
        return state
    return {
        "model": fingerprint(im.model),
        "data": dataset_fingerprint(im.train_dataset),
        "dataset_id": id(im.train_dataset),
    }


def curvature_state(im: Any) -> dict[str, Any]:
    """The fingerprints a :class:`TrainingCurvature` of ``im.train_dataset`` may take from the running call: the
    model's always, the data's only when it is the dataset fingerprinted (a pool module's curvature swaps in its
    training set: its own data is then fingerprinted by the curvature)."""
    state = current_state(im)
    if state.get("dataset_id") == id(im.train_dataset):
        return {"model": state["model"], "data": state["data"]}
    return {"model": state["model"]}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    if old["model"] != new["model"]:
        out.append("the model's weights or buffers changed")
    out += dataset_fingerprint_diffs(old["data"], new["data"])
    return out or ["the training data changed"]


def _revalidate(im: Any, state: dict[str, Any]) -> None:
    """Drop the caches built on another model state or other training data (with one line saying why)."""
    token = _token(state)
    last = getattr(im, "_trust_last", None)
    if last is not None and last[0] != token:
        why = "; ".join(_changes(last[1], state))
        if (
            im._candidates is not None
            and im.index is not None
            and not isinstance(im.index, (str, os.PathLike))
        ):
            raise IndexMismatchError(
                f"The candidate index passed as `index` was built before this: {why}. Its features (and cached "
                "logits) are stale, and an index object cannot be rebuilt here: rebuild the index and pass it to a "
                "new InfluenceModule (or pass an index folder, or index=None to build one in memory)."
            )
        rebuilt = ["the solver's cached curvature"]
        if im._candidates is not None:
            rebuilt.append(
                "the candidate index built in memory"
                if im.index is None
                else "the candidate index (its folder is loaded and checked again)"
            )
        rank_zero_info(f"lightning_fastif: since the last call, {why}: recomputing {' and '.join(rebuilt)}.")
        im._candidates = None
        im._cache = None
        im._train_labels = None
        im._feature_layer_name = None
    im._trust_last = (token, state)


def trusted(method: F) -> F:
    """Run ``method`` of an InfluenceModule with the model and data fingerprinted once (at the outermost call) and
    the caches built on anything else dropped first."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_trust_state", None) is not None:
            return method(self, *args, **kwargs)
        state = current_state(self)
        _revalidate(self, state)
        self._trust_state = state
        try:
            return method(self, *args, **kwargs)
        finally:
            self._trust_state = None

    return wrapper  # type: ignore[return-value]
