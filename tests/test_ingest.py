"""VisualInputConfig and Session.ingest_visual_frame: the Go server's checks before a store."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest

from capsule_sessions import VisualFrame, VisualInputConfig

JPEG = b"\xff\xd8\xff\xe0" + bytes(60)
RAW = {"video/x-raw-gray": 1, "video/x-raw-rgb": 3, "video/x-raw-bgr": 3,
       "video/x-raw-rgba": 4, "video/x-raw-bgra": 4}


def jpeg(width=4, height=3, data=JPEG, **kw):
    return VisualFrame(data, "image/jpeg", width, height, kw.pop("source", "cam"), **kw)


def test_defaults_are_the_go_servers():
    c = VisualInputConfig()
    assert c.frame_interval == 1.0
    assert (c.max_width, c.max_height) == (1280, 720)
    assert c.max_frame_bytes == 1_048_576
    assert c.max_recent_frames == 2
    assert c.frame_ttl == 10.0
    assert tuple(c.mime_types) == ("image/jpeg",)


def test_mime_types_accepts_any_sequence():
    c = VisualInputConfig(mime_types=["image/jpeg", "video/x-raw-rgb"])
    assert tuple(c.mime_types) == ("image/jpeg", "video/x-raw-rgb")


@pytest.mark.parametrize(
    "kwargs,error,word",
    [
        (dict(max_width=0), ValueError, "max_width"),
        (dict(max_height=-1), ValueError, "max_height"),
        (dict(max_frame_bytes=0), ValueError, "max_frame_bytes"),
        (dict(max_width=1.5), TypeError, "max_width"),
        (dict(max_recent_frames="2"), TypeError, "max_recent_frames"),
        (dict(frame_interval=math.nan), ValueError, "frame_interval"),
        (dict(frame_interval="1"), TypeError, "frame_interval"),
        (dict(frame_ttl=math.nan), ValueError, "frame_ttl"),
        (dict(mime_types="image/jpeg"), TypeError, "mime_types"),
        (dict(mime_types=[b"image/jpeg"]), TypeError, "mime_types"),
        (dict(mime_types=5), TypeError, "mime_types"),
    ],
)
def test_bad_config_is_refused(kwargs, error, word):
    with pytest.raises(error, match=word):
        VisualInputConfig(**kwargs)


def test_timedelta_durations_are_accepted(session):
    c = VisualInputConfig(frame_interval=dt.timedelta(milliseconds=250), frame_ttl=dt.timedelta(seconds=2))
    assert session.ingest_visual_frame(jpeg(), c, now=1.0) is True
    assert session.ingest_visual_frame(jpeg(), c, now=1.2) is False
    assert session.ingest_visual_frame(jpeg(), c, now=1.25) is True


def test_ingest_stores_with_the_configs_limits(session):
    c = VisualInputConfig(frame_interval=0.5, max_recent_frames=2)
    results = [session.ingest_visual_frame(jpeg(frame_seq=i), c, now=i * 0.25) for i in range(7)]
    assert results == [True, False, True, False, True, False, True]
    frames = session.latest_visual_frames(math.inf, now=10.0)
    assert [f.frame_seq for f in frames] == [4, 6]
    assert [f.received_at for f in frames] == [1.0, 1.5]
    assert bytes(frames[0].data) == JPEG
    assert session.visual_stats()["rate_limited"] == 3


def test_ingest_uses_the_clock_when_now_is_none(session, clock):
    assert session.ingest_visual_frame(jpeg(), VisualInputConfig()) is True
    assert session.latest_visual_frames(1.0)[0].received_at == clock()


def test_boundaries_are_allowed(session):
    c = VisualInputConfig(max_width=4, max_height=3, max_frame_bytes=len(JPEG), frame_interval=0)
    assert session.ingest_visual_frame(jpeg(4, 3), c) is True
    assert session.ingest_visual_frame(jpeg(1, 1, data=b"\xff\xd8\xff"), c) is True


def test_jpeg_magic_in_any_buffer(session):
    c = VisualInputConfig(frame_interval=0)
    arr = np.frombuffer(JPEG, dtype=np.uint8)
    strided = np.zeros(2 * len(JPEG), dtype=np.uint8)
    strided[::2] = arr
    for data in (bytearray(JPEG), memoryview(JPEG), arr, strided[::2], arr.reshape(8, 8)):
        assert session.ingest_visual_frame(jpeg(data=data), c) is True
        assert bytes(session.latest_visual_frames(1.0)[-1].data) == JPEG


def _reject(session, frame, config, word):
    sub = session.subscribe_visual_frames(8)
    session.store_frame(b"keep", source="cam", max_recent=4)
    before = (session.visual_stats(), session.latest_visual_frames(math.inf), session.last_active_at)
    with pytest.raises(ValueError, match=word):
        session.ingest_visual_frame(frame, config, now=5000.0)
    after = (session.visual_stats(), session.latest_visual_frames(math.inf), session.last_active_at)
    assert after == before
    assert sub.qsize() == 1


@pytest.mark.parametrize(
    "frame,word",
    [
        (VisualFrame(JPEG, "image/png", 4, 3, "cam"), "mime_type"),
        (VisualFrame(JPEG, "", 4, 3, "cam"), "mime_type"),
        (VisualFrame(JPEG, "IMAGE/JPEG", 4, 3, "cam"), "mime_type"),
        (jpeg(0, 3), "width"),
        (jpeg(-4, 3), "width"),
        (jpeg(1281, 3), "width"),
        (jpeg(4, 0), "height"),
        (jpeg(4, -1), "height"),
        (jpeg(4, 721), "height"),
        (jpeg(data=b""), "empty"),
        (jpeg(data=np.empty((0, 3), dtype=np.uint8)), "empty"),
        (jpeg(data=b"\xff\xd8\xff" + bytes(1_048_576 - 2)), "max_frame_bytes"),
        (jpeg(data=b"\x89PNG" + bytes(10)), "JPEG"),
        (jpeg(data=b"\xff\xd8"), "JPEG"),
        (jpeg(data=b"\xff\xd8\xfe" + bytes(10)), "JPEG"),
    ],
    ids=["png", "no-mime", "mime-case", "width-0", "width-neg", "width-over", "height-0", "height-neg",
         "height-over", "empty", "empty-2d", "too-big", "not-jpeg", "short-magic", "bad-third-byte"],
)
def test_each_rule_rejects_with_a_named_problem_and_changes_nothing(session, frame, word):
    _reject(session, frame, VisualInputConfig(), word)


def test_rejected_even_when_it_would_be_rate_limited(session):
    c = VisualInputConfig(frame_interval=100.0)
    assert session.ingest_visual_frame(jpeg(), c, now=0.0) is True
    with pytest.raises(ValueError, match="width"):
        session.ingest_visual_frame(jpeg(0, 3), c, now=0.1)
    assert session.visual_stats()["rate_limited"] == 0


@pytest.mark.parametrize("mime,channels", sorted(RAW.items()))
def test_raw_mime_needs_width_height_channels_bytes(session, mime, channels):
    c = VisualInputConfig(mime_types=(mime,), frame_interval=0)
    good = np.arange(4 * 3 * channels, dtype=np.uint8).reshape(3, 4, channels)
    assert session.ingest_visual_frame(VisualFrame(good, mime, 4, 3, "cam"), c) is True
    stored = session.latest_visual_frames(1.0)[-1]
    assert np.array_equal(stored.as_array((3, 4, channels)), good)
    for wrong in (good.tobytes()[:-1], good.tobytes() + b"\x00", bytes(4 * 3 * (channels + 1))):
        _reject(session, VisualFrame(wrong, mime, 4, 3, "cam"), c, "bytes")


def test_raw_mime_is_refused_unless_listed(session):
    rgb = bytes(4 * 3 * 3)
    _reject(session, VisualFrame(rgb, "video/x-raw-rgb", 4, 3, "cam"), VisualInputConfig(), "mime_type")
    _reject(session, VisualFrame(rgb, "video/x-raw-rgb", 4, 3, "cam"),
            VisualInputConfig(mime_types=("video/x-raw-bgr",)), "mime_type")


def test_raw_frames_are_not_jpeg_checked(session):
    c = VisualInputConfig(mime_types=("image/jpeg", "video/x-raw-gray"), frame_interval=0)
    assert session.ingest_visual_frame(VisualFrame(bytes(12), "video/x-raw-gray", 4, 3, "cam"), c) is True


def test_unlisted_non_raw_mime_needs_no_size_rule(session):
    c = VisualInputConfig(mime_types=("image/png",), frame_interval=0)
    assert session.ingest_visual_frame(VisualFrame(b"\x89PNG", "image/png", 4, 3, "cam"), c) is True


def test_full_hd_rgb_with_a_raised_limit(session):
    c = VisualInputConfig(mime_types=("video/x-raw-rgb",), max_width=1920, max_height=1080,
                          max_frame_bytes=1920 * 1080 * 3, frame_interval=0)
    frame = np.zeros((1080, 1920, 3), dtype=np.uint8)
    frame[0, 0] = (1, 2, 3)
    assert session.ingest_visual_frame(VisualFrame(frame, "video/x-raw-rgb", 1920, 1080, "cam"), c) is True
    assert tuple(session.latest_visual_frames(1.0)[0].as_array((1080, 1920, 3))[0, 0]) == (1, 2, 3)


@pytest.mark.parametrize(
    "frame,config,error,word",
    [
        ("not a frame", VisualInputConfig(), TypeError, "frame"),
        (jpeg(), "not a config", TypeError, "config"),
        (jpeg(data=12345), VisualInputConfig(), TypeError, "data"),
        (jpeg(width=1.5), VisualInputConfig(), TypeError, "width"),
        (jpeg(height="3"), VisualInputConfig(), TypeError, "height"),
    ],
)
def test_wrong_types_are_refused(session, frame, config, error, word):
    with pytest.raises(error, match=word):
        session.ingest_visual_frame(frame, config)
    assert session.visual_stats()["accepted"] == 0
