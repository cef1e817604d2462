"""Frame sources for the main job: the synthetic generator, video files/URLs and v4l2
cameras (both decoded with PyAV).

A source yields ``(rgb, t)``: a C-contiguous ``(height, width, 3)`` uint8 array and its
stream time in seconds. Everything that can go wrong with one source is a
``SourceError`` whose text is one line for the user.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._errors import SourceError, UsageError
from ._extras import require

_SYNTHETIC = re.compile(r"^synthetic:(\d+)x(\d+)@(\d+(?:\.\d+)?)$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# Bars in the classic test-card order; a moving pattern that compresses like real video.
_BARS = np.array(
    [[235, 235, 235], [235, 235, 16], [16, 235, 235], [16, 235, 16],
     [235, 16, 235], [235, 16, 16], [16, 16, 235], [16, 16, 16]], dtype=np.uint16)


def fit(width: int, height: int, max_width: int | None, max_height: int | None) -> tuple[int, int]:
    """The size to send: scaled down (aspect kept) to fit the maxima, never up."""
    scale = 1.0
    if max_width and width > max_width:
        scale = min(scale, max_width / width)
    if max_height and height > max_height:
        scale = min(scale, max_height / height)
    if scale == 1.0:
        return width, height
    return max(1, int(width * scale)), max(1, int(height * scale))


def test_pattern(width: int, height: int, shift: int = 0) -> np.ndarray:
    """Colour bars with a vertical ramp, rolled ``shift`` columns to the right."""
    cols = (np.arange(width) * len(_BARS)) // width
    ramp = (np.arange(height, dtype=np.uint16) * 191) // max(1, height - 1) + 64
    img = (_BARS[cols][None, :, :] * ramp[:, None, None]) >> 8
    return np.ascontiguousarray(np.roll(img.astype(np.uint8), shift, axis=1))


class Source:
    """The interface the producer uses. Subclasses fill in the stream facts in open()."""

    kind = "source"
    live = False  # True: no end of its own; runs for the run's --seconds
    stamped = False  # True: frames of 8+ bytes carry their index in their first 8 bytes

    def __init__(self, label: str) -> None:
        self.label = label
        self.width = 0
        self.height = 0
        self.native_size: tuple[int, int] | None = None
        self.fps = 0.0
        self.codec = ""
        self.expected_frames: int | None = None

    def open(self, max_width: int | None = None, max_height: int | None = None) -> None:
        raise NotImplementedError

    def frames(self) -> Iterator[tuple[np.ndarray, float]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        size = f"{self.width}x{self.height}"
        if self.native_size and self.native_size != (self.width, self.height):
            size = f"{self.native_size[0]}x{self.native_size[1]} scaled to {size}"
        parts = [self.codec or self.kind, size]
        if self.fps:
            parts.append(f"@ {self.fps:g} fps")
        text = " ".join(parts)
        if self.expected_frames is not None:
            text += f", {self.expected_frames} frames"
        return text


class SyntheticSource(Source):
    """A simulated camera: ``count`` frames of a moving test pattern at ``fps``.

    A few frames are made up front and reused, each stamped with its frame index in its
    first 8 bytes, so producing a frame costs almost nothing and a consumer can check
    that the bytes it got are the ones stored for that frame_seq.
    """

    kind = "synthetic"
    stamped = True
    PRECOMPUTED = 4

    def __init__(self, label: str, width: int, height: int, fps: float, count: int, *, offset: int = 0) -> None:
        super().__init__(label)
        self.native_size = (width, height)
        self.fps = fps
        self.count = count
        self.offset = offset
        self.expected_frames = count
        self.codec = "synthetic"
        self._frames: list[np.ndarray] = []

    @classmethod
    def parse(cls, spec: str, seconds: float, *, offset: int = 0) -> SyntheticSource:
        match = _SYNTHETIC.match(spec)
        if not match:
            raise UsageError(f"bad source {spec!r}: expected synthetic:WxH@FPS, e.g. synthetic:1280x720@60")
        width, height, fps = int(match[1]), int(match[2]), float(match[3])
        check_size(width, height, spec)
        if not 0 < fps <= 10_000:
            raise UsageError(f"bad source {spec!r}: FPS must be in (0, 10000]")
        return cls(spec, width, height, fps, max(1, round(fps * seconds)), offset=offset)

    def open(self, max_width: int | None = None, max_height: int | None = None) -> None:
        assert self.native_size is not None
        self.width, self.height = fit(*self.native_size, max_width, max_height)
        step = max(1, self.width // (2 * self.PRECOMPUTED))
        self._frames = [test_pattern(self.width, self.height, self.offset * 37 + k * step)
                        for k in range(self.PRECOMPUTED)]

    def frames(self) -> Iterator[tuple[np.ndarray, float]]:
        frames = self._frames
        k = len(frames)
        stamp = self.width * self.height * 3 >= 8  # room for the 8-byte stamp
        headers = [f.reshape(-1)[:8].view("<u8") for f in frames] if stamp else []
        for i in range(self.count):
            if stamp:
                headers[i % k][0] = i  # the store copies the bytes, so reuse is safe
            yield frames[i % k], i / self.fps


def check_size(width: int, height: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise UsageError(f"bad size in {what!r}: width and height must be >= 1")
    if width > 16384 or height > 16384:
        raise UsageError(f"bad size in {what!r}: at most 16384 pixels on a side")


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.rstrip(".")


class VideoSource(Source):
    """A video file or URL, decoded by PyAV (FFmpeg), converted to RGB."""

    kind = "video"

    def __init__(self, label: str, path: str, *, input_format: str | None = None) -> None:
        super().__init__(label)
        self.path = path
        self.input_format = input_format
        self._container: Any = None
        self._stream: Any = None
        self._av: Any = None

    @property
    def is_url(self) -> bool:
        return bool(_URL.match(self.path))

    def _check_exists(self) -> None:
        if not os.path.exists(self.path):
            raise SourceError(f"no such file: {self.path}")
        if os.path.isdir(self.path):
            raise SourceError(f"is a directory, not a video file: {self.path}")

    def _open_container(self) -> Any:
        av = self._av
        try:
            return av.open(self.path, format=self.input_format, timeout=10.0)
        except FileNotFoundError:
            raise SourceError(f"no such file: {self.path}") from None
        except PermissionError:
            raise SourceError(f"permission denied: {self.path}") from None
        except av.error.InvalidDataError:
            raise SourceError("corrupt or not a video FFmpeg can read (invalid data)") from None
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open: {_reason(exc)}") from None

    def open(self, max_width: int | None = None, max_height: int | None = None) -> None:
        self._av = require("av", f"reading {self.label}")
        if not self.is_url:
            self._check_exists()
        container = self._container = self._open_container()
        if not container.streams.video:
            raise SourceError("no video stream in it")
        stream = self._stream = container.streams.video[0]
        if stream.codec_context is None:
            raise SourceError("unsupported codec: this FFmpeg build has no decoder for its video stream")
        stream.thread_type = "AUTO"
        ctx = stream.codec_context
        self.codec = ctx.name
        self.native_size = (ctx.width, ctx.height)
        if ctx.width <= 0 or ctx.height <= 0:
            raise SourceError(f"unsupported video: {ctx.name} stream has no frame size")
        self.width, self.height = fit(ctx.width, ctx.height, max_width, max_height)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = float(rate) if rate else 0.0
        self.expected_frames = self._expected_frames(container, stream)

    def _expected_frames(self, container: Any, stream: Any) -> int | None:
        if self.live:
            return None
        if stream.frames:
            return int(stream.frames)
        seconds = None
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / 1_000_000  # AV_TIME_BASE
        if seconds and self.fps:
            return int(math.floor(seconds * self.fps + 0.5))
        return None

    def frames(self) -> Iterator[tuple[np.ndarray, float]]:
        av = self._av
        scale = self.native_size != (self.width, self.height)
        fps = self.fps or 30.0
        n = 0
        try:
            for frame in self._container.decode(self._stream):
                if scale:
                    frame = frame.reformat(width=self.width, height=self.height, format="rgb24")
                # FFmpeg pads rows to an alignment; such a view is made contiguous here
                # (one copy, only for odd widths) so every consumer gets plain pixels.
                rgb = np.ascontiguousarray(frame.to_ndarray(format="rgb24"))
                t = frame.time
                yield rgb, (n / fps if t is None else float(t))
                n += 1
        except av.error.FFmpegError as exc:
            of = f" of {self.expected_frames}" if self.expected_frames else ""
            raise SourceError(f"ended early after {n}{of} frames: decode error ({_reason(exc)})") from None

    def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # closing a half-read container must not hide the real error
                pass


class CameraSource(VideoSource):
    """A local camera through PyAV's v4l2 input (Linux)."""

    kind = "camera"
    live = True

    def __init__(self, label: str, device: str) -> None:
        super().__init__(label, device, input_format="v4l2")

    def _check_exists(self) -> None:
        if not os.path.exists(self.path):
            raise SourceError(f"no camera at {self.path} (no such device)")

    def open(self, max_width: int | None = None, max_height: int | None = None) -> None:
        av = self._av = require("av", f"reading camera {self.path}")
        if not any("v4l2" in name.split(",") for name in av.formats_available):
            raise SourceError("this FFmpeg build has no v4l2 (camera) input")
        super().open(max_width, max_height)


def is_camera(spec: str) -> bool:
    return spec.startswith("/dev/video") or spec.startswith("v4l2:")


def parse_source(spec: str, *, seconds: float, index: int = 0,
                 sample_path: Callable[[], str] | None = None) -> Source:
    """A Source for one SOURCE argument (UsageError when it cannot mean anything)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("a SOURCE must not be empty")
    if spec.startswith("synthetic:") or spec == "synthetic":
        return SyntheticSource.parse(spec, seconds, offset=index)
    if spec == "sample":
        if sample_path is None:
            raise UsageError("the sample video is not available here")
        return VideoSource("sample", sample_path())
    if is_camera(spec):
        return CameraSource(spec, spec[len("v4l2:"):] if spec.startswith("v4l2:") else spec)
    return VideoSource(spec, spec)
