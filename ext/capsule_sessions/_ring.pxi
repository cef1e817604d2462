# The ring: one session's newest frames, rate limiter, source, subscribers, counters
# and activity clock. The store path (_store, _copy_frame, _commit) and the reads; the
# slots, the buffers and the fan-out each have their own file.


@cython.final
cdef class FrameRing:
    """One session's newest frames, rate limiter, source, subscribers and counters."""

    def __cinit__(self, clock, created_at):
        cdef int64_t ignored
        self._clock = _validate.clock(clock)
        parse_instant(created_at, "created_at", &self._last_active_s, &ignored)
        self._subscribers = []
        empty = ""
        Py_INCREF(empty)
        self._source = <PyObject *>empty
        self._fork_gen = fork_generation
        self._fan = _FanOut.__new__(_FanOut)
        if pthread_mutex_init(&self._lock, NULL) != 0:
            raise MemoryError("pthread_mutex_init failed")
        self._locks_made = True

    def __dealloc__(self):
        cdef Grave grave
        grave_init(&grave)
        self._clear_frames(&grave)
        pool_clear(&self._pool, &grave)
        grave_add(&grave, self._source)
        self._source = NULL
        grave_flush(&grave)
        free(self._slots.items)
        if self._locks_made and self._fork_gen == fork_generation:
            pthread_mutex_destroy(&self._lock)

    __reduce_ex__ = _refuse_copy

    # -- time ---------------------------------------------------------------------
    cdef int _read_now(self, object now, double *seconds, int64_t *ns) except -1:
        check_not_forked(self._fork_gen)
        if now is None:
            return parse_instant(self._clock(), "clock()", seconds, ns)
        return parse_instant(now, "now", seconds, ns)

    @property
    def last_active_at(self):
        cdef double value
        check_not_forked(self._fork_gen)
        lock_with_gil(&self._lock)
        value = self._last_active_s
        pthread_mutex_unlock(&self._lock)
        return value

    def touch(self, now=None):
        cdef double seconds
        cdef int64_t ns
        self._read_now(now, &seconds, &ns)
        lock_with_gil(&self._lock)
        self._last_active_s = seconds
        pthread_mutex_unlock(&self._lock)

    # -- visual input (ring lock held in the C helpers) --------------------------------
    cdef void _clear_frames(self, Grave *grave) noexcept nogil:
        slots_evict_oldest(&self._slots, self._slots.count, &self._pool, grave)

    cdef void _switch_source(self, object source, Grave *grave) noexcept:
        # Called with the GIL and the ring lock: the INCREF needs the GIL; no Python runs.
        if (<object>self._source) != "":
            self._source_resets += 1
        grave_add(grave, self._source)
        Py_INCREF(source)
        self._source = <PyObject *>source
        self._clear_frames(grave)

    def start_visual_input(self, source, now=None):
        cdef double seconds
        cdef int64_t ns
        cdef Grave grave
        source = parse_text(source, "source")
        self._read_now(now, &seconds, &ns)
        grave_init(&grave)
        lock_with_gil(&self._lock)
        if PyUnicode_Compare(<object>self._source, source) != 0:
            self._switch_source(source, &grave)
            self._has_last = False
        self._last_active_s = seconds
        pthread_mutex_unlock(&self._lock)
        grave_flush(&grave)

    def stop_visual_input(self, source="", now=None):
        cdef double seconds
        cdef int64_t ns
        cdef Grave grave
        source = parse_text(source, "source")
        self._read_now(now, &seconds, &ns)
        empty = ""
        grave_init(&grave)
        lock_with_gil(&self._lock)
        active = <object>self._source
        if not source or not active or PyUnicode_Compare(active, source) == 0:
            self._clear_frames(&grave)
            grave_add(&grave, self._source)
            Py_INCREF(empty)
            self._source = <PyObject *>empty
            self._has_last = False
        del active
        self._last_active_s = seconds
        pthread_mutex_unlock(&self._lock)
        grave_flush(&grave)

    def store_frame(self, data, *, source, max_recent, min_interval=0.0, mime_type="",
                    width=0, height=0, timestamp_ms=0, frame_seq=0, now=None):
        """Store one frame's bytes (one copy); False when rate-limited."""
        return self._store(data, source, max_recent, min_interval, mime_type, width, height,
                           timestamp_ms, frame_seq, now)

    def store_visual_frame(self, frame, max_recent, min_interval=0.0, now=None):
        if not isinstance(frame, VisualFrame):
            raise TypeError(f"frame must be a VisualFrame, got {type(frame).__name__}")
        return self._store(frame.data, frame.source, max_recent, min_interval, frame.mime_type,
                           frame.width, frame.height, frame.timestamp_ms, frame.frame_seq, now)

    cdef bint _store(self, object data, object source, object max_recent, object min_interval,
                     object mime_type, object width, object height, object timestamp_ms,
                     object frame_seq, object now) except -1:
        cdef Slot meta
        cdef Py_ssize_t keep
        cdef int64_t min_ns
        cdef Py_buffer buf
        cdef _FrameBuffer target

        if not PyObject_CheckBuffer(data):
            raise TypeError("data must support the buffer protocol (bytes, bytearray, "
                            f"memoryview, numpy array), got {type(data).__name__}")
        source = parse_text(source, "source")
        keep = parse_count(max_recent, "max_recent")
        min_ns = parse_duration_ns(min_interval, "min_interval")
        mime_type = parse_frame_fields(&meta, mime_type, width, height, timestamp_ms, frame_seq)
        describe_image(&meta, data)
        self._read_now(now, &meta.received_at, &meta.received_ns)
        meta.source = <PyObject *>source
        meta.mime = <PyObject *>mime_type

        # Cheap early rejection: most calls of a rate-limited camera loop end here.
        if self._count_if_rate_limited(meta.received_ns, min_ns):
            return False
        try:
            PyObject_GetBuffer(data, &buf, PyBUF_FULL_RO)
        except (ValueError, BufferError) as exc:
            raise TypeError(f"data cannot be read as bytes: {exc}") from None
        try:
            target = self._copy_frame(&buf, source, keep)
            meta.nbytes = buf.len
        finally:
            PyBuffer_Release(&buf)
        return self._accept(target, &meta, keep, min_ns)

    cdef bint _store_loan(self, FrameLoan loan, object source, object max_recent, object min_interval,
                          object mime_type, object width, object height, object timestamp_ms,
                          object frame_seq, object now) except -1:
        """FrameLoan.commit: _store's checks (a loan is 1-D: no width or height is read
        from a shape), then the loan's buffer becomes the frame's, without a copy."""
        cdef Slot meta
        cdef Py_ssize_t keep
        cdef int64_t min_ns
        source = parse_text(source, "source")
        keep = parse_count(max_recent, "max_recent")
        min_ns = parse_duration_ns(min_interval, "min_interval")
        mime_type = parse_frame_fields(&meta, mime_type, width, height, timestamp_ms, frame_seq)
        self._read_now(now, &meta.received_at, &meta.received_ns)
        meta.source = <PyObject *>source
        meta.mime = <PyObject *>mime_type
        meta.nbytes = loan._nbytes
        return self._accept(loan._take(), &meta, keep, min_ns)

    cdef bint _accept(self, _FrameBuffer target, Slot *meta, Py_ssize_t keep, int64_t min_ns) except -1:
        """Commit a filled buffer and see it offered to every subscriber; False when
        another producer's store made it rate-limited meanwhile."""
        cdef bint run
        cdef uint64_t seq = self._commit(target, meta, keep, min_ns, &run)
        if seq == 0:
            return False
        if run:
            self._fan.run(self)
        elif seq != NO_FAN_OUT:
            self._fan.await_offer(self, seq)
        return True

    cdef bint _count_if_rate_limited(self, int64_t now_ns, int64_t min_ns) noexcept:
        cdef bint limited
        lock_with_gil(&self._lock)
        limited = self._is_rate_limited(now_ns, min_ns)
        if limited:
            self._rate_limited += 1
        pthread_mutex_unlock(&self._lock)
        return limited

    cdef inline bint _is_rate_limited(self, int64_t now_ns, int64_t min_ns) noexcept nogil:
        return self._has_last and min_ns > 0 and now_ns - self._last_accepted_ns < min_ns

    cdef _FrameBuffer _copy_frame(self, const Py_buffer *buf, object source, Py_ssize_t keep):
        """Copy buf's bytes into a buffer nothing else references: the buffer of the slot
        this store evicts, a free pool buffer, else a new one. The copy runs without the
        ring lock (readers never wait behind it, and a thread stopped at interpreter exit
        holds no lock) and, for large frames, without the GIL."""
        cdef PyObject *free_buffer
        cdef _FrameBuffer target
        cdef Grave grave
        cdef bint contiguous = PyBuffer_IsContiguous(buf, b'C')
        if buf.ndim > PyBUF_MAX_NDIM:
            # memoryview's own refusal, word for word: the pure twin raises it.
            raise TypeError("data cannot be read as bytes: memoryview: number of "
                            f"dimensions must not exceed {PyBUF_MAX_NDIM}")
        grave_init(&grave)
        lock_with_gil(&self._lock)
        free_buffer = self._take_evicted_buffer(buf.len, source, keep, &grave)
        if free_buffer == NULL:
            free_buffer = pool_take_free(&self._pool, buf.len)
        pthread_mutex_unlock(&self._lock)
        grave_flush(&grave)
        if free_buffer != NULL:
            target = <_FrameBuffer>free_buffer
            Py_DECREF(target)  # the pool's reference is now `target`
        else:
            target = new_buffer(buf.len)
        if buf.len >= NOGIL_COPY_MIN:
            with nogil:
                gather(target.ptr, buf, contiguous)
        else:
            gather(target.ptr, buf, contiguous)
        return target

    cdef PyObject *_take_evicted_buffer(self, Py_ssize_t nbytes, object source, Py_ssize_t keep,
                                        Grave *grave) noexcept:
        """When this store evicts the oldest slot anyway (same source, ring full), take
        its buffer now if nothing else references it, so a camera loop cycles through
        max_recent buffers, not one more. If the store is then rate-limited after all
        (another producer stored during the copy), the evicted frame stays gone: it was
        the next to leave."""
        if self._slots.count == 0 or self._slots.count < keep:
            return NULL
        if PyUnicode_Compare(<object>self._source, source) != 0:
            return NULL
        return slots_take_oldest_buffer(&self._slots, nbytes, grave)

    cdef uint64_t _commit(self, _FrameBuffer target, Slot *meta, Py_ssize_t keep, int64_t min_ns,
                          bint *run) except? 0:
        """Accept the copied frame into the ring and queue it for the fan-out. Returns its
        accept number (``run``: this thread is now the fan-out's runner), 0 when
        rate-limited (another producer stored meanwhile), or NO_FAN_OUT when nobody
        subscribes. Nothing here calls Python or fails half-way."""
        cdef Grave grave
        cdef Slot *slot
        cdef Py_ssize_t count, evict
        cdef bint reset
        cdef uint64_t seq
        grave_init(&grave)
        Py_INCREF(target)  # from here on the ring's: a slot's, or back in the pool
        lock_with_gil(&self._lock)
        if self._is_rate_limited(meta.received_ns, min_ns):
            self._rate_limited += 1
            pool_retire(&self._pool, <PyObject *>target, &grave)
            pthread_mutex_unlock(&self._lock)
            grave_flush(&grave)
            return 0
        count = self._slots.count
        reset = PyUnicode_Compare(<object>self._source, <object>meta.source) != 0
        evict = count if reset else (count - keep + 1 if count >= keep else 0)
        if not slots_reserve(&self._slots, count - evict + 1):
            pool_retire(&self._pool, <PyObject *>target, &grave)
            pthread_mutex_unlock(&self._lock)
            grave_flush(&grave)
            raise MemoryError("cannot grow the frame ring")
        if reset:
            self._switch_source(<object>meta.source, &grave)
        else:
            slots_evict_oldest(&self._slots, evict, &self._pool, &grave)
        pool_release_oversized(&self._pool, meta.nbytes, &grave)
        self._accepted += 1
        slot = slots_append(&self._slots, meta, <PyObject *>target, self._accepted)
        self._has_last = True
        self._last_accepted_ns = meta.received_ns
        self._last_active_s = meta.received_at
        run[0] = False
        seq = self._queue_for_fan_out(slot, run)
        pthread_mutex_unlock(&self._lock)
        grave_flush(&grave)
        return seq

    cdef uint64_t _queue_for_fan_out(self, const Slot *slot, bint *run) noexcept:
        """Under the ring lock: hand an accepted slot to the fan-out, claiming the runner
        role if nobody holds it. Its accept number, or NO_FAN_OUT."""
        if PyList_GET_SIZE(self._subscribers) == 0:
            return NO_FAN_OUT
        if not self._fan.push(slot):
            # Out of memory for the fan-out: counted as dropped for every subscriber
            # rather than lost silently.
            for q in self._subscribers:
                (<_Queue>q).settle(slot.seq)
            return NO_FAN_OUT
        run[0] = not self._fan.running
        if run[0]:
            self._fan.claim()
        return slot.seq

    def loan_frame(self, nbytes):
        """Writable memory for one frame of ``nbytes`` bytes; its commit() stores it."""
        cdef Py_ssize_t size = <Py_ssize_t>parse_int(nbytes, "nbytes", 0, MAX_LOAN)
        check_not_forked(self._fork_gen)
        return lend(self, size)

    # -- reads --------------------------------------------------------------------
    def latest_visual_frames(self, ttl, now=None):
        """Frames no older than ttl (inclusive), oldest first; [] when ttl <= 0."""
        cdef int64_t ttl_ns = parse_duration_ns(ttl, "ttl")
        cdef double now_s
        cdef int64_t now_ns
        cdef Py_ssize_t i, k = 0
        cdef Slot *picked
        cdef Grave grave
        cdef list result
        self._read_now(now, &now_s, &now_ns)
        if ttl_ns <= 0:
            return []
        lock_with_gil(&self._lock)
        picked = slots_pick_recent(&self._slots, now_ns, ttl_ns, &k)
        pthread_mutex_unlock(&self._lock)
        if picked == NULL:
            raise MemoryError()
        grave_init(&grave)
        try:
            result = hand_out(picked, k)
            lock_with_gil(&self._lock)
            slots_cache_frames(&self._slots, picked, k, &grave)
            pthread_mutex_unlock(&self._lock)
        finally:
            for i in range(k):
                if picked[i].buffer != NULL:
                    # Made here but not handed to a slot (an error stopped us first).
                    grave_add(&grave, picked[i].frame)
                    grave_add(&grave, picked[i].view)
                    grave_add(&grave, picked[i].buffer)
                    grave_add(&grave, picked[i].source)
                    grave_add(&grave, picked[i].mime)
            free(picked)
            grave_flush(&grave)
        return result

    def visual_stats(self):
        cdef uint64_t accepted, rate_limited, resets
        cdef Py_ssize_t frames, nbytes
        check_not_forked(self._fork_gen)
        lock_with_gil(&self._lock)
        accepted = self._accepted
        rate_limited = self._rate_limited
        resets = self._source_resets
        frames = self._slots.count
        nbytes = self._slots.nbytes
        pthread_mutex_unlock(&self._lock)
        return {"accepted": accepted, "rate_limited": rate_limited, "source_resets": resets,
                "frames": frames, "bytes": nbytes}

    # -- subscribers ----------------------------------------------------------------
    def subscribe_visual_frames(self, buffer=1, *, policy="drop_newest"):
        cdef Py_ssize_t maxsize = parse_count(buffer, "buffer")
        cdef _Queue q
        cdef list old, grown
        policy = _validate.policy(policy)
        check_not_forked(self._fork_gen)
        # Made before locking: no allocation (so no garbage collection) under the lock.
        q = _Queue.__new__(_Queue, maxsize, policy, 0)
        while True:
            old = self._subscribers
            grown = old + [q]
            lock_with_gil(&self._lock)
            if self._subscribers is old or self._ended:
                break
            pthread_mutex_unlock(&self._lock)
        # Frames accepted before now are not this subscriber's, even those still waiting
        # for the fan-out.
        q.booked_seq = self._accepted
        if self._ended:
            # Nothing would ever close it: it starts closed, so a reader finishes at once.
            q.closed = True
        else:
            self._subscribers = grown
        pthread_mutex_unlock(&self._lock)
        sub = Subscription.__new__(Subscription, _MAKE)
        (<Subscription>sub)._queue = q
        (<Subscription>sub)._ring = self
        return sub

    @property
    def subscriber_count(self):
        cdef Py_ssize_t n
        check_not_forked(self._fork_gen)
        self._prune_closed()
        lock_with_gil(&self._lock)
        n = PyList_GET_SIZE(self._subscribers)
        pthread_mutex_unlock(&self._lock)
        return n

    cdef void _remove_queue(self, _Queue q) noexcept:
        self._replace_subscribers(q)

    cdef void _prune_closed(self) noexcept:
        """Forget queues whose handle was dropped (closed from __dealloc__)."""
        self._replace_subscribers(None)

    cdef void _replace_subscribers(self, _Queue leaving) noexcept:
        """Replace the subscriber list by one without ``leaving`` (None: without the
        closed queues). The list is built with the GIL but without the lock, then
        swapped in if nobody replaced it meanwhile."""
        cdef list old, kept
        while True:
            old = self._subscribers
            if leaving is None:
                kept = [q for q in old if not (<_Queue>q).closed]
            else:
                kept = [q for q in old if q is not leaving]
            if len(kept) == len(old):
                return
            lock_with_gil(&self._lock)
            if self._subscribers is old:
                self._subscribers = kept
                pthread_mutex_unlock(&self._lock)
                return  # `old` is released after unlocking: a queue's last reference may go with it
            pthread_mutex_unlock(&self._lock)

    def close_subscriptions(self):
        """Close every live subscription (the session ended): their readers wake up."""
        cdef list none_left = []  # made before locking: no allocation under the lock
        cdef list subscribers
        cdef _Queue q
        check_not_forked(self._fork_gen)
        lock_with_gil(&self._lock)
        self._ended = True
        subscribers = self._subscribers
        self._subscribers = none_left
        pthread_mutex_unlock(&self._lock)
        error = None
        for q in subscribers:
            try:
                q.close()
            except BaseException as exc:  # every reader is still woken, then it is raised
                if error is None:
                    error = exc
        if error is not None:
            raise error
