"""Batch sizes from the memory a GPU has free: ``batch_size: auto`` for calibration and for
the gate's evaluation.

One forward of a single item is measured (``torch.cuda.max_memory_allocated`` above what
was allocated before it), and the batch is as many such items as fit in a share of the free
memory, with a margin for what the measured forward does not show (ModelOpt's calibration
temporaries, allocator fragmentation). Measuring beats a formula from the config: it covers
every architecture, attention kernel and logits trick without knowing them. On a CPU, or
when a model is spread over devices (``model.max_memory``: the cap is the user's), ``auto``
means a fixed default: batching gains little there and the memory is the host's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

AUTO = "auto"
#: What ``batch_size`` may be in a recipe or suite: a number, or ``auto``.
BatchSize = int | Literal["auto"]


def parse(value: Any, maximum: int | None = None) -> BatchSize:
    """A recipe's or suite's ``batch_size`` checked (one message for every wrong value: a
    pydantic union would report each branch separately)."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number or 'auto', not {value!r}")
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be at most {maximum:,}, not {value:,}")
    return value


@dataclass(frozen=True)
class Choice:
    """A resolved batch size and why: ``measured`` is False when ``auto`` fell back."""

    batch_size: int
    measured: bool
    per_item_bytes: int | None = None
    free_bytes: int | None = None
    reason: str = ""

    def describe(self) -> str:
        if not self.measured:
            return f"batch size {self.batch_size} ({self.reason})"
        return (
            f"batch size {self.batch_size} (auto: {self.per_item_bytes / 2**20:.0f} MiB measured "
            f"per item, {self.free_bytes / 2**30:.1f} GiB free)"
        )


def fit(per_item_bytes: int, free_bytes: int, limit: int, *, share: float, margin: float) -> int:
    """Items of ``per_item_bytes`` (times ``margin``) that fit in ``share`` of ``free_bytes``,
    at least 1 and at most ``limit``."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    budget = free_bytes * share
    cost = max(per_item_bytes, 1) * margin
    return max(1, min(limit, int(budget // cost)))


def gpu_device(model) -> Any | None:
    """The CUDA device the whole of ``model`` is on, or None (a CPU model, or one whose
    parameters are spread over devices or offloaded)."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return None
    (device,) = devices
    return device if device.type == "cuda" else None


def measure(model, forward: Callable[[], Any], limit: int, fallback: int, **fit_args) -> Choice:
    """Run ``forward()`` (one item through ``model``) and size the batch from its peak; the
    fallback on a CPU or a model spread over devices. ``forward``'s result is discarded."""
    import torch

    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    device = gpu_device(model)
    if device is None:
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        reason = "auto on a CPU" if on_cpu else "auto with the model spread over devices"
        return Choice(min(fallback, limit), measured=False, reason=reason)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        forward()
    torch.cuda.synchronize(device)
    per_item = torch.cuda.max_memory_allocated(device) - before
    free, _total = torch.cuda.mem_get_info(device)
    size = fit(per_item, free, limit, **fit_args)
    return Choice(size, measured=True, per_item_bytes=per_item, free_bytes=free)


def fixed(batch_size: BatchSize, fallback: int) -> int:
    """``batch_size`` where nothing is measured: the number, or ``fallback`` for ``auto``."""
    return fallback if batch_size == AUTO else int(batch_size)
