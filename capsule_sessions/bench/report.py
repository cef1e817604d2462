"""The markdown report of a run (what ``capsule-sessions bench`` prints)."""

from __future__ import annotations

import math
from collections.abc import Callable

from .._json import JsonObject
from . import ipc, redis_frames, redis_ops
from .targets import format_ratio

RATIOS = ("cython/python", "cython/naive", "cython/memcpy")


def _ns(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else format_ratio(value)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _heading(results: JsonObject) -> list[str]:
    m, s = results["machine"], results["settings"]
    load = m.get("load_average_at_start")
    return [
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}; Python {m['python']}, numpy {m['numpy']}, "
        f"capsule_sessions {m['capsule_sessions']} (backends: {', '.join(m['backends'])}); {m['date']}"
        + (f"; load average at start {load[0]}" if load else "") + ".",
        f"Mode {s['mode']}: medians of {s['repeats']} interleaved repeats, each a calibrated batch of "
        f">= {s['min_batch_s'] * 1e3:g} ms; ratios are medians of the per-repeat ratios; fake clock +1 ms "
        "per store; random payloads passed as numpy arrays.",
    ]


def _timed_table(results: JsonObject, aux: bool) -> list[str]:
    names = results["targets"]
    rows = []
    for wid, entry in results.get("timed", {}).items():
        if entry["aux"] != aux:
            continue
        r = entry["results"]
        row = [wid] + [_ns(r[t]["ns_per_op"]) if t in r else "" for t in names]
        if not aux:
            row.append(_ns(entry["reference_ns"]["go"]))
        row += [_ratio(entry["ratios"].get(name)) for name in RATIOS]
        rows.append(row)
    if not rows:
        return []
    header = ["workload"] + [f"{t} ns/op" for t in names] + ([] if aux else ["Go ns/op (reference)"]) + list(RATIOS)
    return _table(header, rows)


def _alloc_table(results: JsonObject) -> list[str]:
    rows = []
    for wid, by_target in results.get("alloc", {}).items():
        for target, a in by_target.items():
            rows.append([wid, target, _num(a["peak_alloc_bytes_per_store"]), _num(a["minflt_per_store"], 2)])
    if not rows:
        return []
    return _table(["workload", "target", "bytes allocated per store (tracemalloc peak)",
                   "minor page faults per store"], rows)


def _threads_table(results: JsonObject) -> list[str]:
    rows = [[t, _num(r["fps_1"]), _num(r["fps_2"]), _ratio(r["ratio"]), _ratio(r.get("ratio_of_memcpy_ratio")),
             _num(r.get("cores_used_2"), 2), _num(r.get("other_cores_busy"), 2)]
            for t, r in results.get("threads", {}).items()]
    if not rows:
        return []
    return _table(["target", "1 thread frames/s", "2 threads frames/s", "2/1 ratio", "2/1 ratio / memcpy's",
                   "CPU cores busy (2 threads)", "other processes (cores)"], rows)


def _fanout_table(results: JsonObject) -> list[str]:
    rows = []
    for target, by_subs in results.get("fanout", {}).items():
        for subs, phases in sorted(by_subs.items(), key=lambda kv: int(kv[0])):
            free, paced = phases["free"], phases["paced"]
            offered = free["frames"] * int(subs) * free.get("runs", 1)
            lost = sum(p[k] for p in (free, paced)
                       for k in ("lost", "corrupt", "counter_mismatch", "out_of_order", "hung_readers"))
            rows.append([
                target, subs, _num(free["stored_fps"]), _num(free["delivered_fps_per_subscriber"]),
                f"{100 * free['dropped'] / offered:.0f}%" if offered else "",
                _num(free["p50_us"]), _num(free["p99_us"]),
                _num(paced["p50_us"]), _num(paced["p99_us"]), _num(paced["p99_over_p50"], 1), str(lost),
            ])
    if not rows:
        return []
    return _table(["target", "subscribers", "stored frames/s", "delivered frames/s per subscriber", "dropped",
                   "p50 us", "p99 us", "paced p50 us", "paced p99 us", "paced p99/p50", "lost uncounted"], rows)


def _ipc_note(entry: JsonObject) -> str:
    notes = []
    if entry.get("failed"):
        notes.append(f"{entry['failed']} of {entry['runs']} runs failed: {entry['errors'][0].strip().splitlines()[-1]}")
    if entry.get("forced_exits"):
        notes.append(f"{entry['forced_exits']} child(ren) had to be killed")
    if entry.get("shm_left"):
        notes.append("left in /dev/shm: " + ", ".join(entry["shm_left"]))
    return "; ".join(notes)


def _ipc_stream_rows(results: JsonObject, wid: str,
                     cells: Callable[[JsonObject], list[str]], width: int) -> list[list[str]]:
    rows = []
    for target, by_readers in results.get("ipc", {}).get(wid, {}).get("results", {}).items():
        if "unavailable" in by_readers:
            rows.append([target, ""] + [""] * width + [by_readers["unavailable"]])
            continue
        for readers, entry in sorted(by_readers.items(), key=lambda kv: int(kv[0])):
            rows.append([target, readers] + cells(entry) + [_ipc_note(entry)])
    return rows


