"""The Redis frame workloads of docs/bench.md, each side by side with bare redis-py on the
same server, which the benchmark starts itself (``redis_local.py``: a free loopback
port, persistence off):

- W14 (``store_frame`` of 4 KiB and 64 KiB, ``max_recent=2``) against a bare
  ``XADD key MAXLEN 2 * d <bytes>``, one round trip per frame as a store is, and shown
  beside it the same XADDs pipelined 64 to a round trip (a store must answer whether
  it accepted the frame before the next one, so it cannot be pipelined: that figure is
  the floor of the transport, not judged);
- W15 (``latest_visual_frames`` of a ring of 2 frames of 64 KiB, and 4 KiB as an aux
  point) against a bare ``XREVRANGE key + - COUNT 2`` of the same entries;
- W16 (store on node A, receive on node B: 64 KiB at 1 kHz, store-to-receive p50/p99)
  against a bare XADD on A and ``XREAD BLOCK`` on B. A and B are spawned processes (the
  'spawn' method), one pair for every case of every round.

W14 and W15 are timed as W1-W7 are (``harness.py``: calibrated batches, interleaved
rounds, medians, per-round ratios). In W16 the producer stamps each frame with its
sequence number and ``time.monotonic_ns()`` (one clock for every process on Linux) just
before the store; the reader takes the time when it holds a usable array. The library's
figures are a user's calls on a ``RedisSessionManager``'s session (whose ring checks the
session's incarnation and touches it in each script), and are the same whichever backend
is built (the Redis ring is Python and Lua).
"""

from __future__ import annotations

import multiprocessing as mp
import random
import statistics
import struct
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from .._json import JsonObject
from . import harness, redis_local
from .workloads import TICK, Case, FakeClock, payload

W14_ID = "W14_redis_store"
W15_ID = "W15_redis_latest"
W16_ID = "W16_redis_fanout"
IDS = (W14_ID, W15_ID, W16_ID)
DESCRIPTIONS = {
    W14_ID: "store_frame of 4 KiB and 64 KiB frames (max_recent=2) against a bare XADD MAXLEN of the same bytes",
    W15_ID: "latest_visual_frames of 2 frames of 64 KiB (and 4 KiB) against a bare XREVRANGE",
    W16_ID: "store on node A, receive on node B, 64 KiB at 1 kHz: p50/p99 against a bare XADD to XREAD BLOCK",
}
LIBRARY = "library"
BARE = "redis-py"
PIPELINED = "redis-py pipelined"
W14_SIZES = (4096, 65536)
W15_SIZES = (65536, 4096)  # the second is the aux point
PIPELINE_DEPTH = 64
W16_FRAME_BYTES = 65536
W16_INTERVAL_S = 0.001
W16_BUFFER = 8
# The newest frames, as the bare reader gets them (it reads past whatever was trimmed): a
# reader that fell behind is handed what is newest, not what waited longest.
W16_POLICY = "drop_oldest"
# docs/bench.md's targets for the library against bare redis-py in the same run.
W14_W15_LIMIT = 1.3
W16_P50_LIMIT = 1.2
W16_P99_LIMIT = 1.5

STAMP = struct.Struct("<qq")  # (seq, time.monotonic_ns() just before the store)
READY_TIMEOUT_S = 60.0


def unavailable() -> str | None:
    """Why the Redis frame workloads cannot run here, or None."""
    return redis_local.unavailable()


def steps(ids: list[str], repeats: int, rounds: int) -> int:
    """How many progress ticks ``run`` makes for ``ids``."""
    cases = (2 * len(W14_SIZES) + len(W14_SIZES) if W14_ID in ids else 0) + (2 * len(W15_SIZES) if W15_ID in ids else 0)
    total = harness.steps(cases, repeats)
    if W16_ID in ids:
        total += 2 * rounds
    return total


# -- W14, W15: timed cases ----------------------------------------------------------------

def _client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def _session(url: str, tag: str) -> tuple[Any, Any]:
    """(manager, session) of session ``tag``, made by whichever node asks first: the
    library's figures are a user's calls on a session (its ring also checks the session's
    incarnation and touches it), not the bare ring's."""
    from ..errors import SessionExistsError
    from ..redis import RedisSessionManager

    manager = RedisSessionManager(url, 1024, namespace="bench", cleanup_interval=None)
    try:
        return manager, manager.create(tag)
    except SessionExistsError:
        return manager, manager.get(tag)


