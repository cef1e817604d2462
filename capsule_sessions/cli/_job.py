"""Run a list of sources and report: the part ``demo`` and ``ingest`` share after parsing."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import _report
from ._display import counted, make_display, print_summary
from ._redis import attach_hint
from ._runner import Run, RunOptions
from ._sources import Source
from ._summary import summarize

EXIT_OK, EXIT_SOURCE_FAILED, EXIT_USAGE, EXIT_ACCOUNTING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def run_job(command: str, sources: Sequence[Source], options: RunOptions, args: argparse.Namespace) -> int:
    """Run, show, and write the summary/report; returns the exit status.

    Optional extras the flags need are checked first (MissingExtra), so a missing one
    costs no run.
    """
    title = f"capsule-sessions {command}"
    display = make_display(args.display, title)
    if args.report:
        _report.check_available()
    run = Run(sources, options, on_message=display.message)
    if options.shared is not None:
        display.message(f"sessions shared in namespace {options.shared!r}: "
                        f"capsule-sessions attach --namespace {options.shared}")
    if options.redis is not None:
        display.message(f"sessions in {run.store}: {attach_hint(run.store_url, options.redis_namespace)}")
    display.start(run)
    try:
        result = run.execute(display.update)
    finally:
        display.stop(run)
    summary = summarize(result, command=command)
    where = f"sessions in {result.store}" if result.store else f"backend {result.backend}"
    print_summary(summary, title=f"{title} - {where} - {counted(len(result.sessions), 'session')} - "
                                 f"{result.seconds:.1f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    if args.report:
        path = _report.write_report(result, args.report, title=title)
        print(f"report written to {path}")
    sys.stdout.flush()
    if result.interrupted:
        return EXIT_INTERRUPTED
    if summary["accounting_problems"]:
        return EXIT_ACCOUNTING
    if result.failed or result.store_error:
        return EXIT_SOURCE_FAILED
    return EXIT_OK
