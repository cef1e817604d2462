"""``capsule-sessions demo``: a simulated multi-camera ingest.

N synthetic cameras, each into its own session of one SessionManager, stored with
``Session.store_frame`` (the hot path) as raw RGB, paced at the camera's fps. It is the
same runner as ``ingest synthetic:WxH@FPS ...``, with demo defaults.
"""

from __future__ import annotations

import argparse

from ._args import (
    EXIT_CODES,
    add_common_arguments,
    check_backend,
    check_redis,
    check_shared,
    int_at_least,
    plain,
    seconds,
    size,
)
from ._errors import UsageError
from ._runner import RunOptions
from ._sources import SyntheticSource

HELP = "simulated multi-camera ingest into one SessionManager"
# Each camera keeps a few precomputed frames; refuse sizes that would not fit in memory.
MAX_PRECOMPUTED_BYTES = 2 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = plain(__doc__.split("\n\n", 1)[1])
    parser.epilog = EXIT_CODES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--cameras", type=int_at_least(1, 64), default=4, metavar="N",
                        help="number of cameras, one session each (default: 4)")
    parser.add_argument("--fps", type=seconds(allow_zero=False, unit="frames per second"), default=60.0,
                        help="frames per second of each camera (default: 60)")
    parser.add_argument("--size", type=size, default=(1280, 720), metavar="WxH",
                        help="frame size, raw RGB (default: 1280x720)")
    parser.add_argument("--min-interval", type=seconds(allow_zero=True), default=0.0, metavar="S",
                        help="rate limit: least time between accepted frames (default: 0)")
    parser.add_argument("--max-recent", type=int_at_least(1, 1 << 20), default=2, metavar="N",
                        help="frames each session's ring keeps (default: 2)")
    add_common_arguments(parser, default_subscribers="fast,slow,async,sampler", default_seconds=5.0,
                         seconds_help="how long the cameras run (default: 5)")


def run(args: argparse.Namespace) -> int:
    from ._job import run_job

    redis_namespace = check_redis(args)
    check_backend(args.backend)
    check_shared(args.shared, args.backend)
    if args.fps > 10_000:
        raise UsageError(f"--fps must be at most 10000, got {args.fps:g}")
    width, height = args.size
    if args.cameras * SyntheticSource.PRECOMPUTED * width * height * 3 > MAX_PRECOMPUTED_BYTES:
        raise UsageError(f"--cameras {args.cameras} at --size {width}x{height} needs more than "
                         f"{MAX_PRECOMPUTED_BYTES >> 30} GiB of precomputed frames; use fewer or smaller")
    count = max(1, round(args.fps * args.seconds))
    sources = [SyntheticSource(f"synthetic:{width}x{height}@{args.fps:g}", width, height, args.fps, count, offset=i)
               for i in range(args.cameras)]
    options = RunOptions(
        backend=args.backend,
        subscribers=args.subscribers,
        max_recent=args.max_recent,
        min_interval=args.min_interval,
        realtime=True,
        seconds=args.seconds,
        buffer=args.buffer,
        slow_work=args.slow_ms / 1000.0,
        sampler_interval=args.sampler_interval,
        session_prefix="cam",
        shared=args.shared,
        redis=args.redis,
        redis_namespace=redis_namespace,
    )
    return run_job("demo", sources, options, args)
