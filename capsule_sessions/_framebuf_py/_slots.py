"""The ring's own record of one stored frame. The compiled twin's ``Slot`` (declared in
``_framebuf.pxd``, kept in the circular array of ``_slots.pxi``); here the ring keeps
its slots in a deque.
"""

from __future__ import annotations

from .._records import VisualFrame


class _Slot:
    """One stored frame as the ring books it: its bookkeeping never reads fields of a
    frame it has handed out (a reader cannot change the ring's books by editing one)."""

    __slots__ = ("frame", "nbytes", "received_ns")

    def __init__(self, frame: VisualFrame, nbytes: int, received_ns: int) -> None:
        self.frame = frame
        self.nbytes = nbytes
        self.received_ns = received_ns
