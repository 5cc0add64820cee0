"""Reports of influence results: inputs rendered for people, JSON Lines, a self-contained HTML page, a W&B Table.

Nothing here imports Lightning or W&B at import time (``wandb`` is imported inside :func:`log_to_wandb`).
"""

from __future__ import annotations

from lightning_fastif._files import atomic_write_text
from lightning_fastif.reporting._items import ExampleView, Lookup
from lightning_fastif.reporting.html import render_html_report, write_html_report
from lightning_fastif.reporting.jsonl import JsonlWriter, read_jsonl
from lightning_fastif.reporting.render import RenderedInput, png_data_uri, render_example
from lightning_fastif.reporting.wandb_table import WANDB_COLUMNS, build_rows, log_to_wandb

__all__ = [
    "WANDB_COLUMNS",
    "ExampleView",
    "JsonlWriter",
    "Lookup",
    "RenderedInput",
    "atomic_write_text",
    "build_rows",
    "log_to_wandb",
    "png_data_uri",
    "read_jsonl",
    "render_example",
    "render_html_report",
    "write_html_report",
]
