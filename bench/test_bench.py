"""The workloads of docs/bench.md under pytest-benchmark, one group per workload.

Each group's table lists the targets side by side (library backends, naive port, memcpy
limit). The timings are pytest-benchmark's own; ``capsule-sessions bench`` times the
same workload definitions with interleaved repeats and judges the targets. The
only assertions are about correctness (W9's frame accounting), never about speed.
"""

from __future__ import annotations

import pytest

from capsule_sessions.bench import threaded
from capsule_sessions.bench.workloads import TIMED

W8_FRAMES_PER_THREAD = 20
W9_FRAMES = 400


@pytest.mark.parametrize("workload", TIMED, ids=[w.id for w in TIMED])
def test_timed(benchmark, workload, target):
    case = workload.setup(target)
    if case is None:
        pytest.skip(f"{workload.id} has no {target} figure")
    benchmark.group = workload.id
    benchmark.extra_info["description"] = workload.description
    try:
        case.run(16)  # past the first stores: subscriber queues full, buffers recycled
        benchmark(case.op)
    finally:
        case.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_w8_threads(benchmark, target, threads):
    """W8 with a fixed count per producer, so pytest-benchmark's time is the figure:
    frames/s = threads * W8_FRAMES_PER_THREAD / time."""
    benchmark.group = threaded.W8_ID
    result = benchmark.pedantic(threaded.run_threads, args=(target, threads),
                                kwargs={"frames": W8_FRAMES_PER_THREAD}, rounds=5, iterations=1)
    assert result["frames"] == threads * W8_FRAMES_PER_THREAD
    benchmark.extra_info.update(threads=threads, frames_per_thread=W8_FRAMES_PER_THREAD,
                                cores_used=round(result["cores_used"], 2))


@pytest.mark.parametrize("subscribers", threaded.W9_SUBSCRIBERS)
def test_w9_fanout(benchmark, target, subscribers):
    if target in threaded.W9_TARGETS_EXCLUDED:
        pytest.skip(f"{target} stores nothing to fan out")
    benchmark.group = f"{threaded.W9_ID} {subscribers} sub"
    result = benchmark.pedantic(threaded.run_fanout, args=(target, subscribers, W9_FRAMES),
                                rounds=3, iterations=1)
    benchmark.extra_info.update({k: result[k] for k in ("stored_fps", "delivered_fps_per_subscriber",
                                                        "dropped", "p50_us", "p99_us")})
    # Every frame is either received or counted as dropped, intact and in order.
    assert result["lost"] == 0
    assert result["corrupt"] == 0
    assert result["counter_mismatch"] == 0
    assert result["out_of_order"] == 0
    assert result["hung_readers"] == 0
