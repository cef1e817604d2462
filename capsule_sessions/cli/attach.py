"""``capsule-sessions attach --namespace NS | --redis URL``: read another process's sessions.

Waits up to --wait seconds for sessions to appear, attaches to every one, and to ones
that appear later, and subscribes to each with --buffer and --policy. The sessions are
either shared in this machine's memory under namespace NS (made by ``demo --shared NS``,
``ingest --shared NS``, or any program whose SessionManager or Session has shared="NS";
Linux and the compiled backend only), or in Redis at URL, under --redis-namespace (made
by ``demo --redis URL``, ``ingest --redis URL``, or any program's RedisSessionManager):
this process is then a node of their cluster, on this machine or any other, that only
reads; it never ends or evicts a session. It receives frames until every session
ended or for --seconds from the first attach, then shows per session what this process
got: frames received, the subscription's delivered and dropped counters, frames/s, and
the store-to-receive latency p50/p99/max: the store's clock here at receipt minus the
frame's received_at, the producer's reading of the same clock at its store (shared
memory: time.monotonic, one clock for every process of a Linux machine; Redis: the
Redis server's clock, through each process's offset to it). Every frame's bytes are
checked: raw RGB must be width x height x 3 bytes, and the frames of the command line's
synthetic sources carry their frame_seq in their first 8 bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from .._limits import MAX_COUNT
from ._args import int_at_least, namespace, plain, seconds
from ._display import MODES, AttachView, counted, print_attach_summary
from ._errors import UsageError

if TYPE_CHECKING:
    from ._attach_stores import Store

HELP = "attach to another process's sessions (shared memory or Redis) and show its drops and latency from here"
EXIT_OK, EXIT_FAILED, EXIT_ACCOUNTING, EXIT_INTERRUPTED = 0, 1, 3, 130
EXIT_CODES = """exit status:
  0    frames were received from every session attached to, none with wrong bytes
  1    no session appeared within --wait, or a session could not be attached to,
       subscribed to or read, or gave no frame; or the Redis server (--redis)
       could not be reached
  2    usage error: a bad flag, not exactly one of --namespace and --redis, no
       shared memory here (pure backend only, not Linux), or no redis extra
  3    the counts did not add up or a frame had wrong bytes (a bug worth reporting)
  130  interrupted (Ctrl-C)"""
# A shared subscription's queue lives in the control segment: 64 entries
# (capsule_sessions._shm.MAX_QUEUE, docs/shared-memory.md).
MAX_BUFFER = 64
# A Redis subscription's queue is in this process's memory, bounded only by the
# library's clamp of every buffer (it grows with what is queued, not with the bound).
MAX_REDIS_BUFFER = MAX_COUNT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = plain(__doc__.split("\n\n", 1)[1])
    parser.epilog = EXIT_CODES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    # One of the two is required, but that is checked in run(): argparse would report
    # it before an unknown flag, and the unknown flag is the likelier mistake.
    parser.add_argument("--namespace", type=namespace, default=None, metavar="NS",
                        help="read the sessions shared in memory under namespace NS (demo --shared NS)")
    parser.add_argument("--redis", default=None, metavar="URL",
                        help="read the sessions in Redis at URL (demo --redis URL; the redis extra)")
    parser.add_argument("--redis-namespace", default=None, metavar="NS",
                        help="with --redis: the namespace of the sessions in Redis (default: capsule)")
    parser.add_argument("--seconds", type=seconds(allow_zero=False), default=None, metavar="S",
                        help="stop S seconds after the first attach (default: when every session ended)")
    parser.add_argument("--wait", type=seconds(allow_zero=True), default=5.0, metavar="S",
                        help="how long to wait for the first session to appear (default: 5)")
    parser.add_argument("--buffer", type=int_at_least(1, MAX_REDIS_BUFFER), default=16, metavar="N",
                        help=f"queue size of each subscription: 1..{MAX_BUFFER} with --namespace, "
                             f"1..{MAX_REDIS_BUFFER} with --redis (default: 16)")
    parser.add_argument("--policy", choices=("drop_newest", "drop_oldest"), default="drop_oldest",
                        help="what a full queue drops (default: drop_oldest)")
    parser.add_argument("--slow-ms", type=seconds(allow_zero=True, unit="ms"), default=0.0, metavar="MS",
                        help="work time per frame, in ms, as a model would spend: a reader slower than the "
                             "frames shows its drops (default: 0)")
    parser.add_argument("--display", choices=MODES, default="auto",
                        help="live view: rich table on a terminal, plain lines on stderr, or none "
                             "(default: auto)")
    parser.add_argument("--json", metavar="PATH", help="write the summary as JSON")


def _check_shared_memory(ns: str) -> None:
    from .. import list_shared

    try:
        list_shared(ns)
    except ImportError as exc:
        raise UsageError(str(exc)) from None


def _store(args: argparse.Namespace) -> Store:
    """Where the sessions are, from exactly one of --namespace and --redis (UsageError
    otherwise; StoreError for a Redis server that cannot be reached)."""
    from ._attach_stores import RedisSessions, SharedSessions
    from ._redis import check_flags

    if (args.namespace is None) == (args.redis is None):
        given = "both were given" if args.namespace is not None else "neither was given"
        raise UsageError(f"give exactly one of --namespace NS (sessions shared in this machine's memory) or "
                         f"--redis URL (sessions in Redis): {given}")
    redis_namespace = check_flags(args.redis, args.redis_namespace, {})
    if args.redis is not None:
        return RedisSessions(args.redis, redis_namespace)
    if args.buffer > MAX_BUFFER:
        raise UsageError(f"--buffer: must be an integer in 1..{MAX_BUFFER} with --namespace (a shared "
                         f"subscription's queue is in shared memory), got {args.buffer}")
    _check_shared_memory(args.namespace)
    return SharedSessions(args.namespace)


def run(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        return _receive(args, store)
    finally:
        store.close()


def _receive(args: argparse.Namespace, store: Store) -> int:
    from ._attacher import Attacher, AttachOptions
    from ._summary import summarize_attach

    title = "capsule-sessions attach"
    view = AttachView(args.display, title)
    options = AttachOptions(namespace=store.namespace, redis=store.redis_url, seconds=args.seconds, wait=args.wait,
                            buffer=args.buffer, policy=args.policy, work=args.slow_ms / 1000.0, clock=store.clock)
    attacher = Attacher(options, store, on_message=view.message)
    view.start(attacher)
    try:
        result = attacher.execute(view.update)
    finally:
        view.stop(attacher)
    summary = summarize_attach(result)
    print_attach_summary(summary, title=f"{title} - {result.where} - pid {summary['pid']} - "
                                        f"{counted(len(result.readers), 'session')} - {result.seconds:.1f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    sys.stdout.flush()
    if result.interrupted:
        return EXIT_INTERRUPTED
    if summary["accounting_problems"]:
        return EXIT_ACCOUNTING
    if summary["failures"]:
        return EXIT_FAILED
    return EXIT_OK
