"""API hardening: interrupted session ends, message validation, clamped idle timeouts,
str/int/float subclasses, and the TypeError of a wrong call signature, on both backends."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import math
import threading
from unittest import mock

import pytest

from capsule_sessions import (
    ChatMessage,
    Session,
    SessionManager,
    SessionState,
    VisualFrame,
    VisualInputConfig,
    _framebuf_py,
    available_backends,
)
from capsule_sessions._validate import MAX_INSTANT_SECONDS
from support import FakeClock

INTERRUPTS = [KeyboardInterrupt, SystemExit, asyncio.CancelledError]


# -- 1. a BaseException from on_session_end ------------------------------------------


def _blocked_reader(session):
    """A thread iterating a new subscription of ``session`` that has read one frame, so
    it waits in get() for the next; returns (thread, subscription, frame_seqs it read)."""
    sub = session.subscribe_visual_frames(4)
    seen = []
    got_one = threading.Event()

    def read():
        for frame in sub:
            seen.append(frame.frame_seq)
            got_one.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    session.store_frame(b"frame", source="cam", max_recent=1, frame_seq=1)
    assert got_one.wait(10)
    return thread, sub, seen


def _assert_ended(sessions, subs, readers):
    for s in sessions:
        assert s.state is SessionState.CLOSED, f"{s.id} was removed but not ended"
    for sub in subs:
        assert sub.closed
    for thread in readers:
        thread.join(10)
        assert not thread.is_alive(), "a reader blocked on an interrupted session never woke"


@pytest.mark.parametrize("interrupt", INTERRUPTS, ids=lambda e: e.__name__)
def test_interrupted_eviction_still_ends_every_session(make_manager, clock, interrupt):
    attempted = []

    def on_end(session):
        attempted.append(session.id)
        if session.id == "a":
            raise interrupt("stop")

    clock.set(0.0)
    m = make_manager(idle_timeout=1.0, on_session_end=on_end)
    sessions = [m.create(name) for name in ("a", "b", "c")]
    readers = [_blocked_reader(s) for s in sessions]
    clock.set(5.0)
    with pytest.raises(interrupt):
        m.evict_idle()
    assert attempted == ["a", "b", "c"]  # the callback was attempted for every session
    assert m.count() == 0
    _assert_ended(sessions, [r[1] for r in readers], [r[0] for r in readers])
    assert [r[2] for r in readers] == [[1], [1], [1]]


@pytest.mark.parametrize("interrupt", INTERRUPTS, ids=lambda e: e.__name__)
def test_interrupted_delete_still_ends_the_session(make_manager, interrupt):
    def on_end(session):
        raise interrupt("stop")

    m = make_manager(on_session_end=on_end)
    s = m.create("a")
    thread, sub, _ = _blocked_reader(s)
    with pytest.raises(interrupt):
        m.delete("a")
    assert "a" not in m
    _assert_ended([s], [sub], [thread])


def test_a_base_exception_wins_over_an_earlier_error(make_manager, clock):
    def on_end(session):
        if session.id == "a":
            raise RuntimeError("ordinary failure")
        if session.id == "b":
            raise KeyboardInterrupt

    clock.set(0.0)
    m = make_manager(idle_timeout=1.0, on_session_end=on_end)
    sessions = [m.create(name) for name in ("a", "b", "c")]
    subs = [s.subscribe_visual_frames() for s in sessions]
    clock.set(5.0)
    with pytest.raises(KeyboardInterrupt):
        m.evict_idle()
    _assert_ended(sessions, subs, [])


def test_the_first_of_several_errors_is_raised(make_manager, clock):
    def on_end(session):
        raise RuntimeError(f"failed on {session.id}")

    clock.set(0.0)
    m = make_manager(idle_timeout=1.0, on_session_end=on_end)
    sessions = [m.create(name) for name in ("a", "b")]
    clock.set(5.0)
    with pytest.raises(RuntimeError, match="failed on a"):
        m.evict_idle()
    _assert_ended(sessions, [], [])


def test_interrupted_background_eviction_still_ends_every_session(backend, clock, monkeypatch):
    died = []
    thread_died = threading.Event()

    def hook(args):
        died.append(args.exc_type)
        thread_died.set()

    monkeypatch.setattr(threading, "excepthook", hook)

    def on_end(session):
        if session.id == "a":
            raise KeyboardInterrupt

    clock.set(0.0)
    m = SessionManager(8, 1.0, cleanup_interval=0.005, on_session_end=on_end, clock=clock, backend=backend)
    try:
        sessions = [m.create(name) for name in ("a", "b", "c")]
        readers = [_blocked_reader(s) for s in sessions]
        clock.set(5.0)
        assert thread_died.wait(10), "the callback's KeyboardInterrupt did not reach the cleanup thread"
        # The interrupt ends the cleanup thread (as in any thread), but only after the
        # whole round was ended.
        assert died == [KeyboardInterrupt]
        _assert_ended(sessions, [r[1] for r in readers], [r[0] for r in readers])
    finally:
        m.stop()


# -- 2. ChatMessage fields are validated by add_message ------------------------------

BAD_MESSAGES = [
    ("msg.timestamp", ValueError, dict(timestamp=math.nan)),
    ("msg.timestamp", ValueError, dict(timestamp=math.inf)),
    ("msg.timestamp", ValueError, dict(timestamp=-math.inf)),
    ("msg.timestamp", ValueError, dict(timestamp=1e300)),
    ("msg.timestamp", ValueError, dict(timestamp=10**400)),
    ("msg.timestamp", TypeError, dict(timestamp="now")),
    ("msg.timestamp", TypeError, dict(timestamp=True)),
    ("msg.timestamp", TypeError, dict(timestamp=dt.datetime(2024, 1, 1))),
    ("msg.turn_seq", TypeError, dict(turn_seq="1")),
    ("msg.turn_seq", TypeError, dict(turn_seq=1.0)),
    ("msg.turn_seq", TypeError, dict(turn_seq=None)),
    ("msg.turn_seq", TypeError, dict(turn_seq=True)),
    ("msg.turn_seq", ValueError, dict(turn_seq=2**64)),
    ("msg.role", TypeError, dict(role=None)),
    ("msg.role", TypeError, dict(role=b"assistant")),
    ("msg.content", TypeError, dict(content=None)),
    ("msg.content", TypeError, dict(content=5)),
]


@pytest.mark.parametrize("name,error,bad", BAD_MESSAGES, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_MESSAGES)])
def test_add_message_rejects_bad_fields(make_session, clock, name, error, bad):
    s = make_session()
    s.add_message(ChatMessage("user", "hi", turn_seq=1))
    before = (s.history_snapshot(), s.last_active_at)
    fields = dict(role="assistant", content="hello", timestamp=None, turn_seq=1)
    fields.update(bad)
    clock.advance(5)
    with pytest.raises(error) as info:
        s.add_message(ChatMessage(**fields))
    assert name in str(info.value), f"message {str(info.value)!r} does not name {name!r}"
    assert (s.history_snapshot(), s.last_active_at) == before, "a rejected message changed the session"
    assert len(s.to_dict()["history"]) == 1


def test_add_message_keeps_valid_fields_as_plain_values(make_session, clock):
    clock.set(50.0)
    s = make_session()
    s.add_message(ChatMessage("user", "a", timestamp=7))  # an int instant is a valid instant
    s.add_message(ChatMessage("user", "b"))  # None: the clock's now
    s.add_message(ChatMessage("user", "c", timestamp=0.0))  # 0.0 is an instant, not "unset"
    history = s.history_snapshot()
    assert [(m.timestamp, type(m.timestamp)) for m in history] == [(7.0, float), (50.0, float), (0.0, float)]
    assert len(s.to_dict()["history"]) == 3


# -- 3. idle_timeout: huge means never, NaN is an error, <= 0 evicts at once ----------


@pytest.mark.parametrize("forever", [10**400, math.inf, 1e300, dt.timedelta.max],
                         ids=["huge-int", "inf", "1e300", "timedelta.max"])
def test_a_huge_idle_timeout_never_evicts(make_manager, clock, forever):
    clock.set(-MAX_INSTANT_SECONDS * 0.999)
    m = make_manager(idle_timeout=forever)
    s = m.create("a")
    # The two instants furthest apart there are: still not idle.
    assert m.evict_idle(now=MAX_INSTANT_SECONDS * 0.999) == []
    assert m.list() == [s] and s.state is SessionState.INIT


@pytest.mark.parametrize("bad", [math.nan, -math.nan], ids=["nan", "-nan"])
def test_a_nan_idle_timeout_is_a_value_error(backend, bad):
    with pytest.raises(ValueError, match="idle_timeout"):
        SessionManager(1, bad, cleanup_interval=None, backend=backend)


@pytest.mark.parametrize("timeout", [-1.0, -(10**400), -math.inf, dt.timedelta(seconds=-5)],
                         ids=["-1", "-huge-int", "-inf", "timedelta"])
def test_a_negative_idle_timeout_evicts_every_session(make_manager, clock, timeout):
    # As in Go (idle when now - last_active > idle_timeout): below zero even a session
    # touched at this very instant is idle.
    clock.set(10.0)
    m = make_manager(idle_timeout=timeout)
    s = m.create("a")
    assert m.evict_idle() == [s]


def test_a_zero_idle_timeout_evicts_any_session_idle_at_all(make_manager, clock):
    clock.set(10.0)
    m = make_manager(idle_timeout=0)
    s = m.create("a")
    assert m.evict_idle() == []  # idle for exactly 0 s: not longer than 0
    clock.advance(0.001)
    assert m.evict_idle() == [s]


# -- 4. subclasses of str, int and float: their value is used, never their hooks ----


class Tagged(str):
    def __str__(self):
        return "tagged:" + str.__str__(self)

    def __repr__(self):
        return "Tagged(" + str.__repr__(self) + ")"


class HookedInt(int):
    """An int whose conversion hooks all lie: only its value may be used."""

    def __index__(self):
        return -7

    def __int__(self):
        return -7

    def __float__(self):
        return -7.0


class HookedFloat(float):
    def __float__(self):
        return -7.0


def _exact(value, expected):
    assert value == expected and type(value) is type(expected), f"{value!r} ({type(value).__name__})"


def test_str_subclasses_are_stored_as_their_contents(make_session, make_manager):
    m = make_manager()
    s = m.create(Tagged("a"), character_id=Tagged("char"))
    _exact(s.id, "a")
    _exact(s.character_id, "char")
    assert m.get("a") is s
    direct = make_session(Tagged("b"), character_id=Tagged("c"))
    _exact(direct.id, "b")
    _exact(direct.character_id, "c")
    s.set_owner_id(Tagged("owner"))
    _exact(s.owner_id, "owner")
    sub = s.subscribe_visual_frames(4, policy=Tagged("drop_oldest"))
    _exact(sub.policy, "drop_oldest")
    s.add_message(ChatMessage("user", "q", turn_seq=1))
    s.add_message(ChatMessage("user", "next", turn_seq=2))
    s.add_message(ChatMessage(Tagged("assistant"), Tagged("answer"), turn_seq=1))
    history = s.history_snapshot()
    assert [m.content for m in history] == ["q", "answer", "next"]  # still inserted as an assistant reply
    _exact(history[1].role, "assistant")
    _exact(history[1].content, "answer")


def test_a_str_subclass_source_is_the_same_source(session):
    session.start_visual_input("cam")
    assert session.store_frame(b"one", source="cam", max_recent=4, frame_seq=1, now=1.0)
    assert session.store_frame(b"two", source=Tagged("cam"), mime_type=Tagged("image/x"), max_recent=4,
                               frame_seq=2, now=2.0)
    frame = VisualFrame(b"three", mime_type=Tagged("image/y"), source=Tagged("cam"), frame_seq=3)
    assert session.store_visual_frame(frame, 4, 0.0, now=3.0)
    session.start_visual_input(Tagged("cam"), now=4.0)  # the active source: nothing is cleared
    frames = session.latest_visual_frames(math.inf, now=4.0)
    assert [f.frame_seq for f in frames] == [1, 2, 3]
    for f in frames:
        _exact(f.source, "cam")
    _exact(frames[1].mime_type, "image/x")
    _exact(frames[2].mime_type, "image/y")
    stats = session.visual_stats()
    assert (stats["source_resets"], stats["frames"], stats["accepted"]) == (0, 3, 3)
    session.stop_visual_input(Tagged("cam"), now=5.0)  # the active one: clears everything
    assert session.visual_stats()["frames"] == 0


def test_ingest_config_mime_types_are_plain_str(session):
    config = VisualInputConfig(mime_types=(Tagged("video/x-raw-gray"),))
    for mime in config.mime_types:
        _exact(mime, "video/x-raw-gray")
    frame = VisualFrame(b"\x00" * 6, mime_type=Tagged("video/x-raw-gray"), width=3, height=2, source="cam")
    assert session.ingest_visual_frame(frame, config, now=1.0)
    _exact(session.latest_visual_frames(1.0, now=1.0)[0].mime_type, "video/x-raw-gray")


def test_number_subclasses_are_read_by_value(backend):
    s = Session("a", clock=lambda: HookedFloat(10.0), backend=backend)
    _exact(s.created_at, 10.0)
    sub = s.subscribe_visual_frames(HookedInt(3))
    assert sub.maxsize == 3
    args = dict(source="cam", max_recent=HookedInt(2), min_interval=HookedFloat(0.5))
    assert s.store_frame(b"a", width=HookedInt(4), height=HookedInt(2), timestamp_ms=HookedInt(9),
                         frame_seq=HookedInt(1), now=HookedFloat(11.0), **args)
    assert not s.store_frame(b"b", frame_seq=2, now=HookedFloat(11.25), **args)  # 0.25 s < 0.5 s
    assert s.store_frame(b"c", frame_seq=3, now=HookedInt(12), **args)
    assert s.store_frame(b"d", frame_seq=4, now=12.5, **args)
    frames = s.latest_visual_frames(math.inf, now=13.0)
    assert [f.frame_seq for f in frames] == [3, 4]  # max_recent=2 kept the newest two
    _exact(frames[0].received_at, 12.0)
    _exact(frames[0].frame_seq, 3)
    assert [f.frame_seq for f in s.latest_visual_frames(HookedFloat(0.6), now=HookedInt(13))] == [4]
    assert s.store_frame(b"e", frame_seq=5, now=13.0, **args)
    stored = sub.get(timeout=HookedFloat(0.0))
    _exact(stored.width, 4)
    _exact(stored.height, 2)
    _exact(stored.timestamp_ms, 9)
    _exact(stored.received_at, 11.0)
    s.touch(now=HookedFloat(20.0))
    _exact(s.last_active_at, 20.0)
    s.add_message(ChatMessage("user", "x", timestamp=HookedFloat(5.0), turn_seq=HookedInt(2)))
    msg = s.history_snapshot()[0]
    _exact(msg.timestamp, 5.0)
    _exact(msg.turn_seq, 2)


def test_number_subclasses_in_manager_and_config(make_manager, clock):
    clock.set(0.0)
    m = make_manager(HookedInt(1), idle_timeout=HookedFloat(10.0))
    assert m.max_concurrent == 1
    _exact(m.idle_timeout, 10.0)
    m.create("a")
    assert m.evict_idle(now=HookedFloat(10.0)) == []
    assert len(m.evict_idle(now=HookedInt(11))) == 1


# -- 5. a wrong call signature: the same TypeError on both backends ------------------

PLACEHOLDER = None


def _session(backend):
    return Session("s", clock=FakeClock(), backend=backend)


def _subscription(backend):
    return _session(backend).subscribe_visual_frames()  # a handle keeps its ring alive


# (the class whose signatures are the reference, how to make an instance on a backend)
TARGETS = {
    "Session": (Session, _session),
    "Subscription": (_framebuf_py.Subscription, _subscription),
    "SessionManager": (SessionManager, lambda backend: SessionManager(4, cleanup_interval=None, backend=backend)),
    "VisualInputConfig": (VisualInputConfig, lambda backend: VisualInputConfig()),
}
CONSTRUCTORS = {
    "Session": lambda backend, *a, **k: Session(*a, backend=backend, **k),
    "SessionManager": lambda backend, *a, **k: SessionManager(*a, backend=backend, **k),
    "VisualInputConfig": lambda backend, *a, **k: VisualInputConfig(*a, **k),
}


def _bad_calls(function):
    """(kind, args, kwargs) of the wrong calls that ``function``'s signature allows."""
    params = list(inspect.signature(function).parameters.values())[1:]  # without self
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_pos = [p for p in positional if p.default is p.empty]
    required_kw = {p.name: PLACEHOLDER for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty}
    filled = [PLACEHOLDER] * len(required_pos)
    calls = []
    if required_pos or required_kw:
        calls.append(("missing-all", [], {}))
    if required_pos and required_kw:
        calls.append(("missing-keyword", filled, {}))
    calls.append(("unknown-keyword", filled, dict(required_kw, bogus=1)))
    if not any(p.kind is p.VAR_POSITIONAL for p in params):
        calls.append(("too-many-positional", [PLACEHOLDER] * (len(positional) + 1), required_kw))
    return calls


