"""``Session.loan_frame(nbytes) -> FrameLoan``: a frame written in place, then committed
as ``store_frame`` would store it (docs/spec.md, "Frame loans"), on both backends.

The compiled backend lends a buffer of the ring's pool and makes it the frame's buffer
without a copy; the pure one copies once at commit. Both refuse a commit while a view
of the loan is alive (BufferError), so nothing can write into a published frame.
"""

from __future__ import annotations

import copy
import gc
import math
import pickle
import re
import sys
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule

import capsule_sessions
from capsule_sessions import FrameLoan, Session, _framebuf_py, _limits, available_backends
from capsule_sessions.errors import LOAN_EXPORTED_MESSAGE, LOAN_FINISHED_MESSAGE, LOAN_NOT_BY_HAND_MESSAGE
from support import FakeClock, assert_handed_out, drain, normalise, outcome, payload, run_child, seq_of

# Every test here runs on a shared session too (tests/conftest.py).
ALSO_SHARED = True

FRAME_1080P = 1920 * 1080 * 3
needs_cython = pytest.mark.skipif("cython" not in available_backends(), reason="the Cython backend is not built")


def pointer(array) -> int:
    return np.asarray(array).__array_interface__["data"][0]


def fill(loan, data) -> None:
    """Write ``data`` (bytes) into the whole loan through its array, leaving no view."""
    np.copyto(loan.array, np.frombuffer(data, np.uint8))


def commit_bytes(session, data, **kwargs):
    loan = session.loan_frame(len(data))
    fill(loan, data)
    kwargs.setdefault("source", "cam")
    kwargs.setdefault("max_recent", 4)
    return loan.commit(**kwargs)


