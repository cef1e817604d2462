"""Allocation and page-fault cost of a store (the figures for W3 and W4).

``peak_alloc_bytes_per_store``: during one store, how far tracemalloc's traced memory
rises above where it started (a fresh 1080p payload shows up as ~6.2 MB). tracemalloc
sees Python's allocators and numpy's data buffers, not a bare C ``malloc``, which is
why the minor page faults are reported too: ``minflt_per_store`` is the
``getrusage(RUSAGE_SELF).ru_minflt`` delta over a run of stores divided by their count.
A store that reuses its buffers scores ~0 on both. Minor faults are process-wide, so
another thread of this process faulting meanwhile would count; nothing else runs here.
"""

from __future__ import annotations

import gc
import resource
import tracemalloc

from .workloads import Case

WARMUP_STORES = 8


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(case: Case, stores: int) -> dict[str, float]:
    case.run(WARMUP_STORES)  # fill the ring and the queues: the steady state is measured
    gc.collect()
    before = _minflt()
    case.run(stores)
    faults = _minflt() - before

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        case.run(2)  # tracemalloc's own first allocations fall outside the sample
        rises = 0
        for _ in range(stores):
            start, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            case.run(1)
            _, peak = tracemalloc.get_traced_memory()
            rises += max(0, peak - start)
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return {
        "stores": stores,
        "peak_alloc_bytes_per_store": rises / stores,
        "minflt_per_store": faults / stores,
    }