def _signature_cases():
    cases = []
    for target, (cls, _) in TARGETS.items():
        # getattr, not vars(): on the class a compiled forwarder gives its Python method.
        names = sorted(n for n in vars(cls) if not n.startswith("_") and inspect.isfunction(getattr(cls, n)))
        if target in CONSTRUCTORS:
            names.insert(0, "__init__")
        for name in names:
            for kind, args, kwargs in _bad_calls(getattr(cls, name)):
                cases.append(pytest.param(target, name, args, kwargs, id=f"{target}.{name}-{kind}"))
    return cases


def _call(backend, target, name, args, kwargs):
    """The message of the TypeError one wrong call raises on ``backend``, or what it did."""
    obj = None
    if name == "__init__":
        method = lambda *a, **k: CONSTRUCTORS[target](backend, *a, **k)  # noqa: E731
    else:
        obj = TARGETS[target][1](backend)
        method = getattr(obj, name)
    try:
        result = method(*args, **kwargs)
    except TypeError as exc:
        return str(exc)
    finally:
        if isinstance(obj, SessionManager):
            obj.stop()
    if isinstance(result, SessionManager):
        result.stop()
    if inspect.iscoroutine(result):
        result.close()
    return f"no TypeError: returned {result!r}"


# Cython's own argument parser words these differently; ext/capsule_sessions/_subscription.pxi is the place to
# change that (see the report of the hardening-api branch), so these stay marked.
PYX_SIGNATURE_DIFFERENCES: set = set()


