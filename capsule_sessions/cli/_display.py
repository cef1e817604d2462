"""What a person watches: a live view while the run goes, then the summary tables.

With rich (optional extra ``cli``) on a terminal the live view is a table redrawn four
times a second; otherwise (no rich, output piped) a plain line per session every second
on stderr. The summary tables go to stdout, drawn by rich when it is installed and as
aligned plain text when it is not.

A rich table never cuts a number short: at the terminal's width it is one table when it
fits, else its columns are split into groups shown one under the other, each repeating
the session (and subscriber) column; text such as a file name wraps instead.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .._json import JsonObject
from ._extras import available, require

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.live import Live
    from rich.table import Table

    from ._attacher import Attacher
    from ._runner import Run

# A table's header and rows, all cells text.
Rows = tuple[list[str], list[list[str]]]

MODES = ("auto", "live", "plain", "none")


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt_int(value: int) -> str:
    return f"{value:,}"


def counted(n: int, noun: str) -> str:
    """``1 session``, ``2 sessions``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _dropped_header(label: str) -> str:
    return f"dropped\n{label}"


def _live_rows(run: Run) -> Rows:
    """Headers and one row per session from the running state (read without locks)."""
    rejected = run.options.config is not None
    headers = ["session", "source", "status", "time s", "fps", "accepted", "rate-limited"]
    headers += ["rejected"] if rejected else []
    # Every session has the same subscribers: one column of drops for each.
    labels = [c.label for c in run.sessions[0].consumers] if run.sessions else []
    headers += [_dropped_header(label) for label in labels]
    headers += ["p50 ms", "p99 ms"]
    rows: list[list[str]] = []
    for s in run.sessions:
        producer = s.producer
        drops = [_fmt_int(c.subscription.dropped) for c in s.consumers]
        timed = next((c for c in s.consumers if c.spec.kind == "fast"), s.consumers[0] if s.consumers else None)
        p50 = p99 = None
        if timed is not None:
            p50 = timed.latency.percentile(50)
            p99 = timed.latency.percentile(99)
        status = producer.status if not producer.message else f"{producer.status}: {producer.message}"
        row = [s.id, s.source.label, status, f"{producer.active_seconds:.1f}", f"{s.recent_fps():.1f}",
               _fmt_int(producer.accepted), _fmt_int(producer.rate_limited)]
        row += [_fmt_int(producer.rejected)] if rejected else []
        row += drops + [_fmt_ms(None if p50 is None else p50 * 1e3), _fmt_ms(None if p99 is None else p99 * 1e3)]
        rows.append(row)
    return headers, rows


def session_table(summary: JsonObject) -> Rows:
    headers = ["session", "source", "status", "offered", "accepted", "rate-limited"]
    if summary["uses_config"]:
        headers.append("rejected")
    headers += ["fps", "MB/s"]  # the backend is in the title: one for the whole run
    rows = []
    for s in summary["sessions"]:
        row = [s["id"], s["source"], s["status"], _fmt_int(s["offered"]), _fmt_int(s["accepted"]),
               _fmt_int(s["rate_limited"])]
        if summary["uses_config"]:
            row.append(_fmt_int(s["rejected"]))
        row += [f"{s['fps']:.1f}", f"{s['mb_per_s']:.1f}"]
        rows.append(row)
    return headers, rows


def subscriber_table(summary: JsonObject) -> tuple[list[str], list[list[str]], list[int]]:
    """Headers, rows, and the index of each session's first row (for section lines)."""
    headers = ["session", "subscriber", "queue", "delivered", "dropped", "queued", "p50 ms", "p99 ms", "max ms"]
    rows: list[list[str]] = []
    starts: list[int] = []
    for s in summary["sessions"]:
        starts.append(len(rows))
        first = True
        for sub in s["subscribers"]:
            lat = sub["latency_ms"]
            rows.append([s["id"] if first else "", sub["label"], f"{sub['policy']}/{sub['buffer']}",
                         _fmt_int(sub["delivered"]), _fmt_int(sub["dropped"]), _fmt_int(sub["queued"]),
                         _fmt_ms(lat["p50"]), _fmt_ms(lat["p99"]), _fmt_ms(lat["max"])])
            first = False
        for sampler in s["samplers"]:
            age = sampler["newest_age_ms"]
            rows.append([s["id"] if first else "", sampler["label"],
                         f"latest(ttl={sampler['ttl']:g}s)/{sampler['interval']:g}s",
                         f"{_fmt_int(sampler['frames'])} in {_fmt_int(sampler['calls'])} calls", "-", "-",
                         _fmt_ms(age["p50"]), _fmt_ms(age["p99"]), _fmt_ms(age["max"])])
            first = False
    return headers, rows, starts


