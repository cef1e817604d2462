"""A one-glance PNG of a run: where each target stands against the naive port and the goals.

Left: W1..W7, every target's time as a multiple of the naive port's (log axis, lower is
better), with each workload's goal for the Cython backend (docs/bench.md) as a red tick
and the Go original as a black diamond. Middle: W8's 2-thread/1-thread scaling against
the 1.6x target. Right: W9's paced store-to-receive latency, p50 bars with p99 whiskers.
matplotlib is the optional ``plot`` extra; the caller checks it is installed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .._json import JsonObject
from . import targets as T
from .harness import paired_ratio

if TYPE_CHECKING:
    from matplotlib.axes import Axes

COLORS = {"python": "#4C72B0", "cython": "#DD8452", "naive": "#8C8C8C", "memcpy": "#55A868", "memcpy_2buf": "#A6D8B4"}


def _color(target: str) -> str:
    return COLORS.get(target, "#937860")


def _target_ratio_to_naive(results: JsonObject, wid: str) -> float | None:
    """The limit for the Cython backend on ``wid``, in units of the naive port's time."""
    prefix = T.short(wid)
    r = results["timed"][wid]["results"]
    naive = r.get("naive", {}).get("ns_per_op")
    if not naive:
        return None
    if prefix in T.NAIVE_LIMIT:
        return T.NAIVE_LIMIT[prefix]
    if prefix in T.MEMCPY_LIMIT and "memcpy" in r:
        ratio = paired_ratio(r["memcpy"], r["naive"])  # None: no round timed the naive port above 0 ns
        return None if ratio is None else T.MEMCPY_LIMIT[prefix] * ratio
    return None


def _plain_log_axis(ax: Axes) -> None:
    """A log y axis labelled 0.1, 1, 10 (and 2, 5, 20, 50 between) rather than 10^-1."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))


def _timed_panel(ax: Axes, results: JsonObject) -> None:
    wids = [wid for wid, e in results.get("timed", {}).items() if not e["aux"] and "naive" in e["results"]]
    names = [t for t in results["targets"] if t != "naive"]
    if not wids or not names:
        ax.set_axis_off()
        ax.set_title("W1-W7: no naive figures to compare against")
        return
    width = 0.8 / len(names)
    for i, target in enumerate(names):
        xs: list[float] = []
        ys: list[float] = []
        for j, wid in enumerate(wids):
            r = results["timed"][wid]["results"]
            if target in r:
                xs.append(j - 0.4 + width * (i + 0.5))
                ratio = paired_ratio(r[target], r["naive"])
                ys.append(math.nan if ratio is None else ratio)  # no bar (None would stop the chart)
        ax.bar(xs, ys, width, label=target, color=_color(target))
    for j, wid in enumerate(wids):
        limit = _target_ratio_to_naive(results, wid)
        if limit:
            ax.hlines(limit, j - 0.45, j + 0.45, colors="red", linewidth=2,
                      label="target (cython)" if j == 0 else "_nolegend_")
        go = T.GO_NS.get(T.short(wid))
        naive = results["timed"][wid]["results"]["naive"]["ns_per_op"]
        if go:
            ax.plot([j], [go / naive], marker="D", color="black", linestyle="none",
                    label="Go original (reference)" if j == 0 else None)
    ax.axhline(1.0, color="#8C8C8C", linewidth=1, linestyle="--", label="naive port = 1")
    _plain_log_axis(ax)
    ax.set_xticks(range(len(wids)))
    ax.set_xticklabels([wid.replace("_", "\n", 1) for wid in wids], fontsize=8)
    ax.set_ylabel("time / naive port's time (log, lower is better)")
    ax.set_title("W1-W7: cost relative to the naive port")
    ax.set_ylim(top=ax.get_ylim()[1] * 4)  # headroom for the legend above the bars
    ax.legend(fontsize=7, loc="upper center", ncol=3)


def _threads_panel(ax: Axes, results: JsonObject) -> None:
    scaling = results.get("threads", {})
    if not scaling:
        ax.set_axis_off()
        ax.set_title("W8 not run")
        return
    names = list(scaling)
    ratios = [scaling[t]["ratio"] or 0.0 for t in names]
    ax.bar(range(len(names)), ratios, color=[_color(t) for t in names])
    ax.axhline(T.W8_SCALING_LIMIT, color="red", linewidth=2, label=f"target {T.W8_SCALING_LIMIT:g}x")
    ax.axhline(1.0, color="#8C8C8C", linewidth=1, linestyle="--", label="no scaling")
    for i, t in enumerate(names):
        ax.text(i, ratios[i], f"{ratios[i]:.2f}x\n{scaling[t]['fps_1']:,.0f} fps",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([name.replace("_", "\n") for name in names], fontsize=8)
    ax.set_ylim(0, max(ratios + [T.W8_SCALING_LIMIT]) * 1.3)
    ax.set_ylabel("frames/s with 2 threads / with 1")
    ax.set_title("W8: 1080p producer scaling")
    ax.legend(fontsize=7, loc="upper right")


def _fanout_panel(ax: Axes, results: JsonObject) -> None:
    fanout = results.get("fanout", {})
    if not fanout:
        ax.set_axis_off()
        ax.set_title("W9 not run")
        return
    names = list(fanout)
    subs = sorted({int(s) for by in fanout.values() for s in by}, key=int)
    width = 0.8 / len(names)
    for i, target in enumerate(names):
        xs, p50, err = [], [], []
        for j, n in enumerate(subs):
            paced = fanout[target].get(str(n), {}).get("paced")
            if paced:
                xs.append(j - 0.4 + width * (i + 0.5))
                p50.append(paced["p50_us"])
                err.append(max(0.0, paced["p99_us"] - paced["p50_us"]))
        ax.bar(xs, p50, width, yerr=[[0] * len(err), err], capsize=3, label=target, color=_color(target))
    _plain_log_axis(ax)
    ax.set_xticks(range(len(subs)))
    ax.set_xticklabels([f"{n} sub" for n in subs])
    ax.set_ylabel("store-to-receive latency, us (bar p50, whisker p99)")
    ax.set_title("W9: paced fan-out latency (64 KiB)")
    ax.legend(fontsize=7, loc="upper left")


def write(results: JsonObject, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [2.4, 1, 1.2]})
    _timed_panel(axes[0], results)
    _threads_panel(axes[1], results)
    _fanout_panel(axes[2], results)
    m = results["machine"]
    fig.suptitle(f"capsule_sessions bench ({results['settings']['mode']}): {m['cpu']}, {m['cpus']} CPUs, "
                 f"Python {m['python']}, {m['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
