"""Wall-clock timing: the median of repeated calls, several candidates interleaved.

Every figure is a median over ``repeats`` calls after ``warmup`` untimed calls (compilation, caches and lazy
initialisation happen there). Candidates timed together take turns within each repetition, so a slow spell of a
shared machine hits them all alike and their ratios stay meaningful when absolute times do not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["interleaved_medians", "median_ms"]


def interleaved_medians(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        device: str = "cpu") -> dict[str, float]:
    """``{name: median wall time of fn() in milliseconds}`` over ``repeats`` repetitions, each calling every
    one of ``fns`` once in turn, after ``warmup`` such untimed repetitions. On CUDA the device is synchronised
    around each call."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds: :func:`interleaved_medians` of one candidate."""
    return interleaved_medians({"fn": fn}, repeats, warmup, device)["fn"]
