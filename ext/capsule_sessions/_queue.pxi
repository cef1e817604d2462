# The subscriber queue: a bounded ring of frame references with its own lock, which the
# ring offers accepted frames to and a Subscription takes them from.


def _wake(fut):
    # Runs in the waiter's event loop (call_soon_threadsafe).
    if not fut.done():
        fut.set_result(None)


@cython.final
cdef class _Queue:
    """A bounded ring of frame references with its own lock and condition.

    Each accepted frame is booked once, by its accept number (``booked_seq``): queued,
    or counted in ``dropped``.
    """

    def __cinit__(self, Py_ssize_t maxsize, str policy, uint64_t booked_seq):
        if pthread_mutex_init(&self.lock, NULL) != 0:
            raise MemoryError("pthread_mutex_init failed")
        try:
            init_cond(&self.cond)
        except BaseException:
            pthread_mutex_destroy(&self.lock)
            raise
        self.locks_made = True
        self.maxsize = maxsize
        self.policy = policy
        self.drop_oldest = policy == "drop_oldest"
        self.booked_seq = booked_seq
        self.async_waiters = []
        self.fork_gen = fork_generation

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.items != NULL:
            for i in range(self.n):
                Py_DECREF(<object>self.items[(self.head + i) % self.cap])
            free(self.items)
        if self.locks_made and self.fork_gen == fork_generation:
            pthread_cond_destroy(&self.cond)
            pthread_mutex_destroy(&self.lock)

    __reduce_ex__ = _refuse_copy

    # -- producer side (GIL held) ------------------------------------------------
    cdef bint wants(self, uint64_t seq) noexcept:
        """False when the offer of ``seq`` ends here: closed, booked already, or full
        under drop_newest (then booked as dropped)."""
        cdef bint wants = True
        lock_with_gil(&self.lock)
        if self.closed or seq <= self.booked_seq:
            wants = False
        elif self.n >= self.maxsize and not self.drop_oldest:
            self.booked_seq = seq
            self.dropped += 1
            wants = False
        pthread_mutex_unlock(&self.lock)
        return wants

    cdef void settle(self, uint64_t seq) noexcept:
        """Offering ``seq`` failed: count it dropped unless it was booked."""
        lock_with_gil(&self.lock)
        if not self.closed and seq > self.booked_seq:
            self.booked_seq = seq
            self.dropped += 1
        pthread_mutex_unlock(&self.lock)

    cdef bint grow(self) noexcept nogil:
        cdef Py_ssize_t newcap = 16 if self.cap == 0 else self.cap * 2, i
        if newcap > self.maxsize:
            newcap = self.maxsize
        cdef PyObject **items = <PyObject **>malloc(newcap * sizeof(PyObject *))
        if items == NULL:
            return False
        for i in range(self.n):
            items[i] = self.items[(self.head + i) % self.cap]
        free(self.items)
        self.items = items
        self.cap = newcap
        self.head = 0
        return True

    cdef int push(self, object frame, uint64_t seq) except -1:
        """Book ``seq`` as queued (or dropped), then wake readers. Raises only what an
        event loop's wake-up raised, after the frame was booked."""
        cdef Grave grave
        cdef bint wake_async = False
        grave_init(&grave)
        lock_with_gil(&self.lock)
        if not self.closed and seq > self.booked_seq:
            self.booked_seq = seq
            if self.n >= self.maxsize:
                self.dropped += 1
                if self.drop_oldest:
                    grave_add(&grave, self.items[self.head])
                    self.head = (self.head + 1) % self.cap
                    self.n -= 1
            if self.n < self.maxsize:
                if self.n == self.cap and not self.grow():
                    self.dropped += 1  # out of memory: the frame is dropped, and counted
                else:
                    Py_INCREF(frame)
                    self.items[(self.head + self.n) % self.cap] = <PyObject *>frame
                    self.n += 1
                    pthread_cond_signal(&self.cond)
                    wake_async = self.async_parked
                    self.async_parked = False
        pthread_mutex_unlock(&self.lock)
        grave_flush(&grave)
        if wake_async:
            self.wake_async_waiters()
        return 0

    cdef int wake_parked(self) except -1:
        """Wake parked asyncio waiters when frames are queued for them."""
        cdef bint wake
        lock_with_gil(&self.lock)
        wake = self.async_parked and self.n > 0
        if wake:
            self.async_parked = False
        pthread_mutex_unlock(&self.lock)
        if wake:
            self.wake_async_waiters()
        return 0

    cdef int wake_async_waiters(self) except -1:
        """Wake every parked asyncio waiter. Waking runs the loop's Python code (where a
        signal handler may raise): the first error is raised after all were tried."""
        waiters = self.async_waiters
        if not waiters:
            return 0
        self.async_waiters = []
        error = None
        for waiter in waiters:
            loop, fut = waiter
            for attempt in range(2):  # an interrupt is raised once: the second try wakes it
                try:
                    loop.call_soon_threadsafe(_wake, fut)
                    break
                except RuntimeError:  # a closed loop: its waiter went with it
                    break
                except BaseException as exc:
                    if error is None:
                        error = exc
            else:
                # Still not woken: parked again, so the next frame (or close) tries again.
                self.async_waiters.append(waiter)
        if error is not None:
            lock_with_gil(&self.lock)
            self.async_parked = True
            pthread_mutex_unlock(&self.lock)
            raise error
        return 0

    cdef void mark_closed(self) noexcept:
        """Close without calling Python: usable from __dealloc__. Wakes blocked threads
        only (a parked asyncio waiter keeps its Subscription, so none is parked here).
        In a forked child the lock may be held by a thread that is gone: no locking."""
        if self.fork_gen != fork_generation:
            self.closed = True
            return
        lock_with_gil(&self.lock)
        self.closed = True
        pthread_cond_broadcast(&self.cond)
        pthread_mutex_unlock(&self.lock)

    cdef int close(self) except -1:
        self.mark_closed()
        return self.wake_async_waiters()

    # -- consumer side -------------------------------------------------------------
    cdef PyObject *take(self) noexcept nogil:
        cdef PyObject *frame = self.items[self.head]
        self.head = (self.head + 1) % self.cap
        self.n -= 1
        self.delivered += 1
        return frame

    cdef int wait_take(self, bint forever, int64_t deadline_ns, PyObject **out) noexcept nogil:
        """0: got a frame (owned reference in out); 1: closed and empty; 2: timed out;
        3: a wait slice ended (the caller checks for signals and calls again)."""
        cdef timespec ts
        cdef int64_t now, until
        cdef int status = 3
        pthread_mutex_lock(&self.lock)
        while True:
            if self.n > 0:
                out[0] = self.take()
                status = 0
                break
            if self.closed:
                status = 1
                break
            now = monotonic_ns()
            if not forever and now >= deadline_ns:
                status = 2
                break
            until = now + WAIT_SLICE_NS
            if not forever and deadline_ns < until:
                until = deadline_ns
            to_timespec(until, &ts)
            if pthread_cond_timedwait(&self.cond, &self.lock, &ts) == ETIMEDOUT and monotonic_ns() >= until:
                if self.n == 0 and not self.closed and (forever or until < deadline_ns):
                    status = 3
                    break
        pthread_mutex_unlock(&self.lock)
        return status

    cdef object try_take(self, bint park):
        """A frame, or None (parking an async waiter when park); raises when closed."""
        cdef PyObject *frame = NULL
        cdef bint closed = False
        lock_with_gil(&self.lock)
        if self.n > 0:
            frame = self.take()
        elif self.closed:
            closed = True
        elif park:
            self.async_parked = True
        pthread_mutex_unlock(&self.lock)
        if frame != NULL:
            result = <object>frame
            Py_DECREF(result)  # the queue's reference moves to `result`
            return result
        if closed:
            raise SubscriptionClosed("subscription is closed")
        return None

