# The subscriber's handle on its queue: queue.Queue's reading methods, asyncio and
# iteration. Blocking reads wait with the GIL released.


cdef object timeout_argument(str method, tuple args, dict kwargs):
    """The ``timeout`` of a ``method(timeout=None)`` call."""
    if not kwargs:
        if len(args) <= 1:
            return args[0] if args else None
    elif not args and len(kwargs) == 1 and "timeout" in kwargs:
        return kwargs["timeout"]
    refuse_call(method, args, kwargs)


cdef int refuse_call(str method, tuple args, dict kwargs) except -1:
    """Raise the TypeError the pure twin's Subscription.<method>() raises for arguments
    that do not fit its signature (CPython checks them before running the body)."""
    from capsule_sessions import _framebuf_py
    getattr(_framebuf_py.Subscription, method)(None, *args, **kwargs)
    raise AssertionError(f"Subscription.{method}() accepted arguments its compiled twin refused")


@cython.final
cdef class Subscription:
    """A subscriber's handle on a bounded queue of the frames a session accepts.

    Dropping the last reference closes it, so a forgotten subscriber stops costing
    the producer anything.
    """

    def __cinit__(self, *args, **kwargs):
        # At the door: a handle without a queue behind it must never exist.
        if len(args) != 1 or args[0] is not _MAKE or kwargs:
            raise TypeError(NOT_BY_HAND_MESSAGE)

    def __dealloc__(self):
        if self._queue is not None:
            self._queue.mark_closed()

    # A second handle on one queue would close it when collected (as threading.Lock, it
    # is neither copied nor pickled).
    __reduce_ex__ = _refuse_copy

    @property
    def maxsize(self):
        return self._queue.maxsize

    @property
    def policy(self):
        return self._queue.policy

    @property
    def closed(self):
        return self._queue.closed

    @property
    def dropped(self):
        return self._queue.dropped

    @property
    def delivered(self):
        return self._queue.delivered

    # The public methods take *args/**kwargs and unpack them by hand: a call that does
    # not fit gets the pure twin's own TypeError (refuse_call), word for word.
    def qsize(self, *args, **kwargs):
        if args or kwargs:
            refuse_call("qsize", args, kwargs)
        return self._queue.n

    def empty(self, *args, **kwargs):
        if args or kwargs:
            refuse_call("empty", args, kwargs)
        return self._queue.n == 0

    def full(self, *args, **kwargs):
        if args or kwargs:
            refuse_call("full", args, kwargs)
        return self._queue.n >= self._queue.maxsize

    def get(self, *args, **kwargs):
        """get(block=True, timeout=None), as ``queue.Queue.get``: the next frame, waiting
        (GIL released) up to ``timeout`` seconds (forever when None), or at once when
        ``block`` is false; ``queue.Empty`` when there is none. After close(): the
        frames still queued, then ``SubscriptionClosed``."""
        cdef Py_ssize_t n = len(args)
        block = True
        timeout = None
        if n <= 2 and (not kwargs or kwargs.keys() <= {"block", "timeout"}):
            if n >= 1:
                block = args[0]
                if "block" in kwargs:
                    refuse_call("get", args, kwargs)
            if n == 2:
                timeout = args[1]
                if "timeout" in kwargs:
                    refuse_call("get", args, kwargs)
            block = kwargs.get("block", block)
            timeout = kwargs.get("timeout", timeout)
        else:
            refuse_call("get", args, kwargs)
        if not block:
            return self.get_nowait()
        return self._get_blocking(timeout)

    cdef object _get_blocking(self, object timeout):
        cdef bint forever = True
        cdef int64_t deadline_ns = 0
        cdef PyObject *frame = NULL
        cdef int status
        if timeout is not None:
            seconds = _validate.timeout_seconds(timeout)
            if seconds is not None:
                forever = False
                deadline_ns = monotonic_ns() + <int64_t>(<double>seconds * 1e9)
        check_not_forked(self._queue.fork_gen)
        result = self._queue.try_take(False)
        if result is not None:
            return result
        while True:
            with nogil:
                status = self._queue.wait_take(forever, deadline_ns, &frame)
            if status == 0:
                result = <object>frame
                Py_DECREF(result)
                return result
            if status == 1:
                raise SubscriptionClosed("subscription is closed")
            if status == 2:
                raise _queue_mod.Empty
            PyErr_CheckSignals()

    def get_nowait(self, *args, **kwargs):
        if args or kwargs:
            refuse_call("get_nowait", args, kwargs)
        check_not_forked(self._queue.fork_gen)
        result = self._queue.try_take(False)
        if result is None:
            raise _queue_mod.Empty
        return result

    def aget(self, *args, **kwargs):
        """aget(timeout=None): await the next frame without blocking the loop;
        ``queue.Empty`` on timeout."""
        # A plain method returning the coroutine, so a wrong call fails when made, as an
        # `async def` of the pure twin does, not when awaited.
        return self._await_frame(timeout_argument("aget", args, kwargs))

    async def _await_frame(self, timeout):
        seconds = _validate.timeout_seconds(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        check_not_forked(self._queue.fork_gen)
        while True:
            fut = loop.create_future()
            # Strong, like asyncio.Queue: a live session keeps a task parked on it alive.
            # An abandoned one is still collected: the GC sees ring -> subscribers -> queue ->
            # waiter -> task -> subscription -> ring as a cycle.
            waiter = (loop, fut)
            result = self._queue.try_take(True)
            if result is not None:
                return result
            # Still holding the GIL since try_take unlocked: no producer can wake the
            # queue between the park and this append.
            self._queue.async_waiters.append(waiter)
            try:
                if deadline is None:
                    await fut
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise _queue_mod.Empty
                    try:
                        await asyncio.wait_for(fut, remaining)
                    except asyncio.TimeoutError:
                        raise _queue_mod.Empty from None
            finally:
                try:
                    self._queue.async_waiters.remove(waiter)
                except ValueError:
                    pass

    def close(self, *args, **kwargs):
        """Stop receiving; wakes every waiter. Idempotent."""
        if args or kwargs:
            refuse_call("close", args, kwargs)
        check_not_forked(self._queue.fork_gen)
        try:
            self._queue.close()
        finally:
            self._ring._remove_queue(self._queue)

    unsubscribe = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        while True:
            try:
                yield self._get_blocking(None)
            except SubscriptionClosed:
                return

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self._await_frame(None)
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return (f"<Subscription {state} policy={self.policy} maxsize={self.maxsize} "
                f"queued={self.qsize()} dropped={self.dropped} delivered={self.delivered}>")
