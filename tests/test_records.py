"""Enums and records: SessionState, PipelineMode, ChatMessage, DialogContextItem, VisualFrame
(a value: replaced, copied and pickled as one)."""

from __future__ import annotations

import copy
import datetime as dt
import pickle
import time

import numpy as np
import pytest

import capsule_sessions as cs
from capsule_sessions import ChatMessage, DialogContextItem, PipelineMode, SessionState, VisualFrame
from support import FakeClock


def test_session_state_values_and_str():
    assert [s.name for s in SessionState] == ["INIT", "CONNECTED", "LISTENING", "PROCESSING", "SPEAKING", "CLOSED"]
    assert [int(s) for s in SessionState] == [0, 1, 2, 3, 4, 5]
    assert str(SessionState.LISTENING) == "listening"
    assert [str(s) for s in SessionState] == ["init", "connected", "listening", "processing", "speaking", "closed"]
    assert f"{SessionState.CLOSED}" == "closed"


def test_pipeline_mode_values_and_alias():
    assert PipelineMode.OMNI == 0 and PipelineMode.STANDARD == 1
    assert PipelineMode.VOICE_LLM is PipelineMode.OMNI
    assert PipelineMode(0) is PipelineMode.OMNI
    # An alias is not a member of its own: iteration shows the two real modes.
    assert list(PipelineMode) == [PipelineMode.OMNI, PipelineMode.STANDARD]


def test_chat_message_defaults():
    msg = ChatMessage("user", "hi")
    assert (msg.role, msg.content, msg.timestamp, msg.turn_seq) == ("user", "hi", None, 0)


def test_chat_message_to_dict_omits_unset_fields():
    assert ChatMessage("user", "hi").to_dict() == {"role": "user", "content": "hi"}
    assert ChatMessage("user", "hi", turn_seq=3).to_dict() == {"role": "user", "content": "hi", "turn_seq": 3}


def _parse_rfc3339(text: str) -> dt.datetime:
    assert text.endswith("Z"), text
    parsed = dt.datetime.fromisoformat(text[:-1] + "+00:00")
    assert parsed.tzinfo is not None and parsed.utcoffset() == dt.timedelta(0)
    return parsed


def test_chat_message_timestamp_is_rfc3339_utc_mapped_through_the_clock():
    clock = FakeClock(500.0)
    # 0.0 is an instant like any other, not "unset".
    for instant in (490.0, 0.0):
        before = time.time()
        out = ChatMessage("assistant", "x", timestamp=instant, turn_seq=1).to_dict(clock)
        after = time.time()
        assert set(out) == {"role", "content", "timestamp", "turn_seq"}
        wall = _parse_rfc3339(out["timestamp"]).timestamp()
        age = 500.0 - instant
        assert before - age - 1e-3 <= wall <= after - age + 1e-3


def test_chat_message_default_clock_is_monotonic():
    out = ChatMessage("user", "x", timestamp=time.monotonic()).to_dict()
    wall = _parse_rfc3339(out["timestamp"]).timestamp()
    assert abs(wall - time.time()) < 5.0


def test_dialog_context_item_defaults():
    item = DialogContextItem("user", "text")
    assert (item.role, item.text, item.timestamp) == ("user", "text", 0)


def test_visual_frame_defaults():
    f = VisualFrame(b"abc")
    assert (f.mime_type, f.width, f.height, f.source, f.timestamp_ms, f.frame_seq, f.received_at) == (
        "", 0, 0, "", 0, 0, 0.0)


@pytest.mark.parametrize(
    "other",
    [b"\x01\x02\x03\x04", bytearray(b"\x01\x02\x03\x04"), memoryview(b"\x01\x02\x03\x04"),
     np.array([1, 2, 3, 4], dtype=np.uint8), np.array([[1, 2], [3, 4]], dtype=np.uint8),
     np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint16)],
    ids=["bytes", "bytearray", "memoryview", "ndarray", "2d", "uint16"],
)
def test_visual_frame_equality_compares_bytes_not_containers(other):
    a = VisualFrame(b"\x01\x02\x03\x04", "m", 1, 2, "s", 3, 4, 5.0)
    assert a == VisualFrame(other, "m", 1, 2, "s", 3, 4, 5.0)


