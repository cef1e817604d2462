"""``capsule-sessions bench``: the benchmark matrix on every backend.

Times W1..W7 and W13 on each library backend, the naive port and the memcpy limit with
interleaved repeats (medians), measures allocation and page faults of the 1080p stores,
runs the threaded workloads W8 (producer scaling) and W9 (fan-out latency), the
across-process workloads W10-W12 in spawned processes against their peers
(multiprocessing.Queue, faster_fifo, the Frigate pattern, iceoryx2, the in-process
subscription), the Redis workloads W14-W16 against bare redis-py on a redis-server the
run starts itself, then prints a markdown table with the ratios and the targets judged.
The project's docs/bench.md defines each workload and target. The workloads are
installed with the package (capsule_sessions.bench), so the command runs anywhere and
needs numpy only; rich draws the progress bar when it is installed, --plot needs
matplotlib, and the peers faster_fifo and iceoryx2 come with the 'bench' extra (without
them they are reported as unavailable).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, overload

from .._json import JsonObject
from ..bench import ipc, plot, redis_frames, redis_ops, report, runner, workloads
from ._errors import UsageError
from ._extras import MissingExtra, available, missing_message

HELP = "benchmark both backends (workloads and targets: docs/bench.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true",
                        help="short batches and windows: the whole matrix in under a minute")
    parser.add_argument("--targets", metavar="LIST",
                        help="comma-separated targets to run (default: every backend, naive, memcpy, and for "
                             "W10-W12 shm, iceoryx2, frigate, faster_fifo, mp_queue, in_process)")
    parser.add_argument("--workloads", metavar="LIST",
                        help="comma-separated workload ids or prefixes, e.g. W1,W3,W8 (default: all)")
    parser.add_argument("--repeats", type=_positive_int, metavar="N",
                        help="interleaved repeats per figure (default: 5 with --quick, else 9)")
    parser.add_argument("--json", metavar="PATH", help="write every raw figure to PATH as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart to PATH (needs matplotlib: the 'plot' extra)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--list", action="store_true", help="list the workloads and targets, then exit")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _PlainProgress:
    """Progress on stderr without rich: a line every few percent."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.shown = max(total, 1), 0, -1
        self.start = time.monotonic()

    def advance(self, label: str) -> None:
        self.done += 1
        percent = 100 * self.done // self.total
        if percent // 5 != self.shown // 5 or self.done == self.total:
            self.shown = percent
            elapsed = time.monotonic() - self.start
            print(f"bench: {percent:3d}% ({self.done}/{self.total}, {elapsed:.0f} s) {label}",
                  file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda label: None
        return
    if available("rich"):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if console.is_terminal:
            columns = (TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.description}"))
            with Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task("", total=total)
                yield lambda label: bar.update(task, advance=1, description=label)
            return
    plain = _PlainProgress(total)
    yield plain.advance


def _list() -> str:
    lines = ["workloads:"]
    for wid in runner.ALL_IDS:
        workload = workloads.BY_ID.get(wid)
        if workload is not None:
            description = workload.description
        elif wid in ipc.DESCRIPTIONS:
            description = ipc.DESCRIPTIONS[wid]
        elif wid in redis_frames.DESCRIPTIONS:
            description = redis_frames.DESCRIPTIONS[wid]
        elif wid == redis_ops.W17_ID:
            description = redis_ops.DESCRIPTION
        elif wid.startswith("W8"):
            description = "1 and 2 producer threads, 1080p RGB"
        else:
            description = "64 KiB frames, 1/4/16 subscribers drained by threads"
        lines.append(f"  {wid:26s} {description}")
    lines.append("targets: " + ", ".join(workloads.targets()))
    peers = [name + (f" ({reason})" if reason else "") for name, reason in ipc.availability(list(ipc.TARGETS)).items()]
    lines.append("across processes (W10-W12): " + ", ".join(peers))
    lines.append("across machines (W14-W16): the library against bare redis-py on a redis-server of the run's own"
                 + (f" (unavailable: {redis_frames.unavailable()})" if redis_frames.unavailable() else ""))
    return "\n".join(lines)


def _write_json(path: str, results: JsonObject) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2, allow_nan=False, default=_json_default) + "\n")


def _json_default(value: object) -> NoReturn:
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


@overload
def _finite(value: JsonObject) -> JsonObject: ...
@overload
def _finite(value: object) -> object: ...
def _finite(value: object) -> object:
    """JSON has no NaN: an undefined figure (no sample) is written as null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(_list())
        return 0
    if args.plot and not available("matplotlib"):
        raise MissingExtra(missing_message("matplotlib", "--plot"))
    try:
        selection = runner.select(args.workloads, args.targets)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = runner.QUICK if args.quick else runner.FULL
    if args.repeats:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    with _progress(runner.total_steps(selection, settings), not args.no_progress) as tick:
        results = _finite(runner.run(selection, settings, tick))
    print(report.markdown(results), end="")
    if args.json:
        _write_json(args.json, results)
        print(f"\nraw figures: {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot.write(results, args.plot)
        print(f"chart: {args.plot}")
    return 0