def _store_cases(url: str, size: int) -> dict[tuple[str, str], Case]:
    data: Any = payload(size, seed=size)  # an array: what a camera loop stores
    client = _client(url)
    manager, session = _session(url, f"w14-{size}")
    clock = FakeClock()
    store = session.store_frame

    def library_op() -> None:
        clock.t += TICK
        store(data, source="cam", max_recent=2, now=clock.t)

    def library_run(n: int) -> None:
        for _ in range(n):
            clock.t += TICK
            store(data, source="cam", max_recent=2, now=clock.t)

    key = f"bench:w14-{size}:bare"
    xadd = client.xadd

    def bare_op() -> None:
        xadd(key, {"d": memoryview(data)}, maxlen=2, approximate=False)

    def bare_run(n: int) -> None:
        for _ in range(n):
            xadd(key, {"d": memoryview(data)}, maxlen=2, approximate=False)

    pipe_key = f"bench:w14-{size}:pipelined"

    def pipelined_run(n: int) -> None:
        while n > 0:
            pipe = client.pipeline(transaction=False)
            for _ in range(min(n, PIPELINE_DEPTH)):
                pipe.xadd(pipe_key, {"d": memoryview(data)}, maxlen=2, approximate=False)
            pipe.execute()
            n -= PIPELINE_DEPTH

    wid = f"{W14_ID}_{size // 1024}k"
    return {
        (wid, LIBRARY): Case(library_op, library_run, keep=[session], close=manager.stop),
        (wid, BARE): Case(bare_op, bare_run, close=client.close),
        (wid, PIPELINED): Case(lambda: pipelined_run(1), pipelined_run),
    }


def _latest_cases(url: str, size: int) -> dict[tuple[str, str], Case]:
    client = _client(url)
    manager, session = _session(url, f"w15-{size}")
    key = f"bench:w15-{size}:bare"
    for seq in range(2):
        data: Any = payload(size, seed=seq)
        session.store_frame(data, source="cam", max_recent=2, now=float(seq))
        client.xadd(key, {"d": memoryview(data)}, maxlen=2, approximate=False)
    latest = session.latest_visual_frames
    xrevrange = client.xrevrange

    def library_run(n: int) -> None:
        for _ in range(n):
            latest(10.0, now=1.0)

    def bare_run(n: int) -> None:
        for _ in range(n):
            xrevrange(key, count=2)

    wid = f"{W15_ID}_{size // 1024}k"
    return {
        (wid, LIBRARY): Case(lambda: latest(10.0, now=1.0), library_run, keep=[session], close=manager.stop),
        (wid, BARE): Case(lambda: xrevrange(key, count=2), bare_run, close=client.close),
    }


def _timed(url: str, ids: list[str], repeats: int, min_batch_s: float,
           tick: Callable[[str], None]) -> dict[str, JsonObject]:
    """W14's and W15's figures: {workload: {"results": {size: {target: summary}},
    "ratios": {size: library/redis-py}, "aux": [sizes not judged]}}."""
    cases: dict[tuple[str, str], Case] = {}
    if W14_ID in ids:
        for size in W14_SIZES:
            cases.update(_store_cases(url, size))
    if W15_ID in ids:
        for size in W15_SIZES:
            cases.update(_latest_cases(url, size))
    try:
        measured = harness.interleaved(cases, repeats, min_batch_s, progress=lambda key: tick(f"{key[0]} {key[1]}"))
    finally:
        for case in cases.values():
            case.close()
    out: dict[str, JsonObject] = {}
    for wid, sizes, aux in ((W14_ID, W14_SIZES, ()), (W15_ID, W15_SIZES, W15_SIZES[1:])):
        if wid not in ids:
            continue
        results: JsonObject = {}
        for size in sizes:
            case_id = f"{wid}_{size // 1024}k"
            results[str(size)] = {target: figures for (cid, target), figures in measured.items() if cid == case_id}
        out[wid] = {"description": DESCRIPTIONS[wid], "results": results, "aux": [str(size) for size in aux],
                    "ratios": {size: harness.paired_ratio(r[LIBRARY], r[BARE]) for size, r in results.items()}}
    return out


# -- W16: two nodes ---------------------------------------------------------------------

def _pace(target_ns: int) -> None:
    """Wait until time.monotonic_ns() reaches target_ns: sleep most of it, spin the rest."""
    while True:
        left = target_ns - time.monotonic_ns()
        if left <= 0:
            return
        if left > 300_000:
            time.sleep((left - 200_000) / 1e9)


