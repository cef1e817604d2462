# The fan-out: accepted frames wait in _FanOut.pending and one thread at a time (the
# runner) offers them to the subscribers, oldest first. A store that finds a runner at
# work leaves its frame to it and waits until it was offered, so each subscriber
# receives frames in accept order and has been offered a frame when its store returns.
# A runner never waits for another thread's fan-out (a store made by a finalizer or a
# signal handler that interrupted a fan-out returns at once: the runner offers its
# frame), so no two threads can wait for each other. Every method takes the ring whose
# lock guards the fan-out's state.

cdef extern from *:
    """
    /* How many fan-outs this thread is running: a runner never waits for another
       thread's fan-out, which is what rules out two threads waiting on each other. */
    static __thread int capsule_fan_run_depth = 0;
    """
    int fan_run_depth "capsule_fan_run_depth"


@cython.final
cdef class _FanOut:
    """The frames a ring accepted and has not offered to every subscriber yet, and the
    runner's claim."""

    def __cinit__(self):
        init_cond(&self.done)
        self.locks_made = True
        self.fork_gen = fork_generation

    def __dealloc__(self):
        cdef Grave grave
        grave_init(&grave)
        while self.n > 0:
            self.pop(&grave)
        grave_flush(&grave)
        free(self.pending)
        if self.locks_made and self.fork_gen == fork_generation:
            pthread_cond_destroy(&self.done)

    __reduce_ex__ = _refuse_copy

    # -- the pending frames (ring lock held) ---------------------------------------
    cdef bint push(self, const Slot *accepted) noexcept:
        """Queue a copy of an accepted slot (GIL held: the references are taken here,
        and no Python runs). False when out of memory."""
        cdef Py_ssize_t newcap, i
        cdef Slot *grown
        cdef Slot *entry
        if self.n == self.cap:
            newcap = self.cap * 2 if self.cap else 4
            grown = <Slot *>malloc(newcap * sizeof(Slot))
            if grown == NULL:
                return False
            for i in range(self.n):
                grown[i] = self.pending[(self.head + i) % self.cap]
            free(self.pending)
            self.pending = grown
            self.cap = newcap
            self.head = 0
        entry = &self.pending[(self.head + self.n) % self.cap]
        entry[0] = accepted[0]
        entry.view = NULL
        entry.frame = NULL
        Py_INCREF(<object>entry.buffer)
        Py_INCREF(<object>entry.source)
        Py_INCREF(<object>entry.mime)
        self.n += 1
        return True

    cdef void pop(self, Grave *grave) noexcept nogil:
        cdef Slot *entry = &self.pending[self.head]
        grave_add(grave, entry.buffer)
        grave_add(grave, entry.source)
        grave_add(grave, entry.mime)
        self.head = (self.head + 1) % self.cap
        self.n -= 1

    # -- the runner's claim (ring lock held) ----------------------------------------
    cdef void claim(self) noexcept nogil:
        self.running = True
        self.runner = PyThread_get_thread_ident()

    cdef void release(self) noexcept nogil:
        self.running = False
        if self.waiters:
            pthread_cond_broadcast(&self.done)

    # -- offering ---------------------------------------------------------------------
    cdef int await_offer(self, FrameRing ring, uint64_t seq) except -1:
        """Wait until accepted frame ``seq`` was offered, or run the fan-out ourselves
        if its runner left (an error made it stop early)."""
        cdef unsigned long me = PyThread_get_thread_ident()
        cdef bint run
        while True:
            lock_with_gil(&ring._lock)
            if self.offered_through >= seq or self.n == 0 or (
                    self.running and (fan_run_depth > 0 or self.runner == me)):
                pthread_mutex_unlock(&ring._lock)
                return 0
            run = not self.running
            if run:
                self.claim()
            else:
                self.waiters += 1
            pthread_mutex_unlock(&ring._lock)
            if run:
                return self.run(ring)
            with nogil:
                self.wait_for_runner(ring, seq)
            # Interrupted here (Ctrl-C): the frame stays pending, so the runner still
            # offers it and the books balance.
            PyErr_CheckSignals()

    cdef void wait_for_runner(self, FrameRing ring, uint64_t seq) noexcept nogil:
        # The lock is released before the GIL is taken back: a thread stopped at
        # interpreter exit while it waits for the GIL then holds no lock.
        cdef timespec ts
        pthread_mutex_lock(&ring._lock)
        if self.offered_through < seq and self.running:
            to_timespec(monotonic_ns() + WAIT_SLICE_NS, &ts)
            pthread_cond_timedwait(&self.done, &ring._lock, &ts)
        self.waiters -= 1
        pthread_mutex_unlock(&ring._lock)

    cdef int run(self, FrameRing ring) except -1:
        """Offer pending frames until none is left (the caller claimed the runner role).
        An error (KeyboardInterrupt from a signal handler in an event loop's wake-up,
        MemoryError) is raised only after every pending frame was offered to every
        subscriber, or counted as dropped for it."""
        global fan_run_depth
        cdef Slot meta
        cdef list queues
        cdef int failures = 0
        cdef bint more = True
        error = None
        lock_with_gil(&ring._lock)
        if self.n == 0:
            self.release()
            pthread_mutex_unlock(&ring._lock)
            return 0
        meta = self.pending[self.head]  # its references stay the entry's until popped
        queues = ring._subscribers
        pthread_mutex_unlock(&ring._lock)
        fan_run_depth += 1
        try:
            while more:
                try:
                    self.offer_to(ring, queues, &meta, failures >= 2, failures > 0)
                except BaseException as exc:
                    if error is None:
                        error = exc
                    failures += 1
                    continue  # offers book each frame once: making it again is safe
                failures = 0
                queues = self.next_pending(ring, &meta)
                more = queues is not None
        finally:
            fan_run_depth -= 1
        if error is not None:
            raise error
        return 0

    cdef list next_pending(self, FrameRing ring, Slot *meta):
        """Forget the frame just offered and take the next (into meta): the subscribers
        to offer it to, or None when none is left (the runner role is then handed back
        under the same lock, so no frame is stranded)."""
        cdef Grave grave
        cdef list queues = None
        grave_init(&grave)
        lock_with_gil(&ring._lock)
        self.pop(&grave)
        self.offered_through = meta.seq
        if self.n > 0:
            meta[0] = self.pending[self.head]
            queues = ring._subscribers
            if self.waiters:
                pthread_cond_broadcast(&self.done)
        else:
            self.release()
        pthread_mutex_unlock(&ring._lock)
        grave_flush(&grave)
        return queues

    cdef int offer_to(self, FrameRing ring, list queues, Slot *meta, bint give_up, bint retry) except -1:
        """Offer one pending frame to every open queue (made into a frame object only if
        one takes it); the first error is raised after every queue had its offer."""
        cdef Py_ssize_t i, n = PyList_GET_SIZE(queues)
        cdef _Queue q
        cdef bint saw_closed = False
        error = None
        frame = None
        for i in range(n):
            q = <_Queue>PyList_GET_ITEM(queues, i)
            if q.closed:
                saw_closed = True
            elif give_up:  # offering it failed over and over: counted as dropped instead
                q.settle(meta.seq)
            else:
                try:
                    if q.wants(meta.seq):
                        if frame is None:
                            frame = make_frame(make_view(meta.buffer, meta.nbytes), meta)
                        q.push(frame, meta.seq)
                    elif retry:
                        # Booked by the interrupted try, whose wake-up may have failed.
                        q.wake_parked()
                except BaseException as exc:
                    if error is None:
                        error = exc
                    q.settle(meta.seq)  # a no-op when push booked it before the error
        if saw_closed:
            ring._prune_closed()
        if error is not None:
            raise error
        return 0
