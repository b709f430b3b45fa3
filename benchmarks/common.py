"""Shared timing helpers for the benchmarks: medians of repeated, warmed-up measurements."""
from __future__ import annotations

import statistics
import time

import torch


def median_time(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_rounds(fns: dict, rounds: int = 5, repeats: int = 4, warmup: int = 2) -> dict[str, list[float]]:
    """Per interleaved round, the median time of ``repeats`` calls of each callable, so machine
    noise hits all callables alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(median_time(fn, repeats=repeats, warmup=0))
    return samples


def interleaved(fns: dict, rounds: int = 5, repeats: int = 4, warmup: int = 2) -> dict:
    """Median over interleaved rounds of each callable's time (see ``interleaved_rounds``)."""
    return {k: statistics.median(v) for k, v in interleaved_rounds(fns, rounds, repeats, warmup).items()}
