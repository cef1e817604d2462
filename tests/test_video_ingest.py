"""``capsule-sessions ingest`` on real (tiny, generated) video: decode, store, errors."""

from __future__ import annotations

import itertools
import json
import os
import random
import stat
import time

import numpy as np
import pytest

from capsule_sessions import VisualInputConfig, cli
from capsule_sessions.cli import _sample
from capsule_sessions.cli._runner import Run, RunOptions
from capsule_sessions.cli._sources import VideoSource
from support import assert_counts_add_up

av = pytest.importorskip("av")

W, H, FPS, SECONDS = 320, 240, 30, 2
FRAMES = FPS * SECONDS
QUIET = ["--display", "none", "--slow-ms", "2"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    tiny = root / "tiny.mp4"
    _sample.make_test_video(tiny, W, H, FPS, SECONDS)
    # Matroska keeps its duration up front, so a cut file still says how long it was.
    whole = root / "whole.mkv"
    _sample.make_test_video(whole, W, H, FPS, SECONDS)
    cut = root / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(random.Random(5).randbytes(40_000))
    # An AVI whose codec tag FFmpeg has never heard of: it opens, but nothing decodes it.
    mjpeg = root / "mjpeg.avi"
    _sample.make_test_video(mjpeg, 32, 24, 10, 0.5, codec="mjpeg", box=False, pix_fmt="yuvj420p")
    data = mjpeg.read_bytes()
    assert data.count(b"MJPG") >= 1
    unknown = root / "unknown-codec.avi"
    unknown.write_bytes(data.replace(b"MJPG", b"QZX9"))
    audio = root / "audio-only.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    short = root / "short.mp4"
    _sample.make_test_video(short, 64, 48, 30, 0.3)
    five = root / "five-seconds.mp4"
    _sample.make_test_video(five, 64, 48, 30, 5)
    return {"tiny": str(tiny), "cut": str(cut), "corrupt": str(corrupt), "unknown": str(unknown),
            "audio": str(audio), "short": str(short), "five": str(five), "root": root}


def decoded_frames(path):
    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def ingest(tmp_path, *args):
    out = tmp_path / "summary.json"
    code = cli.main(["ingest", *QUIET, *args, "--json", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else None


def raw_config(**overrides):
    values = dict(frame_interval=0.0, max_recent_frames=FRAMES, max_frame_bytes=W * H * 3,
                  mime_types=("video/x-raw-rgb",))
    values.update(overrides)
    return VisualInputConfig(**values)


# -- end to end -----------------------------------------------------------------------
def test_ring_frames_equal_the_decoded_frames_byte_for_byte(videos, backend):
    expected = decoded_frames(videos["tiny"])
    assert len(expected) == FRAMES
    options = RunOptions(backend=backend, subscribers=["fast", "slow", "async", "sampler"], realtime=False,
                         config=raw_config(), max_recent=FRAMES, slow_work=0.001)
    result = Run([VideoSource("tiny", videos["tiny"])], options).execute()
    run = result.sessions[0]
    assert run.producer.status == "done" and not run.producer.failed
    assert (run.producer.offered, run.producer.accepted) == (FRAMES, FRAMES)
    stored = run.session.latest_visual_frames(1e6)
    assert [f.frame_seq for f in stored] == list(range(FRAMES))
    for frame in stored:
        assert (frame.mime_type, frame.width, frame.height, frame.source) == ("video/x-raw-rgb", W, H, "tiny")
        assert frame.timestamp_ms == int(frame.frame_seq * 1000 / FPS)
        assert frame.as_array((H, W, 3)).tobytes() == expected[frame.frame_seq].tobytes()
    for consumer in run.consumers:
        sub = consumer.subscription
        assert sub.delivered + sub.dropped + sub.qsize() == FRAMES


def test_ingest_command_on_a_video_file(videos, tmp_path, backend):
    code, summary = ingest(tmp_path, "--backend", backend, videos["tiny"])
    assert code == 0
    (s,) = summary["sessions"]
    assert s["status"] == "done" and s["message"] == ""
    assert (s["offered"], s["accepted"], s["rejected"]) == (FRAMES, FRAMES, 0)
    assert s["description"] == f"h264 {W}x{H} @ {FPS} fps, {FRAMES} frames"
    assert s["bytes"] == FRAMES * W * H * 3
    assert_counts_add_up(summary)


def test_ingest_jpeg_path(videos, backend):
    simplejpeg = pytest.importorskip("simplejpeg")
    expected = decoded_frames(videos["tiny"])
    config = raw_config(mime_types=("image/jpeg",), max_frame_bytes=1_048_576, max_recent_frames=4)
    options = RunOptions(backend=backend, subscribers=["fast", "async"], realtime=False, config=config,
                         jpeg_quality=90)
    result = Run([VideoSource("tiny", videos["tiny"])], options).execute()
    run = result.sessions[0]
    assert (run.producer.accepted, run.producer.rejected) == (FRAMES, 0)
    stored = run.session.latest_visual_frames(1e6)
    assert [f.frame_seq for f in stored] == list(range(FRAMES - 4, FRAMES))
    for frame in stored:
        assert frame.mime_type == "image/jpeg" and bytes(frame.data[:3]) == b"\xff\xd8\xff"
        image = simplejpeg.decode_jpeg(bytes(frame.data), colorspace="RGB")
        error = np.abs(image.astype(np.int16) - expected[frame.frame_seq].astype(np.int16)).mean()
        assert error < 8, f"frame {frame.frame_seq} is not the decoded picture (mean error {error:.1f})"


def test_ingest_jpeg_flag_end_to_end(videos, tmp_path):
    pytest.importorskip("simplejpeg")
    code, summary = ingest(tmp_path, "--jpeg", videos["tiny"])
    assert code == 0
    assert summary["jpeg"] is True
    (s,) = summary["sessions"]
    assert s["accepted"] == FRAMES and s["bytes"] < FRAMES * W * H * 3
    assert_counts_add_up(summary)


def test_ingest_scales_a_video_down_to_the_maximum(videos, tmp_path):
    code, summary = ingest(tmp_path, "--max-width", "160", "--max-height", "200", videos["tiny"])
    assert code == 0
    (s,) = summary["sessions"]
    assert (s["width"], s["height"]) == (160, 120)
    assert s["bytes"] == FRAMES * 160 * 120 * 3


def test_ingest_realtime_runs_to_the_end(videos, tmp_path):
    code, summary = ingest(tmp_path, "--realtime", videos["short"])
    assert code == 0
    (s,) = summary["sessions"]
    assert s["status"] == "done" and s["offered"] == 9


def test_without_realtime_the_frame_interval_is_video_time(videos, tmp_path):
    # 5 s of video decode in a fraction of that; 1 s between accepted frames is 1 s of
    # the video's own time, so about one frame per second of video gets through.
    code, summary = ingest(tmp_path, "--frame-interval", "1", videos["five"])
    assert code == 0
    (s,) = summary["sessions"]
    assert (s["offered"], s["accepted"], s["rate_limited"]) == (150, 5, 145)
    assert_counts_add_up(summary)


def test_without_realtime_the_session_clock_follows_the_pts(videos, backend):
    config = raw_config(frame_interval=1.0, max_recent_frames=10, max_frame_bytes=64 * 48 * 3)
    options = RunOptions(backend=backend, subscribers=["fast", "slow", "sampler"], realtime=False,
                         config=config, slow_work=0.01, sampler_interval=1.0)
    (run,) = Run([VideoSource("five", videos["five"])], options).execute().sessions
    stored = run.session.latest_visual_frames(1e6)
    assert [f.frame_seq for f in stored] == [0, 30, 60, 90, 120]
    stamps = [f.received_at for f in stored]
    assert [b - a for a, b in itertools.pairwise(stamps)] == [1.0] * 4
    # The sampler calls at each second of video (1, 2, 3 and 4 s; the clip ends at
    # 4.97 s), however fast it decodes, and each call sees the frames up to its second:
    # 2, 3, 4 and 5 of them, the newest accepted exactly then (age 0).
    (sampler,) = run.samplers
    assert (sampler.calls, sampler.frames, sampler.empty_calls, sampler.violations) == (4, 14, 0, 0)
    assert sampler.latency.max == 0.0
    # Latency stays wall-clock time from store to receive, not video time.
    for consumer in run.consumers:
        assert consumer.latency.count == consumer.received > 0
        assert consumer.latency.max < 5.0
    (_, slow) = run.consumers
    assert slow.latency.max > 0.0


def test_realtime_keeps_the_wall_clock(videos, backend):
    config = raw_config(frame_interval=0.0, max_recent_frames=9, max_frame_bytes=64 * 48 * 3)
    options = RunOptions(backend=backend, subscribers=[], realtime=True, config=config)
    (run,) = Run([VideoSource("short", videos["short"])], options).execute().sessions
    stamps = [f.received_at for f in run.session.latest_visual_frames(1e6)]
    assert len(stamps) == 9
    # Paced at 30 fps on the wall clock: received_at is when each frame was stored.
    assert stamps[-1] - stamps[0] == pytest.approx(8 / 30, abs=0.1)
    assert stamps[-1] <= time.monotonic()


def test_report_png_from_a_video_run(videos, tmp_path):
    pytest.importorskip("matplotlib")
    report = tmp_path / "report.png"
    code, _ = ingest(tmp_path, "--report", str(report), videos["tiny"], "synthetic:32x24@30")
    assert code == 0
    assert report.read_bytes()[:4] == b"\x89PNG"


# -- errors: one line each, the other sessions keep running ----------------------------
@pytest.mark.parametrize(
    "name, status, fragment",
    [
        ("missing", "failed", "no such file: "),
        ("corrupt", "failed", "corrupt or not a video FFmpeg can read"),
        ("unknown", "failed", "unsupported codec: this FFmpeg build has no decoder for its video stream"),
        ("audio", "failed", "no video stream in it"),
        ("cut", "ended early", "ended early after "),
        ("camera", "failed", "no camera at /dev/video99 (no such device)"),
        ("directory", "failed", "is a directory, not a video file"),
    ],
)
def test_a_bad_source_fails_alone(videos, tmp_path, capsys, name, status, fragment):
    path = {"missing": str(tmp_path / "nope.mp4"), "camera": "/dev/video99",
            "directory": str(videos["root"])}.get(name) or videos[name]
    # --seconds 30 only sizes the synthetic source (60 frames); no wall-clock race.
    code, summary = ingest(tmp_path, path, "synthetic:16x16@2", "--seconds", "30")
    assert code == 1
    bad, good = summary["sessions"]
    assert bad["status"] == status and fragment in bad["message"]
    assert good["status"] == "done" and good["offered"] == good["accepted"] == 60
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err_lines == [f"s0 {path}: {bad['message']}"]
    assert_counts_add_up(summary)


def test_a_video_whose_every_frame_is_rejected_exits_1_with_one_line(videos, tmp_path, capsys):
    pytest.importorskip("simplejpeg")
    code, summary = ingest(tmp_path, "--jpeg", "--max-frame-bytes", "200", videos["tiny"])
    assert code == 1
    (s,) = summary["sessions"]
    assert s["status"] == "failed" and (s["accepted"], s["rejected"]) == (0, FRAMES)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith(f"s0 {videos['tiny']}: all {FRAMES} of {FRAMES} frames rejected by the ingest "
                           "config; the first: frame 0: data is ")
    assert line.endswith(" bytes, over max_frame_bytes=200")


def test_a_cut_file_says_how_much_it_got(videos, tmp_path):
    code, summary = ingest(tmp_path, videos["cut"])
    assert code == 1
    (s,) = summary["sessions"]
    got = s["offered"]
    assert 0 < got < FRAMES
    assert s["message"].startswith(f"ended early after {got} of {FRAMES} frames")


def test_every_source_failing_still_exits_1(tmp_path, capsys):
    code, summary = ingest(tmp_path, str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4"))
    assert code == 1
    assert [s["status"] for s in summary["sessions"]] == ["failed", "failed"]
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


# -- the sample video -------------------------------------------------------------------
@pytest.fixture
def small_sample(monkeypatch, tmp_path):
    monkeypatch.setenv(_sample.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(_sample, "SAMPLE_WIDTH", 64)
    monkeypatch.setattr(_sample, "SAMPLE_HEIGHT", 48)
    monkeypatch.setattr(_sample, "SAMPLE_FPS", 10)
    monkeypatch.setattr(_sample, "SAMPLE_SECONDS", 1)
    monkeypatch.setattr(_sample, "SAMPLE_NAME", "sample-small.mp4")
    return tmp_path / "cache"


def test_sample_is_made_once_and_cached(small_sample):
    logged = []
    path = _sample.sample_video(logged.append)
    assert path == str(small_sample / "sample-small.mp4")
    assert len(logged) == 1 and "first run only" in logged[0] and "H.264" in logged[0]
    assert len(decoded_frames(path)) == 10
    assert _sample.sample_video(logged.append) == path
    assert len(logged) == 1
    assert os.listdir(small_sample) == ["sample-small.mp4"]  # no temporary file left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_sample_file_mode_follows_the_umask(small_sample, umask, mode):
    old = os.umask(umask)
    try:
        path = _sample.sample_video()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_ingest_sample_flag_and_pseudo_source(small_sample, tmp_path, capsys):
    code, summary = ingest(tmp_path, "--sample", "sample")
    assert code == 0
    assert [s["source"] for s in summary["sessions"]] == ["sample", "sample"]
    assert all(s["accepted"] == 10 for s in summary["sessions"])
    assert capsys.readouterr().err.count("making the sample video") == 1


def test_mpeg4_fallback_encodes_a_readable_video(tmp_path):
    path = tmp_path / "fallback.mp4"
    assert _sample.make_test_video(path, 64, 48, 10, 0.5, codec="mpeg4") == "mpeg4"
    frames = decoded_frames(str(path))
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)


def test_odd_sized_video_with_padded_rows(tmp_path, backend):
    path = tmp_path / "odd.mp4"
    _sample.make_test_video(path, 322, 242, 10, 0.3)
    expected = decoded_frames(str(path))
    options = RunOptions(backend=backend, subscribers=["fast"], realtime=False,
                         config=raw_config(max_recent_frames=3, max_frame_bytes=322 * 242 * 3))
    run = Run([VideoSource("odd", str(path))], options).execute().sessions[0]
    assert run.producer.accepted == 3
    for frame in run.session.latest_visual_frames(1e6):
        assert frame.as_array((242, 322, 3)).tobytes() == expected[frame.frame_seq].tobytes()
