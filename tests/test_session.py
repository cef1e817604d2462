"""Session core: state, owner, pipeline and turn sequencing, greeting, history (and the
validation of the messages added to it), dialog context, and methods that stay methods
(found on the class, subclassed, patched, forwarded to the compiled ring)."""

from __future__ import annotations

import datetime as dt
import inspect
import json
import math
import threading
from unittest import mock

import pytest

from capsule_sessions import (
    ChatMessage,
    ConversationSnapshot,
    DialogContextItem,
    PipelineMode,
    Session,
    SessionState,
)
from support import FakeClock


def test_new_session_attributes(make_session, clock, backend):
    clock.set(42.0)
    s = make_session("abc", PipelineMode.STANDARD, "char-1")
    assert (s.id, s.character_id, s.mode) == ("abc", "char-1", PipelineMode.STANDARD)
    assert s.created_at == 42.0 and s.last_active_at == 42.0
    assert s.state is SessionState.INIT
    assert s.owner_id == ""
    assert s.pipeline_cancel is None and s.recording_dir is None
    assert s.current_turn_seq == 0
    assert s.history_snapshot() == [] and s.dialog_context_snapshot() == []
    assert s.backend == backend


def test_defaults(backend):
    s = Session("x", backend=backend)
    assert s.mode is PipelineMode.OMNI and s.character_id == ""


def test_mode_accepts_int_and_alias(make_session):
    assert make_session(mode=1).mode is PipelineMode.STANDARD
    assert make_session(mode=PipelineMode.VOICE_LLM).mode is PipelineMode.OMNI


def test_mutable_attributes(session):
    called = []
    session.pipeline_cancel = lambda: called.append(1)
    session.recording_dir = "/tmp/rec"
    session.pipeline_cancel()
    assert called == [1] and session.recording_dir == "/tmp/rec"


def test_set_state_sets_and_touches(session, clock):
    clock.advance(5)
    session.set_state(SessionState.LISTENING)
    assert session.state is SessionState.LISTENING
    assert session.last_active_at == clock()
    session.set_state(3)
    assert session.state is SessionState.PROCESSING


def test_state_is_read_only(session):
    with pytest.raises(AttributeError):
        session.state = SessionState.CLOSED


def test_touch_uses_clock_or_given_instant(session, clock):
    clock.advance(7.5)
    session.touch()
    assert session.last_active_at == clock()
    session.touch(now=0.0)
    assert session.last_active_at == 0.0
    assert session.created_at == 1000.0


def test_owner_id(session, clock):
    before = session.last_active_at
    clock.advance(1)
    session.set_owner_id("user-7")
    assert session.owner_id == "user-7"
    assert session.last_active_at == before  # Go's SetOwnerID does not touch
    with pytest.raises(AttributeError):
        session.owner_id = "x"


# -- pipeline sequencing -------------------------------------------------------------


def test_pipeline_seq_increments_and_current(session):
    assert session.is_current_pipeline(0)
    first = session.mark_pipeline_running()
    second = session.mark_pipeline_running()
    assert (first, second) == (1, 2)
    assert session.is_current_pipeline(2) and not session.is_current_pipeline(1)


def test_wait_pipeline_done_without_pipeline_is_true(session):
    assert session.wait_pipeline_done(0) is True
    assert session.wait_pipeline_done(None) is True


def test_wait_pipeline_done_times_out_then_finishes(session):
    seq = session.mark_pipeline_running()
    assert session.wait_pipeline_done(0) is False
    assert session.wait_pipeline_done(dt.timedelta(0)) is False
    session.mark_pipeline_finished(seq)
    assert session.wait_pipeline_done(0) is True
    session.mark_pipeline_finished(seq)  # finishing twice is harmless (Go: already closed)
    assert session.wait_pipeline_done(0) is True


def test_stale_pipeline_finish_is_ignored(session):
    old = session.mark_pipeline_running()
    new = session.mark_pipeline_running()
    session.mark_pipeline_finished(old)
    assert session.wait_pipeline_done(0) is False
    session.mark_pipeline_finished(new + 5)  # a future seq is not current either
    assert session.wait_pipeline_done(0) is False
    session.mark_pipeline_finished(new)
    assert session.wait_pipeline_done(0) is True


