"""Voice/vision AI sessions with a zero-copy, rate-limited, fan-out frame ring.

A Python port of a Go session manager; the visual input runs on a compiled (Cython)
backend when it is built, or on the pure-Python reference backend.
"""

from ._backend import BACKEND, available_backends
from ._framebuf_py import FrameLoan, Subscription
from ._records import (
    ChatMessage,
    ConversationSnapshot,
    DialogContextItem,
    PipelineMode,
    SessionState,
    VisualFrame,
)
from .errors import (
    MaxSessionsError,
    SessionError,
    SessionExistsError,
    SessionNotFoundError,
    SharedMemoryError,
    SubscriptionClosed,
)
from .ingest import VisualInputConfig
from .manager import SessionManager
from .session import Session
from .shared import attach, list_shared

__version__ = "0.1.0"

__all__ = [
    "BACKEND",
    "ChatMessage",
    "ConversationSnapshot",
    "DialogContextItem",
    "FrameLoan",
    "MaxSessionsError",
    "PipelineMode",
    "Session",
    "SessionError",
    "SessionExistsError",
    "SessionManager",
    "SessionNotFoundError",
    "SessionState",
    "SharedMemoryError",
    "Subscription",
    "SubscriptionClosed",
    "VisualFrame",
    "VisualInputConfig",
    "attach",
    "available_backends",
    "list_shared",
]