@pytest.mark.skipif("cython" not in available_backends(), reason="compares the two backends")
@pytest.mark.parametrize("target,name,args,kwargs", _signature_cases())
def test_wrong_signature_gives_the_same_type_error_on_both_backends(request, target, name, args, kwargs):
    if target in PYX_SIGNATURE_DIFFERENCES:
        request.applymarker(pytest.mark.xfail(strict=True, reason="message made by Cython's argument parser"))
    messages = {backend: _call(backend, target, name, args, kwargs) for backend in ("python", "cython")}
    qualname = getattr(TARGETS[target][0], name).__qualname__
    assert messages["python"].startswith(f"{qualname}() "), messages
    assert messages["cython"] == messages["python"]


def test_the_signature_cases_cover_the_examples():
    ids = {p.id for p in _signature_cases()}
    for example in ("Session.store_frame-missing-keyword", "Session.store_frame-unknown-keyword",
                    "Session.store_frame-too-many-positional", "Subscription.get-too-many-positional",
                    "Session.subscribe_visual_frames-too-many-positional", "Session.latest_visual_frames-missing-all",
                    "SessionManager.create-missing-all", "VisualInputConfig.__init__-unknown-keyword",
                    "Session.__init__-missing-all"):
        assert example in ids


def test_session_methods_are_found_on_the_class(session, backend):
    # docs/spec.md: subclass overrides and mock.patch.object(Session, ...) work on both backends.
    class Counting(Session):
        def store_frame(self, data, **kwargs):
            self.calls = getattr(self, "calls", 0) + 1
            return super().store_frame(data, **kwargs)

    counting = Counting("c", clock=FakeClock(), backend=backend)
    assert counting.store_frame(b"x", source="cam", max_recent=1)
    assert counting.calls == 1
    with mock.patch.object(Session, "latest_visual_frames", return_value=["patched"]):
        assert session.latest_visual_frames(1.0) == ["patched"]


