"""Small runtime helpers of ``InfluenceModule``: eval mode with gradients, progress bars, argument checks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_fastif.errors import ConfigurationError

__all__ = [
    "NON_TTY_INTERVAL_S",
    "StageProgress",
    "check_bool",
    "check_positive_int",
    "eval_mode",
    "synchronize",
]

NON_TTY_INTERVAL_S = 60.0
"""Seconds between progress lines when stderr is not a terminal (a log file, CI)."""


def synchronize(device: Any = None) -> None:
    """Wait for the work queued on a CUDA device (a no-op elsewhere), so that a wall-clock stage timing counts the
    kernels it launched rather than only their launch.

    Args:
        device: a ``torch.device``, a device string, a tensor or a module (its first parameter's device); None
            means the current CUDA device when CUDA is initialised.
    """
    if isinstance(device, nn.Module):
        device = next((p.device for p in device.parameters()), None)
    elif isinstance(device, torch.Tensor):
        device = device.device
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run with ``model.eval()`` and outer autograd off (torch.func transforms still differentiate); restore modes."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode(False), torch.no_grad():  # torch.func transforms ignore an outer no_grad
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class StageProgress:
    """``callback(stage, done, total)`` drawing one tqdm bar per long stage (shown only after 2 s).

    Args:
        device: where the stages compute; on a CUDA device the queued work is waited for when a stage ends, so its
            bar's elapsed time is the stage's real time (None: the current CUDA device, if CUDA is in use).
    """

    def __init__(self, device: Any = None) -> None:
        self.bars: dict[str, Any] = {}
        self.device = device

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if done >= total:
            synchronize(self.device)

        bar = self.bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            # to a log file (not a terminal) a bar cannot redraw in place: one line a minute, not one per step
            interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
            bar = self.bars[stage] = tqdm(
                total=total,
                desc=f"lightning_fastif {stage}",
                delay=2.0,
                leave=False,
                mininterval=0.1 if interactive else NON_TTY_INTERVAL_S,
            )
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            self.bars.pop(stage, None)


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "a positive int or None" if allow_none else "a positive int"
        raise ConfigurationError(f"Expected `{name}` to be {what}, but got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """A real ``bool`` only: a string such as ``"no"`` is truthy and would silently mean ``True``."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"Expected `{name}` to be a bool (True or False), but got {value!r}.")