def footnotes(summary: JsonObject) -> list[str]:
    notes = []
    for s in summary["sessions"]:
        text = f"{s['id']}: {s['source']}"
        if s["description"]:
            text += f" ({s['description']})"
        if s["message"]:
            text += f" - {s['status']}: {s['message']}"
        notes.append(text)
    # With --redis, frames are stamped on the Redis server's clock, and so is every latency.
    clock = "the Redis server's clock (read through this process's offset to it)" if summary.get("redis") \
        else "time.monotonic"
    notes.append(f"latency: {clock} at receive - at store; a sampler's p50/p99 is the age of the "
                 "newest frame latest_visual_frames() returned, on the session's clock")
    on_video_time = [s["id"] for s in summary["sessions"] if s["clock"] == "video"]
    if on_video_time:
        notes.append(f"video time: the clock of {', '.join(on_video_time)} follows the stream's timestamps (pts), "
                     "so the rate limit, ttl and sampler interval there are seconds of video")
    if summary.get("store_error"):
        notes.append(f"FAILED the session store: {summary['store_error']}")
    problems = summary["accounting_problems"]
    if problems:
        notes += [f"ACCOUNTING ERROR {p}" for p in problems]
    else:
        notes.append("accounting: offered = accepted + rate-limited + rejected, and "
                     "delivered + dropped + queued = accepted for every subscriber")
    return notes


# Columns of words, which may wrap; every other column holds one number per cell.
_TEXT = ("source", "status", "queue")
# The columns that say what a row is about, repeated in every group of columns.
_KEYS = ("session", "subscriber")
# The narrowest a text column is squeezed to before the columns are split in groups.
_TEXT_MIN = 22
# Neighbouring columns that read together stay in one group when the table is split.
_BLOCK_OF = {"source": "what", "status": "what", "time s": "rate", "fps": "rate", "MB/s": "rate",
             "offered": "counts", "accepted": "counts", "rate-limited": "counts", "rejected": "counts",
             "delivered": "counts", "dropped": "counts", "queued": "counts",
             "received": "counts", "bad frames": "counts",
             "p50 ms": "latency", "p99 ms": "latency", "max ms": "latency"}


def _block(header: str) -> str:
    return "drops" if header.startswith("dropped\n") else _BLOCK_OF.get(header, header)


def _numeric(header: str) -> bool:
    return header not in _TEXT and header not in _KEYS


def plain_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]],
                starts: Sequence[int] = ()) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if _numeric(h) else c.ljust(w) for c, w, h in zip(cells, widths, headers, strict=True)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [title, line(headers), rule]
    for i, row in enumerate(rows):
        if i and i in starts:
            lines.append("")
        lines.append(line(row))
    return "\n".join(lines)


def _table(title: str | None, headers: Sequence[str], widths: Sequence[int] | None = None) -> Table:
    from rich import box
    from rich.table import Table

    # Padding on the right only: two spaces between columns instead of three.
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, padding=(0, 1, 0, 0))
    for i, header in enumerate(headers):
        width = None if widths is None else widths[i]
        if header in _TEXT:
            # Words wrap and a long file name folds: a cell is never cut short.
            table.add_column(header, overflow="fold", width=width)
        else:
            table.add_column(header, justify="left" if header in _KEYS else "right", no_wrap=True, width=width)
    return table


