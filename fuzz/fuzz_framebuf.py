"""Coverage-guided fuzzing of the compiled frame ring, differential against the pure twin.

Each input is read as a small program: a sequence of operations on one session, among
them store_frame (buffers of any dtype, byte order, shape and strides, 0-d, Fortran
order, zero and negative strides, frames the ring handed out fed back in),
store_visual_frame, ingest_visual_frame, subscribe_visual_frames, get / get_nowait /
close / dropping a subscription without close, latest_visual_frames, start/stop input and
moving the fake clock. Arguments come from valid values and hostile ones (wrong types,
+-2**63, 2**100, NaN, +-inf, -0.0, 1e300, timedeltas, odd strings). The program runs on a
Cython session and on a pure-Python session side by side. After every operation:

- the outcome must be the same on both (same result, or the same exception type);
- an exception must be TypeError/ValueError/OverflowError (or queue.Empty /
  SubscriptionClosed from a read), and a rejected call must change neither session;
- visual_stats, the frames held (every field and byte), every subscription's counters
  and the subscriber count must be identical on both twins.

Hardening operations (the ones that found the hardening issue's bugs):

- weak references to handed-out arrays, dereferenced later (a resurrected array must
  have the bytes it had), and records edited behind the API with object.__setattr__
  (data=None, a forged received_at, ...; the reader keeps the array): the twins' states
  must stay identical and every held array unchanged;
- _testbuffer arrays of 0..128 dimensions, C, Fortran or PIL-style (suboffsets);
- valid arguments passed as int/float/str subclasses whose __index__/__float__/__str__/
  __eq__ lie (both twins must read the value);
- a store while finalizers in reference cycles read the same session (gc threshold 1..5);
- a storm on a scratch session per twin (what completes there is timing, so only
  invariants are checked): finalizers that store, read, subscribe and close during
  stores, and a KeyboardInterrupt at a drawn Python function entry of some stores; the
  books must balance after every store and a store afterwards must reach every open
  subscriber. The known pure-twin bug (an interrupt at the fan-out's entry leaves frames
  pending) is counted as "known" unless --strict-known is given.

Anything else raises, and atheris saves the input as a crash file.

Run (atheris; the usual libFuzzer flags apply):
    .venv/bin/python fuzz/fuzz_framebuf.py -atheris_runs=200000 fuzz/corpus
    .venv/bin/python fuzz/fuzz_framebuf.py -max_total_time=60 fuzz/corpus
    .venv/bin/python fuzz/fuzz_framebuf.py crash-<sha1>          # replay one input
Without atheris (a plain seeded random-input loop over the same program decoder):
    .venv/bin/python fuzz/fuzz_framebuf.py --no-atheris --runs 20000 --seed 1
    .venv/bin/python fuzz/fuzz_framebuf.py --no-atheris --replay crash-<sha1>
    .venv/bin/python fuzz/fuzz_framebuf.py --no-atheris --runs 2000 --seed 1 --counts   # what was tried

Coverage feedback reaches the Python layers (argument checks, ingest rules, the pure
twin); the compiled ring is not instrumented, so inside it this is a differential
random search steered by what the Python side does.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import gc
import math
import os
import random
import sys
import time
import weakref

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The twin-comparison toolkit (frame_key, compared, Twin, lie) is the test suite's own,
# tests/support.py. It imports the package, so main() imports it once atheris has
# instrumented the package (a module imported before that gets no coverage feedback).
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
support = None
# What the hardening operations tried, printed at the end of a --no-atheris run.
COUNTS: collections.Counter = collections.Counter()
# Known bugs (tests/test_fuzz.py holds them as strict xfails): by default their symptoms
# are counted as "known" instead of failing the run, so the search goes on; --strict-known
# makes them failures again.
STRICT_KNOWN = False

try:
    import _testbuffer
except ImportError:  # a CPython without its test modules: those buffers are not made
    _testbuffer = None


class Reader:
    """Turns fuzzer bytes into choices, deterministically; past the end everything is 0."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def more(self) -> bool:
        return self.pos < len(self.data)

    def int(self, low: int, high: int) -> int:
        span = high - low + 1
        value = 0
        for _ in range((span.bit_length() + 7) // 8):
            value = (value << 8) | self.byte()
        return low + value % span

    def pick(self, options):
        return options[self.int(0, len(options) - 1)]

    def chance(self, percent: int) -> bool:
        return self.int(0, 99) < percent

    def raw(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk + bytes(n - len(chunk))


NAN = float("nan")
HOSTILE = [
    None, "1", b"1", [], object(), 1 + 2j, True, False, NAN, math.inf, -math.inf, -0.0, 1e300, -1e300, 5e-324,
    2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**100, -(2**100), np.int64(3), np.float32(1.5),
    dt.timedelta(0), dt.timedelta.max, dt.timedelta.min, dt.timedelta(seconds=-1), 4.7e9,
]
TEXT = ["cam", "cam", "other", "", "\x00", "\ud800", "é" * 50]
DTYPES = ["u1", "i1", "<i2", ">i2", "<u4", ">f4", "<f8", ">c8", "?", "S3", "V5", "<f2", [("a", "<i4"), ("b", ">f8")]]
MIMES = ["image/jpeg", "video/x-raw-rgb", "video/x-raw-gray", "video/x-raw-bgra", "image/png", ""]


def value(r: Reader, valid):
    """A valid value (a list to pick from, or a callable) or, 1 time in 6, a hostile one;
    1 time in 8 a valid one is passed as a lying int/float/str subclass."""
    if r.chance(17):
        return r.pick(HOSTILE + TEXT)
    v = valid(r) if callable(valid) else r.pick(valid)
    if r.chance(12):
        COUNTS["lying_subclass_arguments"] += 1
        return support.lie(v)
    return v


def testbuffer(r: Reader):
    """A _testbuffer.ndarray of 0..128 dimensions (a few of 2..4 items), C, Fortran or
    PIL-style (suboffsets), sometimes sliced with negative or stepped strides."""
    ndim = r.pick([0, 1, 2, 3, 63, 64, 65, 66, 127, 128, r.int(0, 128)])
    shape = [1] * ndim
    for _ in range(r.int(0, 3) if ndim else 0):
        shape[r.int(0, ndim - 1)] = r.int(2, 4)
    count = int(np.prod(shape)) if shape else 1
    items = list(r.raw(count))
    layout = r.int(0, 3)
    flags = [0, _testbuffer.ND_FORTRAN, _testbuffer.ND_PIL, _testbuffer.ND_PIL][layout] if ndim else 0
    data = _testbuffer.ndarray(items if ndim else items[0], shape=shape, format="B", flags=flags)
    if ndim and r.chance(30):
        data = data[tuple(r.pick([slice(None), slice(None, None, -1), slice(None, None, 2), slice(1, None)])
                          for _ in range(min(ndim, 3)))]
    COUNTS["testbuffer_over_64_dims" if ndim > 64 else "testbuffer_up_to_64_dims"] += 1
    return data


def buffer(r: Reader):
    kind = r.int(0, 9)
    if kind == 9 and r.chance(10):
        # A rare big frame (up to 4 MB), cheap to make: crosses the no-GIL copy size.
        size = r.int(16_000, 4 << 20)
        return np.frombuffer(r.raw(16), dtype=np.uint8).repeat(size // 16 + 1)[:size][:: r.pick([1, 1, 2, -1])]
    if kind <= 2:
        raw = r.raw(r.int(0, 300))
        return [raw, bytearray(raw), memoryview(raw)][kind]
    if kind == 3:
        if _testbuffer is not None and r.chance(50):
            return testbuffer(r)
        return r.pick(["frame", None, 5, 1.5, [1, 2], object()])
    dtype = np.dtype(r.pick(DTYPES))
    shape = tuple(r.int(0, 5) for _ in range(r.int(0, 4)))
    count = int(np.prod(shape)) if shape else 1
    base = np.frombuffer(r.raw(count * dtype.itemsize), dtype=dtype).reshape(shape).copy()
    layout = r.int(0, 6)
    if layout == 1:
        return np.asfortranarray(base)
    if layout == 2 and base.ndim:
        return base[(slice(None, None, -1),) * base.ndim]
    if layout == 3 and base.ndim:
        return base[(slice(None, None, 2),) * base.ndim]
    if layout == 4:
        return np.broadcast_to(base, (2,) + base.shape)
    if layout == 5:
        return base.T
    return base


# Frames a program edited behind the API (object.__setattr__), by id: (frame, its key
# before the edit). A reader handed the same record again compares as the original (the
# pure twin shares one record between latest readers and subscribers, the compiled one
# makes one per fan-out), while the books, the held arrays and every other frame are
# still compared.
EDITED: dict = {}
RECORD_EDITS = [("data", None), ("data", b"forged"), ("received_at", -1e9), ("received_at", NAN), ("source", "forged"),
                ("frame_seq", -7), ("width", 2**40), ("mime_type", None)]


def decode_op(r: Reader, twins):
    """One operation as (name, function(twin) -> result)."""
    from capsule_sessions import VisualFrame, VisualInputConfig

    op = r.int(0, 17)
    if op >= 13:
        return decode_hardening_op(r, op)
    if op in (0, 1):
        data = buffer(r)
        kw = dict(source=value(r, TEXT), max_recent=value(r, lambda r: r.int(-2, 9)),
                  min_interval=value(r, [0.0, 0.0, 0.5, 2.0]), mime_type=value(r, MIMES),
                  width=value(r, lambda r: r.int(-3, 5000)), height=value(r, lambda r: r.int(-3, 5000)),
                  timestamp_ms=value(r, lambda r: r.int(-(2**63), 2**63 - 1)),
                  frame_seq=value(r, lambda r: r.int(0, 2**63 - 1)), now=value(r, [None, None, 999.0, 1001.5]))
        if op == 0:
            return "store_frame", lambda t: t.session.store_frame(data, **kw)
        frame = VisualFrame(data, kw["mime_type"], kw["width"], kw["height"], kw["source"], kw["timestamp_ms"],
                            kw["frame_seq"])
        return "store_visual_frame", lambda t: t.session.store_visual_frame(frame, kw["max_recent"], kw["min_interval"],
                                                                             kw["now"])
    if op == 2:
        mime = r.pick(MIMES)
        width, height = r.int(-1, 40), r.int(-1, 40)
        channels = {"video/x-raw-rgb": 3, "video/x-raw-gray": 1, "video/x-raw-bgra": 4}.get(mime, 1)
        size = width * height * channels if r.chance(70) and width > 0 and height > 0 else r.int(0, 5000)
        head = b"\xff\xd8\xff" if r.chance(80) else r.raw(3)
        data = (head + r.raw(max(size - 3, 0)))[:size]
        frame = VisualFrame(data, mime, width, height, value(r, TEXT), 0, r.int(0, 1000))
        try:
            config = VisualInputConfig(frame_interval=r.pick([0.0, 0.5, 1.0]), max_width=r.int(1, 64),
                                       max_height=r.int(1, 64), max_frame_bytes=r.int(1, 6000),
                                       max_recent_frames=r.int(-1, 5), mime_types=tuple(MIMES[: r.int(1, 5)]))
        except support.REJECTED:
            config = VisualInputConfig()
        now = value(r, [None, 1000.5])
        return "ingest_visual_frame", lambda t: t.session.ingest_visual_frame(frame, config, now)
    if op == 3:
        size, policy = value(r, lambda r: r.int(-1, 6)), value(r, ["drop_newest", "drop_oldest"])

        def subscribe(t):
            sub = t.session.subscribe_visual_frames(size, policy=policy)
            t.subs.append(sub)
            return sub

        return "subscribe", subscribe
    if op in (4, 5, 6, 7):
        index = r.int(0, 7)
        timeout = r.pick([0, 0.0, 1e-6, None, 3600.0, -1.0, NAN, "x", dt.timedelta(0), 1e300])

        def on_sub(t):
            if not t.subs:
                return "no subscription"
            sub = t.subs[index % len(t.subs)]
            if op == 4:
                return sub.get_nowait()
            if op == 5:
                # Never block: a long or endless wait only where it cannot wait.
                wait = timeout if (sub.qsize() or sub.closed or timeout not in (None, 3600.0, 1e300)) else 0
                return sub.get(timeout=wait)
            if op == 6:
                return sub.close()
            del t.subs[index % len(t.subs)]  # dropped without close()
            return None

        return ["get_nowait", "get", "close", "drop"][op - 4], on_sub
    if op == 8:
        ttl, now = value(r, [0.0, 0.5, 1.0, 5.0, -1.0, math.inf]), value(r, [None, 1000.0, 1003.0])
        return "latest_visual_frames", lambda t: t.session.latest_visual_frames(ttl, now)
    if op == 9:
        source, now, start = value(r, TEXT), value(r, [None, 1000.0]), r.chance(50)
        if start:
            return "start_visual_input", lambda t: t.session.start_visual_input(source, now)
        return "stop_visual_input", lambda t: t.session.stop_visual_input(source, now)
    if op == 10:
        step = r.pick([0.0, 0.25, 0.5, 1.0, 10.0, -1.0])

        def advance(t):
            t.clock.advance(step)

        return "advance_clock", advance
    if op == 11:
        index, kw = r.int(0, 7), dict(source="cam", max_recent=r.int(1, 4))

        def feed_back(t):
            held = t.session.latest_visual_frames(math.inf)
            if not held:
                return None
            return t.session.store_frame(held[index % len(held)].data, **kw)

        return "feed_back", feed_back
    return "visual_stats", lambda t: t.session.visual_stats()


# -- the hardening operations ------------------------------------------------------


class Finalizer:
    """Garbage in a reference cycle whose __del__ calls ``action``: a collection runs it
    wherever the interpreter allocates, in the middle of whatever call runs then."""

    def __init__(self, action) -> None:
        self.action = action
        self.cycle = self

    def __del__(self) -> None:
        self.action()


def decode_hardening_op(r: Reader, op: int):
    index = r.int(0, 7)
    if op == 13:  # keep only a weak reference to a handed-out array
        def weak(t):
            frames = t.session.latest_visual_frames(math.inf)
            if frames and id(frames[index % len(frames)]) not in EDITED:
                frame = frames[index % len(frames)]
                t.weak.append((weakref.ref(frame.data), bytes(frame.data)))
                COUNTS["weak_references_taken"] += 1
        return "weakref", weak
    if op == 14:  # dereference them (a resurrected array must have its bytes), maybe keep
        keep = r.chance(30)

        def deref(t):
            for ref, want in t.weak:
                array = ref()
                if array is None:
                    continue
                COUNTS["weak_references_resurrected"] += 1
                if bytes(array) != want:
                    raise AssertionError(f"{t.backend}: an array resurrected from a weak reference has foreign bytes")
                if keep:
                    t.held.append((array, want))
        return "deref", deref
    if op == 15:  # edit a record behind the API, keep its array
        field, new = r.pick(RECORD_EDITS)

        def edit(t):
            frames = t.session.latest_visual_frames(math.inf)
            if frames and id(frames[index % len(frames)]) not in EDITED:
                frame = frames[index % len(frames)]
                EDITED[id(frame)] = (frame, support.frame_key(frame))
                t.held.append((frame.data, bytes(frame.data)))
                object.__setattr__(frame, field, new)
                COUNTS["records_edited"] += 1
        return "edit_record", edit
    if op == 16:  # a store while finalizers read the same session (gc threshold low)
        threshold, kinds = r.pick([1, 1, 2, 3, 5]), [r.pick(["stats", "latest"]) for _ in range(r.int(1, 4))]
        size, keep = r.int(0, 20000), r.int(1, 4)

        def store_with_reading_finalizers(t):
            failures = []

            def read(kind):
                def action():
                    try:  # reads always complete, on both twins, whoever calls them
                        t.session.visual_stats() if kind == "stats" else t.session.latest_visual_frames(math.inf)
                        COUNTS["finalizer_reads"] += 1
                    except BaseException as exc:  # noqa: BLE001
                        failures.append(repr(exc))
                return action

            old = gc.get_threshold()
            gc.set_threshold(threshold)
            try:
                for kind in kinds:
                    Finalizer(read(kind))
                stored = t.session.store_frame(bytes([size % 256]) * size, source="cam", max_recent=keep)
            finally:
                gc.set_threshold(*old)
            gc.collect(1)
            if failures:
                raise AssertionError(f"{t.backend}: a read from a finalizer failed: {failures}")
            return stored
        return "store_with_reading_finalizers", store_with_reading_finalizers
    plan = decode_storm(r)
    return "storm", lambda t: run_storm(t.backend, plan)


STORM_CALLS = ["store", "store", "stats", "latest", "close", "subscribe", "get"]


def decode_storm(r: Reader) -> dict:
    steps = []
    for _ in range(r.int(1, 12)):
        kind = r.pick(["store", "store", "store", "subscribe", "close", "get"])
        steps.append((kind, [r.pick(STORM_CALLS) for _ in range(r.int(0, 3))], r.int(1, 40) if r.chance(40) else None,
                      r.int(0, 7)))
    return {"threshold": r.pick([1, 1, 2, 3, 5, 8]), "steps": steps}


def run_storm(backend: str, plan: dict):
    """On a scratch session (what completes there is timing, so not compared): stores with
    finalizers that store, read, subscribe and close on the same session (gc threshold
    low), some with a KeyboardInterrupt at their n-th Python function entry. Checked:
    re-entered calls complete or raise RuntimeError(REENTERED_MESSAGE); after every store
    the books balance (exactly for what the top level did, within bounds for callbacks);
    a store afterwards is offered once to every open subscriber. Returns None, so the
    twins compare equal whatever completed."""
    from capsule_sessions import Session
    from capsule_sessions.errors import REENTERED_MESSAGE

    session = Session("storm", clock=lambda: 1000.0, backend=backend)
    recs = []  # [sub, (accepted before, after) subscribing, (before, after, slack) closing or None]
    depth, unsettled, failures = [0], [0], []
    seq = [0]

    def accepted():
        return session.visual_stats()["accepted"]

    def store():
        seq[0] += 1
        depth[0] += 1
        unsettled[0] += 1
        try:
            return session.store_frame(bytes([seq[0] % 256]) * (seq[0] % 50), source="cam", max_recent=3)
        finally:
            depth[0] -= 1
            if not depth[0]:
                unsettled[0] = 0

    def subscribe(n):
        before = accepted()
        sub = session.subscribe_visual_frames(1 + n % 3, policy=["drop_newest", "drop_oldest"][n % 2])
        recs.append([sub, (before, accepted()), None])

    def close(n):
        open_ = [rec for rec in recs if rec[2] is None]
        if open_:
            rec = open_[n % len(open_)]
            before, slack = accepted(), unsettled[0]
            rec[0].close()
            rec[2] = (before, accepted(), slack)

    def get(n):
        if recs:
            try:
                recs[n % len(recs)][0].get_nowait()
            except support.READ_ENDS:
                pass

    def call(kind, n):
        return {"store": lambda: store(), "stats": session.visual_stats,
                "latest": lambda: session.latest_visual_frames(math.inf), "close": lambda: close(n),
                "subscribe": lambda: subscribe(n), "get": lambda: get(n)}[kind]()

    in_finalizer = [0]

    def finalizer(kind, n):
        def action():
            in_finalizer[0] += 1  # no interrupt is injected here: the harness books what it calls
            try:
                call(kind, n)
                COUNTS[f"storm_finalizer_{kind}_completed"] += 1
            except RuntimeError as exc:
                if str(exc) != REENTERED_MESSAGE:
                    failures.append(f"{kind}: RuntimeError({exc})")
                COUNTS[f"storm_finalizer_{kind}_reentered"] += 1
            except BaseException as exc:  # noqa: BLE001
                failures.append(f"{kind}: {type(exc).__name__}({exc})")
            finally:
                in_finalizer[0] -= 1
        return action

    def books_ok(final: bool) -> bool:
        enabled = gc.isenabled()
        gc.disable()  # no finalizer may store while the books are read
        try:
            end = accepted()
            for sub, (o0, o1), closed in recs:
                low, high = (end - o1, end - o0) if closed is None else (closed[0] - o1 - closed[2], closed[1] - o0)
                if not low <= sub.delivered + sub.dropped + sub.qsize() <= high:
                    return False
            return True
        finally:
            if enabled:
                gc.enable()

    def describe(recs):
        return [(sub.delivered, sub.dropped, sub.qsize(), opened, closed) for sub, opened, closed in recs]

    def known_pure_runner_bug() -> bool:
        ring = session._ring
        return backend == "python" and bool(ring._fan.pending) and not STRICT_KNOWN

    subscribe(0)
    subscribe(1)
    old = gc.get_threshold()
    gc.set_threshold(plan["threshold"])
    try:
        for kind, garbage, interrupt_at, n in plan["steps"]:
            if kind != "store":
                call(kind, n)
                continue
            for g in garbage:
                Finalizer(finalizer(g, n))
            seen, where = [0], [None]

            def tracer(frame, event, arg):
                # The library's (and the stdlib's) function entries; not this harness's, and
                # no __del__ (CPython prints and drops an exception raised in a finalizer).
                if (event == "call" and frame.f_code.co_filename != __file__ and not in_finalizer[0]
                        and frame.f_code.co_name != "__del__"):
                    seen[0] += 1
                    if seen[0] == interrupt_at:
                        sys.settrace(None)
                        where[0] = f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)})"
                        raise KeyboardInterrupt
                return None

            previous = sys.gettrace()
            if interrupt_at is not None:
                sys.settrace(tracer)
            try:
                store()
            except KeyboardInterrupt:
                COUNTS["storm_store_interrupted"] += 1
            finally:
                sys.settrace(previous)
            COUNTS["storm_stores"] += 1
            if not books_ok(False):
                if known_pure_runner_bug():
                    COUNTS["known_pure_frame_left_pending_after_interrupt"] += 1
                    return None
                raise AssertionError(f"{backend}: books unbalanced after a store (KeyboardInterrupt at the entry of "
                                     f"{where[0]}; finalizers {garbage}): accepted {accepted()}, subscribers "
                                     f"(delivered, dropped, queued, accepted at subscribe, at close) {describe(recs)}")
    finally:
        gc.set_threshold(*old)
    gc.collect(1)
    if failures:
        raise AssertionError(f"{backend}: re-entered calls failed: {failures[:3]}")
    open_ = [rec for rec in recs if rec[2] is None]
    before = [rec[0].delivered + rec[0].dropped + rec[0].qsize() for rec in open_]
    if store() is not True:
        raise AssertionError(f"{backend}: the session refuses stores after the storm")
    after = [rec[0].delivered + rec[0].dropped + rec[0].qsize() for rec in open_]
    if [a - b for a, b in zip(after, before, strict=True)] != [1] * len(open_) or not books_ok(True):
        if known_pure_runner_bug():
            COUNTS["known_pure_runner_left_set_after_interrupt"] += 1
            return None
        raise AssertionError(f"{backend}: a store after the storm was not offered once to every subscriber")
    return None


