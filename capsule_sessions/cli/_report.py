"""``--report PATH.png`` (matplotlib, extra ``plot``): what the run did, in four panels.

- latency from store to receive, a histogram per subscriber (all sessions);
- frames accepted per second over the run, one line per session; a failed session is
  drawn too, in red and marked FAILED with its reason;
- frames per subscriber of each session: delivered, dropped, still queued;
- the vision sampler's calls to ``latest_visual_frames`` per session, and how many
  came back empty.

``report_data`` gathers everything plotted as plain data and ``figure`` draws only
that, so what the picture shows can be checked without looking at pixels.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._json import JsonObject
from ._display import counted
from ._extras import require
from ._latency import LOW, LatencyHistogram
from ._runner import RunResult, SessionRun

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

FAILED_COLOR = "tab:red"
AXES = {
    "latency": ("latency from store to receive (milliseconds, log scale)", "frames received"),
    "fps": ("time since the run started (seconds)", "frames accepted per second (wall clock, 1 s window)"),
    "subscribers": ("frames", "session and subscriber"),
    "samplers": ("calls to latest_visual_frames", "session and sampler"),
}


def check_available() -> None:
    """Raise MissingExtra before the run, not after it, when matplotlib is missing."""
    require("matplotlib", "--report")


def fps_series(timeline: Sequence[tuple[float, int]], window: float = 1.0) -> tuple[list[float], list[float]]:
    """Frames per second at the points of ``timeline`` that have a full ``window`` behind them.

    Each value counts the frames between a point and the latest earlier point at least
    ``window`` before it. The runner makes the first point the first accepted frame (1
    frame then), so the first value counts the frames after it over at least a window:
    a first frame that came late and the catch-up behind it are averaged out over that
    window rather than shown as a spike over a few milliseconds. A run shorter than the
    window gets one value, over all of it.
    """
    times: list[float] = []
    fps: list[float] = []
    base = 0  # the latest point at least a window before the current one
    for i in range(1, len(timeline)):
        t, n = timeline[i]
        if t - timeline[0][0] < window:
            continue
        while base + 1 < i and t - timeline[base + 1][0] >= window:
            base += 1
        t0, n0 = timeline[base]
        times.append(t)
        fps.append((n - n0) / (t - t0))
    if not times and len(timeline) > 1 and timeline[-1][0] > timeline[0][0]:
        (t0, n0), (t, n) = timeline[0], timeline[-1]
        times, fps = [t], [(n - n0) / (t - t0)]
    return times, fps


def _session_label(run: SessionRun) -> str:
    producer = run.producer
    label = f"{run.id} {run.source.label}"
    if producer.failed:
        return f"{label} - FAILED: {producer.message}"
    return f"{label} ({producer.status})"


def report_data(result: RunResult, *, title: str = "capsule-sessions") -> JsonObject:
    """Everything the report draws, as plain data."""
    sessions = []
    for run in result.sessions:
        times, fps = fps_series(run.timeline)
        producer = run.producer
        sessions.append({
            "id": run.id, "source": run.source.label, "status": producer.status, "failed": producer.failed,
            "message": producer.message, "label": _session_label(run), "accepted": producer.accepted,
            "times_s": times, "fps": fps,
            "elapsed_s": run.timeline[-1][0] if run.timeline else 0.0,
        })
    latency = []
    by_label: dict[str, list[LatencyHistogram]] = {}
    for run in result.sessions:
        for consumer in run.consumers:
            by_label.setdefault(consumer.label, []).append(consumer.latency)
    for label, parts in by_label.items():
        hist = LatencyHistogram.merged(parts)
        lows, highs, counts = hist.nonzero_bins()
        if not counts:
            continue
        # The bin below LOW starts at 0, which a log axis cannot show: draw it from LOW/2.
        lows = [max(low, LOW / 2) for low in lows]
        p50, p99 = hist.percentile(50), hist.percentile(99)
        latency.append({
            "subscriber": label, "lows_ms": [low * 1e3 for low in lows],
            "widths_ms": [(high - low) * 1e3 for low, high in zip(lows, highs, strict=True)], "counts": counts,
            "p50_ms": p50 * 1e3 if p50 is not None else None, "p99_ms": p99 * 1e3 if p99 is not None else None,
        })
    subscribers = [{"session": run.id, "subscriber": c.label, "delivered": c.subscription.delivered,
                    "dropped": c.subscription.dropped, "queued": c.subscription.qsize()}
                   for run in result.sessions for c in run.consumers]
    samplers = [{"session": run.id, "sampler": sampler.label, "calls": sampler.calls,
                 "empty_calls": sampler.empty_calls, "frames": sampler.frames, "interval_s": sampler.interval}
                for run in result.sessions for sampler in run.samplers]
    return {
        "title": f"{title} - backend {result.backend}, {counted(len(result.sessions), 'session')}, "
                 f"{result.seconds:.1f} s",
        "sessions": sessions, "latency": latency, "subscribers": subscribers, "samplers": samplers,
        "axes": AXES,
    }


def _plain(value: float, _position: object = None) -> str:
    """A tick as a plain number: 0.01, 2, 500, 10,000; never 10^-2 or 1e4."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _plain_axis(axis: Axis, log: bool = False, counts: bool = False) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if log:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(NullFormatter())
    elif counts:
        axis.set_major_locator(MaxNLocator(integer=True))
    axis.set_major_formatter(FuncFormatter(_plain))


def _bar_room(ax: Axes, totals: Sequence[int], share: float) -> None:
    """x from 0 to past the longest bar, leaving ``share`` of the width for its note."""
    ax.set_xlim(0, max(max(totals, default=0), 1) / (1 - share))


