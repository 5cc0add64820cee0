"""A new :class:`~lightning_fastif.InfluenceModule` with the settings of another, around another model or dataset.

The applications fine-tune copies of the model (error correction) or score another data set (candidate pools); each
needs a module with the same settings (solver, parameters, candidate settings, scoring) as the user's. The settings
are read back from the constructor's signature, so settings that other parts of the library add to
``InfluenceModule.__init__`` (curvature, candidate space...) travel too when the module keeps them under the same name.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from torch import nn
from torch.utils.data import Dataset

__all__ = ["module_settings", "rebind"]

# constructor argument -> attribute of InfluenceModule that holds it (when the names differ)
_ATTRS = {
    "params": "param_patterns",
    "batch_size": "score_batch_size",
    "collate_fn": "_user_collate",
    "curvature": "curvature_mode",
}
_SKIP = {"self", "model", "train_dataset", "loss_fn", "solver", "index"}


def module_settings(im: Any) -> dict[str, Any]:
    """The constructor arguments of ``im`` (an ``InfluenceModule``) that can be read back from it."""
    from lightning_fastif.influence.module import InfluenceModule

    out: dict[str, Any] = {}
    for name, par in inspect.signature(InfluenceModule.__init__).parameters.items():
        if name in _SKIP or par.kind in (par.VAR_POSITIONAL, par.VAR_KEYWORD):
            continue
        attr = _ATTRS.get(name, name)
        value = getattr(im, attr, par.default)
        if (
            inspect.ismethod(value) and value.__self__ is im
        ):  # a method of the same name, not a stored setting
            continue
        if value is not inspect.Parameter.empty:
            out[name] = value
    if getattr(im, "_feature_layer_name", None) and out.get("feature_layer") is None:
        out["feature_layer"] = im._feature_layer_name
    out["loss_fn"] = getattr(im.loss, "loss_fn", None)
    return out


def rebind(
    im: Any,
    model: nn.Module | None = None,
    train_dataset: Dataset | None = None,
    *,
    index: Any = None,
    cls: type | None = None,
    **overrides: Any,
) -> Any:
    """A fresh module with ``im``'s settings around ``model`` and ``train_dataset`` (``im``'s own when None).

    The solver is copied (its caches belong to the old weights), the loss is resolved again for the new model and
    the candidate index is ``index`` (``None``: built on demand from the new model, when candidates are needed).

    Args:
        im: the template ``InfluenceModule``; not changed.
        model: the model of the new module (default: ``im.model``).
        train_dataset: its dataset (default: ``im.train_dataset``).
        index: a ``CandidateIndex``, an index folder or ``None``.
        cls: the class to build (default: ``type(im)``); a subclass of ``InfluenceModule``.
        **overrides: constructor arguments that replace ``im``'s.
    """
    settings = module_settings(im)
    settings.update(overrides)
    if "progress" in settings and "progress" not in overrides:
        settings["progress"] = False
    cls = cls or type(im)
    out = cls(
        model if model is not None else im.model,
        train_dataset if train_dataset is not None else im.train_dataset,
        solver=overrides.pop("solver", None) or copy.deepcopy(im.solver),
        index=index,
        **{k: v for k, v in settings.items() if k != "solver"},
    )
    for attr in ("fit_dataset", "pool_name"):  # a candidate pool (applications.pool) keeps its training set
        if attr in vars(im):
            setattr(out, attr, getattr(im, attr))
    return out
