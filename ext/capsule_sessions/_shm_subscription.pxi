# A subscription to a shared session: the reader's end of one queue in the control
# segment. Same API and results as capsule_sessions.Subscription in-process.

import concurrent.futures

# aget() waits for a push on these threads, a slice at a time, so a cancelled await
# leaves a thread that returns within one slice and never consumes a frame.
_waiters = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="capsule-shm-wait")


cdef frozenset GET_KEYWORDS = frozenset(("block", "timeout"))


cdef tuple _get_arguments(tuple args, dict kwargs):
    """(block, timeout) of a ``get(block=True, timeout=None)`` call; a call that does not
    fit gets the TypeError the in-process Subscription.get gives."""
    cdef Py_ssize_t n = len(args)
    if not kwargs and n <= 2:
        return (args[0] if n else True, args[1] if n == 2 else None)
    if n <= 2 and GET_KEYWORDS.issuperset(kwargs) and not (n >= 1 and "block" in kwargs) \
            and not (n == 2 and "timeout" in kwargs):
        return (args[0] if n else kwargs.get("block", True), args[1] if n == 2 else kwargs.get("timeout"))
    _refuse_call("Subscription", "get", args, kwargs)


cdef int _refuse_call(str cls, str method, tuple args, dict kwargs) except -1:
    """Raise the TypeError the pure twin's ``cls.method`` raises for arguments that do
    not fit its signature (CPython checks them before running the body)."""
    from capsule_sessions import _framebuf_py
    getattr(getattr(_framebuf_py, cls), method)(None, *args, **kwargs)
    raise AssertionError(f"{cls}.{method}() accepted arguments its shared twin refused")


