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