def _needs(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    """The width each column needs: all of it for numbers, up to _TEXT_MIN for text."""
    from rich.cells import cell_len

    needs = []
    for i, header in enumerate(headers):
        natural = max([cell_len(line) for line in header.split("\n")] + [cell_len(row[i]) for row in rows])
        needs.append(min(natural, _TEXT_MIN) if header in _TEXT else natural)
    return needs


def column_groups(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int,
                  console: Console) -> list[list[int]]:
    """The columns to show as one table, or split in groups (each with the key columns
    first) so that every number fits whole in ``width``. Columns that read together
    (the counts, the drops, the latencies) move to the next group together, unless
    they do not fit in one group at all."""
    needs = _needs(headers, rows)
    keys = [i for i, header in enumerate(headers) if header in _KEYS]

    def fits(columns: list[int]) -> bool:
        skeleton = _table(None, [headers[i] for i in columns], [needs[i] for i in columns])
        return console.measure(skeleton, options=console.options.update_width(10_000)).maximum <= width

    blocks: list[list[int]] = []
    for i, header in enumerate(headers):
        if i in keys:
            continue
        if blocks and _block(headers[blocks[-1][-1]]) == _block(header):
            blocks[-1].append(i)
        else:
            blocks.append([i])
    groups: list[list[int]] = []
    current = list(keys)
    for block in blocks:
        if fits(current + block):
            current += block
            continue
        if len(current) > len(keys):
            groups.append(current)
            current = list(keys)
        for i in block:  # column by column: a block too wide for a group of its own
            if len(current) > len(keys) and not fits(current + [i]):
                groups.append(current)
                current = list(keys)
            current.append(i)
    groups.append(current)
    return groups


class FittedTables:
    """A table that keeps every number whole at the console's width: as one table when
    it fits, else as groups of columns one under the other, each group repeating the
    key columns (session, subscriber). Laid out when rendered, so a live view follows
    the terminal as it is resized."""

    def __init__(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]],
                 starts: Sequence[int] = ()) -> None:
        self.title, self.headers, self.rows, self.starts = title, list(headers), [list(r) for r in rows], starts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.text import Text

        groups = column_groups(self.headers, self.rows, options.max_width, console)
        for n, columns in enumerate(groups):
            table = _table(self.title if n == 0 else None, [self.headers[i] for i in columns])
            for i, row in enumerate(self.rows):
                # Text, not str: a file name like "cam[1].mp4" is not rich markup.
                table.add_row(*(Text(row[c]) for c in columns), end_section=(i + 1) in self.starts)
            yield table


def _rich_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]],
                starts: Sequence[int] = ()) -> FittedTables:
    return FittedTables(title, headers, rows, starts)


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:
        # Piped or captured output has no width to ask for; do not squeeze the tables.
        console = Console(stderr=stderr, width=160)
    return console


def print_summary(summary: JsonObject, *, title: str, use_rich: bool | None = None,
                  out: Callable[[str], None] = print) -> None:
    use_rich = available("rich") if use_rich is None else use_rich
    sessions = session_table(summary)
    subscribers = subscriber_table(summary)
    notes = footnotes(summary)
    if use_rich:
        console = _console()
        console.print(_rich_table(title, *sessions))
        console.print(_rich_table("Subscribers", *subscribers))
        for note in notes:
            style = "bold red" if note.startswith(("ACCOUNTING ERROR", "FAILED")) else "dim"
            console.print(note, style=style, markup=False, highlight=False, overflow="fold")
        return
    out(plain_table(title, *sessions))
    out("")
    out(plain_table("Subscribers", *subscribers))
    out("")
    for note in notes:
        out(note)


