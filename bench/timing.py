"""Interleaved repeated timing: the candidates of one comparison alternate inside a single loop.

A background job that speeds up or slows down the machine then affects every candidate of a round
alike. Each round times every candidate once (in a rotated order, so no candidate always runs right
after the same neighbour); the reported ratio is the median over rounds of ``time / baseline time``
of the same round, and the reported time is the median over rounds.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so a wall-clock reading covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Median seconds per call and median per-round ratio to the baseline candidate."""

    median_s: float
    ratio: float


def time_interleaved(candidates: Mapping[str, Callable[[], object]], baseline: str, *, repeats: int,
                     warmup: int, device: torch.device) -> dict[str, Timing]:
    """Time each callable ``repeats`` times, alternating them, after ``warmup`` untimed rounds.

    Args:
        candidates: name -> zero-argument callable doing one full unit of work (e.g. forward+backward).
        baseline: the name whose time the ratios divide by.
        repeats: timed rounds; each round calls every candidate once.
        warmup: untimed rounds first (allocator caches, lazy initialization, CUDA kernels selection).
        device: synchronized around every call.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            candidates[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    base = seconds[baseline]
    return {name: Timing(statistics.median(values),
                         statistics.median(v / b for v, b in zip(values, base)))
            for name, values in seconds.items()}
