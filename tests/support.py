"""Helpers shared by the test modules, the benchmarks and the atheris harness (imported,
not fixtures): test doubles, payloads, the backend parameters, the twin-comparison
toolkit and child processes."""

from __future__ import annotations

import datetime as dt
import math
import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import capsule_sessions
from capsule_sessions import Session, Subscription, SubscriptionClosed, VisualFrame, available_backends


class FakeClock:
    """A clock the test moves by hand: ``clock()`` returns float seconds.

    Thread-safe, so stress tests can read it from many threads while one advances it.
    Reentrant: a finalizer that the garbage collector runs while this thread holds the
    lock may read the clock too (the soak's storms do), and must not deadlock on it.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = float(start)
        self._lock = threading.RLock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, instant: float) -> None:
        with self._lock:
            self._now = float(instant)


def payload(seq: int, size: int | None = None) -> bytes:
    """Bytes that can only belong to frame ``seq``: its 8-byte tag repeated.

    The default size varies with ``seq`` so that frames of many sizes flow through a ring.
    """
    if size is None:
        size = 8 * (1 + seq % 17)
    tag = int(seq).to_bytes(8, "little", signed=True)
    return (tag * (size // 8 + 1))[:size]


def seq_of(data) -> int:
    """The frame_seq a payload made by ``payload`` was built for (its first 8 bytes)."""
    return int.from_bytes(bytes(memoryview(data)[:8]), "little", signed=True)


def assert_handed_out(frame) -> None:
    """docs/spec.md's promise about a frame the library hands out."""
    data = frame.data
    assert isinstance(data, np.ndarray)
    assert data.dtype == np.uint8
    assert data.ndim == 1
    assert not data.flags.writeable


def assert_payload_matches(frame) -> None:
    """Every delivered frame carries exactly the bytes stored for its frame_seq."""
    assert bytes(frame.data) == payload(frame.frame_seq), f"frame {frame.frame_seq} carries foreign bytes"


def assert_counts_add_up(summary) -> None:
    """The CLI's --json summary balances: every offer is accepted, rate-limited or
    rejected, and every accepted frame is delivered, dropped or still queued."""
    assert summary["accounting_problems"] == []
    for s in summary["sessions"]:
        assert s["offered"] == s["accepted"] + s["rate_limited"] + s["rejected"]
        for sub in s["subscribers"]:
            assert sub["delivered"] + sub["dropped"] + sub["queued"] == s["accepted"], sub
            assert sub["received"] == sub["delivered"]
            assert sub["integrity_errors"] == 0


# -- the backends under test ------------------------------------------------------------


def backend_params(names: list[str] | None = None) -> list:
    """One pytest.param per backend in ``available_backends()`` (or per name of ``names``,
    e.g. the benchmarks' targets), the compiled one marked ``cython``: the parameters of
    tests/conftest.py's ``backend`` fixture and bench/conftest.py's ``target``."""
    return [
        pytest.param(name, id=name, marks=[pytest.mark.cython] if name == "cython" else [])
        for name in (available_backends() if names is None else names)
    ]


# -- comparing the twins ----------------------------------------------------------------
#
# One toolkit for every differential test (tests/test_fuzz.py, tests/test_equivalence.py)
# and the atheris harness (fuzz/fuzz_framebuf.py): what a call did, a frame and a
# session's state, as values that are equal exactly when the twins agree.

REJECTED = (TypeError, ValueError, OverflowError)  # what a call may raise for a bad argument
READ_ENDS = (queue.Empty, SubscriptionClosed)  # what a read may end with instead of a frame


def frame_key(frame, edited: dict | None = None) -> tuple:
    """A handed-out frame as a value: every field and every byte (last), once its data
    was checked to be what docs/spec.md promises (a read-only 1-D uint8 array).

    ``edited`` maps id(record) to (record, its key before the edit, ...) for records a
    test edited behind the API (object.__setattr__): such a record keys as it was, so
    the twins stay comparable while the books and every other frame are still checked."""
    if edited is not None and id(frame) in edited:
        return edited[id(frame)][1]
    data = frame.data
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1 and not data.flags.writeable):
        raise AssertionError(f"a handed-out frame's data is not a read-only 1-D uint8 array: {data!r:.200}")
    return (frame.frame_seq, frame.source, frame.mime_type, frame.width, frame.height, frame.timestamp_ms,
            frame.received_at, bytes(data))


