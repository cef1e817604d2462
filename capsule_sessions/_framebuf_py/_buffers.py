"""Frame memory: the one copy of a frame's bytes, into a read-only array every reader
shares. The compiled twin's ``_buffers.pxi`` (which also reuses the buffers).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_buffer(data: Any) -> None:
    # Only whether data has the buffer protocol at all (the compiled twin's
    # PyObject_CheckBuffer); the export is released at once so a rejected call leaves
    # the caller's buffer unexported.
    try:
        memoryview(data).release()
    except TypeError:
        raise TypeError(
            "data must support the buffer protocol (bytes, bytearray, memoryview, numpy array), "
            f"got {type(data).__name__}"
        ) from None
    except (ValueError, BufferError):
        pass  # an exporter that refuses: reported by copy_bytes, after the rate check


def copy_bytes(data: Any) -> np.ndarray[tuple[int], np.dtype[np.uint8]]:
    try:
        view = memoryview(data)
    except (ValueError, BufferError) as exc:
        raise TypeError(f"data cannot be read as bytes: {exc}") from None
    with view:
        # tobytes() is the one copy (C order, whatever the strides); frombuffer wraps it
        # read-only without another.
        return np.frombuffer(view.tobytes(), dtype=np.uint8)