def test_finish_before_any_run_is_harmless(session):
    session.mark_pipeline_finished(0)
    assert session.wait_pipeline_done(0) is True
    seq = session.mark_pipeline_running()
    assert session.wait_pipeline_done(0) is False
    session.mark_pipeline_finished(seq)


def test_wait_pipeline_done_wakes_when_another_thread_finishes(session):
    seq = session.mark_pipeline_running()
    results = []
    waiter = threading.Thread(target=lambda: results.append(session.wait_pipeline_done(30)))
    waiter.start()
    session.mark_pipeline_finished(seq)
    waiter.join(10)
    assert not waiter.is_alive()
    assert results == [True]


def test_new_pipeline_needs_its_own_finish(session):
    first = session.mark_pipeline_running()
    session.mark_pipeline_finished(first)
    session.mark_pipeline_running()
    assert session.wait_pipeline_done(0) is False


# -- turns and greeting ----------------------------------------------------------------


def test_turn_seq(session, clock):
    assert session.current_turn_seq == 0 and session.is_current_turn(0)
    clock.advance(3)
    assert session.mark_turn_started() == 1
    assert session.last_active_at == clock()  # Go's MarkTurnStarted touches
    assert session.mark_turn_started() == 2
    assert session.current_turn_seq == 2
    assert session.is_current_turn(2) and not session.is_current_turn(1)
    with pytest.raises(AttributeError):
        session.current_turn_seq = 9


def test_greeting_only_once(session, clock):
    clock.advance(2)
    assert session.try_start_voice_startup_greeting() is True
    assert session.last_active_at == clock()
    clock.advance(2)
    assert session.try_start_voice_startup_greeting() is False
    assert session.last_active_at == clock() - 2  # the refused call does not touch


def test_greeting_once_across_threads(session):
    results = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def race():
        barrier.wait()
        won = session.try_start_voice_startup_greeting()
        with lock:
            results.append(won)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results.count(True) == 1 and len(results) == 8


# -- history -------------------------------------------------------------------------


def _roles(session):
    return [(m.role, m.content, m.turn_seq) for m in session.history_snapshot()]


def test_add_message_fills_missing_timestamp_and_touches(session, clock):
    clock.set(50.0)
    session.add_message(ChatMessage("user", "a"))
    session.add_message(ChatMessage("user", "b", timestamp=0.0))  # 0.0 is set, not missing
    session.add_message(ChatMessage("user", "c", timestamp=12.5))
    assert [m.timestamp for m in session.history_snapshot()] == [50.0, 0.0, 12.5]
    assert session.last_active_at == 50.0


def test_add_message_does_not_keep_the_callers_object(session):
    msg = ChatMessage("user", "a")
    session.add_message(msg)
    msg.content = "changed"
    assert msg.timestamp is None  # the caller's message is not filled in
    assert session.history_snapshot()[0].content == "a"


def test_assistant_inserted_after_last_message_of_same_turn(session):
    session.add_message(ChatMessage("user", "u1", turn_seq=1))
    session.add_message(ChatMessage("user", "u1b", turn_seq=1))
    session.add_message(ChatMessage("user", "u2", turn_seq=2))
    session.add_message(ChatMessage("assistant", "a1", turn_seq=1))
    assert _roles(session) == [("user", "u1", 1), ("user", "u1b", 1), ("assistant", "a1", 1), ("user", "u2", 2)]
    # The newest message of the turn is now a1; the next reply goes after it.
    session.add_message(ChatMessage("assistant", "a1b", turn_seq=1))
    assert [c for _, c, _ in _roles(session)] == ["u1", "u1b", "a1", "a1b", "u2"]


def test_assistant_without_matching_turn_is_appended(session):
    session.add_message(ChatMessage("user", "u1", turn_seq=1))
    session.add_message(ChatMessage("assistant", "a5", turn_seq=5))
    assert [c for _, c, _ in _roles(session)] == ["u1", "a5"]


def test_assistant_turn_zero_is_appended(session):
    session.add_message(ChatMessage("user", "u0", turn_seq=0))
    session.add_message(ChatMessage("user", "u1", turn_seq=1))
    session.add_message(ChatMessage("assistant", "a0", turn_seq=0))
    assert [c for _, c, _ in _roles(session)] == ["u0", "u1", "a0"]