# -- what a commit stores ------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 4096, _limits.NOGIL_COPY_MIN_BYTES + 1, FRAME_1080P])
def test_the_bytes_stored_are_the_bytes_written(session, clock, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    loan = session.loan_frame(size)
    assert loan.nbytes == size and type(loan.nbytes) is int
    array = loan.array
    assert (array.dtype, array.shape, array.flags.writeable, array.flags.c_contiguous) == (np.uint8, (size,),
                                                                                           True, True)
    array[:] = np.frombuffer(data, np.uint8)
    del array
    assert loan.commit(source="cam", max_recent=2, mime_type="video/x-raw-rgb", width=7, height=3,
                       timestamp_ms=-5, frame_seq=2**63 - 1, now=clock() + 1.5)
    (frame,) = session.latest_visual_frames(10.0, now=clock() + 1.5)
    assert_handed_out(frame)
    assert frame.data.tobytes() == data
    assert (frame.mime_type, frame.width, frame.height, frame.source, frame.timestamp_ms, frame.frame_seq,
            frame.received_at) == ("video/x-raw-rgb", 7, 3, "cam", -5, 2**63 - 1, clock() + 1.5)
    assert session.visual_stats() == {"accepted": 1, "rate_limited": 0, "source_resets": 0, "frames": 1,
                                      "bytes": size}
    assert session.last_active_at == clock() + 1.5


def test_as_array_views_the_same_memory(session):
    loan = session.loan_frame(2 * 3 * 4)
    image = loan.as_array((2, 3, 4))
    assert (image.shape, image.dtype, image.flags.writeable) == ((2, 3, 4), np.uint8, True)
    image[:] = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    wide = loan.as_array(6, np.uint32)
    assert wide.shape == (6,) and wide[0] == int.from_bytes(bytes([0, 1, 2, 3]), "little")
    words = loan.as_array([3, 4], dtype="<u2")
    words[2, 3] = 0xFFFF
    del image, wide, words
    assert loan.commit(source="cam", max_recent=1, width=3, height=2)
    (frame,) = session.latest_visual_frames(10.0)
    assert frame.data.tobytes() == bytes(range(22)) + b"\xff\xff"
    assert (frame.width, frame.height) == (3, 2)  # as given: a loan is 1-D, no shape is read


@pytest.mark.parametrize("shape, dtype, error, match", [
    ((5,), np.uint8, ValueError, r"^shape \(5,\) of uint8 covers 5 bytes, but the loan has 12$"),
    ((2, 2), np.uint16, ValueError, r"^shape \(2, 2\) of uint16 covers 8 bytes"),
    (5, np.uint32, ValueError, r"^shape \(5,\) of uint32 covers 20 bytes"),
    ((-3, -4), np.uint8, ValueError, "^shape must not have a negative dimension, got -3$"),
    ((1,) * 65, np.uint8, ValueError, "^shape must have at most 64 dimensions, got 65$"),
    ((3.0, 4), np.uint8, TypeError, "^shape must hold ints, got float$"),
    ((True, 12), np.uint8, TypeError, "^shape must hold ints, got bool$"),
    (True, np.uint8, TypeError, "^shape must be an int or a sequence of ints, got bool$"),
    (None, np.uint8, TypeError, "^shape must be an int or a sequence of ints, got NoneType$"),
    ((12,), object, ValueError, "^dtype must be a fixed-size type without Python objects"),
    ((12,), [("a", "u1"), ("b", object)], ValueError, "^dtype must be a fixed-size type"),
    ((4,), (np.uint8, 3), ValueError, "^dtype must be a fixed-size type"),
    ((12,), "no such type", TypeError, "^dtype must be a numpy dtype, got 'no such type'"),
])
def test_as_array_refuses_a_shape_or_dtype_that_does_not_fit(session, shape, dtype, error, match):
    loan = session.loan_frame(12)
    with pytest.raises(error, match=match):
        loan.as_array(shape, dtype)
    assert loan.commit(source="cam", max_recent=1)  # nothing was left exported


def test_the_error_messages_are_the_same_on_both_backends():
    def messages(backend):
        session = Session("m", clock=FakeClock(), backend=backend)
        loan = session.loan_frame(12)
        out = []
        for call in (lambda: loan.as_array((5,)), lambda: loan.as_array((2,), object),
                     lambda: session.loan_frame(True), lambda: session.loan_frame(-1),
                     lambda: session.loan_frame(1.5), lambda: session.loan_frame(_limits.MAX_LOAN_BYTES + 1),
                     lambda: loan.commit(source=1, max_recent=1), lambda: loan.commit(source="c", max_recent=None),
                     lambda: loan.commit(source="c", max_recent=1, width=-1),
                     lambda: loan.commit(source="c", max_recent=1, now=math.nan),
                     lambda: loan.commit(source="c", max_recent=1, min_interval=math.nan)):
            try:
                call()
            except (TypeError, ValueError) as exc:
                out.append((type(exc).__name__, str(exc)))
        view = loan.array
        try:
            loan.commit(source="c", max_recent=1)
        except BufferError as exc:
            out.append(("BufferError", str(exc)))
        del view
        loan.cancel()
        try:
            _ = loan.array
        except ValueError as exc:
            out.append(("ValueError", str(exc)))
        return out

    python = messages("python")
    assert len(python) == 13
    assert ("BufferError", LOAN_EXPORTED_MESSAGE) in python and ("ValueError", LOAN_FINISHED_MESSAGE) in python
    if "cython" in available_backends():
        assert messages("cython") == python


# -- commit is store_frame --------------------------------------------------------------

# (data, keyword arguments, clock step before the call)
SCRIPT = [
    (payload(1), {"source": "cam", "max_recent": 2}, 0.0),
    (payload(2), {"source": "cam", "max_recent": 2, "min_interval": 0.5}, 0.1),  # rate-limited
    (payload(3), {"source": "cam", "max_recent": 2, "min_interval": 0.5}, 0.5),
    (payload(4), {"source": "cam", "max_recent": 2, "frame_seq": 4, "timestamp_ms": 9}, 0.01),
    (payload(5), {"source": "screen", "max_recent": 1, "min_interval": 10.0}, 0.01),  # limited: no switch
    (payload(6), {"source": "screen", "max_recent": 0, "mime_type": "image/jpeg"}, 0.01),  # source switch
    (payload(7), {"source": "screen", "max_recent": 3, "width": 4, "height": 2}, 0.0),
    (payload(8), {"source": "screen", "max_recent": 3}, -1.0),  # the clock going back
    (payload(9), {"source": "screen", "max_recent": 1, "now": 2000.0}, 0.0),
    (b"", {"source": "", "max_recent": 5}, 0.0),
]


def test_a_commit_gives_what_store_frame_gives_in_the_same_situation(backend):
    clocks = FakeClock(), FakeClock()
    stored = Session("store", clock=clocks[0], backend=backend)
    loaned = Session("loan", clock=clocks[1], backend=backend)
    subs = [s.subscribe_visual_frames(3) for s in (stored, loaned)]
    for data, kwargs, step in SCRIPT:
        for c in clocks:
            c.advance(step)
        expected = stored.store_frame(data, **kwargs)
        assert commit_bytes(loaned, data, **kwargs) is expected, (data[:8], kwargs)
        assert loaned.visual_stats() == stored.visual_stats()
        assert loaned.last_active_at == stored.last_active_at
        assert normalise(loaned.latest_visual_frames(1e9)) == normalise(stored.latest_visual_frames(1e9))
        assert (subs[1].qsize(), subs[1].dropped) == (subs[0].qsize(), subs[0].dropped)
    assert stored.visual_stats()["rate_limited"] == 2 and stored.visual_stats()["source_resets"] == 2
    assert normalise(drain(subs[1])) == normalise(drain(subs[0]))


def test_a_rate_limited_commit_returns_false_and_finishes_the_loan(session, clock):
    assert commit_bytes(session, b"first", min_interval=1.0)
    loan = session.loan_frame(6)
    fill(loan, b"second")
    assert loan.commit(source="cam", max_recent=4, min_interval=1.0) is False
    with pytest.raises(ValueError, match="finished"):
        _ = loan.array
    with pytest.raises(ValueError, match="finished"):
        loan.commit(source="cam", max_recent=4)
    loan.cancel()  # a no-op on a finished loan
    stats = session.visual_stats()
    assert (stats["accepted"], stats["rate_limited"], stats["frames"]) == (1, 1, 1)
    assert [f.data.tobytes() for f in session.latest_visual_frames(10.0)] == [b"first"]


def test_the_rate_limit_is_decided_when_the_commit_is_made(session, clock):
    assert commit_bytes(session, b"a", min_interval=1.0)
    early = session.loan_frame(1)  # taken while a store would be rate-limited
    late = session.loan_frame(1)
    fill(early, b"b")
    fill(late, b"c")
    clock.advance(1.0)
    assert early.commit(source="cam", max_recent=4, min_interval=1.0)  # a second later: accepted
    assert late.commit(source="cam", max_recent=4, min_interval=1.0) is False  # taken before, limited now
    assert [f.data.tobytes() for f in session.latest_visual_frames(10.0)] == [b"a", b"b"]


def test_subscribers_receive_the_committed_frame(session):
    with session.subscribe_visual_frames(2) as sub, session.subscribe_visual_frames(1, policy="drop_oldest") as other:
        assert commit_bytes(session, b"hello", frame_seq=1)
        assert commit_bytes(session, b"again", frame_seq=2)
        got = [sub.get(timeout=1), sub.get(timeout=1)]
        assert [(f.data.tobytes(), f.frame_seq) for f in got] == [(b"hello", 1), (b"again", 2)]
        for frame in got:
            assert_handed_out(frame)
        assert other.get(timeout=1).data.tobytes() == b"again" and other.dropped == 1


def test_a_committed_frame_cannot_be_written_through_anything_the_loan_gave(session):
    loan = session.loan_frame(4)
    fill(loan, b"abcd")
    assert loan.commit(source="cam", max_recent=1)
    (frame,) = session.latest_visual_frames(10.0)
    for stale in (lambda: loan.array, lambda: loan.as_array((4,)), lambda: loan.as_array(1, np.uint32)):
        with pytest.raises(ValueError, match=r"^this frame loan is finished \(committed or cancelled\)"):
            stale()
    with pytest.raises(ValueError, match="finished"):
        loan.commit(source="cam", max_recent=1)
    with pytest.raises(ValueError):
        frame.data.flags.writeable = True
    with pytest.raises(ValueError, match="read-only"):
        frame.data[0] = 0
    view = memoryview(frame.data)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 0
    assert frame.data.tobytes() == b"abcd"


# Views of a loan, each of which must make a commit wait: (name, make a view, drop it).
VIEWS = {
    "array": lambda loan: loan.array,
    "as_array": lambda loan: loan.as_array((2, 2)),
    "slice of array": lambda loan: loan.array[1:],
    "transposed as_array": lambda loan: loan.as_array((2, 2)).T,
    "reinterpreted": lambda loan: loan.array.view(np.uint16),
    "memoryview": lambda loan: memoryview(loan.array),
    "memoryview of a slice": lambda loan: memoryview(loan.as_array((4,))[::2]),
    "frombuffer": lambda loan: np.frombuffer(loan.array, np.uint32),
    "the array's base": lambda loan: loan.array.base,
    "ctypes": lambda loan: loan.array.ctypes,
    "list holding an array": lambda loan: [loan.array],
}


@pytest.mark.parametrize("make", VIEWS.values(), ids=VIEWS.keys())
def test_commit_raises_buffer_error_while_a_view_lives_and_works_after(session, make):
    loan = session.loan_frame(4)
    fill(loan, b"\0\0\0\0")
    view = make(loan)
    loan.array[0] = 9  # writes through the loan are still allowed while it is open
    with pytest.raises(BufferError, match=r"^the loan's memory is still exported"):
        loan.commit(source="cam", max_recent=1)
    with pytest.raises(BufferError):
        loan.commit(source="cam", max_recent=1)  # still open, still refused
    assert session.visual_stats()["accepted"] == 0 and session.visual_stats()["rate_limited"] == 0
    del view
    loan.array[3] = 7
    assert loan.commit(source="cam", max_recent=1)
    assert session.latest_visual_frames(10.0)[0].data.tobytes() == b"\x09\0\0\x07"


def test_a_released_memoryview_no_longer_holds_the_loan(session):
    loan = session.loan_frame(2)
    fill(loan, b"ok")
    view = memoryview(loan.array)
    with pytest.raises(BufferError):
        loan.commit(source="cam", max_recent=1)
    view.release()
    assert loan.commit(source="cam", max_recent=1)


def test_a_copy_of_the_loans_bytes_is_not_a_view(session):
    loan = session.loan_frame(3)
    fill(loan, b"xyz")
    kept = loan.array.copy(), loan.array.tobytes(), bytes(loan.as_array((3,)))
    assert loan.commit(source="cam", max_recent=1)
    kept[0][:] = 0  # the copy is the caller's to write
    assert session.latest_visual_frames(10.0)[0].data.tobytes() == b"xyz" == kept[1] == kept[2]


# -- cancel, the with block, finishing twice -------------------------------------------


def test_leaving_the_with_block_without_commit_cancels(session):
    with session.loan_frame(3) as loan:
        assert isinstance(loan, FrameLoan)
        fill(loan, b"abc")
    with pytest.raises(ValueError, match="finished"):
        _ = loan.array
    with pytest.raises(ValueError, match="finished"):
        loan.commit(source="cam", max_recent=1)
    assert session.visual_stats()["accepted"] == 0


def test_an_exception_in_the_with_block_cancels_and_propagates(session):
    with pytest.raises(ZeroDivisionError):
        with session.loan_frame(3) as loan:
            view = loan.array
            raise ZeroDivisionError
    assert session.visual_stats()["accepted"] == 0
    with pytest.raises(ValueError, match="finished"):
        loan.as_array((3,))
    view[:] = 1  # the caller's last view writes memory that is no longer the loan's: harmless
    assert commit_bytes(session, b"new")
    assert session.latest_visual_frames(10.0)[0].data.tobytes() == b"new"


def test_a_commit_inside_the_with_block_is_kept(session):
    with session.loan_frame(2) as loan:
        fill(loan, b"in")
        assert loan.commit(source="cam", max_recent=1)
    assert session.latest_visual_frames(10.0)[0].data.tobytes() == b"in"


def test_commit_and_cancel_after_the_loan_is_finished(session):
    loan = session.loan_frame(1)
    fill(loan, b"1")
    assert loan.commit(source="cam", max_recent=3)
    with pytest.raises(ValueError, match="finished"):
        loan.commit(source="cam", max_recent=3)
    loan.cancel()
    loan.cancel()
    cancelled = session.loan_frame(1)
    cancelled.cancel()
    cancelled.cancel()
    with pytest.raises(ValueError, match="finished"):
        cancelled.commit(source="cam", max_recent=3)
    assert session.visual_stats()["accepted"] == 1
    assert repr(loan) == repr(cancelled) == "<FrameLoan finished nbytes=1>"
    assert repr(session.loan_frame(5)) == "<FrameLoan open nbytes=5>"


def test_a_bad_commit_argument_leaves_the_loan_open(session):
    loan = session.loan_frame(2)
    fill(loan, b"ok")
    for bad, error in (({"source": 3}, TypeError), ({"max_recent": "2"}, TypeError),
                       ({"min_interval": math.nan}, ValueError), ({"width": -1}, ValueError),
                       ({"height": True}, TypeError), ({"mime_type": b"x"}, TypeError),
                       ({"timestamp_ms": 2**63}, ValueError), ({"frame_seq": 1.0}, TypeError),
                       ({"now": math.inf}, ValueError), ({"now": "0"}, TypeError)):
        kwargs = {"source": "cam", "max_recent": 1, **bad}
        with pytest.raises(error) as loaned:
            loan.commit(**kwargs)
        with pytest.raises(error) as stored:
            session.store_frame(b"ok", **kwargs)
        assert str(loaned.value) == str(stored.value)
    assert session.visual_stats()["accepted"] == 0
    assert loan.commit(source="cam", max_recent=1)


# -- nbytes ---------------------------------------------------------------------------


class Size(int):
    def __index__(self):  # never asked: an int counts by its value
        raise AssertionError("__index__ called")


@pytest.mark.parametrize("nbytes, error, match", [
    (True, TypeError, "^nbytes must be an int, got bool$"),
    (4.0, TypeError, "^nbytes must be an int, got float$"),
    ("4", TypeError, "^nbytes must be an int, got str$"),
    (None, TypeError, "^nbytes must be an int, got NoneType$"),
    (-1, ValueError, f"^nbytes must be between 0 and {_limits.MAX_LOAN_BYTES}, got -1$"),
    (_limits.MAX_LOAN_BYTES + 1, ValueError, f"^nbytes must be between 0 and {_limits.MAX_LOAN_BYTES}, got "),
    (2**64, ValueError, "^nbytes must be between"),
])
def test_a_bad_nbytes_is_refused_naming_it(session, nbytes, error, match):
    with pytest.raises(error, match=match):
        session.loan_frame(nbytes)


@pytest.mark.parametrize("nbytes", [np.int64(6), Size(6), 6])
def test_nbytes_is_any_int(session, nbytes):
    loan = session.loan_frame(nbytes)
    assert loan.nbytes == 6 and type(loan.nbytes) is int and loan.array.shape == (6,)


def test_loan_frame_is_called_as_a_method(session):
    with pytest.raises(TypeError, match=r"^Session\.loan_frame\(\) missing 1 required positional argument"):
        session.loan_frame()
    with pytest.raises(TypeError, match=r"^Session\.loan_frame\(\) got an unexpected keyword argument 'size'"):
        session.loan_frame(size=4)
    assert session.loan_frame(nbytes=4).nbytes == 4


# -- the public class --------------------------------------------------------------------


def test_a_loan_is_a_capsule_sessions_frame_loan_on_every_backend(session):
    loan = session.loan_frame(1)
    assert isinstance(loan, FrameLoan) and isinstance(loan, capsule_sessions.FrameLoan)
    assert FrameLoan is _framebuf_py.FrameLoan and "FrameLoan" in capsule_sessions.__all__
    assert not isinstance(object(), FrameLoan)


@pytest.mark.parametrize("make", [lambda loan: FrameLoan(), lambda loan: type(loan)(),
                                  lambda loan: copy.copy(loan), lambda loan: copy.deepcopy(loan),
                                  lambda loan: pickle.dumps(loan)])
def test_a_loan_is_made_only_by_a_session(session, make):
    loan = session.loan_frame(1)
    refused = f"^({re.escape(LOAN_NOT_BY_HAND_MESSAGE)}|cannot pickle or copy 'FrameLoan' object)$"
    with pytest.raises(TypeError, match=refused):
        make(loan)


# -- closed sessions, fork ---------------------------------------------------------------


def test_a_loan_of_an_ended_session_commits_as_store_frame_would(make_manager):
    manager = make_manager()
    session = manager.create("s")
    early = session.loan_frame(5)
    fill(early, b"early")
    manager.delete("s")
    assert session.store_frame(b"store", source="cam", max_recent=3)  # what store_frame does then
    assert early.commit(source="cam", max_recent=3)
    assert commit_bytes(session, b"late", max_recent=3)
    assert [f.data.tobytes() for f in session.latest_visual_frames(1e9)] == [b"store", b"early", b"late"]
    assert session.subscribe_visual_frames().closed


def test_a_loan_inherited_through_fork_refuses_use(backend):
    code = """
        import os
        from capsule_sessions import Session
        session = Session("f", clock=lambda: 1.0)
        loan = session.loan_frame(4)
        pid = os.fork()
        if pid == 0:
            outcomes = []
            for call in (lambda: loan.array, lambda: loan.as_array((4,)), lambda: loan.cancel(),
                         lambda: loan.commit(source="c", max_recent=1), lambda: session.loan_frame(4)):
                try:
                    call()
                    outcomes.append("ran")
                except RuntimeError as exc:
                    outcomes.append("fork" if "fork" in str(exc) else repr(exc))
            del loan  # dropped in the child: never touches the inherited lock
            os._exit(0 if outcomes == ["fork"] * 5 else print(outcomes) or 3)
        _, status = os.waitpid(pid, 0)
        loan.array[:] = 1
        del_ok = loan.commit(source="c", max_recent=1)
        print(os.waitstatus_to_exitcode(status), del_ok)
    """
    code_, out, err = run_child(code, backend)
    assert (code_, out.split()) == (0, ["0", "True"]), err


# -- threads --------------------------------------------------------------------------


def test_loans_from_several_threads_commit_while_stores_race_them(session, clock):
    producers, per_thread = 4, 60
    sub = session.subscribe_visual_frames(10_000)
    results: dict[str, list[bool]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(producers + 1)

    def lender(index: int) -> None:
        try:
            start.wait()
            committed = []
            for n in range(per_thread):
                seq = index * 1000 + n
                held = [session.loan_frame(len(payload(seq))) for _ in range(3)]  # several open at once
                for extra in held[1:]:
                    extra.cancel()
                fill(held[0], payload(seq))
                committed.append(held[0].commit(source="cam", max_recent=8, min_interval=0.0005, frame_seq=seq,
                                                now=clock() + n * 0.001))
            results[f"lender{index}"] = committed
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def storer() -> None:
        try:
            start.wait()
            results["storer"] = [session.store_frame(payload(-n - 1), source="cam", max_recent=8,
                                                     min_interval=0.0005, frame_seq=-n - 1,
                                                     now=clock() + n * 0.001)
                                 for n in range(per_thread)]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=lender, args=(i,)) for i in range(producers - 1)]
    threads.append(threading.Thread(target=storer))
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == producers
    accepted = sum(sum(r) for r in results.values())
    stats = session.visual_stats()
    assert stats["accepted"] == accepted and stats["rate_limited"] == producers * per_thread - accepted
    assert 0 < accepted < producers * per_thread  # some commits lost the race to the limiter
    got = drain(sub)
    assert len(got) == accepted
    last: dict[int, int] = {}  # each producer's frames arrive in the order it made them
    for frame in got:
        seq = frame.frame_seq
        assert frame.data.tobytes() == payload(seq) and seq_of(frame.data) == seq
        owner, order = (seq // 1000, seq % 1000) if seq >= 0 else (-1, -seq)
        assert order > last.get(owner, -1)
        last[owner] = order
    for frame in session.latest_visual_frames(1e9):
        assert frame.data.tobytes() == payload(frame.frame_seq)


def test_two_threads_committing_one_loan_store_it_once(session):
    rounds = 150
    for n in range(rounds):
        loan = session.loan_frame(8)
        fill(loan, payload(n, 8))
        outcomes = []
        gate = threading.Barrier(2)

        def commit(loan=loan, outcomes=outcomes, gate=gate):
            gate.wait()
            try:
                outcomes.append(loan.commit(source="cam", max_recent=2, frame_seq=n))
            except ValueError as exc:
                outcomes.append(str(exc))

        pair = [threading.Thread(target=commit) for _ in range(2)]
        for t in pair:
            t.start()
        for t in pair:
            t.join(10)
        assert sorted(outcomes, key=str) == [True, LOAN_FINISHED_MESSAGE], outcomes
    assert session.visual_stats()["accepted"] == rounds


def test_a_view_in_another_thread_holds_the_commit_back(session):
    loan = session.loan_frame(4)
    fill(loan, b"\0" * 4)
    have_view, release = threading.Event(), threading.Event()

    def writer() -> None:
        view = loan.as_array((4,))
        have_view.set()
        release.wait(10)
        view[:] = 5
        del view

    t = threading.Thread(target=writer)
    t.start()
    have_view.wait(10)
    with pytest.raises(BufferError):
        loan.commit(source="cam", max_recent=1)
    release.set()
    t.join(10)
    assert loan.commit(source="cam", max_recent=1)
    assert session.latest_visual_frames(10.0)[0].data.tobytes() == b"\x05" * 4


def test_a_keyboard_interrupt_at_every_eval_breaker_check_of_a_commit_leaves_the_session_usable(backend):
    """Where a signal handler could run during a commit (tests/test_fuzz.py's tracer), a
    KeyboardInterrupt leaves the loan open or finished, the books balanced, and the
    session working."""
    from test_fuzz import HandlerAt

    at = 0
    while True:
        at += 1
        session = Session("every-point", clock=FakeClock(), backend=backend)
        sub = session.subscribe_visual_frames(1)
        loan = session.loan_frame(16)
        fill(loan, b"x" * 16)
        injection = HandlerAt(at, lambda: (_ for _ in ()).throw(KeyboardInterrupt))
        sys.settrace(injection.tracer)
        try:
            loan.commit(source="cam", max_recent=2)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if injection.where is None:
            break  # past the commit's last point
        accepted = session.visual_stats()["accepted"]
        assert accepted in (0, 1) and sub.delivered + sub.dropped + sub.qsize() == accepted, injection.where
        loan.cancel()
        assert commit_bytes(session, b"after") is True, injection.where
        assert session.visual_stats()["accepted"] == accepted + 1
    assert at > (40 if backend == "python" else 1)  # the tracer saw the commit's points


# -- memory: a dropped loan goes back, a held frame is never lent ------------------------


def test_a_dropped_loan_is_cancelled_and_its_memory_freed(session):
    tracemalloc.start()
    try:
        for _ in range(40):
            loan = session.loan_frame(1 << 20)
            loan.array[:8] = 1
            del loan
        gc.collect()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < 4 << 20  # (the compiled backend's buffers are not traced at all)
    assert session.visual_stats()["accepted"] == 0


@needs_cython
def test_commit_does_not_copy_on_the_compiled_backend():
    session = Session("nc", clock=FakeClock(), backend="cython")
    with session.subscribe_visual_frames() as sub:
        loan = session.loan_frame(FRAME_1080P)
        array = loan.array
        lent = pointer(array)
        array[::4096] = 3
        del array
        assert loan.commit(source="cam", max_recent=2)
        (frame,) = session.latest_visual_frames(10.0)
        assert pointer(frame.data) == lent and pointer(frame.as_array((1080, 1920, 3))) == lent
        assert pointer(sub.get(timeout=1).data) == lent


@needs_cython
def test_the_compiled_backend_lends_pool_buffers_only_when_nothing_else_holds_them():
    session = Session("pool", clock=FakeClock(), backend="cython")
    seen = []
    for n in range(8):  # max_recent=1: the evicted frame's buffer goes back to the pool
        loan = session.loan_frame(64 * 1024)
        seen.append(pointer(loan.array))
        fill(loan, payload(n, 64 * 1024))
        assert loan.commit(source="cam", max_recent=1)
    assert len(set(seen)) == 2  # steady state: max_recent + 1 buffers, no allocation
    (held,) = session.latest_visual_frames(10.0)  # a reader holds the newest frame
    held_at, held_bytes = pointer(held.data), held.data.tobytes()
    dropped = session.loan_frame(64 * 1024)
    dropped_at = pointer(dropped.array)
    view = dropped.array  # a view outlives its loan
    del dropped
    for n in range(8):
        loan = session.loan_frame(64 * 1024)
        assert pointer(loan.array) not in (held_at, dropped_at)
        fill(loan, payload(100 + n, 64 * 1024))
        assert loan.commit(source="cam", max_recent=1)
    assert held.data.tobytes() == held_bytes and view.flags.writeable
    del view, held
    again = {pointer(session.loan_frame(64 * 1024).array) for _ in range(4)}
    assert again & {held_at, dropped_at}  # free again: reused


@needs_cython
def test_a_cancelled_or_dropped_loan_goes_back_to_the_pool():
    session = Session("cancel", clock=FakeClock(), backend="cython")
    loan = session.loan_frame(4096)
    lent = pointer(loan.array)
    loan.cancel()
    assert pointer(session.loan_frame(4096).array) == lent  # dropped at once: back again
    assert pointer(session.loan_frame(4096).array) == lent


# -- the two backends, driven alike ------------------------------------------------------

PAIR = ("python", "cython")
SIZES = st.one_of(st.integers(0, 16), st.integers(0, 4096), st.integers(16384, 20000))


class LoansAgree(RuleBasedStateMachine):
    """A python-backend and a cython-backend session, driven by the same mixed stores,
    loans, writes, views, commits, cancels and drops: every result, error message, frame
    and counter must agree."""

    loans = Bundle("loans")

    def __init__(self):
        super().__init__()
        self.clocks = (FakeClock(100.0), FakeClock(100.0))
        self.sessions = tuple(Session("eq", clock=c, backend=b) for c, b in zip(self.clocks, PAIR, strict=True))
        self.subs = tuple(s.subscribe_visual_frames(4, policy="drop_oldest") for s in self.sessions)
        self.views: list[tuple[object, object]] = []

    def both(self, calls):
        a, b = (outcome(call, catch=Exception) for call in calls)
        assert a == b, f"{PAIR[0]} gave {a!r:.300}, {PAIR[1]} gave {b!r:.300}"
        return a

    @rule(step=st.sampled_from([0.0, 0.001, 0.02, 0.5, -0.01]))
    def advance(self, step):
        for c in self.clocks:
            c.advance(step)

    @rule(size=SIZES, seed=st.integers(0, 2**16), source=st.sampled_from(["cam", "screen"]),
          max_recent=st.integers(0, 3), min_interval=st.sampled_from([0.0, 0.01, 0.1]))
    def store(self, size, seed, source, max_recent, min_interval):
        data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        self.both([lambda s=s: s.store_frame(data, source=source, max_recent=max_recent, min_interval=min_interval)
                   for s in self.sessions])

    @rule(target=loans, size=st.one_of(SIZES, st.sampled_from([-1, True, 1.5])), seed=st.integers(0, 2**16))
    def lend(self, size, seed):
        made = [outcome(lambda s=s: s.loan_frame(size), catch=Exception) for s in self.sessions]
        assert made[0][0] == made[1][0] and (made[0][0] == "ok" or made[0] == made[1]), made
        if made[0][0] != "ok":
            return multiple()
        pair = (made[0][1], made[1][1])
        data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        for loan in pair:  # a loan's first bytes are unspecified: every run writes them all
            np.copyto(loan.array, data)
        return pair

    @rule(pair=loans, offset=st.integers(0, 20000), value=st.integers(0, 255), shaped=st.booleans())
    def write(self, pair, offset, value, shaped):
        def poke(loan):
            view = loan.as_array((loan.nbytes,)) if shaped else loan.array
            if view.size:
                view[offset % view.size] = value
            return view.size

        self.both([lambda loan=loan: poke(loan) for loan in pair])

    @rule(pair=loans, kind=st.sampled_from(["array", "slice", "memoryview", "reshaped"]))
    def hold_view(self, pair, kind):
        makers = {"array": lambda loan: loan.array, "slice": lambda loan: loan.array[1:],
                  "memoryview": lambda loan: memoryview(loan.array),
                  "reshaped": lambda loan: loan.as_array((1, loan.nbytes))}
        made = [outcome(lambda loan=loan: makers[kind](loan), catch=Exception) for loan in pair]
        assert made[0][0] == made[1][0], made
        if made[0][0] == "ok":
            self.views.append((made[0][1], made[1][1]))
        else:
            assert made[0] == made[1]

    @rule()
    def drop_views(self):
        self.views.clear()

    @rule(pair=loans, source=st.sampled_from(["cam", "screen", 3]), max_recent=st.integers(-1, 3),
          min_interval=st.sampled_from([0.0, 0.01, 0.1, math.nan]), seq=st.integers(0, 99),
          width=st.sampled_from([0, 4, -1]), now=st.sampled_from([None, 0.0, 0.05]))
    def commit(self, pair, source, max_recent, min_interval, seq, width, now):
        self.both([lambda loan=loan, c=c: loan.commit(source=source, max_recent=max_recent,
                                                      min_interval=min_interval, frame_seq=seq, width=width,
                                                      now=None if now is None else c() + now)
                   for loan, c in zip(pair, self.clocks, strict=True)])

    @rule(pair=loans)
    def cancel(self, pair):
        self.both([loan.cancel for loan in pair])

    @rule(pair=consumes(loans))
    def drop(self, pair):
        del pair  # an unfinished loan dropped is cancelled
        gc.collect()

    @rule(pair=loans, shape=st.sampled_from([(2, -1), (4,), 3, (1, 1, 1)]),
          dtype=st.sampled_from([np.uint8, np.uint16, "f4", object]))
    def as_array(self, pair, shape, dtype):
        self.both([lambda loan=loan: loan.as_array(shape, dtype).shape for loan in pair])

    @rule(ttl=st.sampled_from([0.0, 0.01, 10.0]))
    def latest(self, ttl):
        a, b = (normalise(s.latest_visual_frames(ttl)) for s in self.sessions)
        assert a == b

    @rule()
    def read(self):
        a, b = (normalise(drain(sub)) for sub in self.subs)
        assert a == b

    @invariant()
    def counters_agree(self):
        a, b = self.sessions
        assert a.visual_stats() == b.visual_stats()
        assert a.last_active_at == b.last_active_at
        x, y = self.subs
        assert (x.qsize(), x.dropped, x.delivered) == (y.qsize(), y.dropped, y.delivered)

    def teardown(self):
        self.views.clear()
        for sub in self.subs:
            sub.close()


TestLoansAgree = LoansAgree.TestCase
TestLoansAgree.settings = settings(max_examples=150, stateful_step_count=40, deadline=None, database=None,
                                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestLoansAgree = needs_cython(TestLoansAgree)
