"""Timing: calibrated batches, repeated in interleaved rounds, summarised by the median.

Each (workload, target) case is calibrated once to a batch of ``n`` operations that
takes at least ``min_batch_s``; then every round times one batch of every case, in an
order shuffled from round to round (seeded: runs are repeatable), so that drift on a shared machine (another process,
frequency changes) lands on every target alike instead of on whichever ran last. The
garbage collector is off inside a batch, as ``timeit`` does.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

from .._json import JsonObject
from .workloads import Case

Key = TypeVar("Key", bound=Hashable)

MAX_BATCH = 1 << 22


def time_batch(case: Case, n: int) -> int:
    """Nanoseconds for ``case.run(n)``, with the collector paused."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        case.run(n)
        return time.perf_counter_ns() - start
    finally:
        if enabled:
            gc.enable()


def calibrate(case: Case, min_batch_s: float) -> int:
    """The batch size whose run takes at least ``min_batch_s``, found twice: the first
    search warms the case up (first-touch page faults, caches, a slow first allocation)
    so that one cold call cannot settle on a batch of a single operation."""
    _search(case, min_batch_s)
    return _search(case, min_batch_s)


def _search(case: Case, min_batch_s: float) -> int:
    goal = min_batch_s * 1e9
    n = 1
    while True:
        elapsed = time_batch(case, n)
        if elapsed >= goal or n >= MAX_BATCH:
            return n
        if elapsed <= 0:
            n *= 10
            continue
        # Aim 20% past the goal so the next try usually settles it; grow at most 100x.
        n = min(MAX_BATCH, max(n + 1, min(n * 100, int(n * 1.2 * goal / elapsed))))


def summarize(per_op_ns: list[float]) -> JsonObject:
    median = statistics.median(per_op_ns)
    return {
        "ns_per_op": median,
        "min_ns": min(per_op_ns),
        "max_ns": max(per_op_ns),
        # Spread of the repeats around their median: how far to trust a small ratio.
        "spread": (max(per_op_ns) - min(per_op_ns)) / median if median else 0.0,
        "repeats_ns": per_op_ns,
    }


def paired_ratio(a: JsonObject, b: JsonObject) -> float | None:
    """Median over rounds of a's time / b's time in the same round (two ``summarize``
    results): both were timed within one round, so whatever slowed the machine in that
    round cancels out of the ratio."""
    pairs = [x / y for x, y in zip(a["repeats_ns"], b["repeats_ns"], strict=True) if y > 0]
    return statistics.median(pairs) if pairs else None


def interleaved(cases: dict[Key, Case], repeats: int, min_batch_s: float,
                progress: Callable[[Key], None] | None = None) -> dict[Key, JsonObject]:
    """Median ns/op of each case in ``cases`` ({key: Case}); ``progress(key)`` after each
    calibration and each timed batch."""
    keys = list(cases)
    batch = {}
    for key in keys:
        batch[key] = calibrate(cases[key], min_batch_s)
        if progress:
            progress(key)
    samples: dict[Key, list[float]] = {key: [] for key in keys}
    for round_no in range(repeats):
        order = keys[:]
        random.Random(round_no).shuffle(order)
        for key in order:
            n = batch[key]
            samples[key].append(time_batch(cases[key], n) / n)
            if progress:
                progress(key)
    out = {}
    for key in keys:
        out[key] = summarize(samples[key])
        out[key]["ops_per_batch"] = batch[key]
    return out


def steps(n_cases: int, repeats: int) -> int:
    """How many progress ticks ``interleaved`` makes."""
    return n_cases * (repeats + 1)
