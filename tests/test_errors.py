"""The exception hierarchy of docs/spec.md, "Errors"."""

import pytest

import capsule_sessions as cs


@pytest.mark.parametrize(
    "cls", [cs.MaxSessionsError, cs.SessionExistsError, cs.SessionNotFoundError, cs.SubscriptionClosed]
)
def test_every_error_is_a_session_error(cls):
    assert issubclass(cls, cs.SessionError)
    assert issubclass(cs.SessionError, Exception)


def test_not_found_message_is_not_repr_quoted():
    # KeyError's str() would wrap the message in quotes.
    assert str(cs.SessionNotFoundError("session 'x' not found")) == "session 'x' not found"