def test_forwarded_methods_behave_as_methods_everywhere(backend):
    # The compiled forwarders (ext/capsule_sessions/_forward.h) must be indistinguishable from the Python
    # methods they stand for: called unbound, through super(), patched on an instance,
    # taken as a bound method, and with a wrong call worded as Python words it.
    session = Session("fwd", clock=FakeClock(), backend=backend)
    assert Session.store_frame(session, b"a", source="cam", max_recent=2)

    class Logged(Session):
        def latest_visual_frames(self, ttl, now=None):
            return ["logged"] + super().latest_visual_frames(ttl, now)

    logged = Logged("l", clock=FakeClock(), backend=backend)
    logged.store_frame(b"b", source="cam", max_recent=2)
    assert [x if isinstance(x, str) else bytes(x.data) for x in logged.latest_visual_frames(10)] == ["logged", b"b"]
    store = session.store_frame
    assert store(b"c", source="cam", max_recent=2) and session.visual_stats()["accepted"] == 2
    with mock.patch.object(session, "visual_stats", return_value={"patched": True}):
        assert session.visual_stats() == {"patched": True}
    assert session.visual_stats()["accepted"] == 2
    assert list(inspect.signature(Session.latest_visual_frames).parameters) == ["self", "ttl", "now"]
    with pytest.raises(TypeError, match=r"^Session\.visual_stats\(\) takes 1 positional argument but 2 were given$"):
        session.visual_stats(1)
    with pytest.raises(TypeError, match="buffer protocol"):  # the ring's own error stands
        session.store_frame(42, source="cam", max_recent=2)


def test_forwarders_are_compiled_where_the_extension_is(backend):
    from capsule_sessions import _backend

    forwarder = vars(Session)["store_frame"]
    if _backend.ring_forward is None:
        assert inspect.isfunction(forwarder)
    else:
        assert type(forwarder).__name__ == "RingForward"
        assert Session.store_frame.__doc__ and Session.store_frame.__name__ == "store_frame"
