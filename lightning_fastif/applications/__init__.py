"""FastIF's applications, above :class:`~lightning_fastif.InfluenceModule`.

- :mod:`.pool`: a candidate pool that is not the training set (FastIF's unseen-data experiment).
- :mod:`.correct`: FastIF's error correction: fine-tune on the most helpful examples of a failing slice, with
  baselines, and its report (table and inline-SVG line plot).
- :mod:`.influence_map`: the influence map (queries on a circle, training examples placed by their pull), inline SVG.

Imports are lazy: ``import lightning_fastif.applications`` costs nothing until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PoolInfluenceModule": "pool",
    "with_pool": "pool",
    "rebind": "_rebind",
    "SliceSpec": "correct",
    "CorrectionSettings": "correct",
    "CorrectionResult": "correct",
    "correct": "correct",
    "select_slice": "correct",
    "sgd_step": "correct",
    "write_correction_report": "correct",
    "influence_map_svg": "influence_map",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
