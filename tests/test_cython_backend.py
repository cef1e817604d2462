"""What the compiled backend promises beyond the shared contract: the GIL is released
during the copy of a large frame. (What every backend promises is tested on every
backend, in the file named for it: held frames in test_held_frames.py, memory in
test_memory.py.)
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from capsule_sessions import Session, _backend, available_backends
from support import FakeClock

needs_cython = pytest.mark.skipif(
    "cython" not in available_backends(),
    reason=f"the Cython backend is not available here: {_backend._cython_import_error}",
)
pytestmark = pytest.mark.usefixtures("deadlock_watchdog")

MB = 1 << 20


# -- the GIL --------------------------------------------------------------------------


@needs_cython
@pytest.mark.cython
def test_gil_is_released_while_a_64mb_frame_is_copied():
    """Another Python thread makes progress *during* the copy, shown by the copied bytes.

    The other thread counts up and writes its counter into two words of the source
    buffer 62 MiB apart: first word A, then word B. A copy made while no Python code
    runs (the GIL held) sees a single instant, in which B == A or B == A - 1. Any other
    pair in the stored frame means the counter thread wrote between the copy reading
    one word and reading the other, i.e. it ran during the copy, whatever order the
    copy goes in. No clock or timing threshold is involved. (With the pure backend,
    whose copy holds the GIL, every stored pair is consistent.)
    """
    source = np.zeros(64 * MB, dtype=np.uint8)
    words = source.view(np.uint64)
    first, second = MB // 8, len(words) - MB // 8
    stop = threading.Event()
    progress = [0]

    def count():
        i = 0
        while not stop.is_set():
            i += 1
            words[first] = i
            words[second] = i
        progress[0] = i

    session = Session("gil", clock=FakeClock(), backend="cython")
    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    overlaps = 0
    try:
        for _ in range(30):
            assert session.store_frame(source, source="cam", max_recent=1)
            [frame] = session.latest_visual_frames(10.0)
            stored = frame.data.view(np.uint64)
            a, b = int(stored[first]), int(stored[second])
            if not a - 1 <= b <= a:
                overlaps += 1
                if overlaps >= 2:
                    break
    finally:
        stop.set()
        counter.join(30)
    assert not counter.is_alive()
    assert progress[0] > 0
    assert overlaps >= 2, "the counter thread never ran while a 64 MB frame was being copied"