def _w16_producer(url: str, orders: Any, answers: Any) -> None:
    """Node A: for each order (target, tag, t_go ns, frames), stores the frames paced
    at W16_INTERVAL_S from t_go, each stamped just before its store; then ends the
    stream (the library's delete of the session, an end entry for bare redis-py)."""
    try:
        client = _client(url)
        frame: Any = payload(W16_FRAME_BYTES, seed=16)
        answers.put(("ready", "producer"))
        while True:
            order = orders.get()
            if order is None:
                return
            target, tag, t_go, frames = order
            manager, session = _session(url, tag) if target == LIBRARY else (None, None)
            key = f"bench:{tag}:bare"
            for seq in range(frames):
                _pace(t_go + int(seq * W16_INTERVAL_S * 1e9))
                STAMP.pack_into(frame, 0, seq, time.monotonic_ns())
                if session is not None:
                    session.store_frame(frame, source="cam", max_recent=2, now=seq * W16_INTERVAL_S)
                else:
                    client.xadd(key, {"d": memoryview(frame)}, maxlen=2, approximate=False)
            if manager is not None:
                manager.delete(tag)  # ends the session: every node's subscriptions close
                manager.stop()
            else:
                client.xadd(key, {"end": "1"}, maxlen=2, approximate=False)
            answers.put(("stored", frames))
    except BaseException:
        answers.put(("error", traceback.format_exc()))


def _w16_reader(url: str, orders: Any, answers: Any) -> None:
    """Node B: for each order (target, tag, frames, warm-up), subscribes (the library,
    W16_BUFFER and W16_POLICY) or reads the bare stream from its start with XREAD BLOCK, says
    ready, receives until the stream ends, and answers the latencies of the frames past
    the warm-up (microseconds) and how many it received and missed."""
    try:
        client = _client(url)
        answers.put(("ready", "reader"))
        while True:
            order = orders.get()
            if order is None:
                return
            target, tag, frames, warmup = order
            latencies: list[float] = []
            received = 0
            last_seq = -1
            gaps = 0
            if target == LIBRARY:
                from ..errors import SubscriptionClosed

                manager, session = _session(url, tag)
                sub = session.subscribe_visual_frames(W16_BUFFER, policy=W16_POLICY)
                answers.put(("subscribed", tag))
                while True:
                    try:
                        frame = sub.get()
                    except SubscriptionClosed:
                        break
                    now = time.monotonic_ns()
                    seq, stamp = STAMP.unpack_from(memoryview(frame.data), 0)
                    received += 1
                    gaps += seq - last_seq - 1
                    last_seq = seq
                    if seq >= warmup:
                        latencies.append((now - stamp) / 1e3)
                dropped = sub.dropped
                manager.stop()
            else:
                key = f"bench:{tag}:bare"
                last_id = "0-0"
                answers.put(("subscribed", tag))
                done = False
                while not done:
                    reply = client.xread({key: last_id}, count=64, block=100)
                    now = time.monotonic_ns()
                    for _, entries in reply:
                        for entry_id, fields in entries:
                            last_id = entry_id
                            if b"end" in fields:
                                done = True
                                break
                            data: Any = np.frombuffer(fields[b"d"], dtype=np.uint8)
                            seq, stamp = STAMP.unpack_from(data, 0)
                            received += 1
                            gaps += seq - last_seq - 1
                            last_seq = seq
                            if seq >= warmup:
                                latencies.append((now - stamp) / 1e3)
                dropped = gaps
            answers.put(("received", {"latencies_us": latencies, "received": received, "dropped": dropped,
                                      "missing": frames - received}))
    except BaseException:
        answers.put(("error", traceback.format_exc()))


