"""Calls that re-enter a session from inside another of its calls, on every backend: a
weakref callback run when an evicted frame's array dies, a finalizer run by a garbage
collection inside the fan-out, a signal handler run between two bytecodes of a store.
Each completes or raises RuntimeError (refused re-entry); none hangs, and the books
balance afterwards.

Each scenario runs in a child process with a deadline, so a call that hangs fails the
test instead of stalling the suite. (Hypothesis draws such callbacks at every point of
a call in tests/test_fuzz.py; KeyboardInterrupt is in tests/test_faults.py.)
"""

from __future__ import annotations

import sys

from capsule_sessions import Session
from support import run_scenario

_WEAKREF_CALLBACKS = """
import weakref
from capsule_sessions import Session
from support import FakeClock, assert_books_balance, payload

clock = FakeClock()
s = Session("callbacks", clock=clock)
sub = s.subscribe_visual_frames(4)
extra = [s.subscribe_visual_frames(1) for _ in range(4)]
calls = []

def call_back(kind):
    # Runs when the array of an evicted frame dies: inside the store that evicts it.
    def callback(ref):
        try:
            if kind == "store":
                s.store_frame(b"from a callback", source="cam", max_recent=1)
            elif kind == "stats":
                s.visual_stats()
            elif kind == "latest":
                s.latest_visual_frames(10)
            elif kind == "close":
                extra.pop().close()
            else:
                s.subscribe_visual_frames(1).close()
            calls.append(kind)
        except RuntimeError as exc:  # allowed: refused re-entry, never a hang
            assert "interrupted another call" in str(exc), exc
            calls.append("refused")
    return callback

refs = []
for n, kind in enumerate(["store", "stats", "latest", "close", "subscribe"] * 4):
    clock.advance(0.001)
    s.store_frame(payload(n), source="cam", max_recent=1)
    while sub.qsize():
        sub.get_nowait()  # the queue must not keep the frame alive
    refs.append(weakref.ref(s.latest_visual_frames(10)[0].data, call_back(kind)))
clock.advance(0.001)
s.store_frame(b"last", source="cam", max_recent=1)
assert_books_balance(s, [sub])
assert len(calls) == 20 and calls.count("refused") < 20, calls
print("ok", calls)
"""


def test_weakref_callbacks_that_call_back_during_a_store_complete(backend):
    run_scenario(_WEAKREF_CALLBACKS, backend, timeout=60)


_FINALIZER_STORM = """
import gc
from support import assert_books_balance, payload, session_with_subscribers

s, subs = session_with_subscribers("storm", 4)
spare = [s.subscribe_visual_frames(1) for _ in range(200)]
calls = {"close": 0, "stats": 0, "store": 0, "latest": 0, "subscribe": 0}

class Callback:
    # In a cycle, so only the cyclic collector (which runs inside allocations, i.e.
    # inside the ring's fan-out) finalizes it.
    def __init__(self, n):
        self.n, self.me = n, self
    def __del__(self):
        kind = ("close", "stats", "store", "latest", "subscribe")[self.n % 5]
        try:
            if kind == "close" and spare:
                spare.pop().close()
            elif kind == "stats":
                s.visual_stats()
            elif kind == "store":
                s.store_frame(payload(10_000 + self.n), source="cam", max_recent=3)
            elif kind == "latest":
                s.latest_visual_frames(10)
            else:
                s.subscribe_visual_frames(1).close()
            calls[kind] += 1
        except RuntimeError as exc:  # allowed: refused re-entry, never a hang
            assert "interrupted another call" in str(exc), exc

gc.set_threshold(1, 1, 1)
for n in range(4000):
    Callback(n)
    s.store_frame(payload(n), source="cam", max_recent=3)
    for sub in subs:
        while sub.qsize() > 2:
            sub.get_nowait()
gc.set_threshold(700, 10, 10)
gc.collect()
assert_books_balance(s, subs)
assert s.store_frame(b"after", source="cam", max_recent=3)
assert bytes(subs[0].get(timeout=5).data) != b""
assert all(calls.values()), calls
print("ok", calls)
"""


def test_finalizers_that_call_back_during_stores_never_hang(backend):
    run_scenario(_FINALIZER_STORM, backend, timeout=120)


_SIGNAL_STORM = """
import signal, time
from support import assert_books_balance, payload, session_with_subscribers

s, subs = session_with_subscribers("signals", 8)
handled = {"stats": 0, "latest": 0, "store": 0, "refused": 0}

def handler(signum, frame):
    kind = ("stats", "latest", "store")[sum(handled.values()) % 3]
    try:
        if kind == "stats":
            s.visual_stats()
        elif kind == "latest":
            s.latest_visual_frames(10)
        else:
            s.store_frame(b"from a handler", source="cam", max_recent=4)
        handled[kind] += 1
    except RuntimeError as exc:
        assert "interrupted another call" in str(exc), exc
        handled["refused"] += 1

signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
deadline = time.monotonic() + 4
n = 0
while time.monotonic() < deadline:
    s.store_frame(payload(n), source="cam", max_recent=4)
    for sub in subs:
        while sub.qsize() > 4:
            sub.get_nowait()
    n += 1
signal.setitimer(signal.ITIMER_REAL, 0)
assert_books_balance(s, subs)
assert handled["stats"] and handled["store"], handled
print("ok", n, handled)
"""


def test_signal_handlers_that_call_the_session_never_hang(backend):
    run_scenario(_SIGNAL_STORM, backend, timeout=120)


def test_a_store_made_inside_a_pure_latest_read_leaves_the_read_whole():
    # A signal handler runs at any eval-breaker check of the main thread, and the pure
    # ring's lock is reentrant, so a handler's store can land inside a latest read's
    # filter: the read iterated the live deque and raised "deque mutated during
    # iteration" (found by test_signal_handlers_that_call_the_session_never_hang).
    # The tracer stands for the handler, at the filter's first step.
    session = Session("s", backend="python")
    for seq in range(3):
        session.store_frame(bytes([seq]), source="cam", max_recent=3, frame_seq=seq, now=float(seq))
    fired = []

    def handler_at_the_filter(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "<listcomp>" and not fired:
            fired.append(frame.f_code.co_filename)
            session.store_frame(b"h", source="cam", max_recent=3, frame_seq=99, now=3.0)
        return None

    sys.settrace(handler_at_the_filter)
    try:
        frames = session.latest_visual_frames(10, now=3.0)
    finally:
        sys.settrace(None)
    assert fired and fired[0].endswith("_ring.py")
    assert [f.frame_seq for f in frames] == [0, 1, 2]  # the ring as the read found it
    assert [f.frame_seq for f in session.latest_visual_frames(10, now=3.0)] == [1, 2, 99]
