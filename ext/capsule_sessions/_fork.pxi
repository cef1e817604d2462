# What every object of the module shares: the key only the ring makes Subscriptions
# with, the refusal to copy or pickle, and the fork generation that makes a ring or a
# queue inherited through fork() refuse use (its locks may be held by a thread the
# child does not have).

cdef extern from *:
    """
    /* fork()s into this process; rings and queues made before the last one refuse use. */
    static unsigned long capsule_fork_generation = 0;
    """
    unsigned long fork_generation "capsule_fork_generation"


# The module's private key for making a Subscription (one made by hand is refused).
cdef object _MAKE = object()


def _after_fork_in_child():
    global fork_generation
    fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


cdef inline int check_not_forked(unsigned long generation) except -1:
    if generation != fork_generation:
        raise RuntimeError(FORKED_MESSAGE)
    return 0


def _refuse_copy(obj, *protocol):
    raise TypeError(f"cannot pickle or copy {type(obj).__name__!r} object")
