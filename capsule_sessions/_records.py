"""Enums and plain records shared by every layer (the Go package's value types)."""

from __future__ import annotations

import datetime as _dt
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt
    from typing_extensions import Buffer


class SessionState(enum.IntEnum):
    INIT = 0
    CONNECTED = 1
    LISTENING = 2
    PROCESSING = 3
    SPEAKING = 4
    CLOSED = 5

    def __str__(self) -> str:
        return self.name.lower()


class PipelineMode(enum.IntEnum):
    OMNI = 0
    STANDARD = 1
    # Kept as an alias for older callers, exactly like Go's ModeVoiceLLM.
    VOICE_LLM = 0


def rfc3339_from_instant(instant: float, clock: Callable[[], float] | None = None) -> str:
    """Render a clock instant as wall time: wall = now_wall - (clock() - instant)."""
    clock = time.monotonic if clock is None else clock
    wall = time.time() - (clock() - instant)
    text = _dt.datetime.fromtimestamp(wall, tz=_dt.timezone.utc).isoformat()
    return text.replace("+00:00", "Z")


@dataclass
class ChatMessage:
    role: str
    content: str
    timestamp: float | None = None
    turn_seq: int = 0

    def to_dict(self, clock: Callable[[], float] | None = None) -> dict[str, str | int]:
        out: dict[str, str | int] = {"role": self.role, "content": self.content}
        # Go's omitempty: the zero timestamp and turn 0 are left out.
        if self.timestamp is not None:
            out["timestamp"] = rfc3339_from_instant(self.timestamp, clock)
        if self.turn_seq:
            out["turn_seq"] = self.turn_seq
        return out


@dataclass
class DialogContextItem:
    role: str
    text: str
    timestamp: int = 0


class ConversationSnapshot(NamedTuple):
    session_id: str
    character_id: str
    created_at: float
    last_active_at: float
    history: list[ChatMessage]


def frame_bytes(data: Any) -> bytes:
    """The bytes of any buffer-protocol object, as ``np.asarray(data).tobytes()`` gives them."""
    return np.asarray(memoryview(data)).tobytes()


_FIELDS = ("data", "mime_type", "width", "height", "source", "timestamp_ms", "frame_seq", "received_at")
_set = object.__setattr__


class VisualFrame:
    """One video/image frame: an immutable value, as the Go original passes it by value.

    On input ``data`` is any buffer-protocol object. Frames handed out by the library
    carry ``data`` as a read-only 1-D ``numpy.uint8`` array that never changes; both
    backends build frames of this one class. Assigning a field raises
    ``AttributeError``; ``frame.replace(**changes)`` returns a new frame.
    """

    __slots__ = _FIELDS
    # The slots' types, for type checkers (annotations alone make no class attributes, so
    # they do not collide with the slots). data is the caller's buffer as given, or a
    # read-only 1-D uint8 numpy array in a frame the library hands out: Any lets code use
    # either as what it knows it to be (frame.data.dtype), as the README does.
    data: Any
    mime_type: str
    width: int
    height: int
    source: str
    timestamp_ms: int
    frame_seq: int
    received_at: float

    def __init__(
        self,
        # An array is named beside Buffer: numpy's stubs make it one from Python 3.12 on only.
        data: Buffer | np.ndarray[Any, Any] = b"",
        mime_type: str = "",
        width: int = 0,
        height: int = 0,
        source: str = "",
        timestamp_ms: int = 0,
        frame_seq: int = 0,
        received_at: float = 0.0,
    ) -> None:
        # The one way in besides the rings' own factory (which sets the slots the same
        # way from C): a frame's fields are written once, here.
        _set(self, "data", data)
        _set(self, "mime_type", mime_type)
        _set(self, "width", width)
        _set(self, "height", height)
        _set(self, "source", source)
        _set(self, "timestamp_ms", timestamp_ms)
        _set(self, "frame_seq", frame_seq)
        _set(self, "received_at", received_at)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"VisualFrame is immutable: cannot set {name!r} (use frame.replace({name}=...))")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"VisualFrame is immutable: cannot delete {name!r}")

    def replace(self, **changes: Any) -> VisualFrame:
        """A new frame with ``changes`` applied (like ``dataclasses.replace``)."""
        unknown = set(changes).difference(_FIELDS)
        if unknown:
            raise TypeError(f"VisualFrame.replace() got unexpected field(s): {', '.join(sorted(unknown))}")
        values = [changes[name] if name in changes else getattr(self, name) for name in _FIELDS]
        return VisualFrame(*values)

    def __reduce__(self) -> tuple[type[VisualFrame], tuple[object, ...]]:
        # Slots plus a refusing __setattr__ defeat the default copy/pickle protocol.
        return (VisualFrame, tuple(getattr(self, name) for name in _FIELDS))

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes

    def as_array(self, shape: Sequence[int] | None = None, dtype: npt.DTypeLike = np.uint8) -> npt.NDArray[Any]:
        """A read-only view of the bytes as ``dtype``, reshaped to ``shape`` (zero-copy when
        ``data`` is contiguous, which every frame the library hands out is)."""
        view = memoryview(self.data)
        if view.c_contiguous:  # an F-ordered buffer cannot be cast; it is gathered below
            arr = np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view, dtype=dtype)
        else:
            arr = np.frombuffer(frame_bytes(self.data), dtype=dtype)
        arr.flags.writeable = False
        return arr if shape is None else arr.reshape(shape)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VisualFrame):
            return NotImplemented
        for name in _FIELDS[1:]:
            if getattr(self, name) != getattr(other, name):
                return False
        return frame_bytes(self.data) == frame_bytes(other.data)

    # Unhashable although immutable: equality is by bytes, and input data (a bytearray,
    # a writable array) may still change under a frame the caller built.
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        try:
            size = f"{memoryview(self.data).nbytes} bytes"
        except TypeError:
            size = type(self.data).__name__
        return (
            f"VisualFrame(<{size}>, mime_type={self.mime_type!r}, width={self.width}, "
            f"height={self.height}, source={self.source!r}, timestamp_ms={self.timestamp_ms}, "
            f"frame_seq={self.frame_seq}, received_at={self.received_at!r})"
        )
