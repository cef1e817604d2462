"""What a frame must be to be stored: ``VisualInputConfig`` and the checks the Go server
applies to a frame before storing it (``check_frame``). The public name is
``capsule_sessions.ingest``; this module sits below the session, which uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _validate as v
from ._limits import INT32_MAX, INT32_MIN
from ._records import VisualFrame

JPEG_MAGIC = b"\xff\xd8\xff"
RAW_CHANNELS = {
    "video/x-raw-gray": 1,
    "video/x-raw-rgb": 3,
    "video/x-raw-bgr": 3,
    "video/x-raw-rgba": 4,
    "video/x-raw-bgra": 4,
}


@dataclass(frozen=True)
class VisualInputConfig:
    """The ingest policy. Defaults are the Go server's."""

    frame_interval: float = 1.0
    max_width: int = 1280
    max_height: int = 720
    max_frame_bytes: int = 1_048_576
    max_recent_frames: int = 2
    frame_ttl: float = 10.0
    mime_types: tuple[str, ...] = ("image/jpeg",)

    def __post_init__(self) -> None:
        v.duration_ns(self.frame_interval, "frame_interval")
        v.duration_ns(self.frame_ttl, "frame_ttl")
        for name in ("max_width", "max_height", "max_frame_bytes"):
            if v.integer(getattr(self, name), name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        v.count(self.max_recent_frames, "max_recent_frames")
        if isinstance(self.mime_types, str):
            raise TypeError("mime_types must be a sequence of str, not a single str")
        try:
            mime_types = tuple(self.mime_types)
        except TypeError:
            raise TypeError(f"mime_types must be a sequence of str, got {type(self.mime_types).__name__}") from None
        mime_types = tuple(v.text(mime, "mime_types[]") for mime in mime_types)
        object.__setattr__(self, "mime_types", mime_types)


def _head(view: memoryview, n: int) -> bytes:
    try:
        return view.cast("B")[:n].tobytes()
    except TypeError:  # not C-contiguous: gather (ingest of such input is rare)
        return view.tobytes()[:n]


def check_frame(frame: Any, config: Any) -> None:
    """Raise ValueError/TypeError naming what ``frame`` breaks in ``config``; else None."""
    if not isinstance(frame, VisualFrame):
        raise TypeError(f"frame must be a VisualFrame, got {type(frame).__name__}")
    if not isinstance(config, VisualInputConfig):
        raise TypeError(f"config must be a VisualInputConfig, got {type(config).__name__}")
    mime = frame.mime_type
    if isinstance(mime, str):
        mime = str.__str__(mime)  # its contents decide, not a subclass's __eq__/__hash__
    if mime not in config.mime_types:
        raise ValueError(f"mime_type {mime!r} is not allowed (allowed: {', '.join(config.mime_types)})")
    width = v.integer(frame.width, "width", INT32_MIN, INT32_MAX)
    height = v.integer(frame.height, "height", INT32_MIN, INT32_MAX)
    if not 0 < width <= config.max_width:
        raise ValueError(f"width must be in 1..{config.max_width}, got {width}")
    if not 0 < height <= config.max_height:
        raise ValueError(f"height must be in 1..{config.max_height}, got {height}")
    try:
        view = memoryview(frame.data)
    except TypeError:
        raise TypeError(f"data must support the buffer protocol, got {type(frame.data).__name__}") from None
    with view:
        size = view.nbytes
        if size == 0:
            raise ValueError("data is empty")
        if size > config.max_frame_bytes:
            raise ValueError(f"data is {size} bytes, over max_frame_bytes={config.max_frame_bytes}")
        if mime == "image/jpeg" and _head(view, 3) != JPEG_MAGIC:
            raise ValueError("data is not a JPEG (it must start with FF D8 FF)")
    channels = RAW_CHANNELS.get(mime)
    if channels is not None and size != width * height * channels:
        raise ValueError(
            f"data is {size} bytes, but {mime} at {width}x{height} needs {width * height * channels}"
        )