@cython.final
@cython.no_gc_clear
cdef class SharedSubscription:
    """A subscriber's handle on a shared session (``capsule_sessions.Subscription``)."""

    cdef AttachedSession _reader
    cdef cs_sub *_s
    cdef int _slot
    cdef uint64_t _epoch
    cdef uint64_t _maxsize
    cdef str _policy
    cdef bint _released
    cdef uint64_t _dropped_at_release
    cdef uint64_t _delivered_at_release
    cdef uint64_t _lost
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        # Released until a factory claims a slot; one made by hand is refused at the door.
        self._released = True
        if len(args) != 1 or args[0] is not _MAKE or kwargs:
            raise TypeError(NOT_BY_HAND_MESSAGE)

    @staticmethod
    cdef SharedSubscription _claimed(AttachedSession reader, uint32_t slot, uint64_t epoch, uint64_t maxsize,
                                     str policy):
        cdef SharedSubscription self = SharedSubscription.__new__(SharedSubscription, _MAKE)
        self._reader = reader
        self._slot = slot
        self._s = &cs_subs(reader._h)[slot]
        self._epoch = epoch
        self._maxsize = maxsize
        self._policy = policy
        self._released = False
        return self

    @staticmethod
    cdef SharedSubscription _born_closed(AttachedSession reader, uint64_t maxsize, str policy):
        cdef SharedSubscription self = SharedSubscription.__new__(SharedSubscription, _MAKE)
        self._reader = reader
        self._slot = -1
        self._released = True
        self._maxsize = maxsize
        self._policy = policy
        return self

    def __dealloc__(self):
        self._release_slot()

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle or copy 'Subscription' object")

    def __copy__(self):
        raise TypeError("cannot pickle or copy 'Subscription' object")

    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle or copy 'Subscription' object")

    cdef inline bint _gone(self) noexcept:
        """Released. A subscription whose reader slot has left is released now: leaving
        released its queue (at exit, the exit handler runs before the finalizers), which
        may be another reader's since, so nothing is written to it again."""
        if not self._released and self._reader._slot.index < 0:
            self._release_slot()
        return self._released

    cdef void _release_slot(self) noexcept:
        if self._released:
            return
        self._released = True
        self._dropped_at_release = cs_load(&self._s.dropped)
        self._delivered_at_release = cs_load(&self._s.delivered)
        if self._reader._slot.index < 0:
            return  # released by the slot's leaving
        cs_store(&self._s.closed, 1)
        cs_store(&self._s.state, CS_SUB_RELEASED)  # the owner counts its entries out, then frees it
        cs_add(&self._reader._h.subs_version, 1)

    # -- counters ------------------------------------------------------------------------
    @property
    def maxsize(self):
        return self._maxsize

    @property
    def policy(self):
        return self._policy

    @property
    def closed(self):
        return self._gone() or cs_load(&self._s.closed) != 0 or self._reader._owner_gone()

    @property
    def dropped(self):
        if self._gone():
            return self._dropped_at_release + self._lost
        return cs_load(&self._s.dropped) + self._lost

    @property
    def delivered(self):
        if self._gone():
            return self._delivered_at_release
        return cs_load(&self._s.delivered)

    def qsize(self):
        if self._gone():
            return 0
        cdef uint64_t head = cs_load(&self._s.head)
        cdef uint64_t tail = cs_load(&self._s.tail)
        return 0 if tail >= head else min(head - tail, self._maxsize)

    def empty(self):
        return self.qsize() == 0

    def full(self):
        return self.qsize() >= self._maxsize

    # -- taking ---------------------------------------------------------------------------
    cdef object _take(self):
        """The next queued frame, or None when the queue is empty."""
        cdef cs_sub *s = self._s
        cdef uint64_t tail, head, entry
        cdef uint32_t index
        while not self._gone():
            tail = cs_load(&s.tail)
            head = cs_load(&s.head)
            if tail >= head:
                return None
            if head - tail > self._maxsize:
                if cs_load(&s.tail) != tail:  # taken or evicted meanwhile: read both again
                    continue
                # The owner never queues more than maxsize: a corrupted table, which would
                # otherwise be walked entry by entry up to the bogus head.
                raise SharedMemoryError(f"a subscription of {self._reader.session_id!r} is corrupted")
            entry = cs_load(&s.entries[tail % self._maxsize])
            index = entry & LOW32
            if index >= CS_MAX_BUFFERS:
                raise SharedMemoryError(f"a subscription of {self._reader.session_id!r} is corrupted")
            # Lease first, then take: from the owner's side the buffer is never unreferenced.
            cs_add32(&self._reader._slot.leases[index], 1)
            if not cs_cas(&s.tail, tail, tail + 1):  # the owner evicted it (drop_oldest)
                self._reader._slot.release_raw(index)
                continue
            frame = self._reader._frame_of_leased(entry)
            if frame is None:  # its segment is gone with the session: counted, not lost silently
                self._lost += 1
                continue
            cs_add(&s.delivered, 1)
            return frame
        return None

    cdef bint _ended(self):
        return self._gone() or cs_load(&self._s.closed) != 0 or self._reader._owner_gone_lately()

    cdef object _take_or_raise(self):
        """A frame, None when there is none yet, SubscriptionClosed when there never will be."""
        frame = self._take()
        if frame is not None:
            return frame
        if self._ended():
            frame = self._take()  # pushed before the close was seen
            if frame is not None:
                return frame
            self._release_slot()
            raise SubscriptionClosed("subscription is closed")
        return None

    cdef _wait_for_push(self, int64_t timeout_ns):
        """Sleep until a push or a close, at most ``timeout_ns``, GIL released."""
        if self._gone():
            return  # (a left slot's index no longer names a reader entry)
        cdef cs_sub *s = self._s
        cdef cs_header *h = self._reader._h
        cdef uint64_t *sleeping = &cs_readers(h)[self._reader._slot.index].sleeping
        cdef uint32_t seen = cs_load32(&h.wake)
        cs_add(sleeping, 1)
        try:
            if cs_load(&s.tail) < cs_load(&s.head) or cs_load(&s.closed):
                return
            with nogil:
                cs_futex_wait(&h.wake, seen, timeout_ns)
        finally:
            cs_sub_(sleeping, 1)

    def _wait_slice(self, double seconds):
        self._wait_for_push(<int64_t>(seconds * 1e9))

    def get(self, *args, **kwargs):
        """get(block=True, timeout=None): as ``queue.Queue.get``, the next frame, waiting
        up to ``timeout`` seconds (forever when None), or at once when ``block`` is false;
        ``queue.Empty`` when there is none. After close(): the frames still queued, then
        SubscriptionClosed."""
        block, timeout = _get_arguments(args, kwargs)
        if not block:
            return self.get_nowait()
        return self._get_blocking(timeout)

    def _get_blocking(self, timeout):
        seconds = v.timeout_seconds(timeout)
        cdef int64_t deadline = 0 if seconds is None else monotonic_ns() + <int64_t>(seconds * 1e9)
        cdef int64_t left
        while True:
            frame = self._take_or_raise()
            if frame is not None:
                return frame
            left = WAIT_SLICE_NS
            if seconds is not None:
                left = min(left, deadline - monotonic_ns())
                if left <= 0:
                    raise _queue_mod.Empty
            self._wait_for_push(left)
            PyErr_CheckSignals()

    def get_nowait(self):
        frame = self._take_or_raise()
        if frame is None:
            raise _queue_mod.Empty
        return frame

    async def aget(self, timeout=None):
        """Await the next frame without blocking the loop; ``queue.Empty`` on timeout."""
        return await self._await_frame(timeout)

    async def _await_frame(self, timeout):
        seconds = v.timeout_seconds(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while True:
            frame = self._take_or_raise()
            if frame is not None:
                return frame
            wait = _limits.WAIT_SLICE_S
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    raise _queue_mod.Empty
            await loop.run_in_executor(_waiters, self._wait_slice, wait)

    def close(self):
        """Stop receiving; wakes every waiter. Idempotent. Frames still queued can be read."""
        if self._gone():
            return
        cs_store(&self._s.closed, 1)
        wake_readers(self._reader._h)  # a thread waiting in get() on this one

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
        return (f"<Subscription {state} policy={self._policy} maxsize={self._maxsize} "
                f"queued={self.qsize()} dropped={self.dropped} delivered={self.delivered}>")
