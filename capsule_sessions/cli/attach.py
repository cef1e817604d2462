"""``capsule-sessions attach --namespace NS``: read another process's shared sessions.

Waits up to --wait seconds for sessions to appear in namespace NS (made by
``demo --shared NS``, ``ingest --shared NS``, or any program whose SessionManager or
Session has shared="NS"), attaches to every one, and to ones that appear later, and
subscribes to each with --buffer and --policy. It receives frames until every session
ended or for --seconds from the first attach, then shows per session what this process
got: frames received, the subscription's delivered and dropped counters, frames/s, and
the store-to-receive latency p50/p99/max (time.monotonic here at receipt minus the
frame's received_at, the owner's time.monotonic at its store: one clock for every
process of a Linux machine). Every frame's bytes are checked: raw RGB must be
width x height x 3 bytes, and the frames of the command line's synthetic sources carry
their frame_seq in their first 8 bytes. Linux and the compiled backend only.
"""

from __future__ import annotations

import argparse
import json
import sys

from ._args import int_at_least, namespace, plain, seconds
from ._display import MODES, AttachView, counted, print_attach_summary
from ._errors import UsageError

HELP = "attach to another process's shared sessions and show its drops and latency from here"
EXIT_OK, EXIT_FAILED, EXIT_ACCOUNTING, EXIT_INTERRUPTED = 0, 1, 3, 130
EXIT_CODES = """exit status:
  0    frames were received from every session attached to, none with wrong bytes
  1    no session appeared within --wait, or a session could not be attached to,
       subscribed to or read, or gave no frame
  2    usage error: a bad flag, or no shared memory here (pure backend only, not Linux)
  3    the counts did not add up or a frame had wrong bytes (a bug worth reporting)
  130  interrupted (Ctrl-C)"""
# A shared subscription's queue lives in the control segment: 64 entries
# (capsule_sessions._shm.MAX_QUEUE, docs/shared-memory.md).
MAX_BUFFER = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = plain(__doc__.split("\n\n", 1)[1])
    parser.epilog = EXIT_CODES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    # Required, but checked in run(): argparse would report a missing --namespace before
    # an unknown flag, and the unknown flag is the likelier mistake.
    parser.add_argument("--namespace", type=namespace, default=None, metavar="NS",
                        help="required: the namespace the sessions are shared in (demo --shared NS)")
    parser.add_argument("--seconds", type=seconds(allow_zero=False), default=None, metavar="S",
                        help="stop S seconds after the first attach (default: when every session ended)")
    parser.add_argument("--wait", type=seconds(allow_zero=True), default=5.0, metavar="S",
                        help="how long to wait for the first session to appear (default: 5)")
    parser.add_argument("--buffer", type=int_at_least(1, MAX_BUFFER), default=16, metavar="N",
                        help=f"queue size of each subscription, 1..{MAX_BUFFER} (default: 16)")
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


def run(args: argparse.Namespace) -> int:
    from ._attacher import Attacher, AttachOptions
    from ._summary import summarize_attach

    if args.namespace is None:
        raise UsageError("--namespace NS is required: the namespace the sessions are shared in (demo --shared NS)")
    _check_shared_memory(args.namespace)
    title = "capsule-sessions attach"
    view = AttachView(args.display, title)
    options = AttachOptions(namespace=args.namespace, seconds=args.seconds, wait=args.wait, buffer=args.buffer,
                            policy=args.policy, work=args.slow_ms / 1000.0)
    attacher = Attacher(options, on_message=view.message)
    view.start(attacher)
    try:
        result = attacher.execute(view.update)
    finally:
        view.stop(attacher)
    summary = summarize_attach(result)
    print_attach_summary(summary, title=f"{title} - namespace {result.namespace} - pid {summary['pid']} - "
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
