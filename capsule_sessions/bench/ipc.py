"""The across-process workloads of docs/bench.md: W10 (1080p to 1 and 4 reader
processes, free-running), W11 (64 KiB paced at 1 kHz: store-to-receive latency) and W12
(``latest_visual_frames`` from another process), each run on every peer of
``ipc_peers.py`` (and ``ipc_iceoryx2.py``, ``ipc_shm.py``) side by side.

One case is one peer with a number of readers. The benchmark's process makes the case's
wiring, spawns (the 'spawn' start method, never fork) one producer process and one
process per reader (the in-process peer: one process, readers as threads), waits until
every child says it is ready, then sets a start instant ``t_go`` a little ahead and lets
them go. All of them read ``time.monotonic_ns()``, which is one clock for the whole
machine on Linux. The producer runs for a warm-up and then a measured window, stamping
every frame before it publishes it; the readers count what they receive in the same
window. Every child is bounded in time: the benchmark waits a fixed grace for their
results, then joins them, terminates and finally kills any that overstays, and the
peer's ``cleanup`` removes what the wiring made, whatever happened to the children.

The stamp: ``(seq, t_ns)`` as two int64 at the start, the middle and the end of the
frame. A reader reads the three stamps of a frame in place (16 bytes each, no copy of
the frame) when it receives it and the first one again before it releases it: a frame
whose stamps differ, that changed while it was held, or whose stamps name another
frame than the transport said (the Frigate pattern's slot numbers) is *torn*. Latency
is the receive instant (the reader holds a usable numpy array) minus ``t_ns``.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import multiprocessing as mp
import os
import queue
import random
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._json import JsonObject
from . import harness
from .ipc_iceoryx2 import Iceoryx2Peer
from .ipc_peers import (
    FasterFifoPeer,
    Frame,
    FrigatePeer,
    InProcessPeer,
    MpQueuePeer,
    Peer,
    Producer,
    Reader,
    Wiring,
    run_threads,
)
from .ipc_shm import LatestProducer, ShmPeer, attach_latest
from .workloads import FRAME_1080P_RGB, Case, backends, build_latest, payload

W10_ID = "W10_ipc_6m"
W11_ID = "W11_ipc_latency_64k"
W12_ID = "W12_ipc_latest"
IDS = (W10_ID, W11_ID, W12_ID)
DESCRIPTIONS = {
    W10_ID: "1080p frames from one producer process to 1 and 4 reader processes (buffer=2), free-running",
    W11_ID: "64 KiB frames paced at 1 kHz to 1 and 4 reader processes: store-to-receive p50/p99",
    W12_ID: "latest_visual_frames from a reader process over 8 frames of 4 KiB and of 6 MB",
}
READERS = (1, 4)
BUFFER = 2
W11_FRAME_BYTES = 65536
W11_INTERVAL_S = 0.001
W12_SIZES = (4096, FRAME_1080P_RGB)
W12_FRAMES = 8
W12_W5_SIZE = 65536  # the in-process W5 (8 x 64 KiB) that W12 is judged against

LIBRARY = "shm"
PEERS: dict[str, Peer] = {peer.name: peer for peer in (
    ShmPeer(), Iceoryx2Peer(), FrigatePeer(), FasterFifoPeer(), MpQueuePeer(), InProcessPeer())}
TARGETS = tuple(PEERS)

STAMP = struct.Struct("<qq")  # (seq, time.monotonic_ns() just before the store)
POLL_S = 0.05  # a reader's receive timeout: how often it looks whether the run is over
READY_TIMEOUT_S = 60.0  # spawning 5 interpreters that import numpy, on a loaded 2-core machine
GO_DELAY_S = 0.02  # t_go is this far ahead of the moment it is set
RESULT_GRACE_S = 15.0  # past the end of the window, for every child's result
JOIN_TIMEOUT_S = 5.0
FINISH_WAIT_S = 30.0  # a producer keeps its end open this long at most for its readers

_TAGS = itertools.count()


@dataclass(frozen=True)
class StreamSpec:
    """One W10/W11 case, as every child of it sees it."""

    workload: str
    size: int
    readers: int
    buffer: int
    warmup_s: float
    window_s: float
    interval_s: float  # 0: free-running
    tag: str


@dataclass
class Control:
    """What the children of one case share besides the wiring."""

    go: Any  # multiprocessing Event: t_go is set
    stop: Any  # the producer is done
    finish: Any  # the benchmark has every result: the producer may close its end
    t_go: Any  # multiprocessing Value('q'): the start instant, monotonic ns


def _new_tag() -> str:
    # Short (POSIX shared-memory names are short on some systems), unique per case.
    return f"csb{os.getpid()}x{next(_TAGS)}"


def is_ours(name: str) -> bool:
    """Whether a /dev/shm entry can be this process's: named with its tags (the Frigate
    slots, iceoryx2's files, the library's namespace), or a multiprocessing semaphore.
    On a shared machine other processes come and go in /dev/shm too."""
    return f"csb{os.getpid()}x" in name or name.startswith("sem.mp-")


def dev_shm() -> set[str]:
    """The names in /dev/shm (empty where there is no /dev/shm)."""
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


# -- the frame stamp -------------------------------------------------------------------

def stamp_offsets(size: int) -> tuple[int, int, int]:
    if size < 3 * STAMP.size:
        raise ValueError(f"a frame of {size} bytes has no room for three {STAMP.size}-byte stamps")
    return 0, (size // 2) & ~7, size - STAMP.size


def stamped(size: int, seq: int, t_ns: int = 0, seed: int = 0) -> Frame:
    frame = payload(size, seed)
    view = frame.data
    for offset in stamp_offsets(size):
        STAMP.pack_into(view, offset, seq, t_ns)
    return frame


def is_torn(data: Any, offsets: tuple[int, int, int], expected_seq: int = -1) -> bool:
    first = STAMP.unpack_from(data, offsets[0])
    return (first != STAMP.unpack_from(data, offsets[1]) or first != STAMP.unpack_from(data, offsets[2])
            or (expected_seq >= 0 and first[0] != expected_seq))


# -- the loops the children run ------------------------------------------------------------

def _produce(producer: Producer, spec: StreamSpec, control: Control) -> JsonObject:
    frame = payload(spec.size, seed=1)
    view = frame.data  # a memoryview: the stamps are written through it, into the frame itself
    o0, o1, o2 = stamp_offsets(spec.size)
    pack, clock, publish = STAMP.pack_into, time.monotonic_ns, producer.publish
    if not control.go.wait(READY_TIMEOUT_S + RESULT_GRACE_S):
        raise RuntimeError("the benchmark never said go")
    t_go = control.t_go.value
    t1 = t_go + int(spec.warmup_s * 1e9)
    t2 = t1 + int(spec.window_s * 1e9)
    interval = int(spec.interval_s * 1e9)
    while (wait := t_go - clock()) > 0:
        time.sleep(wait / 1e9)
    seq = in_window = 0
    cpu_at_t1 = 0
    due = t_go
    try:
        while True:
            if interval:
                due += interval
                wait = due - clock()
                if wait > 0:
                    time.sleep(wait / 1e9)  # pacing the producer in real time
            now = clock()
            if now >= t2:
                break
            pack(view, o0, seq, now)
            pack(view, o1, seq, now)
            pack(view, o2, seq, now)
            if now >= t1 and not in_window:
                cpu_at_t1 = time.process_time_ns()  # every thread of the producer's process
            publish(frame, seq)
            if now >= t1:
                in_window += 1
            seq += 1
    finally:
        control.stop.set()
    cpu_ns = time.process_time_ns() - cpu_at_t1 if in_window else 0
    return {"published": seq, "window_published": in_window, "fps": in_window / spec.window_s,
            "cpu_us_per_frame": cpu_ns / in_window / 1e3 if in_window else None, "counters": producer.counters()}


def _consume(reader: Reader, spec: StreamSpec, control: Control) -> JsonObject:
    offsets = stamp_offsets(spec.size)
    o0 = offsets[0]
    unpack, clock = STAMP.unpack_from, time.monotonic_ns
    receive, release = reader.receive, reader.release
    seqs: list[int] = []
    sent: list[int] = []
    got_at: list[int] = []
    torn = 0
    if not control.go.wait(READY_TIMEOUT_S + RESULT_GRACE_S):
        raise RuntimeError("the benchmark never said go")
    t_go = control.t_go.value
    t1 = t_go + int(spec.warmup_s * 1e9)
    t2 = t1 + int(spec.window_s * 1e9)
    hard_end = t2 + int(RESULT_GRACE_S / 2 * 1e9)
    stop_seen = False
    cpu_marks: list[tuple[int, int]] = []  # (the process's CPU ns, frames received) at t1, at t2
    while True:
        got = receive(POLL_S)
        if got is None:
            # Over once a whole poll came back empty after the producer said it stopped
            # (a queue's feeder thread may still be flushing the last frames).
            if stop_seen or clock() > hard_end:
                break
            stop_seen = control.stop.is_set()
            continue
        data: Any = got[0]  # a uint8 array, read through the buffer protocol
        expected = got[1]
        t = clock()
        if len(cpu_marks) < 2 and t >= (t1, t2)[len(cpu_marks)]:
            cpu_marks.append((time.process_time_ns(), len(seqs)))
        first = unpack(data, o0)
        bad = is_torn(data, offsets, expected) or unpack(data, o0) != first  # or changed while held
        torn += bad
        # The order is the transport's (what it said it delivered, where it says); a
        # torn frame's stamps are no one's, so it has no latency.
        seqs.append(expected if expected >= 0 else first[0])
        sent.append(-1 if bad else first[1])
        got_at.append(t)
        del data, got
        release()
    seq_a = np.array(seqs, dtype=np.int64)
    sent_a = np.array(sent, dtype=np.int64)
    at_a = np.array(got_at, dtype=np.int64)
    in_window = int(np.count_nonzero((at_a >= t1) & (at_a < t2)))
    latencies = (at_a - sent_a)[sent_a >= t1]
    if len(cpu_marks) == 1:
        cpu_marks.append((time.process_time_ns(), len(seqs)))
    (cpu_1, n_1), (cpu_2, n_2) = cpu_marks if cpu_marks else ((0, 0), (0, 0))
    return {"received": len(seqs), "window_received": in_window, "fps": in_window / spec.window_s,
            "cpu_us_per_frame": (cpu_2 - cpu_1) / (n_2 - n_1) / 1e3 if n_2 > n_1 else None,
            "torn": torn, "out_of_order": int(np.count_nonzero(np.diff(seq_a) <= 0)) if len(seqs) > 1 else 0,
            "counters": reader.counters(), "latencies_ns": latencies.tobytes()}


@dataclass
class Phase:
    """One case of a group: its spec, its wiring and its controls, all made before the
    group is spawned (multiprocessing queues and events reach a child only that way)."""

    spec: StreamSpec
    wiring: Wiring
    control: Control


def _error(out: Any, phase: int, role: str, index: int) -> None:
    out.put(("error", phase, role, index, traceback.format_exc(limit=8)))


def _producer_main(peer_name: str, phases: list[Phase], out: Any) -> None:
    for k, phase in enumerate(phases):
        producer = None
        try:
            producer = PEERS[peer_name].producer(phase.wiring)
            out.put(("ready", k, "producer", 0, None))
            out.put(("result", k, "producer", 0, _produce(producer, phase.spec, phase.control)))
            phase.control.finish.wait(FINISH_WAIT_S)  # the readers may still hold what the producer lent them
        except BaseException:
            phase.control.stop.set()
            _error(out, k, "producer", 0)
            return
        finally:
            if producer is not None:
                producer.close()


def _reader_main(peer_name: str, phases: list[Phase], index: int, out: Any) -> None:
    for k, phase in enumerate(phases):
        if index >= phase.spec.readers:
            # Not in this case: keep still until it is over, so that opening the next
            # case's end does not run beside this case's measurement.
            phase.control.finish.wait(READY_TIMEOUT_S + FINISH_WAIT_S)
            continue
        reader = None
        try:
            reader = PEERS[peer_name].reader(phase.wiring, index)
            out.put(("ready", k, "reader", index, None))
            out.put(("result", k, "reader", index, _consume(reader, phase.spec, phase.control)))
        except BaseException:
            _error(out, k, "reader", index)
            return
        finally:
            if reader is not None:
                reader.close()


def _group_phase(peer: Peer, k: int, phase: Phase, out: Any) -> None:
    """The in-process peer's case: the producer in the main thread, each reader a thread."""
    spec, control = phase.spec, phase.control
    producer = peer.producer(phase.wiring)
    readers = [peer.reader(phase.wiring, i) for i in range(spec.readers)]

    def reading(index: int) -> Callable[[], None]:
        def run() -> None:
            try:
                out.put(("result", k, "reader", index, _consume(readers[index], spec, control)))
            except BaseException:
                _error(out, k, "reader", index)
        return run

    threads = run_threads([reading(i) for i in range(spec.readers)])
    try:
        out.put(("ready", k, "producer", 0, None))
        out.put(("result", k, "producer", 0, _produce(producer, spec, control)))
    finally:
        control.stop.set()
        for thread in threads:
            thread.join(RESULT_GRACE_S)
        for reader in readers:
            reader.close()
        producer.close()


