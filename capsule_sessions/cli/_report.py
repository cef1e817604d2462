"""``--report PATH.png``: a latency histogram and fps over time (matplotlib, extra ``plot``)."""

from __future__ import annotations

import os
from ._display import counted
from ._extras import require
from ._latency import LatencyHistogram
from ._runner import RunResult


def check_available() -> None:
    """Raise MissingExtra before the run, not after it, when matplotlib is missing."""
    require("matplotlib", "--report")


def _fps_series(timeline: list, window: float = 1.0) -> tuple:
    """fps over a sliding ``window`` at each tick of the timeline."""
    times, fps = [], []
    start = 0
    for i, (t, n) in enumerate(timeline):
        while start < i and t - timeline[start][0] > window:
            start += 1
        t0, n0 = timeline[start]
        if t > t0:
            times.append(t)
            fps.append((n - n0) / (t - t0))
    return times, fps


def write_report(result: RunResult, path: str, *, title: str = "capsule-sessions") -> str:
    matplotlib = require("matplotlib", "--report")
    matplotlib.use("Agg")  # files only: no display needed, and thread-safe enough here
    import matplotlib.pyplot as plt

    by_label: dict = {}
    for run in result.sessions:
        for consumer in run.consumers:
            by_label.setdefault(consumer.label, []).append(consumer.latency)
    fig, (ax_lat, ax_fps) = plt.subplots(2, 1, figsize=(10, 8), constrained_layout=True)
    for label, parts in by_label.items():
        hist = LatencyHistogram.merged(parts)
        lows, highs, counts = hist.nonzero_bins()
        if not counts:
            continue
        edges = [low * 1e3 for low in lows]
        widths = [(high - low) * 1e3 for low, high in zip(lows, highs)]
        p50, p99 = hist.percentile(50), hist.percentile(99)
        ax_lat.bar(edges, counts, width=widths, align="edge", alpha=0.55,
                   label=f"{label}: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel("store-to-receive latency (ms, log scale)")
    ax_lat.set_ylabel("frames")
    ax_lat.set_title("Latency per subscriber (all sessions)")
    if by_label:
        ax_lat.legend(loc="upper right", fontsize="small")

    for run in result.sessions:
        if not run.producer.accepted:  # a failed source has no line worth drawing
            continue
        times, fps = _fps_series(run.timeline)
        ax_fps.plot(times, fps, label=f"{run.id} {run.source.label}")
    ax_fps.set_xlabel("time since start (s)")
    ax_fps.set_ylabel("accepted frames per second (1 s window)")
    ax_fps.set_title("Accepted fps over time")
    ax_fps.set_ylim(bottom=0)
    if result.sessions:
        ax_fps.legend(loc="lower right", fontsize="small")
    fig.suptitle(f"{title} - backend {result.backend}, {counted(len(result.sessions), 'session')}, {result.seconds:.1f} s")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["check_available", "write_report"]