def normalise(result, edited: dict | None = None):
    """A call's result as the twins must agree on it: a frame, or a list of frames, as
    frame_key(s); a subscription as its size and policy; anything else as it is."""
    if isinstance(result, list):
        return [frame_key(f, edited) for f in result]
    if isinstance(result, VisualFrame):
        return frame_key(result, edited)
    if isinstance(result, Subscription):
        return ("subscription", result.maxsize, result.policy)
    return result


def outcome(call, *, catch: type[BaseException] | tuple = REJECTED, reads: tuple = (), message: bool = True):
    """What ``call()`` did: ("ok", its result); ("rejected", exception type, message) for
    an exception in ``catch`` (without the message if ``message`` is false: the twins
    may word it differently); ("read", exception type) for one in ``reads``. Any other
    exception propagates: the test fails."""
    try:
        return ("ok", call())
    except catch as exc:
        return ("rejected", type(exc), str(exc)) if message else ("rejected", type(exc))
    except reads as exc:
        return ("read", type(exc))


def compared(call, *, catch: type[BaseException] | tuple = REJECTED, reads: tuple = (), edited: dict | None = None):
    """outcome() as the twins must agree on it: the result normalised, no message."""
    got = outcome(call, catch=catch, reads=reads, message=False)
    return ("ok", normalise(got[1], edited)) if got[0] == "ok" else got


def sub_books(sub) -> tuple:
    """A subscription's counters: queued, dropped, delivered, closed."""
    return (sub.qsize(), sub.dropped, sub.delivered, sub.closed)


def state(session, subs, edited: dict | None = None) -> tuple:
    """What a rejected call must leave alone and the twins must agree on after every call:
    visual_stats, the frames held (every field and byte), the activity instant, the
    subscriber count and every subscription's counters."""
    return (
        session.visual_stats(),
        [frame_key(f, edited) for f in session.latest_visual_frames(math.inf)],
        session.last_active_at,
        session._ring.subscriber_count,
        [sub_books(s) for s in subs],
    )


def drain(sub) -> list:
    """Every frame queued for ``sub``, read without waiting (a closed one's too)."""
    out = []
    while True:
        try:
            out.append(sub.get_nowait())
        except READ_ENDS:
            return out


class Twin:
    """One backend's side of a differential run: a session on its own fake clock, the
    subscriptions made on it, and what a reader keeps of the arrays it handed out."""

    def __init__(self, backend: str, session_id: str = "fuzz", start: float = 1000.0) -> None:
        self.backend = backend
        self.clock = FakeClock(start)
        self.session = Session(session_id, clock=self.clock, backend=backend)
        self.subs: list = []
        self.weak: list = []  # (weak reference to a handed-out array, the bytes it had)
        self.held: list = []  # (array a reader keeps, the bytes it had)

    def state(self, edited: dict | None = None) -> tuple:
        return state(self.session, self.subs, edited)

    def check_held(self) -> None:
        """Arrays a reader holds, or brings back from a weak reference, keep their bytes."""
        for array, want in self.held:
            if bytes(array) != want:
                raise AssertionError(f"{self.backend}: an array a reader holds changed its bytes")
        for ref, want in self.weak:
            array = ref()
            if array is not None and bytes(array) != want:
                raise AssertionError(f"{self.backend}: an array resurrected from a weak reference has foreign bytes")


# Number and text subclasses whose hooks lie: a twin must read their value (contents).


class LyingInt(int):
    """An int whose every conversion hook says something else than its value."""

    def __index__(self):
        return 1000

    def __int__(self):
        return -1

    def __float__(self):
        return 1e300

    def __str__(self):
        return "lie"

    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


class LyingFloat(float):
    def __float__(self):
        return math.nan

    def __int__(self):
        return 7

    def __index__(self):
        return 7

    def __round__(self, n=None):
        return 0

    def __eq__(self, other):
        return True

    __hash__ = float.__hash__


