"""The threaded workloads: W8 (producer scaling) and W9 (fan-out to draining subscribers).

Both take a target name like ``workloads.py`` does and return a JSON-ready dict. They
measure real time (``time.perf_counter``) because what they measure is concurrency; the
sessions still see the fake clock (``now=``, 1 ms per store).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from capsule_sessions import SubscriptionClosed

from .._json import JsonObject
from .naive import NaiveClosed
from .workloads import FRAME_1080P_RGB, TICK, make_session, payload

W8_ID = "W8_threads_6m"
W9_ID = "W9_fanout_drain"
# W8's second physical limit: memcpy into two preallocated buffers taken in turn, the
# least memory a ring with max_recent=2 can touch (a reader may still hold the previous
# frame, so it never writes into the buffer it just filled). With two producers the
# working set then outgrows the last-level cache on small machines, and this, not the
# GIL, is what bounds the scaling.
W8_MEMCPY_RING = "memcpy_2buf"
W9_TARGETS_EXCLUDED = ("memcpy",)  # no store, so nothing to fan out
W9_SUBSCRIBERS = (1, 4, 16)
W9_BUFFER = 8
W9_FRAME_BYTES = 65536
_CLOSED = (SubscriptionClosed, NaiveClosed)


def _producer(target: str, seed: int) -> Callable[[], None]:
    """A zero-arg store of a 1080p frame into a session (or copy, for memcpy) of its own,
    already past its first calls (the first touch of fresh buffers faults pages in)."""
    data = payload(FRAME_1080P_RGB, seed)
    if target in (W8_MEMCPY_RING, "memcpy"):
        turns = itertools.cycle([np.empty_like(data) for _ in range(2 if target == W8_MEMCPY_RING else 1)])

        def step() -> None:
            np.copyto(next(turns), data)
    else:
        store = make_session(target).store_frame
        clock = [0.0]

        def step() -> None:
            clock[0] += TICK
            store(data, source="camera", max_recent=2, min_interval=0.0, now=clock[0])
    for _ in range(4):
        step()
    return step


def _machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run_threads(target: str, threads: int, *, seconds: float | None = None,
                frames: int | None = None) -> JsonObject:
    """W8: ``threads`` producers, each into its own session, for ``seconds`` of real time
    or ``frames`` stores each (whichever is given). Frames/s summed over the producers."""
    if (seconds is None) == (frames is None):
        raise ValueError("give exactly one of seconds= or frames=")
    steps = [_producer(target, seed) for seed in range(threads)]
    start = threading.Barrier(threads + 1)
    stop = threading.Event()
    counts = [0] * threads
    spans = [0.0] * threads
    limit = frames if frames is not None else 1 << 62

    def worker(i: int) -> None:
        step = steps[i]
        n = 0
        start.wait()
        t0 = time.perf_counter()
        while n < limit and not stop.is_set():
            step()
            n += 1
        spans[i] = time.perf_counter() - t0
        counts[i] = n

    pool = [threading.Thread(target=worker, args=(i,), name=f"w8-{target}-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    start.wait()
    cpu0, wall0, machine0 = time.process_time(), time.perf_counter(), _machine_jiffies()
    if seconds is not None:
        time.sleep(seconds)  # the measurement window, not a wait for something to happen
        stop.set()
    for thread in pool:
        thread.join()
    # CPU seconds per wall second over the process: ~threads when every producer ran
    # on its own core, ~1 when the GIL (or another process) serialised them.
    wall = time.perf_counter() - wall0
    cores = (time.process_time() - cpu0) / wall
    # What the rest of the machine ran meanwhile, in cores: a busy neighbour takes the
    # second core away from the 2-thread run and the ratio with it.
    machine1 = _machine_jiffies()
    others = None
    if machine0 and machine1 and machine1[1] > machine0[1]:
        busy = (machine1[0] - machine0[0]) / (machine1[1] - machine0[1]) * (os.cpu_count() or 1)
        others = max(0.0, busy - cores)
    return {
        "threads": threads,
        "frames": sum(counts),
        "seconds": max(spans),
        "fps": sum(n / s for n, s in zip(counts, spans, strict=True) if s > 0),
        "cores_used": cores,
        "other_cores_busy": others,
    }


def run_fanout(target: str, subscribers: int, frames: int, *, interval: float | None = None,
               buffer: int = W9_BUFFER, size: int = W9_FRAME_BYTES, join_timeout: float = 120.0) -> JsonObject:
    """W9: one producer stores ``frames`` frames, as fast as it can (``interval=None``) or
    one every ``interval`` seconds of real time; each subscriber is drained by its own
    thread with ``get()``. Reports throughput, store-to-receive latency, and the
    accounting check: per subscriber, received + dropped == stored ("lost" otherwise).

    Free-running measures throughput; a paced producer leaves the readers time to run, so
    its latencies show how promptly a blocked ``get()`` wakes rather than how long a
    frame sat in a full queue."""
    session = make_session(target)
    subs = [session.subscribe_visual_frames(buffer) for _ in range(subscribers)]
    pool_size = 16
    payloads = [payload(size, seed) for seed in range(pool_size)]
    prefixes = [bytes(p[:16]) for p in payloads]
    sent_ns = np.zeros(frames, dtype=np.int64)
    received: list[list[tuple[int, int]]] = [[] for _ in subs]
    corrupt = [0] * subscribers
    ready = threading.Barrier(subscribers + 1)

    def consume(i: int) -> None:
        get = subs[i].get
        out = received[i]
        clock = time.perf_counter_ns
        ready.wait()
        try:
            while True:
                frame = get()
                out.append((frame.frame_seq, clock()))
                if bytes(frame.data[:16]) != prefixes[frame.frame_seq % pool_size]:
                    corrupt[i] += 1
        except _CLOSED:
            pass

    pool = [threading.Thread(target=consume, args=(i,), name=f"w9-{target}-{i}") for i in range(subscribers)]
    for thread in pool:
        thread.start()
    store = session.store_frame
    clock = time.perf_counter_ns
    ready.wait()
    interval_ns = 0 if interval is None else int(interval * 1e9)
    t_start = due = clock()
    now = 0.0
    for seq in range(frames):
        now += TICK
        if interval_ns:
            due += interval_ns
            wait = due - clock()
            if wait > 0:
                time.sleep(wait / 1e9)  # pacing the producer in real time
        sent_ns[seq] = clock()
        store(payloads[seq % pool_size], source="camera", max_recent=2, min_interval=0.0,
              frame_seq=seq, now=now)
    t_stored = clock()
    for sub in subs:
        sub.close()
    for thread in pool:
        thread.join(join_timeout)
    hung = sum(thread.is_alive() for thread in pool)

    latencies = []
    per_sub = []
    last_recv = t_stored
    for sub, got in zip(subs, received, strict=True):
        seqs = np.fromiter((s for s, _ in got), dtype=np.int64, count=len(got))
        times = np.fromiter((t for _, t in got), dtype=np.int64, count=len(got))
        if len(got):
            latencies.append(times - sent_ns[seqs])
            last_recv = max(last_recv, int(times.max()))
        in_order = bool(np.all(np.diff(seqs) > 0)) if len(seqs) > 1 else True
        per_sub.append({
            "received": len(got),
            "delivered": int(sub.delivered),
            "dropped": int(sub.dropped),
            "lost": frames - len(got) - int(sub.dropped),
            "in_order": in_order,
        })
    lat = np.concatenate(latencies) if latencies else np.zeros(0, dtype=np.int64)
    total_received = sum(s["received"] for s in per_sub)
    span_s = (last_recv - t_start) / 1e9
    p50 = float(np.percentile(lat, 50)) / 1e3 if lat.size else float("nan")
    p99 = float(np.percentile(lat, 99)) / 1e3 if lat.size else float("nan")
    return {
        "subscribers": subscribers,
        "frames": frames,
        "interval_s": interval,
        "buffer": buffer,
        "frame_bytes": size,
        "stored_fps": frames / ((t_stored - t_start) / 1e9),
        "delivered_fps": total_received / span_s,
        "delivered_fps_per_subscriber": total_received / subscribers / span_s,
        "received": total_received,
        "dropped": sum(s["dropped"] for s in per_sub),
        "lost": sum(s["lost"] for s in per_sub),
        "counter_mismatch": sum(s["delivered"] != s["received"] for s in per_sub),
        "out_of_order": sum(not s["in_order"] for s in per_sub),
        "corrupt": sum(corrupt),
        "hung_readers": hung,
        "p50_us": p50,
        "p99_us": p99,
        "p99_over_p50": p99 / p50 if lat.size and p50 > 0 else float("nan"),
        "per_subscriber": per_sub,
    }