def _uncounted(entry: JsonObject) -> str:
    return "n/a" if entry.get("unaccounted") is None else str(entry["unaccounted"])


def _w10_table(results: JsonObject) -> list[str]:
    def cells(e: JsonObject) -> list[str]:
        offered = e["dropped"] + e["received"]
        return [_num(e["producer_fps"]), _num(e["fps_per_reader"]), _num(e["fps_slowest_reader"]),
                f"{100 * e['dropped'] / offered:.0f}%" if offered else "",
                str(e["torn"]), _uncounted(e), _num(e["p50_us"]), _num(e["p99_us"]),
                _num(e.get("producer_cpu_us")), _num(e.get("reader_cpu_us"))]

    rows = _ipc_stream_rows(results, ipc.W10_ID, cells, 10)
    if not rows:
        return []
    return _table(["target", "readers", "producer frames/s", "frames/s per reader", "slowest reader", "dropped",
                   "torn", "lost uncounted", "p50 us", "p99 us", "producer CPU us/frame", "reader CPU us/frame",
                   "note"], rows)


def _w11_table(results: JsonObject) -> list[str]:
    def cells(e: JsonObject) -> list[str]:
        tail = e["p99_us"] / e["p50_us"] if e["p50_us"] and e["p99_us"] is not None else None
        return [_num(e["p50_us"]), _num(e["p99_us"]), _num(tail, 1),
                f"{e['dropped']:,} of {e['dropped'] + e['received']:,}", str(e["torn"]), _uncounted(e)]

    rows = _ipc_stream_rows(results, ipc.W11_ID, cells, 6)
    if not rows:
        return []
    return _table(["target", "readers", "p50 us", "p99 us", "p99/p50", "dropped", "torn", "lost uncounted", "note"],
                  rows)


def _w12_table(results: JsonObject) -> list[str]:
    w12 = results.get("ipc", {}).get(ipc.W12_ID)
    if not w12:
        return []
    reference = w12["in_process"]
    w5 = reference["results"].get(str(ipc.W12_W5_SIZE), {}).get("ns_per_frame")
    rows = []

    def row(target: str, size: str, r: JsonObject, note: str = "") -> list[str]:
        return [target, f"{int(size):,}", _ns(r["ns_per_op"]), _ns(r["ns_per_frame"]),
                _ratio(r["ns_per_frame"] / w5) if w5 else "", str(r.get("torn", "")), note]

    for size, r in reference["results"].items():
        rows.append(row(f"in-process ({reference['backend']})", size, r,
                        "W5 itself" if size == str(ipc.W12_W5_SIZE) else ""))
    for target, entry in w12["results"].items():
        if "unavailable" in entry:
            rows.append([target, "", "", "", "", "", entry["unavailable"]])
            continue
        if "results" not in entry:
            rows.append([target, "", "", "", "", "", "failed: " + "; ".join(e.strip().splitlines()[-1]
                                                                           for e in entry["errors"][:1])])
            continue
        for size, r in entry["results"].items():
            rows.append(row(target, size, r, f"{r['frames']} frames read"))
    return _table(["target", "frame bytes", "ns per call (8 frames)", "ns per frame", "x in-process W5 per frame",
                   "torn", "note"], rows)


def _ipc_peers_note(results: JsonObject) -> str:
    ipc_results = results.get("ipc")
    if not ipc_results:
        return ""
    lines = [f"{name}: {text}." for name, text in ipc_results["descriptions"].items()]
    shm = ipc_results["dev_shm"]
    if shm["unchanged"]:
        lines.append(f"/dev/shm: unchanged by the run ({len(shm['before'])} entries before and after).")
    elif shm["left_by_this_run"]:
        lines.append("/dev/shm: **left behind by the run**: " + ", ".join(shm["left_by_this_run"]) + ".")
    else:
        changed = len(set(shm["before"]) ^ set(shm["after"]))
        lines.append(f"/dev/shm: nothing of the run's left (other processes changed {changed} entries meanwhile).")
    return " ".join(lines)


def _w17_table(results: JsonObject) -> list[str]:
    w17 = results.get("redis", {}).get(redis_ops.W17_ID)
    if w17 is None:
        return []
    if "unavailable" in w17:
        return [f"Not run: {w17['unavailable']}."]
    rows = [[op, _ns(w17["results"][op][redis_ops.LIBRARY]["ns_per_op"]), w17["bare"][op],
             _ns(w17["results"][op][redis_ops.BARE]["ns_per_op"]), _ratio(w17["ratios"][op])]
            for op in redis_ops.OPS]
    return _table(["operation", "RedisSessionManager ns", "bare redis-py", "bare ns", "ratio"], rows)


