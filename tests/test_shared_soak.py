"""Soak of a shared session: a producer stores frames of changing sizes without pause
while reader processes attach, subscribe, hold frames, and exit or are SIGKILLed, over
and over. The producer never fails or stalls, its RSS and the session's shared memory
stay flat, every reader's frames are intact, and nothing is left in /dev/shm.

Runs for a sixth of CAPSULE_SESSIONS_SOAK_SECONDS (10 s by default, 100 s under
``make soak``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

import capsule_sessions as cs
from support import child_env

shm = pytest.importorskip("capsule_sessions._shm")

SOAK_SECONDS = float(os.environ.get("CAPSULE_SESSIONS_SOAK_SECONDS", "60")) / 6
READERS_AT_ONCE = 4
SIZES = [4096, 65536, 300_000, 1_000_000, 2_764_800]  # up to 1280x720 RGB
# The producer's RSS may grow by its working set after warm-up, not with time.
RSS_TOLERANCE_BYTES = 64 << 20
# Data segments at any moment: ring + queues + leases of live readers + spares.
MAX_SEGMENTS = 2 + READERS_AT_ONCE * (4 + shm.LEASE_BUDGET) + 8

pytestmark = [pytest.mark.soak, pytest.mark.cython, pytest.mark.timeout(int(SOAK_SECONDS + 120))]

READER = textwrap.dedent("""
    import sys, time, queue
    import capsule_sessions as cs
    namespace, hold, policy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cam = cs.attach("cam", namespace=namespace, timeout=10)
    sub = cam.subscribe_visual_frames(4, policy=policy)
    held, bad, got = [], 0, 0
    print("ready", flush=True)
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        try:
            f = sub.get(timeout=0.5)
        except (queue.Empty, cs.SubscriptionClosed):
            break
        got += 1
        d = f.data
        stamp = f.frame_seq % 251
        if d[0] != stamp or d[len(d) // 2] != stamp or d[-1] != stamp:
            bad += 1
        if len(held) < hold:
            held.append(f)
        del f, d
        for f in cam.latest_visual_frames(10):
            d = f.data
            if d[0] != f.frame_seq % 251 or d[-1] != f.frame_seq % 251:
                bad += 1
            del d
        time.sleep(0.002)
    for f in held:  # held across the whole run: must not have changed
        if f.data[0] != f.frame_seq % 251 or f.data[-1] != f.frame_seq % 251:
            bad += 1
    print(got, bad, sub.dropped, sub.delivered, flush=True)
""")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ours(namespace: str) -> list[str]:
    return [e for e in os.listdir("/dev/shm") if e.startswith(f"capsule.{namespace}.")]


def test_readers_come_and_go_while_the_producer_stores(tmp_path):
    namespace = f"soak-{uuid.uuid4().hex[:12]}"
    frames = {size: [np.full(size, seq, np.uint8) for seq in range(251)] for size in SIZES}
    env = child_env("cython")
    readers: list[tuple[subprocess.Popen, bool]] = []
    results, killed, started = [], 0, 0
    peak_segments = 0
    try:
        with cs.SessionManager(2, shared=namespace, backend="cython", cleanup_interval=None) as manager:
            cam = manager.create("cam")
            seq = 0
            warm_rss = None
            begin = time.monotonic()
            while time.monotonic() - begin < SOAK_SECONDS:
                size = SIZES[(seq // 200) % len(SIZES)]  # a resolution change every 200 frames
                assert cam.store_frame(frames[size][seq % 251], source="cam", max_recent=2, frame_seq=seq)
                seq += 1
                if seq % 50 == 0:
                    readers = _turn_over(readers, results, namespace, env, seq)
                    started = max(started, seq // 50)
                    peak_segments = max(peak_segments, sum(1 for e in ours(namespace) if e.count(".") == 4))
                    assert peak_segments <= MAX_SEGMENTS, cam.shared_stats()
                if warm_rss is None and time.monotonic() - begin > SOAK_SECONDS / 4:
                    warm_rss = rss_bytes()
            killed = sum(1 for r in results if r is None)
            for proc, _ in readers:
                proc.kill()
                proc.wait()
            readers = []
            # Killed readers are reclaimed by the next stores.
            deadline = time.monotonic() + 5
            while cam.shared_stats()["readers"] > 1 and time.monotonic() < deadline:
                cam.store_frame(frames[4096][0], source="cam", max_recent=2, frame_seq=seq)
                time.sleep(0.05)
            assert cam.shared_stats()["readers"] == 1 and cam.shared_stats()["subscriptions"] == 0
            assert rss_bytes() - warm_rss < RSS_TOLERANCE_BYTES
        assert ours(namespace) == []
    finally:
        for proc, _ in readers:
            proc.kill()
            proc.wait()
        for entry in ours(namespace):
            os.unlink(f"/dev/shm/{entry}")
    finished = [r for r in results if r is not None]
    print(f"soak: {seq} frames stored, {len(finished)} readers finished, {killed} killed, "
          f"peak {peak_segments} data segments")
    assert finished and killed, (len(finished), killed)
    for got, bad, _dropped, delivered in finished:
        assert bad == 0
        assert delivered == got


def _turn_over(readers, results, namespace, env, seq):
    """Collect finished readers, SIGKILL one now and then, start new ones up to the limit."""
    alive = []
    for proc, doomed in readers:
        if doomed and proc.poll() is None and seq % 150 == 0:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            results.append(None)
        elif proc.poll() is not None:
            out = proc.stdout.read().split("\n")
            assert proc.returncode == 0, (proc.returncode, out, proc.stderr.read())
            results.append(tuple(int(x) for x in out[1].split()))
        else:
            alive.append((proc, doomed))
    while len(alive) < READERS_AT_ONCE:
        n = len(results) + len(alive)
        proc = subprocess.Popen([sys.executable, "-c", READER, namespace, str(n % 8),
                                 "drop_oldest" if n % 2 else "drop_newest"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        alive.append((proc, n % 3 == 0))
    return alive
