"""Flag parsing shared by ``demo`` and ``ingest``: value types with clear messages, and the
flags both commands have."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import TypeVar

from .. import available_backends
from ._consumers import KINDS
from ._display import MODES
from ._errors import UsageError

EXIT_CODES = """exit status:
  0    every source was read to its end (or for --seconds)
  1    at least one source failed (missing, corrupt, unsupported codec, ended
       early, no camera, or every frame rejected by the ingest config), and
       the other sessions still ran; or the Redis server (--redis) could not
       be reached, or failed during the run
  2    usage error: a bad flag or SOURCE, or a needed optional extra is missing
  3    the run's counts did not add up (a bug worth reporting)
  130  interrupted (Ctrl-C)"""


_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
Number = TypeVar("Number", int, float)


def plain(text: str) -> str:
    """A docstring's text as help: ``name`` is reST markup there, shown as name."""
    return _LITERAL.sub(r"\1", text)


def _number(text: str, kind: Callable[[str], Number], what: str) -> Number:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def int_at_least(low: int, high: int = 1 << 31) -> Callable[[str], int]:
    what = f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        value = _number(text, int, what)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


def seconds(*, allow_zero: bool, unit: str = "seconds") -> Callable[[str], float]:
    what = f"a number of {unit} " + (">= 0" if allow_zero else "> 0")

    def parse(text: str) -> float:
        value = _number(text, float, what)
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


def size(text: str) -> tuple[int, int]:
    """``WxH`` such as 1280x720."""
    parts = text.lower().split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT such as 1280x720, got {text!r}") from None
    if not (1 <= width <= 16384 and 1 <= height <= 16384):
        raise argparse.ArgumentTypeError(f"width and height must be in 1..16384, got {text!r}")
    return width, height


def subscribers(text: str) -> list[str]:
    """Comma-separated subscriber kinds; a kind may repeat (fast,fast,slow)."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown subscriber {unknown[0]!r}; choose from {', '.join(KINDS)}")
    if len(kinds) > 64:
        raise argparse.ArgumentTypeError("at most 64 subscribers per session")
    return kinds


def namespace(text: str) -> str:
    """A shared-memory namespace: 1-64 of A-Z a-z 0-9 _ - (the library's own check)."""
    from ..shared import check_namespace

    try:
        return check_namespace(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_common_arguments(parser: argparse.ArgumentParser, *, default_subscribers: str,
                         default_seconds: object, seconds_help: str) -> None:
    parser.add_argument("--seconds", type=seconds(allow_zero=False), default=default_seconds, metavar="S",
                        help=seconds_help)
    parser.add_argument("--subscribers", type=subscribers, default=subscribers(default_subscribers),
                        metavar="LIST",
                        help=f"subscribers per session, comma-separated, repeats allowed; kinds: {', '.join(KINDS)} "
                             f"(default: {default_subscribers})")
    parser.add_argument("--backend", choices=("python", "cython"), default=None,
                        help="frame-buffer backend (default: the fastest available, "
                             f"now {available_backends()[0]})")
    parser.add_argument("--buffer", type=int_at_least(1, 1 << 16), default=16, metavar="N",
                        help="queue size of the fast and asyncio subscribers (default: 16)")
    parser.add_argument("--slow-ms", type=seconds(allow_zero=True, unit="ms"), default=50.0, metavar="MS",
                        help="work time per frame of the slow subscriber, in ms (default: 50)")
    parser.add_argument("--sampler-interval", type=seconds(allow_zero=False), default=1.0, metavar="S",
                        help="how often the vision sampler calls latest_visual_frames (default: 1 s)")
    parser.add_argument("--display", choices=MODES, default="auto",
                        help="live view: rich table on a terminal, plain lines on stderr, or none "
                             "(default: auto)")
    parser.add_argument("--report", metavar="PATH.png",
                        help="write a PNG with a latency histogram and fps over time (needs matplotlib)")
    parser.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    parser.add_argument("--shared", type=namespace, default=None, metavar="NS",
                        help="put every session's frame ring in shared memory under namespace NS, so other "
                             "processes can attach to it (capsule-sessions attach --namespace NS); "
                             "compiled backend only, Linux (docs/shared-memory.md)")
    parser.add_argument("--redis", default=None, metavar="URL",
                        help="keep the sessions in Redis at URL (redis://, rediss:// or unix://; the redis extra), "
                             "where other processes and machines see them (capsule-sessions attach --redis URL; "
                             "docs/redis.md)")
    parser.add_argument("--redis-namespace", default=None, metavar="NS",
                        help="the namespace of the sessions in Redis: 1-64 of A-Z a-z 0-9 _ . - "
                             "(default: capsule, the library's)")


def check_backend(name: object) -> None:
    if name is not None and name not in available_backends():
        raise UsageError(f"backend {name!r} is not available here (available: {', '.join(available_backends())})")


def check_redis(args: argparse.Namespace) -> str:
    """``--redis`` with the flags demo and ingest share: the Redis namespace to use, or a
    UsageError."""
    from ._redis import check_flags

    conflicts = {}
    if args.shared is not None:
        conflicts["--shared"] = ("the frames go either to Redis, for every process and machine, or to this "
                                 "machine's shared memory: give one")
    if args.backend is not None:
        conflicts["--backend"] = ("--backend picks the in-process frame ring, and with --redis the frames are "
                                  "in Redis")
    return check_flags(args.redis, args.redis_namespace, conflicts)


def check_shared(namespace: str | None, backend: str | None) -> None:
    """``--shared NS`` with ``--backend``: what SessionManager(shared=NS) would refuse
    (ImportError for the pure backend or a build without the shared-memory module,
    ValueError/TypeError for a bad name), as a UsageError before anything runs."""
    if namespace is None:
        return
    from .. import _backend
    from ..shared import check_shared as library_check

    name = _backend.name_of(_backend.module_for(backend))
    if name != "cython":
        how = "" if backend else f" (the {name} backend is the default here)"
        raise UsageError(f"--shared needs the compiled backend (--backend cython){how}; "
                         f"the {name} backend keeps frames in process memory only")
    try:
        library_check(namespace, name)
    except (ImportError, TypeError, ValueError) as exc:
        raise UsageError(f"--shared: {exc}") from None
