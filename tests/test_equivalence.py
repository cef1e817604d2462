"""Both backends, driven by the same random operations, give identical results byte for byte.

A hypothesis state machine holds one Session per backend, each on its own fake clock
moved in lock step, and applies every operation to both: stores of random sizes (0 to
64 KiB) from several sources and buffer types, clock steps (zero and backwards
included), rate limits, TTLs, ring sizes, subscriptions of both policies, reads, closes,
start/stop of visual input. Return values, raised exception types, frames (every field
and every byte) and all counters must agree after every step.

It needs two different backends. With only one built the test is skipped, unless
CAPSULE_SESSIONS_EQUIVALENCE_SAME=1 asks to run the harness against itself (a check
of the harness, not of the backends).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from capsule_sessions import VisualFrame, VisualInputConfig, available_backends
from support import Twin, compared, frame_key, sub_books

AVAILABLE = available_backends()
PAIR = (AVAILABLE[0], AVAILABLE[-1])
SAME_OK = os.environ.get("CAPSULE_SESSIONS_EQUIVALENCE_SAME", "") == "1"

SOURCES = st.sampled_from(["", "cam", "screen", "x"])
SIZES = st.one_of(st.integers(0, 64), st.integers(0, 4096), st.integers(0, 65536))
DURATIONS = st.one_of(
    st.sampled_from([0.0, -1.0, 0.001, 0.01, 0.033, 0.5, 1.0, 10.0, math.inf, -math.inf, 0,
                     dt.timedelta(milliseconds=20), dt.timedelta(0)]),
    st.floats(-2.0, 20.0, allow_nan=False),
)
CLOCK_STEPS = st.one_of(st.sampled_from([0.0, 0.001, 0.01, 0.0333, 1.0, -0.01, -1.0]),
                        st.floats(-3.0, 30.0, allow_nan=False))
NOW = st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False))  # None, or an offset from the clock
INPUT_KINDS = st.sampled_from(["bytes", "bytearray", "memoryview", "uint8", "strided", "uint16", "2d"])


def make_input(kind: str, size: int, seed: int):
    """An input buffer of ``kind`` whose C-order bytes come from ``seed``; its nbytes may
    differ from ``size`` where the kind needs whole elements."""
    raw = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    if kind == "bytes":
        return raw.tobytes()
    if kind == "bytearray":
        return bytearray(raw.tobytes())
    if kind == "memoryview":
        return memoryview(raw.tobytes())
    if kind == "uint8":
        return raw
    if kind == "strided":
        return np.repeat(raw, 2)[::2]  # same bytes, non-contiguous
    if kind == "uint16":
        return raw[: size - size % 2].view(np.uint16)
    return raw[: size - size % 4].reshape(-1, 4)  # 2d


def agreed(call):
    """What a call did on one backend, as both must agree on it: any exception counts,
    by type."""
    return compared(call, catch=Exception)


class BackendsAgree(RuleBasedStateMachine):
    subs = Bundle("subs")

    def __init__(self):
        super().__init__()
        twins = tuple(Twin(b, "eq", 100.0) for b in PAIR)
        self.clocks = tuple(t.clock for t in twins)
        self.sessions = tuple(t.session for t in twins)
        self.live = []

    def both(self, method, *args, **kwargs):
        a, b = (agreed(lambda s=s: getattr(s, method)(*args, **kwargs)) for s in self.sessions)
        assert a == b, f"{method}{args}{kwargs}: {PAIR[0]} gave {a!r:.300}, {PAIR[1]} gave {b!r:.300}"
        return a

    def now(self, offset):
        return None if offset is None else self.clocks[0]() + offset

    @rule(step=CLOCK_STEPS)
    def advance(self, step):
        for c in self.clocks:
            c.advance(step)

    @rule(kind=INPUT_KINDS, size=SIZES, seed=st.integers(0, 2**32 - 1), source=SOURCES,
          max_recent=st.integers(-1, 5), min_interval=DURATIONS, now=NOW,
          seq=st.integers(-(2**63), 2**63 - 1), ts=st.integers(-(2**63), 2**63 - 1),
          width=st.integers(-(2**31), 2**31 - 1), height=st.integers(0, 4000),
          mime=st.sampled_from(["", "image/jpeg", "video/x-raw-rgb"]))
    def store_frame(self, kind, size, seed, source, max_recent, min_interval, now, seq, ts, width, height, mime):
        data = make_input(kind, size, seed)
        self.both("store_frame", data, source=source, max_recent=max_recent, min_interval=min_interval,
                  mime_type=mime, width=width, height=height, timestamp_ms=ts, frame_seq=seq, now=self.now(now))

    @rule(size=SIZES, seed=st.integers(0, 2**32 - 1), source=SOURCES, max_recent=st.integers(-1, 5),
          min_interval=DURATIONS, now=NOW, seq=st.integers(0, 1000))
    def store_visual_frame(self, size, seed, source, max_recent, min_interval, now, seq):
        frame = VisualFrame(make_input("bytes", size, seed), "image/jpeg", 4, 3, source, 7, seq)
        self.both("store_visual_frame", frame, max_recent, min_interval, self.now(now))

    @rule(ok=st.booleans(), size=st.integers(0, 80), max_recent=st.integers(-1, 4),
          interval=st.sampled_from([0.0, 0.01, 0.5]), now=NOW)
    def ingest(self, ok, size, max_recent, interval, now):
        magic = b"\xff\xd8\xff" if ok else b"\x00\xd8\xff"
        frame = VisualFrame(magic + bytes(size), "image/jpeg", 640, 480, "cam", 1, size)
        config = VisualInputConfig(frame_interval=interval, max_recent_frames=max_recent, max_frame_bytes=64)
        self.both("ingest_visual_frame", frame, config, self.now(now))

    @rule(ttl=DURATIONS, now=NOW)
    def latest(self, ttl, now):
        self.both("latest_visual_frames", ttl, now=self.now(now))

    @rule(source=SOURCES, now=NOW)
    def start(self, source, now):
        self.both("start_visual_input", source, now=self.now(now))

    @rule(source=SOURCES, now=NOW)
    def stop(self, source, now):
        self.both("stop_visual_input", source, now=self.now(now))

    @rule(now=NOW)
    def touch(self, now):
        self.both("touch", now=self.now(now))

    @rule(target=subs, buffer=st.integers(-1, 5), policy=st.sampled_from(["drop_newest", "drop_oldest"]))
    def subscribe(self, buffer, policy):
        pair = tuple(s.subscribe_visual_frames(buffer, policy=policy) for s in self.sessions)
        self.live.append(pair)
        return pair

    @rule(pair=subs, how=st.sampled_from(["get_nowait", "get0", "aget0"]))
    def read(self, pair, how):
        if how == "get_nowait":
            results = [agreed(sub.get_nowait) for sub in pair]
        elif how == "get0":
            results = [agreed(lambda s=sub: s.get(timeout=0)) for sub in pair]
        else:
            results = [agreed(lambda s=sub: asyncio.run(s.aget(timeout=0))) for sub in pair]
        assert results[0] == results[1], f"{how}: {results[0]!r:.300} != {results[1]!r:.300}"

    @rule(pair=subs, alias=st.booleans())
    def close(self, pair, alias):
        for sub in pair:
            sub.unsubscribe() if alias else sub.close()

    @rule(pair=subs)
    def drain_if_closed(self, pair):
        if pair[0].closed and pair[1].closed:
            assert [frame_key(f) for f in pair[0]] == [frame_key(f) for f in pair[1]]

    @invariant()
    def counters_agree(self):
        a, b = self.sessions
        assert a.visual_stats() == b.visual_stats()
        assert a.last_active_at == b.last_active_at
        for x, y in self.live:
            assert sub_books(x) + (x.maxsize, x.policy) == sub_books(y) + (y.maxsize, y.policy)

    def teardown(self):
        for pair in self.live:
            for sub in pair:
                sub.close()


TestBackendsAgree = BackendsAgree.TestCase
TestBackendsAgree.settings = settings(
    max_examples=300,  # about 5 s; enough to catch an off-by-one in max_recent (checked by sabotage)
    stateful_step_count=60,
    deadline=None,
    database=None,  # no .hypothesis directory in the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestBackendsAgree = pytest.mark.skipif(
    PAIR[0] == PAIR[1] and not SAME_OK,
    reason=f"needs two backends to compare; only {AVAILABLE} is available (the Cython extension is not built)",
)(TestBackendsAgree)
