"""A latency histogram with log-spaced bins.

A consumer records every frame it receives, for runs of any length, so the recorder must
cost O(1) per sample and bounded memory: fixed bins from 1 µs to 100 s, 50 per decade
(each bin ~4.7 % wide), which is precise enough for a p50/p99 shown in milliseconds.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable

import numpy as np

LOW = 1e-6
HIGH = 100.0
BINS_PER_DECADE = 50
EDGES: list[float] = [
    float(x) for x in np.geomspace(LOW, HIGH, int(round(math.log10(HIGH / LOW))) * BINS_PER_DECADE + 1)
]


class LatencyHistogram:
    """Counts of seconds in log bins: bin 0 is below LOW, the last bin is HIGH and above.

    One thread records; another may read at any time (a reading is a snapshot that may
    miss the sample being recorded, which is fine for a live display).
    """

    __slots__ = ("counts", "count", "total", "min", "max")

    def __init__(self) -> None:
        self.counts = [0] * (len(EDGES) + 1)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def record(self, seconds: float) -> None:
        # A negative latency cannot happen with one monotonic clock; clamp rather than
        # lose the sample if an injected clock is coarse.
        if seconds < 0.0:
            seconds = 0.0
        self.counts[bisect.bisect_right(EDGES, seconds)] += 1
        self.count += 1
        self.total += seconds
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: LatencyHistogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @classmethod
    def merged(cls, parts: Iterable[LatencyHistogram]) -> LatencyHistogram:
        out = cls()
        for part in parts:
            out.merge(part)
        return out

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100): the geometric middle of the bin holding that rank,
        clamped to the observed min and max. None when nothing was recorded."""
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"q must be in 0..100, got {q}")
        counts = list(self.counts)  # a consistent copy while another thread records
        total = sum(counts)
        if total == 0:
            return None
        rank = max(1, math.ceil(q / 100.0 * total))
        i = bisect.bisect_left(list(itertools.accumulate(counts)), rank)  # the bin holding that rank
        if i == 0:  # below the first edge: the smallest sample is the best estimate
            value = self.min
        elif i >= len(EDGES):  # above the last edge: likewise the largest
            value = self.max
        else:
            value = math.sqrt(EDGES[i - 1] * EDGES[i])
        return min(max(value, self.min), self.max)

    def nonzero_bins(self) -> tuple[list[float], list[float], list[int]]:
        """(lower edges, upper edges, counts) of the bins that hold samples, for plotting."""
        lows: list[float] = []
        highs: list[float] = []
        counts: list[int] = []
        for i, n in enumerate(self.counts):
            if n:
                lows.append(EDGES[i - 1] if i > 0 else 0.0)
                highs.append(EDGES[i] if i < len(EDGES) else HIGH * 10)
                counts.append(n)
        return lows, highs, counts
