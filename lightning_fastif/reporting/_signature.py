"""What an ``influence.jsonl`` record depends on, for ``InfluenceWriter``'s resume: the run signature (every setting
that determines a record), and a digest per record keyed with it.

A record is reused only when the run file's signature equals this run's, its ``extra["record_sha256"]`` matches
its content under this signature (so a hand-edited or foreign record is recomputed), and its
``extra["query_sha256"]`` equals the digest of this run's query of the same id (set by ``InfluenceModule``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["changed_settings", "record_digest", "run_signature", "sign", "signature_key", "verify"]

RECORD_DIGEST = "record_sha256"
QUERY_DIGEST = "query_sha256"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _callable_id(fn: Any) -> str | None:
    """A callable in words plus a hash of its code (a lambda edited between runs changes it)."""
    if fn is None:
        return None
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__func__", None), "__code__", None)
    if code is None:  # a callable object (an nn.Module loss...): its repr shows its settings
        return f"{name}:{repr(fn)[:500]}"
    h = hashlib.sha256(code.co_code)
    h.update(repr(code.co_consts).encode())
    h.update(repr(code.co_names).encode())
    return f"{name}#{h.hexdigest()[:16]}"


def _index_id(index: Any) -> Any:
    """The candidate index a run searched: a folder by its path and ``meta.json`` digest, an object by its shape."""
    if index is None:
        return None
    if isinstance(index, (str, os.PathLike)):
        folder = Path(index).expanduser().resolve()
        try:
            meta = _sha((folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            meta = None
        return {"folder": str(folder), "meta_sha256": meta}
    out: dict[str, Any] = {"type": type(index).__name__}
    for attr in ("ntotal", "dim", "factory", "backend"):
        value = getattr(index, attr, None)
        if isinstance(value, (int, float, str)):
            out[attr] = value
    ids = getattr(index, "ids", None)
    if ids is not None and hasattr(ids, "numpy"):  # the training ids it holds (its vectors are not readable)
        out["ids_sha256"] = hashlib.sha256(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return out


def _data_id(dataset: Any) -> Any:
    if dataset is None:
        return None
    from lightning_fastif.functional.params import dataset_fingerprint

    try:
        return dataset_fingerprint(dataset)
    except Exception:  # a dataset that cannot be read this way: its length and type
        return {
            "type": type(dataset).__name__,
            "length": len(dataset) if hasattr(dataset, "__len__") else None,
        }


def _params_id(pl_module: Any, model: Any) -> Any:
    patterns = getattr(pl_module, "param_patterns", None)
    try:
        from lightning_fastif.functional.params import select_params

        names = sorted(select_params(model, patterns))
    except Exception:
        names = None
    return {"patterns": patterns, "selected_sha256": None if names is None else _sha(_canonical(names))}


def run_signature(pl_module: Any, query_split: str | None = None) -> dict[str, Any]:
    """Every setting that determines a record of ``pl_module`` (JSON types; the keys name the settings).

    Keys: module, solver, num_candidates, top_k, params (patterns and the names they select), candidates
    (feature or gradient space, and the sketch settings), index (folder and its ``meta.json`` digest), loss, forward_fn, curvature,
    score_method, feature_layer, group, pool (name and data fingerprint), model (weights fingerprint), train_data
    (size and fingerprint of the training set), query_split, library_version.
    """
    from lightning_fastif._version import __version__
    from lightning_fastif.functional.params import fingerprint

    model = getattr(pl_module, "model", pl_module)
    try:
        weights = fingerprint(model)
    except Exception:  # a model that cannot be fingerprinted: compare the rest
        weights = None
    loss = getattr(pl_module, "loss", None)
    fit = getattr(pl_module, "fit_dataset", None)
    train = getattr(pl_module, "train_dataset", None)
    pool = None
    if fit is not None:  # a PoolInfluenceModule: train_dataset is the pool, fit_dataset the training set
        pool = {"name": getattr(pl_module, "pool_name", None), "data": _data_id(train)}
    else:
        fit = train
    signature = {
        "module": type(pl_module).__name__,
        "solver": repr(getattr(pl_module, "solver", None)),
        "num_candidates": getattr(pl_module, "num_candidates", None),
        "top_k": getattr(pl_module, "top_k", None),
        "params": _params_id(pl_module, model),
        "candidates": {  # the space, and the settings of a gradient index built in memory
            "space": getattr(pl_module, "candidates", None),
            "sketch": getattr(pl_module, "sketch", None)
            if getattr(pl_module, "candidates", None) == "gradients"
            else None,
        },
        "index": _index_id(getattr(pl_module, "index", None)),
        "loss": None
        if loss is None
        else {
            "description": getattr(loss, "description", None),
            "loss_fn": _callable_id(getattr(loss, "loss_fn", None)),
        },
        "forward_fn": _callable_id(getattr(pl_module, "forward_fn", None)),
        "curvature": getattr(pl_module, "curvature_mode", None),
        "score_method": getattr(pl_module, "score_method", None),
        "feature_layer": getattr(pl_module, "feature_layer", None),
        "group": bool(getattr(pl_module, "group_queries", False)),
        "pool": pool,
        "model": weights,
        "train_data": {
            "size": len(fit) if fit is not None and hasattr(fit, "__len__") else None,
            "fingerprint": _data_id(fit),
        },
        "query_split": query_split,
        "library_version": __version__,
    }
    try:
        return json.loads(_canonical(signature))  # JSON types, so that it compares equal to the file's
    except (TypeError, ValueError):  # something not JSON (a sketch setting object): compare its words
        return json.loads(json.dumps(signature, sort_keys=True, default=repr))


def changed_settings(before: Any, now: dict[str, Any]) -> list[str]:
    """The keys of ``now`` whose value differs in ``before`` (all of them when ``before`` is not a dict)."""
    if not isinstance(before, dict):
        return ["unreadable"]
    return sorted({k for k in now if before.get(k) != now[k]} | {k for k in before if k not in now})


def signature_key(signature: dict[str, Any]) -> str:
    """The SHA-256 of a signature: what a record's digest is keyed with."""
    return _sha(_canonical(signature))


def record_digest(record: dict[str, Any], key: str) -> str:
    """SHA-256 of ``key`` and a record's JSON (``to_dict()``) without its own ``extra["record_sha256"]``."""
    data = json.loads(json.dumps(record, allow_nan=False))
    extra = data.get("extra")
    if isinstance(extra, dict):
        extra.pop(RECORD_DIGEST, None)
    return _sha(key + _canonical(data))


def sign(result: Any, key: str) -> Any:
    """Set ``result.extra["record_sha256"]`` (an ``InfluenceResult``) from its content and ``key``."""
    result.extra.pop(RECORD_DIGEST, None)
    result.extra[RECORD_DIGEST] = record_digest(result.to_dict(), key)
    return result


def verify(result: Any, key: str) -> bool:
    """Whether a read-back ``InfluenceResult`` carries the digest of its content under ``key``."""
    extra = getattr(result, "extra", None)
    if not isinstance(extra, dict) or not isinstance(extra.get(RECORD_DIGEST), str):
        return False
    try:
        return extra[RECORD_DIGEST] == record_digest(result.to_dict(), key)
    except (TypeError, ValueError):
        return False