def _answer(answers: Any, want: str, timeout: float, node: Any) -> Any:
    """The next answer of ``node`` (a process), which must be ``want``; a node that died
    or stays silent past ``timeout`` is an error, never a hang."""
    import queue

    deadline = time.monotonic() + timeout
    while True:
        try:
            kind, value = answers.get(timeout=0.5)
            break
        except queue.Empty:
            if not node.is_alive():
                raise RuntimeError(f"the W16 {node.name} process ended (exit code {node.exitcode})") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the W16 {node.name} process did not answer {want!r} in {timeout:g} s") from None
    if kind == "error":
        raise RuntimeError(value)
    if kind != want:
        raise RuntimeError(f"expected {want!r} from a W16 node, got {kind!r}")
    return value


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _w16(url: str, rounds: int, frames: int, warmup: int, tick: Callable[[str], None]) -> JsonObject:
    ctx = mp.get_context("spawn")
    to_producer, to_reader, from_producer, from_reader = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    producer = ctx.Process(target=_w16_producer, args=(url, to_producer, from_producer), daemon=True,
                           name="producer")
    reader = ctx.Process(target=_w16_reader, args=(url, to_reader, from_reader), daemon=True, name="reader")
    runs: dict[str, list[JsonObject]] = {LIBRARY: [], BARE: []}
    producer.start()
    reader.start()
    try:
        _answer(from_producer, "ready", READY_TIMEOUT_S, producer)
        _answer(from_reader, "ready", READY_TIMEOUT_S, reader)
        total = frames + warmup
        for round_no in range(rounds):
            order = [LIBRARY, BARE]
            random.Random(round_no).shuffle(order)
            for target in order:
                tag = f"w16-{uuid.uuid4().hex[:8]}"
                to_reader.put((target, tag, total, warmup))
                _answer(from_reader, "subscribed", READY_TIMEOUT_S, reader)
                time.sleep(0.05)  # the reader's first blocking read is out
                to_producer.put((target, tag, time.monotonic_ns() + 20_000_000, total))
                deadline = total * W16_INTERVAL_S + 30.0
                _answer(from_producer, "stored", deadline, producer)
                got = _answer(from_reader, "received", 30.0, reader)
                latencies = got.pop("latencies_us")
                got.update(p50_us=_percentile(latencies, 50), p99_us=_percentile(latencies, 99),
                           measured=len(latencies))
                runs[target].append(got)
                tick(f"{W16_ID} {target} round {round_no + 1}")
    finally:
        for q in (to_producer, to_reader):
            q.put(None)
        for proc in (producer, reader):
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    out: JsonObject = {"frames": frames, "warmup": warmup, "interval_s": W16_INTERVAL_S, "frame_bytes": W16_FRAME_BYTES,
                       "buffer": W16_BUFFER, "rounds": rounds, "results": {}}
    for target, target_runs in runs.items():
        out["results"][target] = {
            "p50_us": _median([r["p50_us"] for r in target_runs]),
            "p99_us": _median([r["p99_us"] for r in target_runs]),
            "received": sum(r["received"] for r in target_runs),
            "dropped": sum(r["dropped"] for r in target_runs),
            "missing": sum(r["missing"] for r in target_runs),
            "runs": target_runs,
        }
    for quantile in ("p50_us", "p99_us"):
        pairs = [a[quantile] / b[quantile] for a, b in zip(runs[LIBRARY], runs[BARE], strict=True)
                 if a[quantile] is not None and b[quantile]]
        out[f"{quantile[:3]}_ratio"] = statistics.median(pairs) if pairs else None
    return out


def _median(values: list[Any]) -> float | None:
    finite = [v for v in values if v is not None]
    return statistics.median(finite) if finite else None


# -- the run, the verdicts, the report -----------------------------------------------------

def run(ids: list[str], *, repeats: int, min_batch_s: float, w16_rounds: int, w16_frames: int, w16_warmup: int,
        progress: Callable[[str], None] | None = None) -> JsonObject:
    """Every selected Redis frame workload, {workload: figures}, against one redis-server
    this function starts (each workload {"unavailable": why} where none can run)."""
    tick = progress or (lambda label: None)
    reason = unavailable()
    if reason is not None:
        return {wid: {"description": DESCRIPTIONS[wid], "unavailable": reason} for wid in ids}
    import redis

    out: JsonObject = {}
    with redis_local.server() as url:
        info = redis.Redis.from_url(url).info("server")
        server = f"redis-server {info['redis_version']} on loopback, redis-py {redis.__version__}"
        if W14_ID in ids or W15_ID in ids:
            out.update(_timed(url, ids, repeats, min_batch_s, tick))
        if W16_ID in ids:
            out[W16_ID] = _w16(url, w16_rounds, w16_frames, w16_warmup, tick)
    for entry in out.values():
        entry["server"] = server
    return out


def _check(workload: str, text: str, figure: str, met: bool | None) -> JsonObject:
    return {"backend": "redis", "workload": workload, "target": text, "figure": figure, "met": met}


