"""A frame loan: writable memory for one frame, filled in place, then committed to the
ring as a frame (or cancelled). The compiled twin's ``_loan.pxi``, which lends a buffer
of the ring's pool and makes it the frame's without a copy; this twin lends a
``bytearray`` and copies it once, at commit.

The views of a loan (``array``, ``as_array``, and whatever is made from them) all
export the bytearray, which counts its exports as ``memoryview.release`` does; a
bytearray refuses to change size while one is alive, and that is how ``_take`` sees
them. (A ``memoryview`` of the bytearray would not do: numpy makes its own view of
the bytearray from a memoryview, so the memoryview's ``release()`` would see none.)
"""

from __future__ import annotations

import abc
import datetime
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn, SupportsIndex

import numpy as np
import numpy.typing as npt

from .. import _validate as v
from ..errors import LOAN_EXPORTED_MESSAGE, LOAN_FINISHED_MESSAGE, LOAN_NOT_BY_HAND_MESSAGE
from ._fork import _fork, _made_by_ring, _refuse_copy, check_not_forked

if TYPE_CHECKING:
    from ._ring import FrameRing


def lend(nbytes: int) -> bytearray:
    try:
        return bytearray(nbytes)
    except MemoryError:
        raise MemoryError(f"cannot allocate a {nbytes}-byte frame buffer") from None


class FrameLoan(metaclass=abc.ABCMeta):
    """Writable memory for one frame, from ``Session.loan_frame(nbytes)``: write the
    frame into ``array`` or ``as_array(shape)``, drop those views, then ``commit(...)``
    it as ``store_frame`` would store it, or ``cancel()``. Leaving a ``with`` block
    without a commit cancels, and so does dropping the loan.

    This is ``capsule_sessions.FrameLoan`` on both backends: the compiled twin's class is
    registered as a virtual subclass (``_backend``), so ``isinstance`` holds for either.
    """

    __slots__ = ("_ring", "_nbytes", "_memory", "_lock", "_fork_gen")
    _ring: FrameRing
    _nbytes: int
    _memory: bytearray | None
    _lock: threading.RLock
    _fork_gen: int

    def __new__(cls, *args: Any, **kwargs: Any) -> FrameLoan:
        ring, nbytes = _made_by_ring(args, kwargs, LOAN_NOT_BY_HAND_MESSAGE)
        loan = super().__new__(cls)
        loan._ring = ring
        loan._nbytes = nbytes
        loan._memory = lend(nbytes)
        loan._lock = threading.RLock()
        loan._fork_gen = _fork.generation
        return loan

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        # Two loans of one memory would commit it twice.
        _refuse_copy(self, protocol)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """The loan's memory as a writable 1-D uint8 array: a new view on every read, that
        must be gone before ``commit()``. ValueError once the loan is finished."""
        check_not_forked(self._fork_gen)  # before the lock, which a forked child may find held
        with self._lock:
            return np.frombuffer(self._check_open(), dtype=np.uint8)

    def as_array(self, shape: int | Sequence[int], dtype: npt.DTypeLike = np.uint8) -> npt.NDArray[Any]:
        """A writable view of the loan's memory as ``dtype`` with ``shape``, which must
        cover the ``nbytes`` exactly (ValueError naming ``shape`` otherwise)."""
        self._check_open()
        # Checked before a view exists: a refused call leaves nothing exported (not even
        # in its traceback).
        dims, kind = v.view_layout(shape, dtype, self._nbytes)
        return self.array.view(kind).reshape(dims)

    def commit(
        self,
        *,
        source: str,
        max_recent: int,
        min_interval: float | datetime.timedelta = 0.0,
        mime_type: str = "",
        width: int = 0,
        height: int = 0,
        timestamp_ms: int = 0,
        frame_seq: int = 0,
        now: float | None = None,
    ) -> bool:
        """Store the loan's bytes as one frame, as ``store_frame`` would store them: the
        same arguments, checks, errors and result (False when rate-limited). Afterwards
        the loan is finished, rate-limited or not. A bad argument, or a view of the loan
        still alive (BufferError), leaves it open."""
        self._check_open()
        return self._ring._store_loan(self, source, max_recent, min_interval, mime_type, width, height,
                                      timestamp_ms, frame_seq, now)

    def cancel(self) -> None:
        """Give the memory back, storing nothing. A finished loan stays as it is."""
        check_not_forked(self._fork_gen)
        with self._lock:
            self._memory = None

    def __enter__(self) -> FrameLoan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def _check_open(self) -> bytearray:
        check_not_forked(self._fork_gen)
        memory = self._memory
        if memory is None:
            raise ValueError(LOAN_FINISHED_MESSAGE)
        return memory

    def _take(self) -> bytearray:
        """The loan's memory, for a commit: the loan is finished from here on. ValueError
        when it is already, BufferError (and the loan stays open) while a view of it is
        alive."""
        check_not_forked(self._fork_gen)
        with self._lock:
            memory = self._check_open()
            # Resizing checks the exports and changes nothing else: pop and append back
            # the last byte (an empty loan: append and pop one), with no reallocation.
            try:
                if memory:
                    memory.append(memory.pop())
                else:
                    memory.append(0)
                    memory.pop()
            except BufferError:
                raise BufferError(LOAN_EXPORTED_MESSAGE) from None
            self._memory = None
            return memory

    def __repr__(self) -> str:
        state = "open" if self._memory is not None else "finished"
        return f"<FrameLoan {state} nbytes={self._nbytes}>"
