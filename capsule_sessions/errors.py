"""Exceptions raised by capsule_sessions (mirrors the Go package's sentinel errors)."""


class SessionError(Exception):
    """Base class of every error this package raises on purpose."""


class MaxSessionsError(SessionError):
    """The manager already holds ``max_concurrent`` sessions."""


class SessionExistsError(SessionError):
    """A session with that id already exists."""


class SessionNotFoundError(SessionError, KeyError):
    """No session with that id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


class SubscriptionClosed(SessionError):
    """The subscription is closed and every frame it queued has been read."""


# The texts both twins raise RuntimeError with (one source, so they cannot drift apart).
FORKED_MESSAGE = (
    "this session was inherited through os.fork(): its locks may be held by threads that "
    "do not exist in this process, so it cannot be used here; make new sessions in the child"
)
REENTERED_MESSAGE = (
    "a call on this session was made from code that interrupted another call on it in the "
    "same thread (a finalizer, signal handler or weakref callback); retry it outside that code"
)
NOT_BY_HAND_MESSAGE = "subscriptions are made by Session.subscribe_visual_frames()"
LOAN_NOT_BY_HAND_MESSAGE = "frame loans are made by Session.loan_frame()"
LOAN_FINISHED_MESSAGE = "this frame loan is finished (committed or cancelled); take a new one with loan_frame()"
LOAN_EXPORTED_MESSAGE = (
    "the loan's memory is still exported: delete every array and memoryview made from "
    "loan.array or loan.as_array() before commit()"
)


class SharedMemoryError(SessionError):
    """A shared session's memory cannot be used: missing, foreign, corrupted or full."""