@pytest.mark.parametrize(
    "field,value",
    [("data", b"\x01\x02\x03\x05"), ("mime_type", "n"), ("width", 9), ("height", 9), ("source", "t"),
     ("timestamp_ms", 9), ("frame_seq", 9), ("received_at", 9.0)],
)
def test_visual_frame_differs_when_any_field_differs(field, value):
    fields = dict(data=b"\x01\x02\x03\x04", mime_type="m", width=1, height=2, source="s",
                  timestamp_ms=3, frame_seq=4, received_at=5.0)
    a = VisualFrame(**fields)
    fields[field] = value
    assert a != VisualFrame(**fields)


def test_visual_frame_not_equal_to_other_types():
    assert VisualFrame(b"a") != b"a"
    assert VisualFrame(b"a").__eq__(b"a") is NotImplemented


def test_as_array_default_is_flat_readonly_uint8_view():
    src = bytearray(range(12))
    arr = VisualFrame(src).as_array()
    assert arr.dtype == np.uint8 and arr.shape == (12,)
    assert not arr.flags.writeable
    src[0] = 99  # a zero-copy view sees its source
    assert arr[0] == 99


def test_as_array_reshape_and_dtype():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    f = VisualFrame(rgb, "video/x-raw-rgb", 3, 2)
    assert np.array_equal(f.as_array((f.height, f.width, 3)), rgb)
    words = VisualFrame(np.arange(6, dtype=np.uint16)).as_array((2, 3), np.uint16)
    assert words.dtype == np.uint16 and np.array_equal(words, np.arange(6).reshape(2, 3))
    assert not words.flags.writeable


@pytest.mark.parametrize("order", ["F", "strided"])
def test_as_array_of_non_c_contiguous_input_gives_c_order_bytes(order):
    base = np.arange(24, dtype=np.uint8).reshape(4, 6)
    data = np.asfortranarray(base) if order == "F" else base[:, ::2]
    arr = VisualFrame(data).as_array()
    assert arr.tobytes() == np.asarray(data).tobytes()
    assert not arr.flags.writeable


def test_frames_from_every_backend_are_visual_frames(make_session):
    s = make_session()
    s.store_frame(b"xyz", source="cam", max_recent=1)
    frame = s.latest_visual_frames(10.0)[0]
    assert isinstance(frame, cs.VisualFrame)
    assert frame == VisualFrame(b"xyz", source="cam", received_at=frame.received_at)
    rgb = np.arange(12, dtype=np.uint8)
    s.store_frame(rgb, source="cam", max_recent=1, mime_type="video/x-raw-rgb", width=2, height=2)
    got = s.latest_visual_frames(10.0)[0].as_array((2, 2, 3))
    assert np.array_equal(got, rgb.reshape(2, 2, 3))
    assert not got.flags.writeable


def test_replace_makes_a_new_frame_and_keeps_the_old():
    frame = VisualFrame(b"abc", "image/jpeg", 3, 1, "cam", 7, 8, 9.0)
    moved = frame.replace(source="screen", width=4)
    assert (moved.source, moved.width, moved.height, bytes(moved.data)) == ("screen", 4, 1, b"abc")
    assert (frame.source, frame.width) == ("cam", 3)
    with pytest.raises(TypeError, match="colour"):
        frame.replace(colour="red")


def test_frames_copy_and_pickle_as_values():
    frame = VisualFrame(b"abc", "image/jpeg", 3, 1, "cam", 7, 8, 9.0)
    assert copy.copy(frame) == frame
    assert copy.deepcopy(frame) == frame
    assert pickle.loads(pickle.dumps(frame)) == frame


def test_conversation_snapshot_is_a_named_tuple():
    snap = cs.ConversationSnapshot("id", "char", 1.0, 2.0, [])
    assert snap._fields == ("session_id", "character_id", "created_at", "last_active_at", "history")
    assert tuple(snap) == ("id", "char", 1.0, 2.0, [])