def _checks_table(results: JsonObject) -> list[str]:
    rows = [[c["backend"], c["workload"], c["target"], c["figure"],
             "" if c["met"] is None else ("met" if c["met"] else "**not met**")]
            for c in results.get("checks", [])]
    if not rows:
        return []
    return _table(["backend", "workload", "target (docs/bench.md)", "measured", "verdict"], rows)


def markdown(results: JsonObject) -> str:
    s = results["settings"]
    out = ["## capsule_sessions benchmark", ""] + _heading(results) + [""]
    sections = [
        ("### W1-W7, W13: ns per operation (lower is better; ratios below 1 favour cython)",
         _timed_table(results, False),
         "Go ns/op is the reference figure for the Go original (docs/bench.md), not measured in this run."),
        ("### Size-independence points (aux)", _timed_table(results, True),
         "W2_aux and W5_aux repeat W2 and W5 with 4 KiB frames or no subscribers; the W2 and W5 "
         "size-independence targets are judged from them."),
        ("### Allocation and page faults per 1080p store", _alloc_table(results),
         "tracemalloc sees Python's allocators and numpy buffers, not a bare C malloc; page faults see both."),
        (f"### W8: producer threads storing 1080p RGB frames, each into its own session "
         f"({s['w8_seconds']:g} s windows, median of {s['w8_repeats']})", _threads_table(results),
         "memcpy is the machine's own scaling for the same copies: the ceiling for every target "
         "(\"2/1 ratio / memcpy's\" compares with it repeat by repeat). memcpy_2buf copies into two "
         "buffers in turn, the least memory a ring keeping 2 frames can write to: its working set is what "
         "the backends' is. "
         "CPU cores busy is process CPU time over wall time during the 2-thread run: near 2 when both "
         "producers ran at once, near 1 when the GIL serialised them. Other processes: what the rest of "
         "the machine ran meanwhile (/proc/stat); above ~0.2 the 2-thread figures are not the machine's."),
        (f"### W9: fan-out of 64 KiB frames to subscribers drained by their own threads "
         f"(buffer={_fanout_buffer(results)})", _fanout_table(results),
         f"Free-running: the producer stores {s['w9_frames']:,} frames as fast as it can (throughput, drops). "
         f"Paced: {s['w9_paced_frames']:,} frames, one every {s['w9_interval_s'] * 1e3:g} ms (wake-up latency). "
         "Lost uncounted: frames neither received nor counted as dropped, plus any corrupt, "
         "out-of-order or miscounted delivery (must be 0)."),
        (f"### W10: 1080p frames from one producer process to reader processes (buffer={ipc.BUFFER}, "
         f"free-running, {s.get('ipc_seconds', 0):g} s window, median of {s.get('ipc_repeats', 0)})",
         _w10_table(results),
         "Frames/s per reader: received within the window, averaged over the readers. Dropped: frames the "
         "producer published that a reader never received. Torn: frames whose stamps (sequence number and "
         "time at the start, middle and end) did not all match, changed while held, or named another frame "
         "than the transport did (must be 0). Lost uncounted: neither received nor counted as dropped by "
         "the transport's own counter (n/a: the transport counts no drops). Latency: the producer's stamp "
         "just before the store to the reader holding a usable numpy array. CPU per frame: the process's "
         "CPU time (every thread) over the window, per frame it published or received (readers averaged). "
         + _ipc_peers_note(results)),
        (f"### W11: 64 KiB frames paced at 1 kHz to reader processes ({s.get('w11_frames', 0):,} frames, "
         f"median of {s.get('ipc_repeats', 0)})", _w11_table(results),
         "Store-to-receive latency on time.monotonic_ns(), which is one clock for every process on Linux, "
         "pooled over the readers."),
        ("### W12: latest_visual_frames(ttl=10) from a reader process over 8 frames", _w12_table(results),
         "The in-process rows are the reference (W5 is 8 x 64 KiB); the target is judged per frame handed out."),
        *redis_frames.sections(results),
        ("### W17: session operations on a Redis server (one private redis-server on loopback)",
         _w17_table(results),
         "Each operation and its bare redis-py round trip are timed in the same rounds; the ratio is the "
         "median of the per-round ratios."),
        ("### Targets", _checks_table(results), ""),
    ]
    for title, lines, note in sections:
        if not lines and not title.startswith("### W14"):
            continue
        out += [title, ""] + lines + [""]
        if note:
            out += [note, ""]
    return "\n".join(out).rstrip() + "\n"


def _fanout_buffer(results: JsonObject) -> str:
    for by_subs in results.get("fanout", {}).values():
        for phases in by_subs.values():
            return str(phases["free"]["buffer"])
    return ""


def verdict_counts(results: JsonObject) -> tuple[int, int]:
    checks = results.get("checks", [])
    return sum(1 for c in checks if c["met"]), sum(1 for c in checks if c["met"] is False)

