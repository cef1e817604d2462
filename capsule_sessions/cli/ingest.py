"""``capsule-sessions ingest SOURCE...``: real video into sessions, watched live.

Each SOURCE goes into its own session of one SessionManager through
``Session.ingest_visual_frame`` and a VisualInputConfig built from the flags, as raw RGB
(video/x-raw-rgb) or, with --jpeg, as JPEG. Per session: a fast, a slow and an asyncio
subscriber, and a vision sampler calling latest_visual_frames(ttl) every second.

SOURCE is one of:
  PATH or URL             a video file or stream, decoded by PyAV (FFmpeg)
  sample                  the built-in sample video (1280x720 @ 60 fps, 10 s,
                          H.264), made under .cache/ (or $CAPSULE_SESSIONS_CACHE)
                          on first use
  synthetic:WxH@FPS       the built-in generator (--seconds of video, default 10)
  /dev/videoN             a local camera through PyAV's v4l2 input (runs for
                          --seconds, default 10)

Frames larger than --max-width x --max-height are scaled down to fit (aspect kept).

Video time: without --realtime, files, URLs and synthetic sources are read as fast as
they decode, and each such session's clock follows the stream's timestamps (pts), not
the wall clock: --frame-interval, --ttl, --sampler-interval and the frames' received_at
are seconds of video, so a 10 s clip with --frame-interval 1 gives 10 frames however
fast the machine is. With --realtime each source is paced at its own fps and the
sessions use the wall clock, as cameras always do. Latency is wall-clock time from
store to receive either way.

A session ends as done (read to its end), stopped (--seconds reached), interrupted,
failed (the source could not be read, or the ingest config rejected every frame of
it), or ended early (fewer frames than the file declares, or a camera that stopped
sending).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ._args import (
    EXIT_CODES,
    add_common_arguments,
    check_backend,
    check_redis,
    check_shared,
    int_at_least,
    plain,
    seconds,
)
from ._errors import UsageError
from ._extras import require
from ._runner import JPEG_MIME, RAW_MIME, RunOptions

if TYPE_CHECKING:
    from .. import VisualInputConfig
    from ._sources import Source

HELP = "decode video files, URLs, cameras or synthetic sources into sessions, watched live"
DEFAULT_LIVE_SECONDS = 10.0
GO_MAX_FRAME_BYTES = 1_048_576


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = plain(__doc__.split("\n\n", 1)[1])
    parser.epilog = EXIT_CODES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="what to ingest (see above)")
    parser.add_argument("--sample", action="store_true", help="add the built-in sample video as a SOURCE")
    parser.add_argument("--realtime", action="store_true",
                        help="pace each source at its own fps, on the wall clock (default: read files, URLs "
                             "and synthetic sources flat out, on video time; see above)")
    parser.add_argument("--jpeg", action="store_true", help="send JPEG (simplejpeg) instead of raw RGB")
    parser.add_argument("--jpeg-quality", type=int_at_least(1, 100), default=85, metavar="Q",
                        help="JPEG quality 1..100 (default: 85)")
    parser.add_argument("--frame-interval", type=seconds(allow_zero=True), default=0.0, metavar="S",
                        help="rate limit: least seconds between accepted frames, of video unless --realtime "
                             "(default: 0; the Go server uses 1)")
    parser.add_argument("--max-recent", type=int_at_least(1, 1 << 20), default=2, metavar="N",
                        help="frames each session keeps (default: 2)")
    parser.add_argument("--ttl", type=seconds(allow_zero=True), default=10.0, metavar="S",
                        help="frame TTL for latest_visual_frames, as the vision sampler uses it (default: 10)")
    parser.add_argument("--max-width", type=int_at_least(1, 16384), default=1280, metavar="PX",
                        help="widest frame allowed; wider sources are scaled down (default: 1280)")
    parser.add_argument("--max-height", type=int_at_least(1, 16384), default=720, metavar="PX",
                        help="tallest frame allowed; taller sources are scaled down (default: 720)")
    parser.add_argument("--max-frame-bytes", type=int_at_least(1, 1 << 40), default=None, metavar="N",
                        help="largest frame accepted (default: 1 MiB for JPEG as in the Go server; "
                             "max-width x max-height x 3 for raw RGB)")
    add_common_arguments(parser, default_subscribers="fast,slow,async,sampler", default_seconds=None,
                         seconds_help="stop every source after S seconds; synthetic sources are S seconds "
                                      f"of video and cameras run S seconds (default: files to their end, "
                                      f"others {DEFAULT_LIVE_SECONDS:g} s)")


def build_config(args: argparse.Namespace) -> VisualInputConfig:
    from .. import VisualInputConfig

    raw_limit = args.max_width * args.max_height * 3
    max_bytes = args.max_frame_bytes or (GO_MAX_FRAME_BYTES if args.jpeg else raw_limit)
    return VisualInputConfig(
        frame_interval=args.frame_interval,
        max_width=args.max_width,
        max_height=args.max_height,
        max_frame_bytes=max_bytes,
        max_recent_frames=args.max_recent,
        frame_ttl=args.ttl,
        mime_types=(JPEG_MIME if args.jpeg else RAW_MIME,),
    )


def resolve_sources(specs: list[str], length: float) -> list[Source]:
    from ._sample import sample_video
    from ._sources import SyntheticSource, parse_source

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    sources = [parse_source(spec, seconds=length, index=i, sample_path=lambda: sample_video(log))
               for i, spec in enumerate(specs)]
    if any(not isinstance(s, SyntheticSource) for s in sources):
        require("av", "reading video files, URLs and cameras")
    return sources


def run(args: argparse.Namespace) -> int:
    from ._job import run_job

    specs = list(args.sources) + (["sample"] if args.sample else [])
    if not specs:
        raise UsageError("nothing to ingest: give at least one SOURCE, or --sample")
    if len(specs) > 64:
        raise UsageError("at most 64 sources")
    redis_namespace = check_redis(args)
    check_backend(args.backend)
    check_shared(args.shared, args.backend)
    if args.jpeg:
        require("simplejpeg", "--jpeg")
    if "sample" in specs:
        require("av", "the sample video")
    config = build_config(args)
    sources = resolve_sources(specs, args.seconds or DEFAULT_LIVE_SECONDS)
    options = RunOptions(
        backend=args.backend,
        subscribers=args.subscribers,
        max_recent=config.max_recent_frames,
        min_interval=config.frame_interval,
        realtime=args.realtime,
        seconds=args.seconds,
        live_seconds=DEFAULT_LIVE_SECONDS,
        config=config,
        jpeg_quality=args.jpeg_quality if args.jpeg else None,
        buffer=args.buffer,
        slow_work=args.slow_ms / 1000.0,
        ttl=config.frame_ttl,
        sampler_interval=args.sampler_interval,
        shared=args.shared,
        redis=args.redis,
        redis_namespace=redis_namespace,
    )
    return run_job("ingest", sources, options, args)