def run_program(data: bytes) -> None:
    EDITED.clear()
    r = Reader(data)
    twins = [support.Twin("cython"), support.Twin("python")]
    steps = 0
    while r.more() and steps < 64:
        steps += 1
        name, call = decode_op(r, twins)
        before = [t.state(EDITED) for t in twins]
        results = [support.compared(lambda: call(t), reads=support.READ_ENDS, edited=EDITED) for t in twins]
        after = [t.state(EDITED) for t in twins]
        if results[0] != results[1]:
            raise AssertionError(f"step {steps} {name}: cython {results[0]} != python {results[1]}")
        if results[0][0] == "rejected" and name not in ("drop",):
            for b, a, t in zip(before, after, ("cython", "python"), strict=True):
                if a != b:
                    raise AssertionError(f"step {steps} {name}: rejected ({results[0][1]}) but {t} changed")
        if after[0] != after[1]:
            raise AssertionError(f"step {steps} {name}: states differ\ncython {after[0]}\npython {after[1]}")
        for t in twins:
            t.check_held()
        COUNTS[f"op_{name}"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--no-atheris", action="store_true")
    parser.add_argument("--runs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--replay")
    parser.add_argument("--strict-known", action="store_true",
                        help="fail on the known bugs' symptoms too (tests/test_fuzz.py's strict xfails)")
    parser.add_argument("--counts", action="store_true", help="print what the hardening operations tried")
    args, rest = parser.parse_known_args()
    global STRICT_KNOWN, support
    STRICT_KNOWN = args.strict_known

    if args.no_atheris:
        import capsule_sessions
        import support

        if "cython" not in capsule_sessions.available_backends():
            sys.exit("fuzz_framebuf: the Cython backend is not built (make build)")
        if args.replay:
            with open(args.replay, "rb") as f:
                run_program(f.read())
            print("replayed without failure")
            return
        rng = random.Random(args.seed)
        started = time.monotonic()
        for run in range(args.runs):
            data = rng.randbytes(rng.randint(0, args.max_len))
            try:
                run_program(data)
            except BaseException:
                path = f"crash-seed{args.seed}-run{run}"
                with open(path, "wb") as f:
                    f.write(data)
                print(f"failure on run {run}; input saved to {path}", file=sys.stderr)
                raise
        print(f"{args.runs} programs, no failure, {time.monotonic() - started:.1f} s (seed {args.seed})")
        if args.counts:
            for key, n in sorted(COUNTS.items()):
                print(f"  {key}: {n}")
        return

    try:
        import atheris
    except ImportError:
        sys.exit("fuzz_framebuf: atheris is not installed (pip install atheris), "
                 "or run the plain random loop: fuzz/fuzz_framebuf.py --no-atheris")
    with atheris.instrument_imports():
        import capsule_sessions  # noqa: F401 - instrumented for coverage feedback
        import capsule_sessions._framebuf_py  # noqa: F401
        import capsule_sessions._validate  # noqa: F401
        import capsule_sessions.ingest  # noqa: F401
    import support
    if "cython" not in capsule_sessions.available_backends():
        sys.exit("fuzz_framebuf: the Cython backend is not built (make build)")
    atheris.Setup([sys.argv[0]] + rest, run_program)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
