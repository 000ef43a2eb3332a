"""The wall-clock timer the benchmarks share (``benchmarks/`` is on ``sys.path`` both when a
benchmark runs as a script and when ``run_all.py`` imports it)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``; on CUDA the device is synchronised before
    and after, so the figure holds the kernels ``fn`` queued, not only their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
