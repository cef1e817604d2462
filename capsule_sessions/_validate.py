"""Argument checks and time conversions shared by the pure backend and the session layer.

The Cython backend takes C fast paths for the common exact types and calls these for
the rest (its ``_args.pxi``); the differential tests under ``tests/`` hold both to
them. Time is kept as int64 nanoseconds so that both backends compare instants exactly
alike: ``ns = int(seconds * 1e9)`` (the product rounded as a C double, then
truncated toward zero, which is what a C cast does).
"""

from __future__ import annotations

import datetime as _dt
import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from ._limits import INT32_MAX, INT64_MAX, INT64_MIN, MAX_COUNT, MAX_INSTANT_SECONDS, MAX_NDIM

POLICIES = ("drop_newest", "drop_oldest")


def _real(value: Any, name: str) -> float:
    # The number's own value: float(value) and value.total_seconds() would run a
    # subclass's __float__ / total_seconds, which may say anything.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, _dt.timedelta):
            return _dt.timedelta.total_seconds(value)
        raise TypeError(f"{name} must be a float number of seconds or a timedelta, got {type(value).__name__}")
    if isinstance(value, float):
        return float.__float__(value)
    try:
        return int.__float__(value)
    except OverflowError:  # an int beyond any float; copysign would overflow on it too
        return math.inf if operator.index(value) > 0 else -math.inf


def instant(value: Any, name: str = "now") -> tuple[float, int]:
    """An instant as (float seconds, int ns); finite and within +-MAX_INSTANT_SECONDS."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float instant in seconds, got {type(value).__name__}")
    seconds = _real(value, name)
    if not math.isfinite(seconds):
        raise ValueError(f"{name} must be finite, got {seconds!r}")
    if abs(seconds) >= MAX_INSTANT_SECONDS:
        raise ValueError(f"{name} is out of range (|{name}| must be < {MAX_INSTANT_SECONDS:.0f} s)")
    return seconds, int(seconds * 1e9)


def duration_ns(value: Any, name: str) -> int:
    """A duration in int ns; infinities and huge values clamp to the int64 range."""
    seconds = _real(value, name)
    if math.isnan(seconds):
        raise ValueError(f"{name} must not be NaN")
    scaled = seconds * 1e9
    if scaled >= 9.223372036854775e18:
        return INT64_MAX
    if scaled <= -9.223372036854775e18:
        return -INT64_MAX
    return int(scaled)


def duration_seconds(value: Any, name: str) -> float:
    """A duration in float seconds, for comparisons made outside the ring: NaN is an
    error; an int too big for a float becomes +-inf, which compares without overflow."""
    seconds = _real(value, name)
    if math.isnan(seconds):
        raise ValueError(f"{name} must not be NaN")
    return seconds


def timeout_seconds(value: Any, name: str = "timeout") -> float | None:
    """A blocking timeout: None waits forever; negative or NaN is an error (like queue.Queue)."""
    if value is None:
        return None
    seconds = _real(value, name)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds or None, got {value!r}")
    # Past ~146 years a wait is forever; a deadline that far out overflows threading's
    # time_t (OverflowError) and the compiled twin's int64 ns deadline (an instant Empty).
    return None if seconds >= MAX_INSTANT_SECONDS else seconds


def integer(value: Any, name: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not low <= number <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {number}")
    return number


def count(value: Any, name: str) -> int:
    """A bound like max_recent/buffer: Go treats <= 0 as 1; huge values clamp."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    return 1 if number <= 0 else min(number, MAX_COUNT)


def text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    # An exact str of the contents, so a subclass's hooks never run inside the ring;
    # str(value) would be whatever the subclass's __str__ returns.
    return str.__str__(value)


def policy(value: Any) -> str:
    checked = text(value, "policy")
    if checked not in POLICIES:
        raise ValueError(f"policy must be 'drop_newest' or 'drop_oldest', got {checked!r}")
    return checked


def clock(value: Callable[[], float]) -> Callable[[], float]:
    if not callable(value):
        raise TypeError(f"clock must be a callable returning float seconds, got {type(value).__name__}")
    return value


def frame_fields(data: Any, mime_type: Any, width: Any, height: Any, timestamp_ms: Any,
                 frame_seq: Any) -> tuple[str, int, int, int, int]:
    """The described fields of a stored frame: (mime_type, width, height, timestamp_ms,
    frame_seq). An image array describes itself when width or height is 0:
    height, width = shape[:2]."""
    mime_type = text(mime_type, "mime_type")
    width = integer(width, "width", 0, INT32_MAX)
    height = integer(height, "height", 0, INT32_MAX)
    if (width == 0 or height == 0) and isinstance(data, np.ndarray) and data.ndim >= 2:
        height = height or min(data.shape[0], INT32_MAX)
        width = width or min(data.shape[1], INT32_MAX)
    return mime_type, width, height, integer(timestamp_ms, "timestamp_ms"), integer(frame_seq, "frame_seq")


def _dimension(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("shape must hold ints, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"shape must hold ints, got {type(value).__name__}") from None
    if number < 0:
        raise ValueError(f"shape must not have a negative dimension, got {number}")
    return number


def view_layout(shape: Any, dtype: Any, nbytes: int) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape (a tuple of ints) and dtype of a view of exactly ``nbytes`` bytes, as
    ``FrameLoan.as_array`` takes them: an int or a sequence of ints, and anything
    ``numpy.dtype`` accepts, without Python objects or sub-arrays."""
    try:
        kind = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be a numpy dtype, got {dtype!r} ({exc})") from None
    if kind.hasobject or kind.itemsize == 0 or kind.subdtype is not None:
        raise ValueError(f"dtype must be a fixed-size type without Python objects or sub-arrays, got {kind}")
    if isinstance(shape, bool):
        raise TypeError("shape must be an int or a sequence of ints, got bool")
    try:
        dims: tuple[int, ...] = (operator.index(shape),)
    except TypeError:
        try:
            items = list(shape)
        except TypeError:
            raise TypeError(f"shape must be an int or a sequence of ints, got {type(shape).__name__}") from None
        dims = tuple(_dimension(item) for item in items)
    else:
        dims = (_dimension(dims[0]),)
    if len(dims) > MAX_NDIM:
        raise ValueError(f"shape must have at most {MAX_NDIM} dimensions, got {len(dims)}")
    covered = math.prod(dims) * kind.itemsize
    if covered != nbytes:
        raise ValueError(f"shape {dims} of {kind} covers {covered} bytes, but the loan has {nbytes}")
    return dims, kind