class _Display:
    """Shared: messages are printed once, one line each, on stderr."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        with self._lock:
            self.messages.append(text)
            self._emit(text)

    def _emit(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def start(self, run: Run) -> None:
        pass

    def update(self, run: Run) -> None:
        pass

    def stop(self, run: Run) -> None:
        pass


class NoDisplay(_Display):
    pass


class PlainDisplay(_Display):
    """A line per session about every second, on stderr (keeps stdout for the tables)."""

    def __init__(self, every: float = 1.0) -> None:
        super().__init__()
        self.every = every
        self._next = every

    def update(self, run: Run) -> None:
        elapsed = run.elapsed()
        if elapsed < self._next:
            return
        self._next = elapsed + self.every
        headers, rows = _live_rows(run)
        for s, row in zip(run.sessions, rows, strict=True):
            if s.producer.status != "running":  # failures were reported as they happened
                continue
            cells = dict(zip(headers, row, strict=True))
            drops = " ".join(f"{c.label} {cells[_dropped_header(c.label)]}" for c in s.consumers) or "-"
            print(f"[{elapsed:6.1f}s] {cells['session']}: {cells['fps']} fps, "
                  f"accepted {cells['accepted']}, rate-limited {cells['rate-limited']}, "
                  + (f"rejected {cells['rejected']}, " if "rejected" in cells else "")
                  + f"dropped {drops}, "
                  f"p50 {cells['p50 ms']} ms, p99 {cells['p99 ms']} ms", file=sys.stderr, flush=True)


class LiveDisplay(_Display):
    """A rich Live table; messages are held until it stops, so they do not tear it."""

    def __init__(self, title: str) -> None:
        super().__init__()
        self.title = title
        self._live: Live | None = None
        self._held: list[str] = []

    def _render(self, run: Run) -> FittedTables:
        headers, rows = _live_rows(run)
        where = f"sessions in {run.store}" if run.store else f"backend {run.backend}"
        return _rich_table(f"{self.title} - {where} - {run.elapsed():.1f} s", headers, rows)

    def _emit(self, text: str) -> None:
        if self._live is None:
            super()._emit(text)
        else:
            self._held.append(text)

    def start(self, run: Run) -> None:
        from rich.live import Live

        self._live = Live(self._render(run), console=_console(), refresh_per_second=4,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def update(self, run: Run) -> None:
        if self._live is not None:
            self._live.update(self._render(run))

    def stop(self, run: Run) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.update(self._render(run))
            live.stop()
        with self._lock:
            held, self._held = self._held, []
        for text in held:
            super()._emit(text)


def make_display(mode: str, title: str) -> _Display:
    """The display for ``--display MODE`` (MissingExtra when live is asked without rich)."""
    if mode == "none":
        return NoDisplay()
    if mode == "plain":
        return PlainDisplay()
    if mode == "live":
        require("rich", "--display live")
        return LiveDisplay(title)
    if available("rich") and sys.stdout.isatty():
        return LiveDisplay(title)
    return PlainDisplay()


# -- attach: this process reading another one's shared sessions ------------------------
def _attach_live_rows(attacher: Attacher) -> Rows:
    headers = ["session", "source", "status", "time s", "fps", "received", "dropped", "p50 ms", "p99 ms"]
    rows: list[list[str]] = []
    for r in attacher.readers:
        p50, p99 = r.latency.percentile(50), r.latency.percentile(99)
        status = r.status if not r.message else f"{r.status}: {r.message}"
        rows.append([r.id, r.source or "-", status, f"{r.active_seconds:.1f}", f"{r.recent_fps():.1f}",
                     _fmt_int(r.received), _fmt_int(r.subscription.dropped),
                     _fmt_ms(None if p50 is None else p50 * 1e3), _fmt_ms(None if p99 is None else p99 * 1e3)])
    return headers, rows


def attach_table(summary: JsonObject) -> Rows:
    headers = ["session", "source", "status", "queue", "accepted", "received", "delivered", "dropped", "fps",
               "MB/s", "p50 ms", "p99 ms", "max ms", "bad frames"]
    rows = []
    for s in summary["sessions"]:
        lat = s["latency_ms"]
        accepted = s["ring"].get("accepted")
        rows.append([s["id"], s["source"] or "-", s["status"], f"{s['policy']}/{s['buffer']}",
                     "-" if accepted is None else _fmt_int(accepted), _fmt_int(s["received"]),
                     _fmt_int(s["delivered"]), _fmt_int(s["dropped"]), f"{s['fps']:.1f}", f"{s['mb_per_s']:.1f}",
                     _fmt_ms(lat["p50"]), _fmt_ms(lat["p99"]), _fmt_ms(lat["max"]),
                     _fmt_int(s["integrity_errors"])])
    return headers, rows


def attach_footnotes(summary: JsonObject) -> list[str]:
    notes = []
    in_redis = summary.get("redis") is not None
    for s in summary["sessions"]:
        text = f"{s['id']}: in Redis" if in_redis else f"{s['id']}: owner pid {s['owner_pid']}"
        if s["source"]:
            text += f", {s['source']} ({s['width']}x{s['height']} {s['mime_type']})"
        if s["message"]:
            text += f" - {s['status']}: {s['message']}"
        notes.append(text)
    if summary["missed"]:
        notes.append(f"ended before this process could attach: {', '.join(summary['missed'])}")
    if summary["sessions"]:
        if in_redis:
            clock = ("the Redis server's clock in this process at receipt - the frame's received_at, the "
                     "producer's reading of the server's clock at its store (each process reads it through its "
                     "own offset to the server, measured when it connected")
        else:
            clock = ("time.monotonic in this process at receipt - the frame's received_at, the owner's "
                     "time.monotonic at its store (one clock for every process on Linux")
        notes.append(f"latency: {clock}; for a session on video time, ingest without --realtime, it is not a "
                     "latency)")
        notes.append("accepted: frames the session accepted in its whole life (its visual_stats()); this process "
                     "subscribed later, so delivered + dropped <= accepted")
        stamped = sum(s["stamped"] for s in summary["sessions"])
        notes.append(f"integrity: every frame's size checked, and the frame_seq stamp of {stamped:,} synthetic "
                     "frames; bad frames = frames whose bytes were wrong")
    notes += [f"FAILED {text}" for text in summary["failures"]]
    notes += [f"ACCOUNTING ERROR {text}" for text in summary["accounting_problems"]]
    if summary["sessions"] and not summary["accounting_problems"]:
        notes.append("accounting: received = delivered for every session, and no frame had wrong bytes")
    return notes


def print_attach_summary(summary: JsonObject, *, title: str, use_rich: bool | None = None,
                         out: Callable[[str], None] = print) -> None:
    use_rich = available("rich") if use_rich is None else use_rich
    table = attach_table(summary)
    notes = attach_footnotes(summary)
    if use_rich:
        console = _console()
        if summary["sessions"]:
            console.print(_rich_table(title, *table))
        else:
            console.print(title, markup=False, highlight=False)
        for note in notes:
            style = "bold red" if note.startswith(("ACCOUNTING ERROR", "FAILED")) else "dim"
            console.print(note, style=style, markup=False, highlight=False, overflow="fold")
        return
    out(plain_table(title, *table) if summary["sessions"] else title)
    out("")
    for note in notes:
        out(note)


class AttachView:
    """The live view of ``attach``: a rich table redrawn four times a second (live), a
    line per session about every second on stderr (plain), or nothing (none). Messages
    are one line each on stderr, held while a live table is up."""

    def __init__(self, mode: str, title: str, every: float = 1.0) -> None:
        if mode == "live":
            require("rich", "--display live")
        elif mode == "auto":
            mode = "live" if available("rich") and sys.stdout.isatty() else "plain"
        self.mode = mode
        self.title = title
        self.every = every
        self._next = every
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._held: list[str] = []

    def message(self, text: str) -> None:
        with self._lock:
            if self._live is not None:
                self._held.append(text)
                return
        print(text, file=sys.stderr, flush=True)

    def _render(self, attacher: Attacher) -> FittedTables:
        headers, rows = _attach_live_rows(attacher)
        return _rich_table(f"{self.title} - {attacher.where} - {attacher.elapsed():.1f} s", headers, rows)

    def start(self, attacher: Attacher) -> None:
        if self.mode != "live":
            return
        from rich.live import Live

        live = Live(self._render(attacher), console=_console(), refresh_per_second=4,
                    redirect_stdout=False, redirect_stderr=False)
        live.start()
        with self._lock:
            self._live = live

    def update(self, attacher: Attacher) -> None:
        if self._live is not None:
            self._live.update(self._render(attacher))
        elif self.mode == "plain":
            elapsed = attacher.elapsed()
            if elapsed < self._next:
                return
            self._next = elapsed + self.every
            headers, rows = _attach_live_rows(attacher)
            for r, row in zip(attacher.readers, rows, strict=True):
                if r.done:
                    continue
                cells = dict(zip(headers, row, strict=True))
                print(f"[{elapsed:6.1f}s] {cells['session']}: {cells['fps']} fps, received {cells['received']}, "
                      f"dropped {cells['dropped']}, p50 {cells['p50 ms']} ms, p99 {cells['p99 ms']} ms",
                      file=sys.stderr, flush=True)

    def stop(self, attacher: Attacher) -> None:
        with self._lock:
            live, self._live = self._live, None
            held, self._held = self._held, []
        if live is not None:
            live.update(self._render(attacher))
            live.stop()
        for text in held:
            print(text, file=sys.stderr, flush=True)


__all__ = ["MODES", "AttachView", "counted", "make_display", "print_attach_summary", "print_summary",
           "plain_table"]
