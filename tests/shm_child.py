"""A reader (or producer) process for the shared-memory tests, driven over a pipe.

Run as ``python shm_child.py DEADLINE``; reads one JSON command per line on stdin and
answers one JSON line on stdout: ``{"ok": value}`` or ``{"error": name, "msg": text}``.
Everything that crosses the pipe is plain data: frames are described by their fields
and a hash of their bytes (``describe``), never pickled. The handles, subscriptions and
held frames live here, under names the test chooses, so the test can kill this process
while it holds leases and queue entries. ``shm_support.ReaderProcess`` is the other end.

faulthandler ends the process (exit code 1, stacks on stderr) past DEADLINE seconds, so
a hang is a failure, never a stuck run.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time

import numpy as np

from capsule_sessions import Session, SubscriptionClosed, attach
from capsule_sessions import shared as shared_mod


def digest(data) -> str:
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


def stamp(seq: int, nbytes: int) -> np.ndarray:
    """Bytes that only frame ``seq`` carries: its 8-byte tag repeated, then cut."""
    return np.full(nbytes // 8 + 1, seq, dtype="<i8").view(np.uint8)[:nbytes]


def describe(frame) -> list:
    """A frame as plain data: every field, the length and a hash of the bytes."""
    return [frame.frame_seq, frame.source, frame.mime_type, frame.width, frame.height, frame.timestamp_ms,
            frame.received_at, len(frame.data), digest(frame.data)]


owned: dict = {}
handles: dict = {}
subs: dict = {}
held: dict = {}
consumers: dict = {}


def counters(sub) -> dict:
    return {"dropped": sub.dropped, "delivered": sub.delivered, "qsize": sub.qsize(), "empty": sub.empty(),
            "full": sub.full(), "closed": sub.closed}


class Consumer:
    """Reads one subscription on a thread until it closes (``get()`` or ``async for``),
    sleeping ``delay`` after each frame: a slow reader."""

    def __init__(self, sub, delay: float, mode: str, hold: bool) -> None:
        self.sub = sub
        self.delay = delay
        self.frames: list = []
        self.kept: list = []
        self.hold = hold
        self.error = None
        self.closed_at = None
        self.thread = threading.Thread(target=self.run_async if mode == "async" else self.run, daemon=True)
        self.thread.start()

    def take(self, frame) -> None:
        self.frames.append(describe(frame))
        if self.hold:
            self.kept.append(frame)
        if self.delay:
            time.sleep(self.delay)

    def run(self) -> None:
        try:
            while True:
                try:
                    frame = self.sub.get(timeout=30)
                except SubscriptionClosed:
                    break
                self.take(frame)
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        self.closed_at = time.monotonic()

    def run_async(self) -> None:
        async def main() -> None:
            async for frame in self.sub:
                self.take(frame)

        try:
            asyncio.run(asyncio.wait_for(main(), 30))
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        self.closed_at = time.monotonic()


def drain(sub, hold, limit):
    frames, closed = [], False
    while limit is None or len(frames) < limit:
        try:
            frame = sub.get_nowait()
        except queue.Empty:
            break
        except SubscriptionClosed:
            closed = True
            break
        frames.append(frame)
    if hold is not None:
        held.setdefault(hold, []).extend(frames)
    return [describe(f) for f in frames], closed


def outcome(step):
    try:
        result = step()
    except Exception as exc:
        return type(exc).__name__
    return "ok" if result is None else f"ok:{result}"


def probe(session_id, namespace, h=None):
    """attach (or handle ``h``), latest_visual_frames, visual_stats, closed, a
    subscription's get_nowait and qsize: what each gave, for a segment that may be
    corrupted. Frames are checked against their stamps."""
    if h is None:
        try:
            handle_ = attach(session_id, namespace=namespace)
        except Exception as exc:
            return {"attach": type(exc).__name__}
    else:
        handle_ = handles[h]
    result = {"attach": "ok"}

    def latest():
        frames = handle_.latest_visual_frames(1e9, now=None)
        bad = [f.frame_seq for f in frames if len(f.data) >= 8 and not np.array_equal(
            f.data, stamp(f.frame_seq, len(f.data)))]
        return f"{len(frames)} bad={bad}" if bad else len(frames)

    result["latest"] = outcome(latest)
    result["stats"] = outcome(lambda: sorted(handle_.visual_stats()) and None)
    result["closed"] = outcome(lambda: handle_.closed)
    sub = None

    def subscribe():
        nonlocal sub
        sub = handle_.subscribe_visual_frames(2, policy="drop_oldest")

    result["subscribe"] = outcome(subscribe)
    if sub is not None:
        result["get_nowait"] = outcome(lambda: sub.get_nowait().frame_seq)
        result["qsize"] = outcome(sub.qsize)
        result["counters"] = outcome(lambda: (sub.dropped, sub.delivered, sub.closed) and None)
        sub.close()
    if h is None:
        handle_.close()
    return result


def handle(cmd: str, a: dict):
    if cmd == "ping":
        return os.getpid()
    if cmd == "reset":  # forget every handle, subscription and frame of earlier commands
        for table in (consumers, held, subs, handles):
            table.clear()
        gc.collect()
        return True
    if cmd == "own":  # this process becomes the producer of a shared session
        owned[a["id"]] = Session(a["id"], shared=a["ns"])
        return os.getpid()
    if cmd == "store":  # n stamped frames from frame_seq ``seq`` on: how many were accepted
        session = owned[a["id"]]
        accepted = 0
        for k in range(a["n"]):
            accepted += session.store_frame(stamp(a["seq"] + k, a["nbytes"]), source=a.get("source", "cam"),
                                            max_recent=a.get("max_recent", 2), frame_seq=a["seq"] + k,
                                            width=a.get("width", 0), height=a.get("height", 0))
        return accepted
    if cmd == "stream":  # store frames of changing size on a thread until killed (or n frames)
        session = owned[a["id"]]

        def run():
            for seq in range(1, a["n"] + 1):
                session.store_frame(stamp(seq, 1000 + seq % 5 * 40_000), source="cam", max_recent=2, frame_seq=seq)
                if a.get("pause"):
                    time.sleep(a["pause"])

        threading.Thread(target=run, daemon=True).start()
        return True
    if cmd == "end":
        owned.pop(a["id"])._close()
        return True
    if cmd == "attach":
        handles[a["h"]] = attach(a["id"], namespace=a["ns"], timeout=a.get("timeout"))
        return True
    if cmd == "attach_many":  # as many handles as it can get, up to n: how many it got
        got = []
        for _ in range(a["n"]):
            try:
                got.append(attach(a["id"], namespace=a["ns"]))
            except Exception as exc:
                if type(exc).__name__ != "SharedMemoryError":
                    raise
                break
        for i, h in enumerate(got):
            handles[f"{a['h']}{i}"] = h
        return len(got)
    if cmd == "close_handle":
        handles[a["h"]].close()
        return True
    if cmd == "drop_handle":
        del handles[a["h"]]
        gc.collect()
        return True
    if cmd == "handle_closed":
        return handles[a["h"]].closed
    if cmd == "latest":
        frames = handles[a["h"]].latest_visual_frames(a["ttl"], now=a.get("now"))
        if a.get("hold") is not None:
            held.setdefault(a["hold"], []).extend(frames)
        return [describe(f) for f in frames]
    if cmd == "stats":  # the five in-process counters and what sharing costs
        return dict(handles[a["h"]].visual_stats(), **handles[a["h"]].shared_stats())
    if cmd == "subscribe":
        subs[a["s"]] = handles[a["h"]].subscribe_visual_frames(a["buffer"], policy=a["policy"])
        return counters(subs[a["s"]])
    if cmd == "counters":
        return counters(subs[a["s"]])
    if cmd == "drain":
        return drain(subs[a["s"]], a.get("hold"), a.get("limit"))
    if cmd == "get":
        try:
            return describe(subs[a["s"]].get(timeout=a.get("timeout", 1.0)))
        except queue.Empty:
            return "empty"
        except SubscriptionClosed:
            return "closed"
    if cmd == "close_sub":
        subs[a["s"]].close()
        return True
    if cmd == "drop_sub":
        del subs[a["s"]]
        gc.collect()
        return True
    if cmd == "held":  # the held frames, hashed again now
        return [describe(f) for f in held.get(a["key"], [])]
    if cmd == "release":
        held.pop(a["key"], None)
        gc.collect()
        return True
    if cmd == "consume":
        consumers[a["s"]] = Consumer(subs[a["s"]], a.get("delay", 0.0), a.get("mode", "get"), a.get("hold", False))
        return True
    if cmd == "consumed":  # wait for a consumer to end; its frames, counters, when it ended
        c = consumers[a["s"]]
        c.thread.join(a.get("timeout", 10.0))
        result = {"alive": c.thread.is_alive(), "frames": c.frames, "error": c.error, "closed_at": c.closed_at,
                  **counters(c.sub)}
        if a.get("kept"):
            result["kept"] = [describe(f) for f in c.kept]
        return result
    if cmd == "latest_check":  # latest_visual_frames in a loop for ``seconds``: frames not stamped
        h = handles[a["h"]]
        deadline = time.monotonic() + a["seconds"]
        calls = taken = 0
        bad = []
        while time.monotonic() < deadline and len(bad) < 10:
            frames = h.latest_visual_frames(1e9)
            calls += 1
            taken += len(frames)
            for f in frames:
                if not np.array_equal(f.data, stamp(f.frame_seq, len(f.data))):
                    bad.append(describe(f))
            del frames
        return {"calls": calls, "frames": taken, "bad": bad}
    if cmd == "probe":  # attach and read what is there: each step's outcome, an error by its name
        return probe(a["id"], a["ns"], a.get("h"))
    if cmd == "monotonic":
        return time.monotonic()
    if cmd == "list_shared":
        return shared_mod.list_shared(a["ns"])
    raise ValueError(f"unknown command {cmd!r}")


def main() -> None:
    faulthandler.dump_traceback_later(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0, exit=True)
    faulthandler.register(signal.SIGUSR1)  # ReaderProcess asks for the stacks of a child that hangs
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "exit":
            out.write(json.dumps({"ok": True}) + "\n")
            out.flush()
            break
        try:
            reply = {"ok": handle(cmd, msg)}
        except Exception as exc:
            reply = {"error": type(exc).__name__, "msg": str(exc)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
