"""Arguments, on every backend: str/int/float subclasses are read by their value, never
through their (lying) hooks; a wrong call signature is the same TypeError, worded as
Python words it, on both backends. (Bad argument values are tests/test_bad_input.py's.)"""

from __future__ import annotations

import inspect
import math

import pytest

from capsule_sessions import (
    ChatMessage,
    Session,
    SessionManager,
    VisualFrame,
    VisualInputConfig,
    _framebuf_py,
    available_backends,
)
from support import FakeClock

# -- subclasses of str, int and float: their value is used, never their hooks ------


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


# -- a wrong call signature: the same TypeError on both backends ---------------------

PLACEHOLDER = None


def _session(backend):
    return Session("s", clock=FakeClock(), backend=backend)


def _subscription(backend):
    return _session(backend).subscribe_visual_frames()  # a handle keeps its ring alive


def _loan(backend):
    return _session(backend).loan_frame(4)  # a loan keeps its ring alive


# (the class whose signatures are the reference, how to make an instance on a backend)
TARGETS = {
    "Session": (Session, _session),
    "Subscription": (_framebuf_py.Subscription, _subscription),
    "FrameLoan": (_framebuf_py.FrameLoan, _loan),
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
                    "Session.__init__-missing-all", "FrameLoan.commit-missing-all",
                    "FrameLoan.commit-too-many-positional", "FrameLoan.as_array-unknown-keyword",
                    "Session.loan_frame-missing-all"):
        assert example in ids