def evaluate(results: JsonObject) -> list[JsonObject]:
    """W14-W16 judged against bare redis-py in the same run (docs/bench.md)."""
    redis_results = results.get("redis", {})
    checks = []
    for wid in IDS:
        entry = redis_results.get(wid)
        if entry is None:
            continue
        if "unavailable" in entry:
            checks.append(_check(wid, "runs against a redis-server of its own", entry["unavailable"], None))
            continue
        if wid == W16_ID:
            mine = entry["results"][LIBRARY]
            lost = mine["missing"] - mine["dropped"]
            checks.append(_check(wid, "no frame lost without being counted as dropped", f"{lost} uncounted",
                                 lost == 0))
            for quantile, limit in (("p50", W16_P50_LIMIT), ("p99", W16_P99_LIMIT)):
                ratio = entry[f"{quantile}_ratio"]
                checks.append(_check(wid, f"{quantile} at most {limit}x bare XADD to XREAD BLOCK",
                                     "" if ratio is None else f"{ratio:.2f}x",
                                     None if ratio is None else ratio <= limit))
            continue
        for size, ratio in entry["ratios"].items():
            if size in entry["aux"]:
                continue
            checks.append(_check(wid, f"{int(size) // 1024} KiB: at most {W14_W15_LIMIT}x the bare redis-py "
                                      "command (one round trip)",
                                 "" if ratio is None else f"{ratio:.2f}x",
                                 None if ratio is None else ratio <= W14_W15_LIMIT))
    return checks


def _us(ns: float | None) -> str:
    return "" if ns is None else f"{ns / 1e3:,.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def sections(results: JsonObject) -> list[tuple[str, list[str], str]]:
    """The report's W14-W16 sections: (title, table lines, note)."""
    redis_results = results.get("redis", {})
    entries = {wid: redis_results[wid] for wid in IDS if wid in redis_results}
    if not entries:
        return []
    missing = [entry["unavailable"] for entry in entries.values() if "unavailable" in entry]
    if missing:
        return [("### W14-W16: frames in Redis", [], f"Not run: {missing[0]}.")]
    out = []
    rows = []
    for wid in (W14_ID, W15_ID):
        entry = entries.get(wid)
        if entry is None:
            continue
        for size, r in entry["results"].items():
            ratio = entry["ratios"][size]
            rows.append([wid + (" (aux)" if size in entry["aux"] else ""), f"{int(size):,}",
                         _us(r[LIBRARY]["ns_per_op"]), _us(r[BARE]["ns_per_op"]),
                         "" if ratio is None else f"{ratio:.2f}x",
                         _us(r[PIPELINED]["ns_per_op"]) if PIPELINED in r else ""])
    server = next(iter(entries.values()))["server"]
    if rows:
        out.append(("### W14, W15: frames stored in and read from Redis, us per call (lower is better)",
                    _table(["workload", "frame bytes", "library us", "redis-py us", "library/redis-py",
                            f"redis-py pipelined x{PIPELINE_DEPTH} us per frame"], rows),
                    f"Against {server}, a server the run started. W14's redis-py is XADD MAXLEN 2 (exact) of "
                    "the same bytes, one round trip per frame as a store is; W15's is XREVRANGE COUNT 2 of the "
                    "same two entries. The pipelined column is the transport's floor, not judged: a store must "
                    "answer whether it accepted the frame before the next one. The ratio is the median of the "
                    "per-round ratios."))
    w16 = entries.get(W16_ID)
    if w16:
        rows = []
        for target, r in w16["results"].items():
            ratio = (w16["p50_ratio"], w16["p99_ratio"]) if target == LIBRARY else (None, None)
            rows.append([target, f"{r['received']:,}", f"{r['dropped']:,}", f"{r['missing'] - r['dropped']:,}",
                         "" if r["p50_us"] is None else f"{r['p50_us']:,.0f}",
                         "" if r["p99_us"] is None else f"{r['p99_us']:,.0f}",
                         "" if ratio[0] is None else f"{ratio[0]:.2f}x",
                         "" if ratio[1] is None else f"{ratio[1]:.2f}x"])
        out.append((f"### W16: 64 KiB frames at 1 kHz, stored on node A, received on node B ({w16['frames']:,} "
                    f"frames after {w16['warmup']} of warm-up, median of {w16['rounds']})",
                    _table(["target", "received", "dropped", "lost uncounted", "p50 us", "p99 us", "p50 ratio",
                            "p99 ratio"], rows),
                    "Two spawned processes; latency from the producer's stamp just before the store to the "
                    "reader holding a usable array. Both rings keep 2 frames. The library's reader is a "
                    f"subscription (buffer={W16_BUFFER}, {W16_POLICY}) read by get(), whose waiting thread reads "
                    "with XREAD BLOCK itself; redis-py's is a loop of XREAD BLOCK. Ratios are medians of the "
                    "per-round ratios."))
    return out