def _group_main(peer_name: str, phases: list[Phase], out: Any) -> None:
    for k, phase in enumerate(phases):
        try:
            _group_phase(PEERS[peer_name], k, phase, out)
        except BaseException:
            _error(out, k, "producer", 0)
            return
        phase.control.finish.wait(FINISH_WAIT_S)


# -- the benchmark's side of a group of cases -------------------------------------------------

class _Mailbox:
    """The children's messages, as they come: ("ready" | "result" | "error", case
    number, role, index, body). A child may say it is ready for the next case before
    another has sent its result for this one, so every message is kept until asked for."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.counts: dict[tuple[str, int], int] = {}
        self.results: dict[tuple[int, str, int], JsonObject] = {}

    def wait(self, procs: list[Any], phase: int, kind: str, expected: int, timeout: float,
             errors: list[str]) -> bool:
        """Until ``expected`` messages of ``kind`` have come for ``phase``, an error comes,
        a child dies without a word, or ``timeout`` passes; False unless they all came."""
        deadline = time.monotonic() + timeout
        while self.counts.get((kind, phase), 0) < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = expected - self.counts.get((kind, phase), 0)
                errors.append(f"timed out after {timeout:g} s waiting for {missing} '{kind}' message(s)")
                return False
            try:
                message, k, role, index, body = self.out.get(timeout=min(left, 0.2))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    errors.append(", ".join(f"{p.name} exited with code {p.exitcode}" for p in dead))
                    return False
                continue
            if message == "error":
                errors.append(f"{role} {index}: {body.strip().splitlines()[-1]}")
                errors.append(body)
                return False
            if message == "result":
                self.results[(k, role, index)] = body
            self.counts[(message, k)] = self.counts.get((message, k), 0) + 1
        return True


def _end(procs: list[Any]) -> int:
    """Join every child, terminating then killing any that overstays: how many had to be."""
    forced = 0
    procs = [p for p in procs if p.pid is not None]  # a child that failed to start has nothing to join
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
        if p.is_alive():
            forced += 1
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)
    for p in procs:
        with contextlib.suppress(ValueError):
            p.close()
    return forced


def run_group(peer_name: str, specs: list[StreamSpec],
              progress: Callable[[StreamSpec], None] | None = None) -> list[JsonObject]:
    """Run W10/W11 cases of one peer, one after the other, in one group of spawned
    processes (a producer, and as many readers as the largest case has; a case with
    fewer leaves the others idle): prepare every case, spawn, then per case wait until
    its children are ready, go, collect; then end the group and clean up. One dict per
    case, whatever happened: its "errors" say what went wrong, if anything; its
    "shm_left", what of this run's is in /dev/shm after the group that was not before
    (once the group's queues and events, named semaphores under 'spawn', have been
    collected)."""
    before = dev_shm()
    summaries = _run_group(peer_name, specs, progress or (lambda spec: None))
    gc.collect()
    left = sorted(name for name in dev_shm() - before if is_ours(name))
    for summary in summaries:
        summary["shm_left"] = left
    return summaries


def _run_group(peer_name: str, specs: list[StreamSpec], progress: Callable[[StreamSpec], None]) -> list[JsonObject]:
    peer = PEERS[peer_name]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mailbox = _Mailbox(out)
    phases: list[Phase] = []
    errors: list[list[str]] = [[] for _ in specs]
    procs: list[Any] = []
    forced = 0
    swept: list[str] = []
    try:
        for spec in specs:
            control = Control(ctx.Event(), ctx.Event(), ctx.Event(), ctx.Value("q", 0, lock=False))
            phases.append(Phase(spec, peer.prepare(ctx, spec.size, spec.readers, spec.buffer, spec.tag), control))
        most = max(spec.readers for spec in specs)
        if peer.single_process:
            procs.append(ctx.Process(target=_group_main, args=(peer_name, phases, out),
                                     name=f"{peer_name}-group", daemon=True))
        else:
            procs.append(ctx.Process(target=_producer_main, args=(peer_name, phases, out),
                                     name=f"{peer_name}-producer", daemon=True))
            procs += [ctx.Process(target=_reader_main, args=(peer_name, phases, i, out),
                                  name=f"{peer_name}-reader-{i}", daemon=True) for i in range(most)]
        for p in procs:
            p.start()
        for k, phase in enumerate(phases):
            spec, control = phase.spec, phase.control
            ready = 1 if peer.single_process else 1 + spec.readers
            ok = mailbox.wait(procs, k, "ready", ready, READY_TIMEOUT_S, errors[k])
            if ok:
                control.t_go.value = time.monotonic_ns() + int(GO_DELAY_S * 1e9)
                control.go.set()
                ok = mailbox.wait(procs, k, "result", 1 + spec.readers,
                                  GO_DELAY_S + spec.warmup_s + spec.window_s + RESULT_GRACE_S, errors[k])
            control.stop.set()
            control.finish.set()
            progress(spec)
            if not ok:
                for rest in range(k + 1, len(phases)):
                    errors[rest].append(f"not run: an earlier case of the group failed ({errors[k][0]})")
                    progress(phases[rest].spec)
                break
    except Exception:
        errors[0].append(traceback.format_exc(limit=8))
    finally:
        for phase in phases:
            phase.control.stop.set()
            phase.control.finish.set()
        forced = _end(procs)
        for phase in phases:
            swept += peer.cleanup(phase.wiring)
        out.close()
        out.cancel_join_thread()
    return [_summarize(spec, {(role, index): body for (k2, role, index), body in mailbox.results.items() if k2 == k},
                       errors[k], forced, swept) for k, spec in enumerate(specs)]


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _percentile_us(latencies: np.ndarray[Any, np.dtype[np.int64]], q: float) -> float | None:
    return float(np.percentile(latencies, q)) / 1e3 if latencies.size else None


def _summarize(spec: StreamSpec, results: dict[tuple[str, int], JsonObject], errors: list[str], forced: int,
               swept: list[str]) -> JsonObject:
    """One case's figures from its children's results (``forced`` and ``swept`` are the
    group's)."""
    out: JsonObject = {"readers": spec.readers, "errors": errors, "forced_exits": forced, "shm_swept": swept}
    producer = results.get(("producer", 0))
    readers = [results.get(("reader", i)) for i in range(spec.readers)]
    if producer is None or any(r is None for r in readers):
        out["ok"] = False
        return out
    published = producer["published"]
    counted_by_producer = producer["counters"].get("dropped")
    accepted = producer["counters"].get("accepted", published)
    per_reader = []
    latencies = []
    for i, r in enumerate(reader for reader in readers if reader is not None):
        counters = r["counters"]
        counted = (counters["dropped"] if counters is not None
                   else counted_by_producer[i] if counted_by_producer is not None else None)
        per_reader.append({
            "received": r["received"], "window_received": r["window_received"], "fps": r["fps"],
            "torn": r["torn"], "out_of_order": r["out_of_order"],
            "dropped": published - r["received"],  # not received: every stored frame reaches the reader or not
            "dropped_counted": counted,
            "unaccounted": None if counted is None else accepted - r["received"] - counted,
            "counters": counters,
        })
        latencies.append(np.frombuffer(r["latencies_ns"], dtype=np.int64))
    pooled = np.concatenate(latencies)
    rates = [r["fps"] for r in per_reader]
    unaccounted = [r["unaccounted"] for r in per_reader]
    out.update({
        "ok": not errors,
        "published": published,
        "producer_fps": producer["fps"],
        "producer_cpu_us": producer["cpu_us_per_frame"],
        "reader_cpu_us": _mean([r["cpu_us_per_frame"] for r in readers if r is not None]),
        "fps_per_reader": sum(rates) / len(rates),
        "fps_slowest_reader": min(rates),
        "received": sum(r["received"] for r in per_reader),
        "dropped": sum(r["dropped"] for r in per_reader),
        "torn": sum(r["torn"] for r in per_reader),
        "out_of_order": sum(r["out_of_order"] for r in per_reader),
        "unaccounted": None if None in unaccounted else sum(u for u in unaccounted if u is not None),
        "p50_us": _percentile_us(pooled, 50),
        "p99_us": _percentile_us(pooled, 99),
        "latency_samples": int(pooled.size),
        "producer_counters": producer["counters"],
        "per_reader": per_reader,
    })
    return out


_MEDIANS = ("producer_fps", "producer_cpu_us", "reader_cpu_us", "fps_per_reader", "fps_slowest_reader", "p50_us",
            "p99_us")
_SUMS = ("published", "received", "dropped", "torn", "out_of_order", "forced_exits")


def merge(runs: list[JsonObject]) -> JsonObject:
    """The repeats of one case: medians of the rates and latencies, sums of the counts;
    ``repeats_*`` keep each repeat's figure (None where that repeat failed), in round order."""
    good = [r for r in runs if r.get("ok")]
    merged: JsonObject = {"runs": len(runs), "failed": len(runs) - len(good)}
    for key in _MEDIANS:
        values = [r[key] for r in good if r.get(key) is not None]
        merged[key] = float(np.median(values)) if values else None
        merged[f"repeats_{key}"] = [r.get(key) if r.get("ok") else None for r in runs]
    for key in _SUMS:
        merged[key] = sum(r.get(key, 0) for r in good)
    unaccounted = [r.get("unaccounted") for r in good]
    merged["unaccounted"] = None if not good or None in unaccounted else sum(u for u in unaccounted if u is not None)
    merged["errors"] = [e for r in runs for e in r["errors"]]
    merged["forced_exits"] = sum(r["forced_exits"] for r in runs)
    merged["shm_swept"] = sorted({name for r in runs for name in r["shm_swept"]})
    merged["shm_left"] = sorted({name for r in runs for name in r["shm_left"]})
    return merged


# -- W12: latest_visual_frames from a reader process ---------------------------------------

def _latest_producer_main(namespace: str, sizes: list[int], control: Control, out: Any) -> None:
    producer = None
    try:
        producer = LatestProducer(namespace, sizes, W12_FRAMES, lambda size, seq: stamped(size, seq, seed=seq))
        out.put(("ready", 0, "producer", 0, None))
        control.finish.wait(FINISH_WAIT_S + RESULT_GRACE_S)
    except BaseException:
        _error(out, 0, "producer", 0)
    finally:
        if producer is not None:
            producer.close()


def _latest_case(call: Callable[[], Any]) -> Case:
    def run(n: int) -> None:
        for _ in itertools.repeat(None, n):
            call()
    return Case(call, run)


def _latest_reader_main(namespace: str, sizes: list[int], repeats: int, min_batch_s: float, out: Any) -> None:
    sessions = []
    try:
        cases: dict[int, Case] = {}
        checked: JsonObject = {}
        for size in sizes:
            session, call = attach_latest(namespace, size)
            sessions.append(session)
            frames = call()
            offsets = stamp_offsets(size)
            checked[str(size)] = {"frames": len(frames),
                                  "torn": sum(is_torn(f.data, offsets, f.frame_seq) for f in frames)}
            del frames
            cases[size] = _latest_case(call)
        out.put(("ready", 0, "reader", 0, None))
        measured = harness.interleaved(cases, repeats, min_batch_s)
        out.put(("result", 0, "reader", 0, {str(size): {**measured[size], **checked[str(size)]} for size in sizes}))
    except BaseException:
        _error(out, 0, "reader", 0)
    finally:
        for session in sessions:
            session.close()


def _per_frame(summary: JsonObject) -> JsonObject:
    summary["ns_per_frame"] = summary["ns_per_op"] / W12_FRAMES
    summary["repeats_ns_per_frame"] = [ns / W12_FRAMES for ns in summary["repeats_ns"]]
    return summary


def run_latest_in_process(repeats: int, min_batch_s: float) -> JsonObject:
    """The in-process reference: W5 itself (8 x 64 KiB) and the W12 sizes, on the
    compiled backend where it is built."""
    available = backends()
    backend = "cython" if "cython" in available else available[0]
    sizes = sorted({W12_W5_SIZE, *W12_SIZES})
    cases = {size: build_latest(backend, {"size": size, "frames": W12_FRAMES, "ttl": 10.0}) for size in sizes}
    measured = harness.interleaved({k: c for k, c in cases.items() if c is not None}, repeats, min_batch_s)
    return {"backend": backend, "results": {str(size): _per_frame(measured[size]) for size in measured}}


def run_latest_shm(repeats: int, min_batch_s: float) -> JsonObject:
    reason = PEERS[LIBRARY].unavailable()
    if reason is not None:
        return {"unavailable": reason}
    ctx = mp.get_context("spawn")
    before = dev_shm()
    out = ctx.Queue()
    control = Control(ctx.Event(), ctx.Event(), ctx.Event(), ctx.Value("q", 0, lock=False))
    namespace = _new_tag()
    mailbox = _Mailbox(out)
    errors: list[str] = []
    procs = [ctx.Process(target=_latest_producer_main, args=(namespace, list(W12_SIZES), control, out),
                         name="shm-latest-producer", daemon=True)]
    try:
        procs[0].start()
        if mailbox.wait(procs, 0, "ready", 1, READY_TIMEOUT_S, errors):
            procs.append(ctx.Process(target=_latest_reader_main,
                                     args=(namespace, list(W12_SIZES), repeats, min_batch_s, out),
                                     name="shm-latest-reader", daemon=True))
            procs[1].start()
            mailbox.wait(procs, 0, "result", 1, READY_TIMEOUT_S + FINISH_WAIT_S, errors)
    finally:
        control.finish.set()
        forced = _end(procs)
        out.close()
        out.cancel_join_thread()
    del out, control, procs
    gc.collect()
    summary: JsonObject = {"errors": errors, "forced_exits": forced,
                           "shm_left": sorted(name for name in dev_shm() - before if is_ours(name))}
    reader = mailbox.results.get((0, "reader", 0))
    if reader is not None:
        summary["results"] = {size: _per_frame(r) for size, r in reader.items()}
    return summary


# -- the whole across-process run ------------------------------------------------------------

def stream_spec(workload: str, readers: int, window_s: float, warmup_s: float, w11_frames: int) -> StreamSpec:
    if workload == W10_ID:
        return StreamSpec(workload, FRAME_1080P_RGB, readers, BUFFER, warmup_s, window_s, 0.0, _new_tag())
    return StreamSpec(workload, W11_FRAME_BYTES, readers, BUFFER, warmup_s, w11_frames * W11_INTERVAL_S,
                      W11_INTERVAL_S, _new_tag())


def availability(targets: list[str]) -> dict[str, str | None]:
    """{target: why it cannot run here, or None}."""
    return {name: PEERS[name].unavailable() for name in targets}


def _ticker(tick: Callable[[str], None], target: str) -> Callable[[StreamSpec], None]:
    def done(spec: StreamSpec) -> None:
        tick(f"{spec.workload} {target} {spec.readers} reader{'s' if spec.readers > 1 else ''}")
    return done


def steps(workloads: list[str], targets: list[str], repeats: int) -> int:
    """How many times ``run`` calls ``progress``."""
    runnable = sum(reason is None for reason in availability(targets).values())
    n = sum(runnable * len(READERS) * repeats for wid in (W10_ID, W11_ID) if wid in workloads)
    if W12_ID in workloads:
        n += 1 + (LIBRARY in targets and PEERS[LIBRARY].unavailable() is None)
    return n


def run(workloads: list[str], targets: list[str], *, window_s: float, warmup_s: float, repeats: int,
        w11_frames: int, latest_repeats: int, min_batch_s: float,
        progress: Callable[[str], None] | None = None) -> JsonObject:
    tick = progress or (lambda label: None)
    before = dev_shm()
    reasons = availability(targets)
    runnable = [name for name in targets if reasons[name] is None]
    out: JsonObject = {"targets": targets, "unavailable": {k: v for k, v in reasons.items() if v is not None},
                       "descriptions": {name: PEERS[name].description for name in targets}}
    streams = [wid for wid in (W10_ID, W11_ID) if wid in workloads]
    runs: dict[tuple[str, str, int], list[JsonObject]] = {
        (wid, t, n): [] for wid in streams for t in runnable for n in READERS}
    # Each round runs every peer once, in an order shuffled from round to round (as the
    # in-process rounds are), each peer's cases in one group of processes, also shuffled.
    for round_no in range(repeats if streams else 0):
        order = list(runnable)
        random.Random(round_no).shuffle(order)
        for target in order:
            specs = [stream_spec(wid, n, window_s, warmup_s, w11_frames) for wid in streams for n in READERS]
            random.Random(round_no).shuffle(specs)
            summaries = run_group(target, specs, _ticker(tick, target))
            for spec, summary in zip(specs, summaries, strict=True):
                runs[(spec.workload, target, spec.readers)].append(summary)
    for wid in streams:
        spec = stream_spec(wid, 1, window_s, warmup_s, w11_frames)
        by_target: JsonObject = {}
        for target in targets:
            if reasons[target] is not None:
                by_target[target] = {"unavailable": reasons[target]}
            else:
                by_target[target] = {str(n): merge(runs[(wid, target, n)]) for n in READERS}
        out[wid] = {"description": DESCRIPTIONS[wid], "results": by_target,
                    "params": {"frame_bytes": spec.size, "buffer": BUFFER, "readers": list(READERS),
                               "warmup_s": spec.warmup_s, "window_s": spec.window_s,
                               "interval_s": spec.interval_s or None, "repeats": repeats}}
    if W12_ID in workloads:
        reference = run_latest_in_process(latest_repeats, min_batch_s)
        tick(f"{W12_ID} in-process reference")
        w12: JsonObject = {"description": DESCRIPTIONS[W12_ID], "in_process": reference, "results": {},
                           "params": {"sizes": list(W12_SIZES), "frames": W12_FRAMES, "ttl": 10.0,
                                      "w5_size": W12_W5_SIZE, "repeats": latest_repeats}}
        if LIBRARY in targets:
            w12["results"][LIBRARY] = run_latest_shm(latest_repeats, min_batch_s)
            if reasons[LIBRARY] is None:
                tick(f"{W12_ID} {LIBRARY}")
        out[W12_ID] = w12
    after = dev_shm()
    out["dev_shm"] = {"before": sorted(before), "after": sorted(after), "left": sorted(after - before),
                      "left_by_this_run": sorted(name for name in after - before if is_ours(name)),
                      "unchanged": after == before}
    return out
