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

Anything else raises, and atheris saves the input as a crash file.

Run (atheris; the usual libFuzzer flags apply):
    .venv/bin/python fuzz/fuzz_framebuf.py -atheris_runs=200000 fuzz/corpus
    .venv/bin/python fuzz/fuzz_framebuf.py -max_total_time=60 fuzz/corpus
    .venv/bin/python fuzz/fuzz_framebuf.py crash-<sha1>          # replay one input
Without atheris (a plain seeded random-input loop over the same program decoder):
    .venv/bin/python fuzz/fuzz_framebuf.py --no-atheris --runs 20000 --seed 1
    .venv/bin/python fuzz/fuzz_framebuf.py --no-atheris --replay crash-<sha1>

Coverage feedback reaches the Python layers (argument checks, ingest rules, the pure
twin); the compiled ring is not instrumented, so inside it this is a differential
random search steered by what the Python side does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import queue
import random
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ALLOWED = (TypeError, ValueError, OverflowError)


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
    """A valid value (a list to pick from, or a callable) or, 1 time in 6, a hostile one."""
    if r.chance(17):
        return r.pick(HOSTILE + TEXT)
    return valid(r) if callable(valid) else r.pick(valid)


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


def frame_key(frame) -> tuple:
    data = frame.data
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1 and not data.flags.writeable):
        raise AssertionError(f"a handed-out frame's data is not a read-only 1-D uint8 array: {data!r}")
    return (frame.frame_seq, frame.source, frame.mime_type, frame.width, frame.height, frame.timestamp_ms,
            frame.received_at, bytes(data))


class Twin:
    """One backend's session, its subscriptions and its fake clock."""

    def __init__(self, backend: str) -> None:
        from capsule_sessions import Session

        self.now = [1000.0]
        self.session = Session("fuzz", clock=lambda: self.now[0], backend=backend)
        self.subs: list = []

    def state(self) -> tuple:
        s = self.session
        return (s.visual_stats(), [frame_key(f) for f in s.latest_visual_frames(math.inf)], s.last_active_at,
                s._ring.subscriber_count, [(x.qsize(), x.dropped, x.delivered, x.closed) for x in self.subs])


def outcome(call):
    from capsule_sessions import SubscriptionClosed

    try:
        result = call()
    except ALLOWED as exc:
        return ("rejected", type(exc).__name__)
    except (queue.Empty, SubscriptionClosed) as exc:
        return ("read", type(exc).__name__)
    if isinstance(result, list):
        return ("ok", [frame_key(f) for f in result])
    if hasattr(result, "frame_seq") and hasattr(result, "data"):
        return ("ok", frame_key(result))
    if hasattr(result, "maxsize"):
        return ("ok", (result.maxsize, result.policy))
    return ("ok", result)


def decode_op(r: Reader, twins):
    """One operation as (name, function(twin) -> result)."""
    from capsule_sessions import VisualFrame, VisualInputConfig

    op = r.int(0, 12)
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
        return "store_visual_frame", lambda t: t.session.store_visual_frame(frame, kw["max_recent"], kw["min_interval"], kw["now"])
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
        except ALLOWED:
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
            t.now[0] += step

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


def run_program(data: bytes) -> None:
    r = Reader(data)
    twins = [Twin("cython"), Twin("python")]
    steps = 0
    while r.more() and steps < 64:
        steps += 1
        name, call = decode_op(r, twins)
        before = [t.state() for t in twins]
        results = [outcome(lambda: call(t)) for t in twins]
        after = [t.state() for t in twins]
        if results[0] != results[1]:
            raise AssertionError(f"step {steps} {name}: cython {results[0]} != python {results[1]}")
        if results[0][0] == "rejected" and name not in ("drop",):
            for b, a, t in zip(before, after, ("cython", "python")):
                if a != b:
                    raise AssertionError(f"step {steps} {name}: rejected ({results[0][1]}) but {t} changed")
        if after[0] != after[1]:
            raise AssertionError(f"step {steps} {name}: states differ\ncython {after[0]}\npython {after[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--no-atheris", action="store_true")
    parser.add_argument("--runs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--replay")
    args, rest = parser.parse_known_args()

    sys.path.insert(0, os.path.dirname(HERE))
    if args.no_atheris:
        import capsule_sessions

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
    if "cython" not in capsule_sessions.available_backends():
        sys.exit("fuzz_framebuf: the Cython backend is not built (make build)")
    atheris.Setup([sys.argv[0]] + rest, run_program)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
