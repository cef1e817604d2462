"""Test doubles and payload helpers shared by the test modules (imported, not fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import capsule_sessions


class FakeClock:
    """A clock the test moves by hand: ``clock()`` returns float seconds.

    Thread-safe, so stress tests can read it from many threads while one advances it.
    Reentrant: a finalizer that the garbage collector runs while this thread holds the
    lock may read the clock too (the soak's storms do), and must not deadlock on it.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = float(start)
        self._lock = threading.RLock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, instant: float) -> None:
        with self._lock:
            self._now = float(instant)


def payload(seq: int, size: int | None = None) -> bytes:
    """Bytes that can only belong to frame ``seq``: its 8-byte tag repeated.

    The default size varies with ``seq`` so that frames of many sizes flow through a ring.
    """
    if size is None:
        size = 8 * (1 + seq % 17)
    tag = int(seq).to_bytes(8, "little", signed=True)
    return (tag * (size // 8 + 1))[:size]


def seq_of(data) -> int:
    """The frame_seq a payload made by ``payload`` was built for (its first 8 bytes)."""
    return int.from_bytes(bytes(memoryview(data)[:8]), "little", signed=True)


def assert_handed_out(frame) -> None:
    """docs/spec.md's promise about a frame the library hands out."""
    data = frame.data
    assert isinstance(data, np.ndarray)
    assert data.dtype == np.uint8
    assert data.ndim == 1
    assert not data.flags.writeable


def assert_payload_matches(frame) -> None:
    """Every delivered frame carries exactly the bytes stored for its frame_seq."""
    assert bytes(frame.data) == payload(frame.frame_seq), f"frame {frame.frame_seq} carries foreign bytes"


def assert_counts_add_up(summary) -> None:
    """The CLI's --json summary balances: every offer is accepted, rate-limited or
    rejected, and every accepted frame is delivered, dropped or still queued."""
    assert summary["accounting_problems"] == []
    for s in summary["sessions"]:
        assert s["offered"] == s["accepted"] + s["rate_limited"] + s["rejected"]
        for sub in s["subscribers"]:
            assert sub["delivered"] + sub["dropped"] + sub["queued"] == s["accepted"], sub
            assert sub["received"] == sub["delivered"]
            assert sub["integrity_errors"] == 0


# -- child processes, for scenarios that may hang or must start a fresh interpreter ----

PACKAGE_ROOT = Path(capsule_sessions.__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
CHILD_DEADLINE = 60.0  # seconds a child may run before it counts as hung


def child_env(backend: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["CAPSULE_SESSIONS_BACKEND"] = backend
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def start_child(code: str, backend: str, deadline: float = CHILD_DEADLINE) -> subprocess.Popen:
    # The child dumps every thread's stack and exits if it outlives its deadline: a
    # hang shows up as exit code 1 plus stacks, never as a stuck test run.
    prologue = f"import faulthandler; faulthandler.dump_traceback_later({deadline}, exit=True)\n"
    return subprocess.Popen(
        [sys.executable, "-c", prologue + textwrap.dedent(code)],
        env=child_env(backend),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    # wait() then read(), not communicate(): communicate() reads the raw pipes and would
    # lose whatever an earlier readline() left in the text buffer. A child's output is
    # small, so it cannot fill a pipe and block.
    try:
        proc.wait(timeout=CHILD_DEADLINE + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"child hung even past its faulthandler deadline\nstdout:\n{proc.stdout.read()}"
                    f"\nstderr:\n{proc.stderr.read()}")
    return proc.returncode, proc.stdout.read(), proc.stderr.read()



def run_child(code: str, backend: str, timeout: float = CHILD_DEADLINE) -> tuple[int, str, str]:
    """Run ``code`` in a child interpreter on ``backend``: (exit code, stdout, stderr)."""
    return finish(start_child(code, backend, timeout))
