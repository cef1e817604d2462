"""The sample video the main job makes on first use, and the encoder tests use too.

So the main job runs on a fresh machine with no download and no camera, PyAV encodes a
moving test pattern (1280x720 at 60 fps for 10 s) once and caches it under ``.cache/``
in the current directory, or under ``$CAPSULE_SESSIONS_CACHE``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._extras import require
from ._sources import test_pattern

CACHE_ENV = "CAPSULE_SESSIONS_CACHE"
SAMPLE_WIDTH, SAMPLE_HEIGHT, SAMPLE_FPS, SAMPLE_SECONDS = 1280, 720, 60, 10
SAMPLE_NAME = f"sample-{SAMPLE_WIDTH}x{SAMPLE_HEIGHT}-{SAMPLE_FPS}fps-{SAMPLE_SECONDS}s.mp4"
# H.264 when PyAV's FFmpeg has an encoder for it; MPEG-4 Part 2 is in every build.
PREFERRED_CODECS = ("libx264", "libopenh264", "mpeg4")
CODEC_NAMES = {"libx264": "H.264 (libx264)", "libopenh264": "H.264 (OpenH264)", "mpeg4": "MPEG-4 Part 2 (mpeg4)"}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.cwd() / ".cache")


def pick_codec() -> str:
    av = require("av", "making a video")
    for name in PREFERRED_CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # not in this FFmpeg build
            continue
        return name
    raise RuntimeError("PyAV's FFmpeg has none of the encoders " + ", ".join(PREFERRED_CODECS))


def make_test_video(path: os.PathLike[str] | str, width: int, height: int, fps: int, seconds: float,
                    *, codec: str | None = None, box: bool = True, pix_fmt: str = "yuv420p") -> str:
    """Encode a moving test pattern to ``path``; returns the encoder used.

    Frame i is ``test_pattern(width, height, 4 * i)`` plus a box moving down, so every
    frame differs. The container follows the file name's extension.
    """
    av = require("av", "making a video")
    codec = codec or pick_codec()
    count = max(1, round(fps * seconds))
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            # The sample's picture quality does not matter; first-run time does.
            stream.options = {"preset": "ultrafast", "crf": "23"}
        elif codec == "mpeg4":
            stream.options = {"qscale": "4"}
        side = max(2, min(width, height) // 9)
        base = test_pattern(width, height)
        for i in range(count):
            img = np.roll(base, 4 * i, axis=1)
            if box and height > side:
                y = (i * 6) % (height - side)
                img[y:y + side, width // 6:width // 6 + side] = (255, 128, 0)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def _new_file(directory: Path, prefix: str, suffix: str) -> str:
    """A new empty file in ``directory``, with the mode the umask gives (``mkstemp``
    would make it 0600, and the sample is no secret)."""
    while True:
        path = directory / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return str(path)


def sample_video(log: Callable[[str], None] = lambda text: None) -> str:
    """The cached sample video's path, making it first when it is not there yet."""
    directory = cache_dir()
    path = directory / SAMPLE_NAME
    if path.is_file() and path.stat().st_size > 0:
        return str(path)
    directory.mkdir(parents=True, exist_ok=True)
    codec = pick_codec()
    log(f"making the sample video (first run only): {SAMPLE_WIDTH}x{SAMPLE_HEIGHT} @ {SAMPLE_FPS} fps, "
        f"{SAMPLE_SECONDS} s, {CODEC_NAMES.get(codec, codec)} -> {path}")
    # Encode beside the target and rename: an interrupted first run leaves no half file
    # that a later run would take for the sample.
    tmp = _new_file(directory, ".sample-", ".mp4")
    try:
        make_test_video(tmp, SAMPLE_WIDTH, SAMPLE_HEIGHT, SAMPLE_FPS, SAMPLE_SECONDS, codec=codec)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(path)
