"""``capsule-sessions ingest`` on synthetic sources (no PyAV needed), and the pieces the
main job is built from: the consumers, the vision sampler and the latency histogram."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from capsule_sessions import Session, cli
from capsule_sessions.cli._consumers import AsyncConsumer, AsyncLoop, ThreadConsumer, VisionSampler, plan
from capsule_sessions.cli._latency import LatencyHistogram
from capsule_sessions.cli._runner import Run, RunOptions
from capsule_sessions.cli._sources import Source, SyntheticSource, parse_source
from support import FakeClock, assert_counts_add_up, payload

FAST = ["--display", "none", "--slow-ms", "2"]


def ingest(tmp_path, *args):
    out = tmp_path / "summary.json"
    code = cli.main(["ingest", *FAST, *args, "--json", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else None


# -- the command on synthetic sources ------------------------------------------------
def test_ingest_synthetic_counts_add_up(tmp_path, backend):
    # --seconds is also a wall-clock cap; far above what producing these frames takes.
    code, summary = ingest(tmp_path, "--backend", backend, "--seconds", "20",
                           "synthetic:32x24@2.5", "synthetic:16x8@1")
    assert code == 0
    assert summary["backend"] == backend
    first, second = summary["sessions"]
    # Without --realtime a synthetic source is --seconds of video produced flat out.
    assert (first["offered"], second["offered"]) == (50, 20)
    assert first["accepted"] == 50 and first["rejected"] == 0
    assert [sub["label"] for sub in first["subscribers"]] == ["fast", "slow", "async"]
    assert [sm["label"] for sm in first["samplers"]] == ["sampler"]
    assert_counts_add_up(summary)


def test_ingest_frame_interval_rate_limits(tmp_path, backend):
    code, summary = ingest(tmp_path, "--backend", backend, "--seconds", "20", "--frame-interval", "100",
                           "synthetic:8x8@2")
    assert code == 0
    (s,) = summary["sessions"]
    assert (s["accepted"], s["rate_limited"]) == (1, 39)
    assert_counts_add_up(summary)


def test_without_realtime_synthetic_sources_run_on_video_time(tmp_path, backend):
    # 10 s of synthetic video, made far faster than 10 s: one frame per second of it.
    code, summary = ingest(tmp_path, "--backend", backend, "--seconds", "10", "--frame-interval", "1",
                           "synthetic:32x24@30")
    assert code == 0
    (s,) = summary["sessions"]
    assert (s["offered"], s["accepted"], s["rate_limited"]) == (300, 10, 290)
    assert_counts_add_up(summary)


def test_a_source_whose_every_frame_is_rejected_fails(tmp_path, backend, capsys):
    # Nothing of it reached the session: that is a failed source, not a "done" one.
    code, summary = ingest(tmp_path, "--backend", backend, "--seconds", "10", "--max-frame-bytes", "100",
                           "synthetic:32x24@1", "synthetic:4x4@1")
    assert code == 1
    bad, good = summary["sessions"]
    assert (bad["offered"], bad["accepted"], bad["rejected"]) == (10, 0, 10)
    assert bad["status"] == "failed"
    assert bad["message"] == ("all 10 of 10 frames rejected by the ingest config; the first: "
                              "frame 0: data is 2304 bytes, over max_frame_bytes=100")
    assert (good["status"], good["accepted"]) == ("done", 10)
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err_lines == [f"s0 synthetic:32x24@1: {bad['message']}"]
    assert_counts_add_up(summary)


class GrowingSource(Source):
    """Frames of 4x4, then 8x8 pixels: a byte limit between the two turns half down."""

    def open(self, max_width=None, max_height=None):
        self.width, self.height, self.fps = 8, 8, 10.0

    def frames(self):
        for i in range(6):
            side = 4 if i < 3 else 8
            yield np.full((side, side, 3), i, dtype=np.uint8), i / 10


def test_a_source_with_some_frames_rejected_is_done_with_a_warning(backend):
    from capsule_sessions import VisualInputConfig

    messages = []
    config = VisualInputConfig(frame_interval=0.0, max_frame_bytes=4 * 4 * 3, max_recent_frames=6,
                               mime_types=("video/x-raw-rgb",))
    options = RunOptions(backend=backend, subscribers=["fast"], realtime=False, config=config)
    (run,) = Run([GrowingSource("grow")], options, on_message=messages.append).execute().sessions
    assert (run.producer.accepted, run.producer.rejected) == (3, 3)
    assert run.producer.status == "done" and not run.producer.failed
    assert messages == ["s0 grow: warning: frame 3 rejected by the ingest config: "
                        "data is 192 bytes, over max_frame_bytes=48"]


def test_ingest_scales_sources_over_the_maximum(tmp_path):
    code, summary = ingest(tmp_path, "--seconds", "10", "--max-width", "40", "--max-height", "40",
                           "synthetic:80x60@0.2")
    assert code == 0
    (s,) = summary["sessions"]
    assert (s["width"], s["height"]) == (40, 30)
    assert "80x60 scaled to 40x30" in s["description"]


def test_ingest_jpeg_stores_jpeg(backend):
    simplejpeg = pytest.importorskip("simplejpeg")
    import argparse

    from capsule_sessions.cli.ingest import build_config

    args = argparse.Namespace(max_width=1280, max_height=720, max_frame_bytes=None, jpeg=True,
                              frame_interval=0.0, max_recent=3, ttl=10.0)
    config = build_config(args)
    assert config.mime_types == ("image/jpeg",) and config.max_frame_bytes == 1_048_576
    source = SyntheticSource("synthetic:64x48@10", 64, 48, 10.0, 5)
    options = RunOptions(backend=backend, subscribers=["fast"], realtime=False, config=config,
                         jpeg_quality=95, max_recent=3)
    result = Run([source], options).execute()
    session = result.sessions[0].session
    frames = session.latest_visual_frames(1e6)
    assert [f.frame_seq for f in frames] == [2, 3, 4]
    for frame in frames:
        assert frame.mime_type == "image/jpeg"
        assert bytes(frame.data[:3]) == b"\xff\xd8\xff"
        image = simplejpeg.decode_jpeg(bytes(frame.data), colorspace="RGB")
        assert image.shape == (48, 64, 3)
    assert result.sessions[0].producer.accepted == 5


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "nothing to ingest: give at least one SOURCE, or --sample"),
        (["synthetic:10x10"], "expected synthetic:WxH@FPS"),
        (["synthetic:0x10@5"], "width and height must be >= 1"),
        (["synthetic:10x10@0"], "FPS must be in (0, 10000]"),
        (["--frame-interval", "-2", "synthetic:8x8@5"], "--frame-interval: must be a number of seconds >= 0"),
        (["--jpeg-quality", "101", "synthetic:8x8@5"], "--jpeg-quality: must be an integer in 1..100"),
        (["--max-width", "0", "synthetic:8x8@5"], "--max-width: must be an integer"),
        (["--subscribers", "", "synthetic:8x8@5"], None),
        ([""], "a SOURCE must not be empty"),
    ],
)
def test_ingest_usage_errors_exit_2(args, fragment, capsys):
    code = cli.main(["ingest", *FAST, *args])
    err = capsys.readouterr().err
    if fragment is None:  # an empty subscriber list is allowed: sessions with no subscribers
        assert code == 0, err
        return
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err


def test_ingest_help_documents_sources_and_exit_codes(capsys):
    assert cli.main(["ingest", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("synthetic:WxH@FPS", "/dev/videoN", "sample", "--realtime", "--jpeg", "exit status", "130"):
        assert text in out
    assert "clock follows the stream's timestamps (pts)" in " ".join(out.split())


# -- the consumers against both backends ---------------------------------------------
def test_async_consumer_receives_every_frame_stored_from_another_thread(backend):
    clock = FakeClock()
    session = Session("s", clock=clock, backend=backend)
    (spec,) = plan(["async"], buffer=64, slow_work=0.0)
    consumer = AsyncConsumer(spec, session.subscribe_visual_frames(spec.buffer, policy=spec.policy),
                             clock=clock, verify_stamp=True)
    loop = AsyncLoop([consumer])
    loop.start()
    for seq in range(40):
        assert session.store_frame(payload(seq), source="cam", max_recent=2, frame_seq=seq)
    consumer.subscription.close()  # the consumer drains what is queued, then ends
    loop.join(timeout=10)
    assert not loop.thread.is_alive()
    assert consumer.error is None
    assert consumer.received == consumer.subscription.delivered
    assert consumer.received + consumer.subscription.dropped == 40
    assert consumer.integrity_errors == 0
    assert consumer.latency.count == consumer.received
    assert consumer.latency.max == 0.0  # the fake clock never moved


def test_async_consumer_accounts_for_drops(backend):
    clock = FakeClock()
    session = Session("s", clock=clock, backend=backend)
    (spec,) = plan(["async"], buffer=4, slow_work=0.0)
    assert spec.policy == "drop_oldest"
    consumer = AsyncConsumer(spec, session.subscribe_visual_frames(spec.buffer, policy=spec.policy), clock=clock)
    for seq in range(50):
        clock.advance(0.01)
        session.store_frame(payload(seq), source="cam", max_recent=2, frame_seq=seq)
    consumer.subscription.close()
    clock.advance(0.5)
    loop = AsyncLoop([consumer])
    loop.start()
    loop.join(timeout=10)
    sub = consumer.subscription
    assert (sub.delivered, sub.dropped, sub.qsize()) == (4, 46, 0)
    assert consumer.received == 4
    # drop_oldest keeps the newest four; their ages are 0.5 s plus their distance from the last.
    assert consumer.latency.min == pytest.approx(0.5, rel=0.05)
    assert consumer.latency.max == pytest.approx(0.53, rel=0.05)


def test_thread_consumers_fast_and_slow(backend):
    clock = FakeClock()
    session = Session("s", clock=clock, backend=backend)
    fast_spec, slow_spec = plan(["fast", "slow"], buffer=64, slow_work=0.0)
    assert (slow_spec.buffer, slow_spec.policy) == (1, "drop_newest")
    fast = ThreadConsumer(fast_spec, session.subscribe_visual_frames(64, policy="drop_oldest"), clock=clock,
                          verify_stamp=True)
    slow = ThreadConsumer(slow_spec, session.subscribe_visual_frames(1, policy="drop_newest"), clock=clock)
    for seq in range(10):  # before the slow one runs: its queue of one keeps the first frame
        session.store_frame(payload(seq), source="cam", max_recent=2, frame_seq=seq)
    fast.start()
    slow.start()
    for consumer in (fast, slow):
        consumer.subscription.close()
        consumer.join(timeout=10)
        assert not consumer.thread.is_alive() and consumer.error is None
    assert (fast.received, fast.subscription.dropped, fast.integrity_errors) == (10, 0, 0)
    assert (slow.received, slow.subscription.dropped) == (1, 9)


def test_stamp_check_catches_wrong_bytes(backend):
    clock = FakeClock()
    session = Session("s", clock=clock, backend=backend)
    (spec,) = plan(["fast"], buffer=8, slow_work=0.0)
    consumer = ThreadConsumer(spec, session.subscribe_visual_frames(8), clock=clock, verify_stamp=True)
    session.store_frame(payload(7), source="cam", max_recent=2, frame_seq=8)  # bytes of 7, seq 8
    session.store_frame(payload(9), source="cam", max_recent=2, frame_seq=9)
    consumer.subscription.close()
    consumer.start()
    consumer.join(timeout=10)
    assert (consumer.received, consumer.integrity_errors) == (2, 1)


def test_vision_sampler_takes_latest_frames_within_ttl(backend):
    clock = FakeClock(1000.0)
    session = Session("s", clock=clock, backend=backend)
    (spec,) = plan(["sampler"], buffer=1, slow_work=0.0)
    sampler = VisionSampler(spec, session, ttl=1.0, interval=1.0, clock=clock)
    assert sampler.sample() == []
    session.store_frame(payload(0), source="cam", max_recent=3, frame_seq=0)  # at 1000.0
    clock.advance(0.4)
    session.store_frame(payload(1), source="cam", max_recent=3, frame_seq=1)  # at 1000.4
    clock.advance(0.6)
    frames = sampler.sample()  # at 1001.0: frame 0 is exactly ttl old, which still counts
    assert [f.frame_seq for f in frames] == [0, 1]
    clock.advance(0.1)
    assert [f.frame_seq for f in sampler.sample()] == [1]
    clock.advance(5.0)
    assert sampler.sample() == []
    assert (sampler.calls, sampler.frames, sampler.empty_calls, sampler.violations) == (4, 3, 2, 0)
    # The newest frame's age per non-empty call: 0.6 s, then 0.7 s.
    assert sampler.latency.count == 2
    assert sampler.latency.min == pytest.approx(0.6)
    assert sampler.latency.max == pytest.approx(0.7)


def test_vision_sampler_with_ttl_zero_sees_nothing(backend):
    clock = FakeClock()
    session = Session("s", clock=clock, backend=backend)
    (spec,) = plan(["sampler"], buffer=1, slow_work=0.0)
    sampler = VisionSampler(spec, session, ttl=0.0, interval=1.0, clock=clock)
    session.store_frame(payload(0), source="cam", max_recent=3)
    assert sampler.sample() == [] and sampler.empty_calls == 1


def test_vision_sampler_thread_stops_promptly(backend):
    session = Session("s", backend=backend)
    (spec,) = plan(["sampler"], buffer=1, slow_work=0.0)
    sampler = VisionSampler(spec, session, ttl=10.0, interval=3600.0)
    sampler.start()
    sampler.stop()
    sampler.join(timeout=10)
    assert not sampler.thread.is_alive() and sampler.calls == 0 and sampler.error is None


def test_plan_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="unknown subscriber 'nope'"):
        plan(["fast", "nope"], buffer=1, slow_work=0.0)


# -- sources and the latency histogram -------------------------------------------------
def test_synthetic_source_stamps_each_frame_with_its_index():
    source = parse_source("synthetic:16x4@10", seconds=0.5)
    source.open()
    seen = []
    for index, (rgb, t) in enumerate(source.frames()):
        assert rgb.shape == (4, 16, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
        assert int.from_bytes(rgb.tobytes()[:8], "little") == index
        assert t == pytest.approx(index / 10)
        seen.append(rgb.tobytes()[8:])
    assert len(seen) == 5
    assert len(set(seen)) > 1  # the pattern moves


def test_latency_histogram_percentiles():
    hist = LatencyHistogram()
    assert hist.percentile(50) is None
    for ms in range(1, 101):  # 1 ms .. 100 ms
        hist.record(ms / 1000)
    assert hist.count == 100
    assert hist.percentile(50) == pytest.approx(0.050, rel=0.05)
    assert hist.percentile(99) == pytest.approx(0.099, rel=0.05)
    assert hist.percentile(100) == pytest.approx(0.100)
    assert hist.percentile(0) == pytest.approx(0.001, rel=0.05)
    assert hist.mean == pytest.approx(0.0505)
    with pytest.raises(ValueError):
        hist.percentile(101)


def test_latency_histogram_extremes_and_merge():
    a, b = LatencyHistogram(), LatencyHistogram()
    a.record(-1.0)  # clamped, not lost
    a.record(1e-9)
    b.record(500.0)  # above the top bin
    merged = LatencyHistogram.merged([a, b])
    assert merged.count == 3 and merged.min == 0.0 and merged.max == 500.0
    assert merged.percentile(100) == 500.0  # the overflow bin reports the largest sample
    assert merged.percentile(1) == 0.0  # the underflow bin reports the smallest
    lows, highs, counts = merged.nonzero_bins()
    assert sum(counts) == 3 and all(lo < hi for lo, hi in zip(lows, highs, strict=True))


def test_store_times_forget_a_slot_rather_than_give_another_frames_time():
    from types import SimpleNamespace

    from capsule_sessions.cli._streamtime import StoreTimes

    times = StoreTimes(size=4)
    times.put(1, 10.0)
    assert times.get(SimpleNamespace(frame_seq=1)) == 10.0
    times.put(5, 50.0)  # the same slot, four stores later
    assert times.get(SimpleNamespace(frame_seq=1)) is None
    assert times.get(SimpleNamespace(frame_seq=5)) == 50.0
    assert times.get(SimpleNamespace(frame_seq=2)) is None  # never stored


def test_stream_clock_never_goes_back():
    from capsule_sessions.cli._streamtime import StreamClock

    clock = StreamClock(FakeClock(1000.25))
    assert clock() == clock.origin == 1001.0  # a whole second, not before the wall clock
    assert [clock.advance(t) for t in (5.0, 6.0, 5.5, 7.0)] == [1001.0, 1002.0, 1002.0, 1003.0]


# -- optional extras ---------------------------------------------------------------------
def test_without_pyav_synthetic_sources_still_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    code, summary = ingest(tmp_path, "--seconds", "10", "synthetic:8x8@0.2")
    assert code == 0 and summary["sessions"][0]["accepted"] == 2


@pytest.mark.parametrize("args", [["clip.mp4"], ["--sample"], ["/dev/video0"]])
def test_without_pyav_video_sources_are_a_usage_error(args, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "av", None)
    assert cli.main(["ingest", *FAST, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "needs av, which is not installed (pip install 'capsule_sessions[video]')" in err


def test_without_simplejpeg_jpeg_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "simplejpeg", None)
    assert cli.main(["ingest", *FAST, "--jpeg", "synthetic:8x8@10"]) == 2
    assert "--jpeg needs simplejpeg" in capsys.readouterr().err


# -- sources that stop or break mid-stream -----------------------------------------------
class ScriptedSource(Source):
    """A source that yields ``count`` frames, then ends or raises ``error``."""

    def __init__(self, label, count, *, live=False, error=None):
        super().__init__(label)
        self.live, self.count, self.error = live, count, error
        self.closed = False

    def open(self, max_width=None, max_height=None):
        self.width, self.height, self.fps = 8, 4, 30.0

    def frames(self):
        for i in range(self.count):
            yield np.full((4, 8, 3), i, dtype=np.uint8), i / 30
        if self.error is not None:
            raise self.error

    def close(self):
        self.closed = True


def test_a_live_source_that_stops_sending_ended_early(backend):
    camera = ScriptedSource("cam", 3, live=True)
    other = SyntheticSource("synthetic:8x8@10", 8, 8, 10.0, 10)
    options = RunOptions(backend=backend, subscribers=["fast"], realtime=False, live_seconds=3600.0)
    result = Run([camera, other], options).execute()
    bad, good = result.sessions
    assert bad.producer.status == "ended early" and bad.producer.failed
    assert bad.producer.message.startswith("ended early after 3 frames: the stream stopped at ")
    assert bad.producer.message.endswith(" of 3600 s")
    assert camera.closed
    assert good.producer.status == "done" and good.producer.accepted == 10
    assert [run.id for run in result.failed] == ["s0"]


def test_an_unexpected_error_fails_that_source_only(backend):
    messages = []
    broken = ScriptedSource("broken", 2, error=RuntimeError("boom"))
    other = SyntheticSource("synthetic:8x8@10", 8, 8, 10.0, 10)
    options = RunOptions(backend=backend, subscribers=["fast", "slow"], realtime=False, slow_work=0.0)
    result = Run([broken, other], options, on_message=messages.append).execute()
    bad, good = result.sessions
    assert (bad.producer.status, bad.producer.message) == ("failed", "unexpected RuntimeError: boom")
    assert bad.producer.accepted == 2 and broken.closed
    assert messages == ["s0 broken: unexpected RuntimeError: boom"]
    assert good.producer.accepted == 10
    for run in result.sessions:
        for consumer in run.consumers:
            sub = consumer.subscription
            assert sub.delivered + sub.dropped + sub.qsize() == run.producer.accepted


# -- the tables at the width of the terminal -----------------------------------------
LONG_NAME = "/recordings/2024-06-01/front-door-camera-with-a-rather-long-name.mp4"


@pytest.fixture(scope="module")
def finished_run():
    from capsule_sessions import VisualInputConfig
    from capsule_sessions.cli._errors import SourceError

    config = VisualInputConfig(frame_interval=0.25, max_frame_bytes=1 << 20, max_recent_frames=2,
                               mime_types=("video/x-raw-rgb",))
    sources = [SyntheticSource("synthetic:32x24@10", 32, 24, 10.0, 12_345),
               ScriptedSource(LONG_NAME, 3, error=SourceError("decode error (Invalid data found when processing "
                                                              "input)"))]
    options = RunOptions(subscribers=["fast", "slow", "async", "sampler"], realtime=False, config=config,
                         slow_work=0.0)
    run = Run(sources, options)
    return run, run.execute()


def _numbers_in(text):
    return {token.rstrip(".,") for token in re.findall(r"\d[\d,.]*", text)}


def _header_lines(text):
    return [line for line in text.splitlines() if line.split()[:1] == ["session"]]


def _render(width, run, result, monkeypatch):
    from rich.console import Console

    from capsule_sessions.cli import _display
    from capsule_sessions.cli._summary import summarize

    console = Console(width=width, record=True, color_system=None)
    monkeypatch.setattr(_display, "_console", lambda stderr=False: console)
    console.print(_display.LiveDisplay("capsule-sessions ingest")._render(run))
    live = console.export_text()
    summary = summarize(result, command="ingest")
    _display.print_summary(summary, title="capsule-sessions ingest - backend x - 2 sessions - 1.0 s", use_rich=True)
    return live, console.export_text(), summary


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


@pytest.mark.parametrize("width", [80, 120])
def test_live_table_and_summary_keep_every_number_whole(width, finished_run, monkeypatch):
    run, result = finished_run
    live, tables, summary = _render(width, run, result, monkeypatch)
    for text in (live, tables):
        assert "\u2026" not in text  # rich's ellipsis: a cell cut short
        assert all(len(line.rstrip()) <= width for line in text.splitlines())
    live_numbers = set()
    for s in run.sessions:
        p = s.producer
        live_numbers |= {f"{p.accepted:,}", f"{p.rate_limited:,}", f"{p.rejected:,}", f"{p.active_seconds:.1f}",
                         f"{s.recent_fps():.1f}"}
        live_numbers |= {f"{c.subscription.dropped:,}" for c in s.consumers}
        fast = s.consumers[0]
        live_numbers |= {_ms(fast.latency.percentile(50)), _ms(fast.latency.percentile(99))} - {"-"}
    assert live_numbers - _numbers_in(live) == set()
    summary_numbers = set()
    for s in summary["sessions"]:
        summary_numbers |= {f"{s[k]:,}" for k in ("offered", "accepted", "rate_limited", "rejected")}
        summary_numbers |= {f"{s['fps']:.1f}", f"{s['mb_per_s']:.1f}"}
        for sub in s["subscribers"]:
            summary_numbers |= {f"{sub[k]:,}" for k in ("delivered", "dropped", "queued")}
            summary_numbers |= {f"{sub['latency_ms'][k]:.2f}" for k in ("p50", "p99", "max") if sub["latency_ms"][k]}
        for sampler in s["samplers"]:
            summary_numbers |= {f"{sampler['frames']:,}", f"{sampler['calls']:,}"}
    assert summary_numbers - _numbers_in(tables) == set()
    assert "12,345" in summary_numbers  # the numbers checked include wide ones


def test_tables_use_the_width_they_have(finished_run, monkeypatch):
    run, result = finished_run
    narrow = _render(80, run, result, monkeypatch)
    wide = _render(120, run, result, monkeypatch)
    widest = _render(250, run, result, monkeypatch)
    for n, w in zip(narrow[:2], wide[:2], strict=True):
        assert len(_header_lines(w)) <= len(_header_lines(n))
    # With room for it every table is one table: one header line each.
    assert [len(_header_lines(text)) for text in widest[:2]] == [1, 2]
    assert max(len(line.rstrip()) for line in wide[1].splitlines()) > 80


# -- the PNG report ------------------------------------------------------------------
def test_the_timeline_starts_at_the_first_accepted_frame(backend):
    # Counted from the first frame, a steady source's first fps point cannot overshoot:
    # n frames after it took at least n frame intervals.
    source = SyntheticSource("synthetic:8x8@10", 8, 8, 10.0, 40)
    run = Run([source], RunOptions(backend=backend, subscribers=[], realtime=False))
    (s,) = run.execute().sessions
    first_t, first_n = s.timeline[0]
    assert first_n == 1
    assert first_t == s.producer.first_accepted_at - run.started_at
    assert s.timeline[-1][1] == 40
    assert [t for t, _ in s.timeline] == sorted(t for t, _ in s.timeline)


def test_fps_series_counts_full_windows_from_the_first_frame():
    from capsule_sessions.cli._report import fps_series

    # 60 fps from t = 0.013 s, sampled every 0.25 s as the runner ticks, plus the first frame.
    first = 0.013
    ticks = [0.25 * k + 0.017 for k in range(1, 17)]
    timeline = [(first, 1)] + [(t, int((t - first) * 60) + 1) for t in ticks]
    times, fps = fps_series(timeline)
    assert times == [t for t in ticks if t - first >= 1.0]
    assert fps[0] <= 60.0
    assert all(59.0 <= value <= 60.0 + 1.0 for value in fps)  # one frame in a 1 s window


def test_fps_series_does_not_spike_on_a_late_first_frame():
    from capsule_sessions.cli._report import fps_series

    # 30 fps paced from t = 0, but the first frame was stored 50 ms late and the next
    # one right after it: over those 4 ms the rate is 250 fps, which is no fact about
    # the source. As the runner ticked (one tick came early, when a source failed).
    def accepted(t):
        return 0 if t < 0.05 else 1 if t < 0.054 else int(t * 30) + 1

    timeline = [(0.05, 1)] + [(t, accepted(t)) for t in (0.058, 0.308, 0.558, 0.808, 1.058, 1.308, 1.558, 2.058)]
    times, fps = fps_series(timeline)
    assert times and times[0] >= 1.05
    assert all(value <= 30.0 * 1.06 for value in fps), fps  # at most the 50 ms of catch-up


def test_fps_series_of_a_run_shorter_than_the_window():
    from capsule_sessions.cli._report import fps_series

    assert fps_series([(0.01, 1), (0.11, 11)]) == ([0.11], [pytest.approx(100.0)])
    assert fps_series([(0.01, 1)]) == ([], [])


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    from capsule_sessions.cli._sources import VideoSource

    missing = str(tmp_path_factory.mktemp("report") / "missing.mp4")
    sources = [SyntheticSource("synthetic:16x8@30", 16, 8, 30.0, 300), VideoSource(missing, missing)]
    options = RunOptions(subscribers=["fast", "slow", "sampler"], realtime=False, slow_work=0.001)
    return Run(sources, options).execute(), missing


def test_report_data_has_every_session_drops_and_sampler_calls(report_run):
    from capsule_sessions.cli._report import report_data

    result, missing = report_run
    data = report_data(result, title="capsule-sessions ingest")
    good, bad = data["sessions"]
    assert (good["id"], good["failed"]) == ("s0", False)
    # The failed source is in the report, marked, with its reason.
    assert (bad["id"], bad["failed"], bad["status"]) == ("s1", True, "failed")
    assert "FAILED" in bad["label"] and "no such file" in bad["label"] and missing in bad["label"]
    assert data["title"].endswith(", 2 sessions, " + f"{result.seconds:.1f} s")
    # Drops per subscriber, for every session, as the subscriptions counted them.
    expected = [(run.id, c.label, c.subscription.delivered, c.subscription.dropped)
                for run in result.sessions for c in run.consumers]
    assert [(r["session"], r["subscriber"], r["delivered"], r["dropped"]) for r in data["subscribers"]] == expected
    assert any(r["dropped"] for r in data["subscribers"])  # the slow one drops
    # The vision sampler's calls: 9 in 10 s of video for s0, none for the failed one.
    calls = [(r["session"], r["calls"], r["empty_calls"]) for r in data["samplers"]]
    assert calls == [("s0", 9, 0), ("s1", 0, 0)]


def _tick_texts(axis):
    return [label.get_text() for label in axis.get_ticklabels() if label.get_visible() and label.get_text()]


def test_report_figure_shows_it_all_in_plain_units(report_run, tmp_path):
    from capsule_sessions.cli._report import figure, report_data, write_report

    result, _ = report_run
    data = report_data(result, title="capsule-sessions ingest")
    fig = figure(data)
    fig.canvas.draw()
    axes = {ax.get_label(): ax for ax in fig.axes}
    assert set(axes) == {"latency", "fps", "subscribers", "samplers"}
    for name, ax in axes.items():
        for axis in (ax.xaxis, ax.yaxis):
            assert axis.get_label_text(), f"{name}: an axis without a label"
            assert axis.get_offset_text().get_text() == "", f"{name}: a scale factor off the axis"
            for text in _tick_texts(axis):
                if axis is ax.yaxis and name in ("subscribers", "samplers"):
                    continue  # bar names, not numbers
                float(text.replace(",", "").replace("\u2212", "-"))  # a plain number, no 10^x
    assert "milliseconds" in axes["latency"].get_xlabel() and "seconds" in axes["fps"].get_xlabel()
    # The failed session is in the fps legend, marked failed.
    legend = [t.get_text() for t in axes["fps"].get_legend().get_texts()]
    assert [text for text in legend if text.startswith("s1 ") and "FAILED" in text]
    # One bar per subscriber shows its drops, one per session the sampler's calls.
    drop_bars = [c for c in axes["subscribers"].containers if c.get_label() == "dropped"]
    assert [bar.get_width() for bar in drop_bars[0]] == [r["dropped"] for r in data["subscribers"]]
    call_bars = [c for c in axes["samplers"].containers if c.get_label() == "calls with frames"]
    assert [bar.get_width() for bar in call_bars[0]] == [r["calls"] - r["empty_calls"] for r in data["samplers"]]
    path = write_report(result, str(tmp_path / "report.png"), title="capsule-sessions ingest")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
