"""The ingest policy: ``VisualInputConfig`` (the Go server's checks on a frame before it
is stored) and ``check_frame``. Defined in ``capsule_sessions._policy``, the layer below
the session that applies it (docs/architecture.md).
"""

from ._policy import JPEG_MAGIC, RAW_CHANNELS, VisualInputConfig, check_frame

__all__ = ["JPEG_MAGIC", "RAW_CHANNELS", "VisualInputConfig", "check_frame"]