def test_non_assistant_with_turn_is_appended(session):
    session.add_message(ChatMessage("user", "u1", turn_seq=1))
    session.add_message(ChatMessage("user", "u2", turn_seq=2))
    session.add_message(ChatMessage("user", "late", turn_seq=1))
    session.add_message(ChatMessage("system", "sys", turn_seq=1))
    assert [c for _, c, _ in _roles(session)] == ["u1", "u2", "late", "sys"]


def test_insertion_into_empty_history_appends(session):
    session.add_message(ChatMessage("assistant", "a", turn_seq=3))
    assert _roles(session) == [("assistant", "a", 3)]


def test_role_match_is_exact(session):
    session.add_message(ChatMessage("user", "u1", turn_seq=1))
    session.add_message(ChatMessage("user", "u2", turn_seq=2))
    session.add_message(ChatMessage("Assistant", "A", turn_seq=1))
    assert [c for _, c, _ in _roles(session)] == ["u1", "u2", "A"]


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


def test_history_snapshot_is_a_copy(session):
    session.add_message(ChatMessage("user", "a"))
    snap = session.history_snapshot()
    snap[0].content = "mutated"
    snap.append(ChatMessage("user", "extra"))
    again = session.history_snapshot()
    assert len(again) == 1 and again[0].content == "a"


def test_conversation_snapshot(make_session, clock):
    clock.set(10.0)
    s = make_session("sid", character_id="char")
    clock.set(20.0)
    s.add_message(ChatMessage("user", "hello"))
    snap = s.conversation_snapshot()
    assert isinstance(snap, ConversationSnapshot)
    assert (snap.session_id, snap.character_id, snap.created_at, snap.last_active_at) == ("sid", "char", 10.0, 20.0)
    assert [m.content for m in snap.history] == ["hello"]
    snap.history[0].content = "x"
    snap.history.clear()
    assert [m.content for m in s.history_snapshot()] == ["hello"]


def test_dialog_context_is_copied_in_and_out(session, clock):
    items = [DialogContextItem("user", "a", 1), DialogContextItem("assistant", "b", 2)]
    before = session.last_active_at
    clock.advance(1)
    session.set_dialog_context(items)
    assert session.last_active_at == before  # Go's SetDialogContext does not touch
    items[0].text = "mutated"
    items.append(DialogContextItem("user", "c"))
    snap = session.dialog_context_snapshot()
    assert [(i.role, i.text, i.timestamp) for i in snap] == [("user", "a", 1), ("assistant", "b", 2)]
    snap[0].text = "again"
    assert session.dialog_context_snapshot()[0].text == "a"
    session.set_dialog_context(iter([DialogContextItem("x", "y")]))
    assert [i.text for i in session.dialog_context_snapshot()] == ["y"]
    session.set_dialog_context([])
    assert session.dialog_context_snapshot() == []


def test_to_dict_is_json_ready(make_session, clock):
    clock.set(100.0)
    s = make_session("sid", PipelineMode.STANDARD, "char")
    s.add_message(ChatMessage("user", "hi", turn_seq=1))
    s.add_message(ChatMessage("assistant", "yo"))
    out = s.to_dict()
    assert set(out) == {"id", "character_id", "mode", "history", "created_at", "last_active_at"}
    assert out["id"] == "sid" and out["character_id"] == "char"
    assert out["mode"] == 1 and type(out["mode"]) is int
    assert [set(m) for m in out["history"]] == [{"role", "content", "timestamp", "turn_seq"},
                                                {"role", "content", "timestamp"}]
    for key in ("created_at", "last_active_at"):
        assert out[key].endswith("Z")
        dt.datetime.fromisoformat(out[key][:-1] + "+00:00")
    json.dumps(out)


def test_to_dict_maps_instants_through_the_session_clock(make_session, clock):
    clock.set(100.0)
    s = make_session()
    clock.set(160.0)  # the session was made a minute ago
    s.touch()
    out = s.to_dict()
    created = dt.datetime.fromisoformat(out["created_at"][:-1] + "+00:00")
    last = dt.datetime.fromisoformat(out["last_active_at"][:-1] + "+00:00")
    assert abs((last - created).total_seconds() - 60.0) < 0.01
    assert abs(last.timestamp() - dt.datetime.now(dt.timezone.utc).timestamp()) < 5.0


# -- methods: found on the class, forwarded as methods -----------------------------

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


def test_repr_names_the_session(session):
    assert "s1" in repr(session)