class LyingStr(str):
    def __str__(self):
        return "lie"

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    def __hash__(self):
        return 0

    def __len__(self):
        return 0

    def encode(self, *args, **kwargs):
        return b"lie"


class LyingTimedelta(dt.timedelta):
    def total_seconds(self):
        return -1.0


def lie(value):
    """``value`` as a lying subclass instance (a Python int, float, str or timedelta;
    anything else, numpy scalars included, as it is)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and not isinstance(value, np.integer):
        return LyingInt(value)
    if isinstance(value, float) and not isinstance(value, np.floating):
        return LyingFloat(value)
    if isinstance(value, str):
        return LyingStr(value)
    if isinstance(value, dt.timedelta):
        return LyingTimedelta(seconds=value.total_seconds())
    return value


# -- child processes, for scenarios that may hang or must start a fresh interpreter ----

PACKAGE_ROOT = Path(capsule_sessions.__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
CHILD_DEADLINE = 60.0  # seconds a child may run before it counts as hung


def child_env(backend: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["CAPSULE_SESSIONS_BACKEND"] = backend
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def start_child(code: str, backend: str, deadline: float = CHILD_DEADLINE) -> subprocess.Popen:
    # The child dumps every thread's stack and exits if it outlives its deadline: a
    # hang shows up as exit code 1 plus stacks, never as a stuck test run.
    prologue = f"import faulthandler; faulthandler.dump_traceback_later({deadline}, exit=True)\n"
    return subprocess.Popen(
        [sys.executable, "-c", prologue + textwrap.dedent(code)],
        env=child_env(backend),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    # wait() then read(), not communicate(): communicate() reads the raw pipes and would
    # lose whatever an earlier readline() left in the text buffer. A child's output is
    # small, so it cannot fill a pipe and block.
    try:
        proc.wait(timeout=CHILD_DEADLINE + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"child hung even past its faulthandler deadline\nstdout:\n{proc.stdout.read()}"
                    f"\nstderr:\n{proc.stderr.read()}")
    return proc.returncode, proc.stdout.read(), proc.stderr.read()



def start_command(*args: str, backend: str = "cython") -> subprocess.Popen:
    """``python -m capsule_sessions ARGS`` in a child process on ``backend``, its output
    piped as text (read it with ``finish_command``)."""
    return subprocess.Popen([sys.executable, "-m", "capsule_sessions", *args], env=child_env(backend),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_command(proc: subprocess.Popen, timeout: float = CHILD_DEADLINE) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a ``start_command`` child; killed, and the test
    failed, when it outlives ``timeout``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} hung\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def run_child(code: str, backend: str, timeout: float = CHILD_DEADLINE) -> tuple[int, str, str]:
    """Run ``code`` in a child interpreter on ``backend``: (exit code, stdout, stderr)."""
    return finish(start_child(code, backend, timeout))


def run_scenario(script: str, backend: str, timeout: float = CHILD_DEADLINE) -> tuple[str, str]:
    """Run a scenario's child script on ``backend`` and require that it ends well: exit
    code 0 and "ok" first on stdout. Returns (stdout, stderr)."""
    code, out, err = run_child(script, backend, timeout)
    assert code == 0 and out.startswith("ok"), f"exit {code}\n{out}\n{err}"
    return out, err


# What the child scripts of the ring scenarios (tests/test_reentry.py, tests/test_faults.py)
# start from and end with.


def session_with_subscribers(name: str, size: int) -> tuple[Session, list]:
    """A session on a fake clock (on the child's backend, CAPSULE_SESSIONS_BACKEND) with
    one subscriber of each drop policy, each of ``size`` frames."""
    session = Session(name, clock=FakeClock())
    return session, [session.subscribe_visual_frames(size, policy=p) for p in ("drop_oldest", "drop_newest")]


def assert_books_balance(session, subs) -> None:
    """Every frame ``session`` accepted was delivered to, dropped by or is still queued for
    each subscriber of ``subs`` (all made before its first store)."""
    accepted = session.visual_stats()["accepted"]
    for sub in subs:
        assert sub.delivered + sub.dropped + sub.qsize() == accepted, (sub, accepted)
