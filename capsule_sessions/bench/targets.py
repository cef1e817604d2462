"""The reference points and targets of docs/bench.md, and the verdict of a run against them.

The Go figures and the "reference machine" figures of the naive port and memcpy are
quoted from the project's first reference run (docs/bench.md, "Reference points"); they
are never measured here. The verdicts use only figures measured in the same run, except
the Go ones, which no run of this project can move. Some limits are still the project's
first ones, looser than the target table of docs/bench.md, whose "What capsule-sessions
bench checks today" lists them. Two targets need a tolerance the docs leave open; both
are stated in their check text:

- "cost per extra subscriber independent of frame size" (W2) and "independent of frame
  size" (W5): going from 4 KiB to 64 KiB frames may add less than a quarter of what one
  extra copy of the frame (per subscriber, per frame read) would add, measured by the
  memcpy target in the same run.
- W3/W4 "no page faults": under one minor page fault per store on average.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from .._json import JsonObject
from . import ipc, redis_ops
from .harness import paired_ratio

# The project's first reference run, ns per operation (docs/bench.md, "Reference points").
GO_NS = {"W1": 1_000, "W2": 71_000, "W3": 600_000, "W4": 2_500_000, "W5": 90_000, "W6": 65, "W7": 930}
REFERENCE_NAIVE_NS = {"W1": 890, "W2": 6_700, "W3": 278_000, "W4": 284_000, "W5": 1_450, "W6": 290, "W7": 850}
REFERENCE_MEMCPY_NS = {"W1": 415, "W2": 1_700, "W3": 156_000, "W4": 151_000, "W5": 11_900, "W7": 415}

NAIVE_LIMIT = {"W1": 0.5, "W6": 0.5, "W7": 0.5, "W2": 0.25, "W5": 0.5}
MEMCPY_LIMIT = {"W3": 1.10, "W4": 1.10}
GO_LIMIT: dict[str, float] = {}  # every workload: faster than the Go original (ratio < 1)
SIZE_GROWTH_LIMIT = 0.25
MINFLT_LIMIT = 1.0
# W8: the 2-thread/1-thread scaling at least this share of memcpy's own scaling.
W8_SCALING_LIMIT = 0.9
W9_TAIL_LIMIT = 10.0
# W13: a loan's commit (taking it, a view, the commit) against one memcpy of the frame.
W13_MEMCPY_LIMIT = 0.02


def short(workload_id: str) -> str:
    return workload_id.split("_", 1)[0]


def _entry(results: JsonObject, workload_id: str, target: str) -> JsonObject | None:
    entry: JsonObject | None = results.get("timed", {}).get(workload_id, {}).get("results", {}).get(target)
    return entry


def _ns(results: JsonObject, workload_id: str, target: str) -> float | None:
    entry = _entry(results, workload_id, target)
    if entry is None:
        return None
    ns: float = entry["ns_per_op"]
    return ns


def _paired(results: JsonObject, workload_id: str, target: str, reference: str) -> float | None:
    a, b = _entry(results, workload_id, target), _entry(results, workload_id, reference)
    return None if a is None or b is None else paired_ratio(a, b)


def _timed_id(results: JsonObject, prefix: str) -> str | None:
    wid: str
    for wid, entry in results.get("timed", {}).items():
        if short(wid) == prefix and not entry.get("aux"):
            return wid
    return None


def _check(backend: str, workload: str, text: str, figure: str, met: bool | None) -> JsonObject:
    return {"backend": backend, "workload": workload, "target": text, "figure": figure, "met": met}


def _ratio_check(backend: str, wid: str, ratio: float | None, limit: float,
                 text: str, ref_name: str, strict: bool = False) -> JsonObject | None:
    if ratio is None:
        return None
    met = ratio < limit if strict else ratio <= limit
    return _check(backend, wid, text, f"{format_ratio(ratio)}x {ref_name}", met)


def format_ratio(value: float) -> str:
    """Two decimals, or two significant digits below 0.1 (so 0.0011 does not print as 0.00)."""
    return f"{value:.2g}" if abs(value) < 0.1 else f"{value:.2f}"


def _rounds(results: JsonObject, pairs: dict[str, tuple[str, str]]) -> dict[str, list[float]] | None:
    """{name: per-round ns list} for {name: (workload_id, target)}, or None if one is missing."""
    out = {}
    for name, (wid, target) in pairs.items():
        entry = _entry(results, wid, target)
        if entry is None:
            return None
        out[name] = entry["repeats_ns"]
    return out


def _median_per_round(rounds: dict[str, list[float]], formula: Callable[[dict[str, float]], float]) -> float:
    """The median over rounds of ``formula`` applied to one round's figures: the figures
    of one round were timed together, so machine drift cancels within a round."""
    n = min(len(v) for v in rounds.values())
    return statistics.median(formula({k: v[i] for k, v in rounds.items()}) for i in range(n))


def _per_sub_growth(results: JsonObject, backend: str) -> tuple[float, float, float] | None:
    """(per-subscriber cost at 4 KiB, at 64 KiB, cost of copying the extra 60 KiB)."""
    rounds = _rounds(results, {
        "w2": ("W2_store_64k_4sub", backend), "w2_64k_0": ("W2_aux_store_64k_0sub", backend),
        "w2_4k_4": ("W2_aux_store_4k_4sub", backend), "w1": ("W1_store_4k_0sub", backend),
        "copy_64k": ("W2_store_64k_4sub", "memcpy"), "copy_4k": ("W1_store_4k_0sub", "memcpy"),
    })
    if rounds is None:
        return None
    return (_median_per_round(rounds, lambda r: (r["w2_4k_4"] - r["w1"]) / 4),
            _median_per_round(rounds, lambda r: (r["w2"] - r["w2_64k_0"]) / 4),
            _median_per_round(rounds, lambda r: r["copy_64k"] - r["copy_4k"]))


def _read_growth(results: JsonObject, backend: str) -> tuple[float, float, float] | None:
    """(8 reads of 4 KiB frames, of 64 KiB frames, cost of copying the extra 8x60 KiB)."""
    rounds = _rounds(results, {
        "big": ("W5_latest_8x64k", backend), "small": ("W5_aux_latest_8x4k", backend),
        "copy_big": ("W5_latest_8x64k", "memcpy"), "copy_small": ("W5_aux_latest_8x4k", "memcpy"),
    })
    if rounds is None:
        return None
    return (_median_per_round(rounds, lambda r: r["small"]),
            _median_per_round(rounds, lambda r: r["big"]),
            _median_per_round(rounds, lambda r: r["copy_big"] - r["copy_small"]))


def evaluate(results: JsonObject, backend: str) -> list[JsonObject]:
    """Every target that this run measured, judged for ``backend``."""
    checks: list[JsonObject] = []

    def add(check: JsonObject | None) -> None:
        if check is not None:
            checks.append(check)

    for prefix in ("W1", "W2", "W3", "W4", "W5", "W6", "W7"):
        wid = _timed_id(results, prefix)
        if wid is None:
            continue
        ns = _ns(results, wid, backend)
        if ns is None:
            continue
        go_limit = GO_LIMIT.get(prefix, 1.0)
        go_text = f"within {go_limit:g}x of the Go original" if go_limit != 1.0 else "faster than the Go original"
        add(_ratio_check(backend, wid, ns / GO_NS[prefix], go_limit,
                         f"{go_text} ({GO_NS[prefix]:,} ns, reference)", "Go", strict=go_limit == 1.0))
        if prefix in NAIVE_LIMIT:
            limit = NAIVE_LIMIT[prefix]
            add(_ratio_check(backend, wid, _paired(results, wid, backend, "naive"), limit,
                             f"at most {limit:g}x the naive port's time", "naive"))
        if prefix in MEMCPY_LIMIT:
            limit = MEMCPY_LIMIT[prefix]
            add(_ratio_check(backend, wid, _paired(results, wid, backend, "memcpy"), limit,
                             f"within {limit:g}x of the memcpy limit", "memcpy"))
            alloc = results.get("alloc", {}).get(wid, {}).get(backend)
            if alloc is not None:
                faults = alloc["minflt_per_store"]
                add(_check(backend, wid, f"no page faults (< {MINFLT_LIMIT:g} minor fault per store)",
                           f"{faults:.2f} faults/store", faults < MINFLT_LIMIT))

    wid = _timed_id(results, "W13")
    if wid is not None:
        add(_ratio_check(backend, wid, _paired(results, wid, backend, "memcpy"), W13_MEMCPY_LIMIT,
                         f"a commit costs at most {W13_MEMCPY_LIMIT:g}x one memcpy of the frame", "memcpy"))

    growth = _per_sub_growth(results, backend)
    if growth is not None:
        at_4k, at_64k, copy_cost = growth
        extra = at_64k - at_4k
        add(_check(backend, "W2_store_64k_4sub",
                   f"cost per extra subscriber independent of frame size (4 KiB -> 64 KiB adds < "
                   f"{SIZE_GROWTH_LIMIT:g} of one 60 KiB copy)",
                   f"{at_4k:,.0f} -> {at_64k:,.0f} ns/subscriber (one copy: {copy_cost:,.0f} ns)",
                   extra < SIZE_GROWTH_LIMIT * copy_cost))
    growth = _read_growth(results, backend)
    if growth is not None:
        small, big, copy_cost = growth
        extra = big - small
        add(_check(backend, "W5_latest_8x64k",
                   f"independent of frame size (8x4 KiB -> 8x64 KiB adds < {SIZE_GROWTH_LIMIT:g} of copying them)",
                   f"{small:,.0f} -> {big:,.0f} ns (copying: {copy_cost:,.0f} ns)",
                   extra < SIZE_GROWTH_LIMIT * copy_cost))

    threads = results.get("threads", {})
    scaling = threads.get(backend)
    if scaling is not None and scaling.get("ratio") is not None:
        figure = f"{scaling['ratio']:.2f}x"
        limits = [f"{label}: {threads[name]['ratio']:.2f}x"
                  for name, label in (("memcpy", "memcpy"), ("memcpy_2buf", "memcpy into 2 buffers in turn"))
                  if threads.get(name, {}).get("ratio") is not None]
        if limits:
            figure += f" ({'; '.join(limits)})"
        memcpy_ratio = threads.get("memcpy", {}).get("ratio")
        if memcpy_ratio:
            add(_check(backend, "W8_threads_6m",
                       f"2-thread/1-thread scaling at least {W8_SCALING_LIMIT:g}x memcpy's own (same run)",
                       figure, scaling["ratio"] >= W8_SCALING_LIMIT * memcpy_ratio))

    fanout = results.get("fanout", {}).get(backend)
    if fanout:
        ordered = sorted(fanout.items(), key=lambda kv: int(kv[0]))
        interval_ms = ordered[0][1]["paced"]["interval_s"] * 1e3
        for phase, label in (("paced", f"producer paced at one frame per {interval_ms:g} ms"),
                             ("free", "free-running producer")):
            tails = [(subs, r[phase]["p99_over_p50"]) for subs, r in ordered]
            finite = [tail for _, tail in tails if tail is not None and tail == tail]
            add(_check(backend, "W9_fanout_drain", f"store-to-receive p99 under {W9_TAIL_LIMIT:g}x the p50 ({label})",
                       ", ".join(f"{subs} sub: {tail:.1f}x" for subs, tail in tails if tail is not None),
                       max(finite) < W9_TAIL_LIMIT if finite else None))
        unaccounted = sum(r[phase][key] for r in fanout.values() for phase in ("free", "paced")
                          for key in ("lost", "corrupt", "counter_mismatch", "out_of_order", "hung_readers"))
        add(_check(backend, "W9_fanout_drain", "no lost frame that was not counted as dropped",
                   f"{unaccounted} unaccounted", unaccounted == 0))
    return checks


# -- across processes (W10-W12): the library's shared memory against the peers -------------

IPC_LIBRARY = ipc.LIBRARY
W10_ID, W11_ID, W12_ID = ipc.W10_ID, ipc.W11_ID, ipc.W12_ID
W10_ABOVE = ("iceoryx2", "frigate")  # per-reader frames/s strictly above both, same run
W10_SCALING_LIMIT = 0.95  # 4-reader rate over 1-reader rate
W10_MP_QUEUE_LIMIT = 15.0
W11_BELOW = "iceoryx2"  # p50 and p99 strictly below
W12_W5_LIMIT = 2.0  # cost per frame handed out, over the in-process W5's
W12_W5_SIZE = str(ipc.W12_W5_SIZE)
IPC_TEXT = {
    W10_ID: "per-reader frames/s above iceoryx2's and the Frigate pattern's (1 and 4 readers); 4 readers >= "
            f"{W10_SCALING_LIMIT:g}x 1 reader; >= {W10_MP_QUEUE_LIMIT:g}x multiprocessing.Queue; 0 torn frames",
    W11_ID: "p50 and p99 both below iceoryx2's (1 and 4 readers)",
    W12_ID: f"at most {W12_W5_LIMIT:g}x the in-process W5 cost per frame, at 4 KiB and at 6 MB",
}


def _paired_rounds(a: list[float | None], b: list[float | None]) -> float | None:
    """The median over rounds of a/b, both measured in the same round (W10 and W11 run
    every case once per round, in a shuffled order)."""
    ratios = [x / y for x, y in zip(a, b, strict=False) if x is not None and y is not None and y > 0]
    return statistics.median(ratios) if ratios else None


def _readers_label(n: str) -> str:
    return f"{n} reader{'s' if n != '1' else ''}"


def _ipc_peer(workload: JsonObject, name: str) -> JsonObject | None:
    entry: JsonObject | None = workload["results"].get(name)
    return None if entry is None or "unavailable" in entry else entry


def _w10_checks(w10: JsonObject, mine: JsonObject) -> list[JsonObject]:
    checks = []
    key = "repeats_fps_per_reader"
    for n in ("1", "4"):
        ratios = {}
        for peer in W10_ABOVE:
            other = _ipc_peer(w10, peer)
            if other is not None:
                ratios[peer] = _paired_rounds(mine[n][key], other[n][key])
        known = {peer: r for peer, r in ratios.items() if r is not None}
        checks.append(_check(IPC_LIBRARY, W10_ID, f"per-reader frames/s above {' and '.join(ratios or W10_ABOVE)}"
                             f" in the same run ({_readers_label(n)})",
                             "; ".join(f"{format_ratio(r)}x {peer}" for peer, r in known.items()) or "no peer ran",
                             all(r > 1 for r in known.values()) if known and len(known) == len(ratios) else None))
    scaling = _paired_rounds(mine["4"][key], mine["1"][key])
    if scaling is not None:
        checks.append(_check(IPC_LIBRARY, W10_ID, f"with 4 readers at least {W10_SCALING_LIMIT:g}x the 1-reader "
                             "rate per reader", f"{format_ratio(scaling)}x", scaling >= W10_SCALING_LIMIT))
    mp_queue = _ipc_peer(w10, "mp_queue")
    if mp_queue is not None:
        ratios = {n: _paired_rounds(mine[n][key], mp_queue[n][key]) for n in ("1", "4")}
        if None not in ratios.values():
            checks.append(_check(IPC_LIBRARY, W10_ID, f"at least {W10_MP_QUEUE_LIMIT:g}x multiprocessing.Queue's "
                                 "per-reader frames/s (1 and 4 readers)",
                                 ", ".join(f"{_readers_label(n)}: {format_ratio(r)}x" for n, r in ratios.items()
                                           if r is not None),
                                 min(r for r in ratios.values() if r is not None) >= W10_MP_QUEUE_LIMIT))
    torn = sum(mine[n]["torn"] for n in ("1", "4"))
    received = sum(mine[n]["received"] for n in ("1", "4"))
    checks.append(_check(IPC_LIBRARY, W10_ID, "0 torn frames", f"{torn} torn of {received:,} received",
                         torn == 0 if received else None))
    return checks


def _w11_checks(w11: JsonObject, mine: JsonObject) -> list[JsonObject]:
    other = _ipc_peer(w11, W11_BELOW)
    if other is None:
        return []
    checks = []
    for n in ("1", "4"):
        p50 = _paired_rounds(mine[n]["repeats_p50_us"], other[n]["repeats_p50_us"])
        p99 = _paired_rounds(mine[n]["repeats_p99_us"], other[n]["repeats_p99_us"])
        if p50 is None or p99 is None:
            continue
        checks.append(_check(IPC_LIBRARY, W11_ID, f"p50 and p99 both below {W11_BELOW}'s ({_readers_label(n)})",
                             f"p50 {format_ratio(p50)}x, p99 {format_ratio(p99)}x {W11_BELOW}", p50 < 1 and p99 < 1))
    return checks


def _w12_checks(w12: JsonObject, mine: JsonObject) -> list[JsonObject]:
    w5 = w12["in_process"]["results"].get(W12_W5_SIZE)
    if w5 is None or "results" not in mine:
        return []
    checks = []
    for size, figures in mine["results"].items():
        ratio = figures["ns_per_frame"] / w5["ns_per_frame"]
        checks.append(_check(IPC_LIBRARY, W12_ID, f"at most {W12_W5_LIMIT:g}x the in-process W5 cost per frame "
                             f"({int(size):,}-byte frames)",
                             f"{figures['ns_per_frame']:,.0f} ns/frame: {format_ratio(ratio)}x W5's "
                             f"{w5['ns_per_frame']:,.0f}", ratio <= W12_W5_LIMIT))
    return checks


def evaluate_ipc(results: JsonObject) -> list[JsonObject]:
    """The W10-W12 targets, judged for the library's shared memory (``shm``) against the
    peers of the same run; where ``shm`` could not run, one unjudged row per workload
    says why."""
    ipc = results.get("ipc")
    if not ipc:
        return []
    checks: list[JsonObject] = []
    judges = {W10_ID: _w10_checks, W11_ID: _w11_checks, W12_ID: _w12_checks}
    for wid, judge in judges.items():
        workload = ipc.get(wid)
        if workload is None or IPC_LIBRARY not in workload["results"]:
            continue
        mine = workload["results"][IPC_LIBRARY]
        if "unavailable" in mine:
            checks.append(_check(IPC_LIBRARY, wid, IPC_TEXT[wid], mine["unavailable"], None))
            continue
        errors = mine.get("errors", []) + [e for n in ("1", "4") for e in mine.get(n, {}).get("errors", [])]
        if errors:
            checks.append(_check(IPC_LIBRARY, wid, "every run completes without an error",
                                 errors[0].strip().splitlines()[-1], False))
        checks += judge(workload, mine)
    return checks


# -- across machines (W17): the Redis-backed manager against bare redis-py ------------------

W17_LIMIT = 1.5


def evaluate_redis(results: JsonObject) -> list[JsonObject]:
    """W17: create, get and touch each at most W17_LIMIT x the bare round trip (the median
    of the per-round ratios); one unjudged row when no redis-server could run."""
    w17 = results.get("redis", {}).get(redis_ops.W17_ID)
    if w17 is None:
        return []
    text = f"at most {W17_LIMIT:g}x the bare round trips"
    if "unavailable" in w17:
        return [_check(redis_ops.LIBRARY, redis_ops.W17_ID, text, w17["unavailable"], None)]
    checks = []
    for op in redis_ops.OPS:
        ratio = w17["ratios"].get(op)
        add = _ratio_check(redis_ops.LIBRARY, redis_ops.W17_ID, ratio, W17_LIMIT,
                           f"{op}: {text} ({w17['bare'][op]})", "bare")
        if add is not None:
            checks.append(add)
    return checks
