"""Test doubles and payload helpers shared by the test modules (imported, not fixtures)."""

from __future__ import annotations

import threading

import numpy as np


class FakeClock:
    """A clock the test moves by hand: ``clock()`` returns float seconds.

    Thread-safe, so stress tests can read it from many threads while one advances it.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

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
    """The SPEC's promise about a frame the library hands out."""
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
