"""What every object of the pure twin shares: the key only the ring makes Subscriptions
with, the refusal to copy or pickle, and the fork generation that makes a ring or a
queue inherited through fork() refuse use (its locks may be held by a thread the child
does not have). The compiled twin's ``_fork.pxi``.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn, SupportsIndex

from ..errors import FORKED_MESSAGE

# The ring's private key for making a Subscription (a handle made by hand is refused).
_MAKE = object()


class _Fork:
    """Counts fork()s into this process: every ring and queue remembers the count it was
    made under and refuses use in a child (see FORKED_MESSAGE)."""

    generation = 0


_fork = _Fork()


def _after_fork_in_child() -> None:
    _fork.generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_not_forked(generation: int) -> None:
    if generation != _fork.generation:
        raise RuntimeError(FORKED_MESSAGE)


def _made_by_ring(args: tuple[Any, ...], kwargs: dict[str, Any], refused: str) -> tuple[Any, Any]:
    """What a ring passed along with its key to make a handle (the ring, and the handle's
    queue or size); TypeError(``refused``) for a handle made by hand, which would have
    nothing behind it."""
    if len(args) != 3 or args[0] is not _MAKE or kwargs:
        raise TypeError(refused)
    return args[1], args[2]


def _refuse_copy(obj: object, protocol: SupportsIndex) -> NoReturn:
    raise TypeError(f"cannot pickle or copy {type(obj).__name__!r} object")
