# The writer of a shared session: the in-process ring's decisions (the pure twin's
# _ring.py, step for step), its frames in data segments, the result published for readers.

cdef inline uint64_t _pack(uint64_t gen, uint64_t index) noexcept nogil:
    return ((gen & LOW32) << 32) | index


cdef inline bint _fits(uint64_t capacity, uint64_t needed) noexcept nogil:
    # As the compiled twin's pool: a buffer is reused for a frame that fits and fills a
    # quarter of it (small buffers for any frame that fits).
    return capacity >= needed and (capacity <= SHRINK_FLOOR or needed * 4 >= capacity)


@cython.final
cdef class _SubMirror:
    """What the owner remembers of one subscription slot: which claim it belongs to,
    how far it has counted the queue's entries out of the buffer books, and the accept
    number it booked last."""
    cdef uint64_t epoch
    cdef uint64_t seen_tail
    cdef uint64_t booked
    # Read once at adoption: the shared copies are writable by readers, so the owner
    # never divides by, or branches on, what a reader could change afterwards.
    cdef uint64_t maxsize
    cdef bint drop_oldest
    cdef uint64_t head


@cython.final
@cython.no_gc_clear  # __dealloc__ writes through the mapping its attributes keep alive
cdef class SharedRing:
    """A session's frame ring in shared memory (the owning process's side). Same methods
    and results as ``FrameRing``; reads go through an ``AttachedSession`` of its own."""

    cdef _Segment _control
    cdef cs_header *_h
    cdef object _clock
    cdef object _lock
    cdef bint _busy
    cdef bint _ended
    cdef readonly str namespace
    cdef readonly str session_id
    cdef readonly str control_name
    cdef str _data_prefix
    cdef double _last_active_s
    cdef object _slots              # deque of [buffer index, nbytes, received ns]
    cdef str _source
    cdef object _last_accepted_ns
    cdef uint64_t _accepted, _rate_limited, _source_resets, _bytes
    cdef list _segments             # buffer index -> _Segment or None
    cdef list _free                 # indices holding a segment that is not in the ring
    cdef list _unused               # indices without a segment
    cdef uint32_t *_qrefs           # queue entries naming each buffer
    cdef uint64_t _serial
    cdef list _mirrors
    cdef int64_t _reaped_at
    cdef uint32_t _writing
    cdef AttachedSession _local
    cdef object __weakref__

    def __cinit__(self):
        self._qrefs = <uint32_t *>calloc(CS_MAX_BUFFERS, sizeof(uint32_t))
        if self._qrefs == NULL:
            raise MemoryError()

    def __init__(self, clock, created_at, *, str namespace, str session_id, str control_name, str data_prefix):
        self._clock = v.clock(clock)
        self._last_active_s, _ = v.instant(created_at, "created_at")
        self._lock = threading.RLock()
        self._slots = deque()
        self._source = ""
        self._last_accepted_ns = None
        self._segments = []
        self._free = []
        self._unused = []
        self._mirrors = [None] * CS_MAX_SUBS
        self.namespace = namespace
        self.session_id = session_id
        self.control_name = control_name
        self._data_prefix = data_prefix
        encoded = session_id.encode("utf-8", "surrogatepass")
        if len(encoded) > CS_ID_MAX:
            raise ValueError(f"a shared session's id must be at most {CS_ID_MAX} bytes in UTF-8")
        try:
            self._control = _create_segment(control_name, CS_TOTAL_SIZE)
        except FileExistsError:
            raise SessionExistsError(
                f"session {session_id!r} is already shared in namespace {namespace!r} by a live process") from None
        self._h = <cs_header *>self._control.addr
        self._init_header(encoded)
        self._local = AttachedSession._for_owner(self, self._control, self._clock)
        _live_rings.add(self)

    cdef _init_header(self, bytes encoded):
        cdef cs_header *h = self._h
        h.version = CS_VERSION
        h.header_size = sizeof(cs_header)
        h.total_size = CS_TOTAL_SIZE
        h.max_ring = CS_MAX_RING
        h.max_buffers = CS_MAX_BUFFERS
        h.max_readers = CS_MAX_READERS
        h.max_subs = CS_MAX_SUBS
        h.max_queue = CS_MAX_QUEUE
        h.lease_budget = CS_LEASE_BUDGET
        h.off_buffers = CS_OFF_BUFFERS
        h.off_readers = CS_OFF_READERS
        h.off_leases = CS_OFF_LEASES
        h.off_subs = CS_OFF_SUBS
        h.owner_start = own_start_time()
        h.nonce = int(self._data_prefix.rsplit(".", 1)[1], 16)
        h.id_len = len(encoded)
        memcpy(h.id, <char *>encoded, len(encoded))
        h.owner_pid = getpid()
        # Last: a reader that sees the magic sees every field above.
        cs_store(&h.magic, CS_MAGIC)

    def __dealloc__(self):
        free(self._qrefs)
        self._qrefs = NULL
        if self._h != NULL and not self._ended:
            # A session dropped without being ended: its names go with it.
            cs_store(&self._h.closed, 1)
            self._unlink_all()

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle a shared session's ring: attach() to it by name instead")

    # -- locking and time (as FrameRing) -------------------------------------------------------
    cdef _claim(self):
        if self._busy:
            raise RuntimeError(REENTERED_MESSAGE)
        self._busy = True

    cdef tuple _read_now(self, now):
        if now is None:
            return v.instant(self._clock(), "clock()")
        return v.instant(now, "now")

    @property
    def last_active_at(self):
        return self._last_active_s

    def touch(self, now=None):
        seconds, _ = self._read_now(now)
        with self._lock:
            self._claim()
            try:
                self._last_active_s = seconds
            finally:
                self._busy = False

    # -- visual input -------------------------------------------------------------------
    cdef _clear_frames(self):
        for slot in self._slots:
            self._free.append(slot[0])
        self._slots.clear()
        self._bytes = 0

    cdef _switch_source(self, str source):
        if self._source:
            self._source_resets += 1
        self._source = source
        self._clear_frames()

    def start_visual_input(self, source, now=None):
        source = v.text(source, "source")
        seconds, _ = self._read_now(now)
        with self._lock:
            self._claim()
            try:
                if self._source != source:
                    self._switch_source(source)
                    self._last_accepted_ns = None
                    self._publish()
                self._last_active_s = seconds
            finally:
                self._busy = False

    def stop_visual_input(self, source="", now=None):
        source = v.text(source, "source")
        seconds, _ = self._read_now(now)
        with self._lock:
            self._claim()
            try:
                if not source or not self._source or self._source == source:
                    self._clear_frames()
                    self._source = ""
                    self._last_accepted_ns = None
                    self._publish()
                self._last_active_s = seconds
            finally:
                self._busy = False

    def store_frame(self, data, *, source, max_recent, min_interval=0.0, mime_type="", width=0, height=0,
                    timestamp_ms=0, frame_seq=0, now=None):
        """Store one frame's bytes (one copy, into shared memory); False when rate-limited."""
        return self._store(data, source, max_recent, min_interval, mime_type, width, height,
                           timestamp_ms, frame_seq, now)

    def store_visual_frame(self, frame, max_recent, min_interval=0.0, now=None):
        if not isinstance(frame, VisualFrame):
            raise TypeError(f"frame must be a VisualFrame, got {type(frame).__name__}")
        return self._store(frame.data, frame.source, max_recent, min_interval, frame.mime_type,
                           frame.width, frame.height, frame.timestamp_ms, frame.frame_seq, now)

    cdef _store(self, data, source, max_recent, min_interval, mime_type, width, height, timestamp_ms,
                frame_seq, now):
        check_buffer(data)
        source = v.text(source, "source")
        keep = v.count(max_recent, "max_recent")
        if keep > CS_MAX_RING:
            raise ValueError(f"max_recent must be at most {CS_MAX_RING} for a shared session, got {keep}")
        min_ns = v.duration_ns(min_interval, "min_interval")
        mime_type, width, height, timestamp_ms, frame_seq = v.frame_fields(
            data, mime_type, width, height, timestamp_ms, frame_seq)
        seconds, now_ns = self._read_now(now)
        if self._count_if_rate_limited(now_ns, min_ns):
            return False
        cdef Py_buffer view
        cdef object gathered = None
        try:
            PyObject_GetBuffer(data, &view, PyBUF_C_CONTIGUOUS)
        except (BufferError, ValueError, TypeError):
            gathered = copy_bytes(data)  # strided or PIL-style: one gather, then one copy
            PyObject_GetBuffer(gathered, &view, PyBUF_C_CONTIGUOUS)
        cdef int index = -1
        try:
            index = self._reserve(view.len, mime_type, source)
            self._write(index, &view, mime_type, width, height, timestamp_ms, frame_seq, seconds, source)
        except BaseException:
            if index >= 0:
                self._unreserve(index)
            raise
        finally:
            PyBuffer_Release(&view)
        return self._commit(index, view.len, keep, min_ns, seconds, now_ns, source)

    cdef bint _count_if_rate_limited(self, int64_t now_ns, int64_t min_ns) except -1:
        with self._lock:
            self._claim()
            try:
                limited = self._is_rate_limited(now_ns, min_ns)
                if limited:
                    self._rate_limited += 1
                    self._publish()
                return limited
            finally:
                self._busy = False

    cdef bint _is_rate_limited(self, int64_t now_ns, int64_t min_ns):
        last = self._last_accepted_ns
        return last is not None and min_ns > 0 and now_ns - last < min_ns

    cdef int _reserve(self, Py_ssize_t nbytes, str mime_type, str source) except -1:
        meta_len = sizeof(cs_meta) + len(mime_type.encode("utf-8", "surrogatepass")) \
            + len(source.encode("utf-8", "surrogatepass"))
        needed = CS_ALIGN(meta_len) + nbytes
        with self._lock:
            self._claim()
            try:
                if self._writing >= CS_MAX_WRITING:
                    raise RuntimeError(f"more than {CS_MAX_WRITING} stores of one shared session at once")
                index = self._allocate(needed)
                self._writing += 1
                return index
            finally:
                self._busy = False

    cdef _unreserve(self, int index):
        with self._lock:
            self._writing -= 1
            self._free.append(index)

    cdef _write(self, int index, Py_buffer *view, str mime_type, int64_t width, int64_t height,
                int64_t timestamp_ms, int64_t frame_seq, double seconds, str source):
        cdef _Segment seg = self._segments[index]
        cdef cs_meta *meta = <cs_meta *>seg.addr
        cdef bytes mime = mime_type.encode("utf-8", "surrogatepass")
        cdef bytes src = source.encode("utf-8", "surrogatepass")
        meta.magic = CS_DATA_MAGIC
        meta.nbytes = view.len
        meta.width = width
        meta.height = height
        meta.timestamp_ms = timestamp_ms
        meta.frame_seq = frame_seq
        meta.received_at = seconds
        meta.mime_len = len(mime)
        meta.source_len = len(src)
        memcpy(seg.addr + sizeof(cs_meta), <char *>mime, len(mime))
        memcpy(seg.addr + sizeof(cs_meta) + len(mime), <char *>src, len(src))
        meta.data_offset = CS_ALIGN(sizeof(cs_meta) + len(mime) + len(src))
        cdef char *dst = seg.addr + meta.data_offset
        cdef char *from_ = <char *>view.buf
        cdef Py_ssize_t n = view.len
        if n >= NOGIL_COPY_MIN:
            with nogil:
                memcpy(dst, from_, n)
        else:
            memcpy(dst, from_, n)

    cdef bint _commit(self, int index, Py_ssize_t nbytes, Py_ssize_t keep, int64_t min_ns, double seconds,
                      int64_t now_ns, str source) except -1:
        cdef uint64_t gen
        with self._lock:
            self._claim()
            try:
                self._writing -= 1
                if self._is_rate_limited(now_ns, min_ns):
                    self._rate_limited += 1
                    self._free.append(index)
                    self._publish()
                    return False
                self._adopt_subscribers()
                if self._source != source:
                    self._switch_source(source)
                else:
                    while len(self._slots) >= keep:
                        old = self._slots.popleft()
                        self._bytes -= old[1]
                        self._free.append(old[0])
                self._slots.append([index, nbytes, now_ns])
                self._bytes += nbytes
                self._last_accepted_ns = now_ns
                self._last_active_s = seconds
                self._accepted += 1
                self._publish()
                gen = cs_load(&cs_buffers(self._h)[index].gen)
                self._fan_out(_pack(gen, index))
                self._trim_pool()
                return True
            finally:
                self._busy = False

    # -- publishing (lock held) -----------------------------------------------------------
    cdef _publish(self):
        cdef cs_header *h = self._h
        cdef cs_buffer *buffers = cs_buffers(h)
        cdef uint64_t i = 0
        cs_add(&h.seq, 1)  # odd: readers retry
        for slot in self._slots:
            index = slot[0]
            cs_store(&h.ring[i].entry, _pack(cs_load(&buffers[index].gen), index))
            cs_store(<uint64_t *>&h.ring[i].received_ns, <uint64_t>slot[2])
            cs_store(&h.ring[i].nbytes, slot[1])
            i += 1
        cs_store(&h.ring_count, i)
        cs_store(&h.accepted, self._accepted)
        cs_store(&h.rate_limited, self._rate_limited)
        cs_store(&h.source_resets, self._source_resets)
        cs_store(&h.frames, i)
        cs_store(&h.bytes, self._bytes)
        cs_add(&h.seq, 1)

    # -- buffers (lock held) --------------------------------------------------------------
    cdef bint _leased(self, uint64_t index):
        cdef cs_header *h = self._h
        cdef cs_reader *readers = cs_readers(h)
        cdef uint32_t r
        for r in range(CS_MAX_READERS):
            if cs_load32(&cs_leases(h, r)[index]) != 0:
                return True
        return False

    cdef bint _retire(self, uint64_t index):
        """Whether buffer ``index`` (leased by nobody a moment ago) can be destroyed: its
        generation is bumped first, then the leases are read again (the Dekker pair of
        _allocate), so a reader that leased it in between either fails its generation
        check or is seen here, and never maps the segment that replaces it."""
        cs_add(&cs_buffers(self._h)[index].gen, 1)
        return not self._leased(index)

    cdef int _allocate(self, uint64_t needed) except -1:
        """A buffer of at least ``needed`` bytes that no reader can reach: not in the
        ring, in no queue, leased by nobody; its generation is bumped before it is
        handed out, so a reader racing for its old frame fails its check."""
        cdef cs_buffer *buffers = cs_buffers(self._h)
        cdef Py_ssize_t i
        cdef uint64_t index
        self._reap_readers(False)
        self._reap_subscribers()
        for attempt in range(2):
            for i in range(len(self._free) - 1, -1, -1):
                index = self._free[i]
                if self._qrefs[index] or self._leased(index):
                    continue
                if not _fits(buffers[index].capacity, needed):
                    if not self._retire(index):
                        continue
                    del self._free[i]
                    self._destroy(index)
                    continue
                cs_add(&buffers[index].gen, 1)
                if self._leased(index):  # a reader leased it before it saw the new generation
                    continue
                del self._free[i]
                return index
            if self._unused or len(self._segments) < CS_MAX_BUFFERS:
                return self._new_buffer(needed)
            self._reap_readers(True)
        raise SharedMemoryError(f"every one of the {CS_MAX_BUFFERS} buffers of shared session "
                                f"{self.session_id!r} is in use")

    cdef int _new_buffer(self, uint64_t needed) except -1:
        cdef uint64_t capacity = (needed + 4095) & ~(<uint64_t>4095)
        if self._unused:
            index = self._unused.pop()
        else:
            index = len(self._segments)
            self._segments.append(None)
        self._serial += 1
        name = f"{self._data_prefix}.{self._serial}"
        try:
            seg = _create_segment(name, capacity)
        except BaseException:
            self._unused.append(index)
            raise
        if self._ended:
            seg.unlink()  # nobody can attach any more: the name would only leak
        self._segments[index] = seg
        cdef cs_buffer *b = &cs_buffers(self._h)[index]
        cs_add(&b.gen, 1)
        cs_store(&b.capacity, capacity)
        cs_store(&b.serial, self._serial)
        cs_add(&self._h.buffers_version, 1)
        return index

    cdef _destroy(self, uint64_t index):
        cdef cs_buffer *b = &cs_buffers(self._h)[index]
        seg = self._segments[index]
        cs_store(&b.serial, 0)
        cs_add(&b.gen, 1)
        self._segments[index] = None
        self._unused.append(index)
        if seg is not None and not self._ended:
            (<_Segment>seg).unlink()

    cdef _trim_pool(self):
        # Free buffers beyond a few spares are unlinked, so memory follows what the ring,
        # the queues and the readers hold (a reader's mapping outlives the name).
        cdef Py_ssize_t i
        cdef uint64_t index
        if len(self._free) <= POOL_SPARE:
            return
        for i in range(len(self._free) - 1 - POOL_SPARE, -1, -1):
            index = self._free[i]
            if self._qrefs[index] == 0 and not self._leased(index):
                if not self._retire(index):
                    continue
                del self._free[i]
                self._destroy(index)

    # -- subscribers (lock held) ----------------------------------------------------------
    cdef _count_out(self, cs_sub *s, _SubMirror m, uint64_t upto):
        cdef uint64_t k, e
        if upto > m.head:  # a tail past the head: only a corrupted table says so
            upto = m.head
        for k in range(m.seen_tail, upto):
            e = cs_load(&s.entries[k % m.maxsize])
            if (e & LOW32) < CS_MAX_BUFFERS and self._qrefs[e & LOW32]:
                self._qrefs[e & LOW32] -= 1
        m.seen_tail = upto

    cdef _reap_subscribers(self):
        cdef cs_sub *subs = cs_subs(self._h)
        cdef uint32_t i
        for i in range(CS_MAX_SUBS):
            m = self._mirrors[i]
            if m is None:
                if cs_load(&subs[i].state) == CS_SUB_RELEASED:
                    cs_store(&subs[i].state, CS_SUB_FREE)
                continue
            state = cs_load(&subs[i].state)
            if state == CS_SUB_ACTIVE and cs_load(&subs[i].epoch) == (<_SubMirror>m).epoch:
                self._count_out(&subs[i], m, cs_load(&subs[i].tail))
            else:  # released (or reclaimed and claimed again): nothing of it is queued
                self._count_out(&subs[i], m, (<_SubMirror>m).head)
                self._mirrors[i] = None
                if state == CS_SUB_RELEASED:
                    cs_store(&subs[i].state, CS_SUB_FREE)

    cdef _adopt_subscribers(self):
        """Subscriptions claimed since the last store start with the next accept number."""
        cdef cs_sub *subs = cs_subs(self._h)
        cdef uint32_t i
        cdef _SubMirror m
        self._reap_subscribers()
        for i in range(CS_MAX_SUBS):
            if self._mirrors[i] is None and cs_load(&subs[i].state) == CS_SUB_ACTIVE:
                maxsize = cs_load(&subs[i].maxsize)
                if maxsize == 0 or maxsize > CS_MAX_QUEUE:  # a corrupted claim: refuse it
                    cs_store(&subs[i].closed, 1)
                    continue
                m = _SubMirror.__new__(_SubMirror)
                m.epoch = cs_load(&subs[i].epoch)
                m.head = cs_load(&subs[i].head)
                m.seen_tail = m.head
                m.booked = self._accepted
                m.maxsize = maxsize
                m.drop_oldest = cs_load(&subs[i].policy) == 1
                self._mirrors[i] = m

    cdef _fan_out(self, uint64_t entry):
        cdef cs_sub *subs = cs_subs(self._h)
        cdef cs_sub *s
        cdef uint32_t i
        cdef uint64_t head, tail
        cdef _SubMirror m
        for i in range(CS_MAX_SUBS):
            if self._mirrors[i] is None:
                continue
            m = self._mirrors[i]
            s = &subs[i]
            if cs_load(&s.closed) or m.booked >= self._accepted:
                continue
            m.booked = self._accepted
            head = m.head
            tail = cs_load(&s.tail)
            if tail > head or head - tail > m.maxsize:  # corrupted by a reader: closed
                cs_store(&s.closed, 1)
                continue
            if head - tail >= m.maxsize:
                if not m.drop_oldest:
                    cs_add(&s.dropped, 1)
                    continue
                while head - tail >= m.maxsize and tail <= head:
                    if cs_cas(&s.tail, tail, tail + 1):
                        cs_add(&s.dropped, 1)
                    tail = cs_load(&s.tail)
                if tail > head:
                    cs_store(&s.closed, 1)
                    continue
            # Before the push: its slot is the one of entry head - maxsize, which the reader
            # may have taken since the last count, and must be counted out while it names
            # its own buffer, not the new one.
            self._count_out(s, m, tail)
            cs_store(&s.entries[head % m.maxsize], entry)
            self._qrefs[entry & LOW32] += 1
            m.head = head + 1
            cs_store(&s.head, head + 1)
            cs_add32(&s.wake, 1)
            if cs_load32(&s.sleepers):
                cs_futex_wake(&s.wake)

    cdef _reap_readers(self, bint now):
        """Reclaim the leases and subscriptions of readers whose process died (at most
        every REAP_INTERVAL_NS unless ``now``)."""
        cdef int64_t t = monotonic_ns()
        if not now and t - self._reaped_at < REAP_INTERVAL_NS:
            return
        self._reaped_at = t
        cdef cs_header *h = self._h
        cdef cs_reader *readers = cs_readers(h)
        cdef cs_sub *subs = cs_subs(h)
        cdef uint32_t r, i
        for r in range(CS_MAX_READERS):
            pid = cs_load(&readers[r].pid)
            if pid == 0 or process_alive(pid, cs_load(&readers[r].start_time)):
                continue
            for i in range(CS_MAX_SUBS):
                if cs_load(&subs[i].reader) == r and cs_load(&subs[i].state) in (CS_SUB_CLAIMED, CS_SUB_ACTIVE):
                    cs_store(&subs[i].state, CS_SUB_RELEASED)
            memset(cs_leases(h, r), 0, CS_MAX_BUFFERS * sizeof(uint32_t))
            cs_store(&readers[r].start_time, 0)
            cs_store(&readers[r].pid, 0)
        self._reap_subscribers()

    # -- reads: the owner's own attachment ---------------------------------------------------
    def latest_visual_frames(self, ttl, now=None):
        return self._local.latest_visual_frames(ttl, now)

    def visual_stats(self):
        with self._lock:
            return {"accepted": self._accepted, "rate_limited": self._rate_limited,
                    "source_resets": self._source_resets, "frames": len(self._slots), "bytes": self._bytes,
                    "copied_out": self._local._copied_out_total()}

    def subscribe_visual_frames(self, buffer=1, *, policy="drop_newest"):
        return self._local.subscribe_visual_frames(buffer, policy=policy)

    @property
    def subscriber_count(self):
        return self._local._subscriber_count()

    @property
    def closed(self):
        return self._ended

    def close_subscriptions(self):
        """End the session: every subscription closes (readers in every process wake,
        get what was queued, then SubscriptionClosed) and the names are unlinked."""
        cdef cs_sub *subs = cs_subs(self._h)
        cdef uint32_t i
        with self._lock:
            if self._ended:
                return
            self._ended = True
            cs_store(&self._h.closed, 1)
            for i in range(CS_MAX_SUBS):
                cs_store(&subs[i].closed, 1)
                cs_add32(&subs[i].wake, 1)
                cs_futex_wake(&subs[i].wake)
            self._unlink_all()

    cdef _unlink_all(self):
        self._control.unlink()
        for seg in self._segments:
            if seg is not None:
                (<_Segment>seg).unlink()


# Rings still shared at interpreter exit are ended then, so a normal exit leaves nothing
# in /dev/shm even for sessions nobody closed.
_live_rings = weakref.WeakSet()


def _end_live_rings():
    for ring in list(_live_rings):
        try:
            ring.close_subscriptions()
        except Exception:
            pass


import atexit
atexit.register(_end_live_rings)