def _mark_failed(ax: Axes, data: JsonObject) -> None:
    failed = {s["id"] for s in data["sessions"] if s["failed"]}
    for label in ax.get_yticklabels():
        if label.get_text().split(" ")[0] in failed:
            label.set_color(FAILED_COLOR)


def figure(data: JsonObject) -> Figure:
    """The report's matplotlib Figure, drawn from ``report_data`` alone."""
    matplotlib = require("matplotlib", "--report")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = max(3, len(data["subscribers"]), len(data["samplers"]))
    fig, grid = plt.subplots(2, 2, figsize=(15, 8 + 0.18 * rows), constrained_layout=True,
                             gridspec_kw={"height_ratios": [3, 1 + 0.12 * rows]})
    ax_lat, ax_fps, ax_sub, ax_smp = grid[0][0], grid[0][1], grid[1][0], grid[1][1]
    for ax, name in ((ax_lat, "latency"), (ax_fps, "fps"), (ax_sub, "subscribers"), (ax_smp, "samplers")):
        ax.set_label(name)
        xlabel, ylabel = data["axes"][name]
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)

    for entry in data["latency"]:
        ax_lat.bar(entry["lows_ms"], entry["counts"], width=entry["widths_ms"], align="edge", alpha=0.55,
                   label=f"{entry['subscriber']}: p50 {entry['p50_ms']:.2f} ms, p99 {entry['p99_ms']:.2f} ms")
    ax_lat.set_xscale("log")
    _plain_axis(ax_lat.xaxis, log=True)
    _plain_axis(ax_lat.yaxis, counts=True)
    ax_lat.set_title("Latency per subscriber (all sessions)")
    if data["latency"]:
        ax_lat.legend(loc="upper right", fontsize="small")
    else:
        ax_lat.text(0.5, 0.5, "no frame was received", transform=ax_lat.transAxes, ha="center")

    top = 1.0
    for s in data["sessions"]:
        # Wrapped: a long reason would widen the legend past its panel.
        label = textwrap.fill(s["label"], 70, subsequent_indent="    ")
        if s["failed"]:
            # Drawn even with no point to draw: a failed source must not vanish.
            times, fps = (s["times_s"], s["fps"]) if s["times_s"] else ([s["elapsed_s"]], [0.0])
            ax_fps.plot(times, fps, color=FAILED_COLOR, linestyle="--", marker="x", label=label)
        else:
            few = len(s["times_s"]) < 3  # a short run: dots, or a line of one point is invisible
            ax_fps.plot(s["times_s"], s["fps"], label=label, marker="o" if few else None)
        top = max([top] + s["fps"])
    ax_fps.set_title("Frames accepted per second")
    ax_fps.set_xlim(0, max([1.0] + [s["elapsed_s"] for s in data["sessions"]]) * 1.03)
    ax_fps.set_ylim(0, top * 1.15)
    _plain_axis(ax_fps.xaxis)
    _plain_axis(ax_fps.yaxis)
    if data["sessions"]:
        legend = ax_fps.legend(loc="best", fontsize="small")
        for text, s in zip(legend.get_texts(), data["sessions"], strict=False):
            if s["failed"]:
                text.set_color(FAILED_COLOR)

    subs = data["subscribers"]
    names = [f"{r['session']} {r['subscriber']}" for r in subs]
    delivered = [r["delivered"] for r in subs]
    dropped = [r["dropped"] for r in subs]
    queued = [r["queued"] for r in subs]
    ax_sub.barh(names, delivered, color="tab:green", label="delivered")
    ax_sub.barh(names, dropped, left=delivered, color="tab:red", label="dropped")
    ax_sub.barh(names, queued, left=[d + x for d, x in zip(delivered, dropped, strict=True)], color="tab:gray",
                label="queued")
    for y, r in enumerate(subs):
        ax_sub.annotate(f" {r['dropped']:,} dropped", (r["delivered"] + r["dropped"] + r["queued"], y),
                        va="center", fontsize="small")
    ax_sub.invert_yaxis()
    ax_sub.set_title("Frames per subscriber: delivered, dropped, queued")
    _plain_axis(ax_sub.xaxis, counts=True)
    _bar_room(ax_sub, [d + x + q for d, x, q in zip(delivered, dropped, queued, strict=True)], 0.2)
    _mark_failed(ax_sub, data)
    if subs:
        ax_sub.legend(loc="lower right", fontsize="small")

    smp = data["samplers"]
    names = [f"{r['session']} {r['sampler']}" for r in smp]
    with_frames = [r["calls"] - r["empty_calls"] for r in smp]
    empty = [r["empty_calls"] for r in smp]
    ax_smp.barh(names, with_frames, color="tab:blue", label="calls with frames")
    ax_smp.barh(names, empty, left=with_frames, color="tab:orange", label="empty calls")
    for y, r in enumerate(smp):
        ax_smp.annotate(f" {r['calls']:,} calls, {r['frames']:,} frames", (r["calls"], y), va="center",
                        fontsize="small")
    ax_smp.invert_yaxis()
    ax_smp.set_title("Vision sampler: latest_visual_frames calls")
    _plain_axis(ax_smp.xaxis, counts=True)
    _bar_room(ax_smp, [r["calls"] for r in smp], 0.3)
    _mark_failed(ax_smp, data)
    if smp:
        ax_smp.legend(loc="lower right", fontsize="small")
    else:
        ax_smp.text(0.5, 0.5, "no vision sampler in this run", transform=ax_smp.transAxes, ha="center")
    fig.suptitle(data["title"])
    return fig


def write_report(result: RunResult, path: str, *, title: str = "capsule-sessions") -> str:
    fig = figure(report_data(result, title=title))
    import matplotlib.pyplot as plt

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["check_available", "figure", "fps_series", "report_data", "write_report"]
