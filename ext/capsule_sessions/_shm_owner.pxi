# The writer of a shared session: the in-process ring's decisions (the pure twin's
# _ring.py, step for step), its frames in data segments, the result published for readers.

cdef inline uint64_t _pack(uint64_t gen, uint64_t index) noexcept nogil:
    return ((gen & LOW32) << 32) | index


cdef struct _OwnerSlot:
    uint32_t index        # the buffer
    uint64_t nbytes
    int64_t received_ns


@cython.final
@cython.no_gc_clear
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
    # The ring's frames, oldest first, in C (no Python object per store): _slot_count
    # of them from _slot_head, a circle of CS_MAX_RING.
    cdef _OwnerSlot _slot_items[CS_MAX_RING]
    cdef Py_ssize_t _slot_head, _slot_count
    cdef str _source
    cdef object _last_accepted_ns
    cdef uint64_t _accepted, _rate_limited, _source_resets, _bytes
    cdef list _segments             # buffer index -> _Segment or None
    cdef list _free                 # indices holding a segment that is not in the ring
    cdef list _unused               # indices without a segment
    cdef uint32_t *_qrefs           # queue entries naming each buffer
    cdef uint64_t _serial
    cdef uint64_t _last_needed          # the size the last store or loan asked for
    cdef list _mirrors
    cdef uint64_t _mirrored         # bit i: slot i has a mirror (an adopted subscription)
    cdef uint64_t _subs_seen        # the header's subs_version at the last full look
    cdef int64_t _reaped_at
    cdef uint32_t _writing
    cdef AttachedSession _local
    cdef list _returned             # (index, abandoned) of loans given back, drained under the lock
    cdef uint64_t _fork_gen
    cdef object __weakref__

    def __cinit__(self):
        self._qrefs = <uint32_t *>calloc(CS_MAX_BUFFERS, sizeof(uint32_t))
        if self._qrefs == NULL:
            raise MemoryError()

    def __init__(self, clock, created_at, *, str namespace, str session_id, str control_name, str data_prefix):
        self._clock = v.clock(clock)
        self._last_active_s, _ = v.instant(created_at, "created_at")
        self._lock = threading.RLock()
        self._source = ""
        self._last_accepted_ns = None
        self._segments = []
        self._free = []
        self._unused = []
        self._mirrors = [None] * CS_MAX_SUBS
        self._returned = []
        self._fork_gen = fork_generation
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
        header_init(self._h, encoded, int(self._data_prefix.rsplit(".", 1)[1], 16))
        self._local = AttachedSession._for_owner(self, self._control, self._clock, self._segments)
        cs_store(&self._h.owner_reader, self._local._slot.index)
        _live_rings.add(self)

    def __dealloc__(self):
        free(self._qrefs)
        self._qrefs = NULL
        if self._h != NULL and self._fork_gen == fork_generation:
            # A session dropped without being ended: its names go with it; one ended
            # while readers were attached: what those that died since left (not in a
            # forked child, whose copy of the ring is not the session).
            cs_store(&self._h.closed, 1)
            if not self._ended:
                self._control.unlink()
            try:
                _leave_if_last(self._h, self._local._slot.index, self._data_prefix)
            except BaseException:
                pass

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle or copy 'FrameRing' object (another process attach()es to a shared session by name)")

    # -- locking and time (as FrameRing) -------------------------------------------------------
    cdef _claim(self):
        if self._h == NULL:
            raise TypeError("this shared ring was never initialised (made with SharedRing.__new__)")
        if self._fork_gen != fork_generation:
            raise RuntimeError(FORKED_MESSAGE)
        if self._busy:
            raise RuntimeError(REENTERED_MESSAGE)
        self._busy = True

    cdef tuple _read_now(self, now):
        cdef double seconds
        cdef int64_t ns
        read_clock(self._clock, now, &seconds, &ns)
        return seconds, ns

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
    cdef inline _OwnerSlot *_slot(self, Py_ssize_t k) noexcept:
        return &self._slot_items[(self._slot_head + k) % CS_MAX_RING]

    cdef _clear_frames(self):
        cdef Py_ssize_t k
        for k in range(self._slot_count):
            self._free.append(self._slot(k).index)
        self._slot_count = 0
        self._bytes = 0

    cdef _switch_source(self, str source):
        if self._source:
            self._source_resets += 1
        self._source = source
        self._clear_frames()

    def start_visual_input(self, source, now=None):
        source = parse_text(source, "source")
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
        source = parse_text(source, "source")
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
        if not PyObject_CheckBuffer(data):
            check_buffer(data)  # its TypeError
        source = parse_text(source, "source")
        # The published ring has room for CS_MAX_RING frames: a larger bound is that one
        # (as in-process, where a huge bound is clamped too; docs/shared-memory.md).
        cdef Py_ssize_t keep = min(parse_count(max_recent, "max_recent"), CS_MAX_RING)
        cdef int64_t min_ns = parse_duration_ns(min_interval, "min_interval")
        cdef Slot meta
        mime_type = parse_frame_fields(&meta, mime_type, width, height, timestamp_ms, frame_seq)
        describe_image(&meta, data)
        cdef double seconds
        cdef int64_t now_ns
        read_clock(self._clock, now, &seconds, &now_ns)
        if self._count_if_rate_limited(now_ns, min_ns):
            return False
        cdef Py_buffer view
        cdef object gathered = None
        try:
            PyObject_GetBuffer(data, &view, PyBUF_C_CONTIGUOUS)
        except (BufferError, ValueError, TypeError):
            gathered = copy_bytes(data)  # strided or PIL-style: one gather, then one copy
            PyObject_GetBuffer(gathered, &view, PyBUF_C_CONTIGUOUS)
        if view.ndim > PyBUF_MAX_NDIM:  # refused as memoryview (so in-process) refuses it
            PyBuffer_Release(&view)
            copy_bytes(data)
        cdef int index = -1
        cdef bytes mime = mime_type.encode("utf-8", "surrogatepass")
        cdef bytes src = source.encode("utf-8", "surrogatepass")
        try:
            index = self._reserve(DATA_OFFSET + view.len + len(mime) + len(src))
            self._copy_in(index, &view)
            self._describe(index, view.len, mime, src, meta.width, meta.height, meta.timestamp_ms, meta.frame_seq,
                           seconds)
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

    cdef int _reserve(self, uint64_t needed) except -1:
        """A buffer of ``needed`` bytes (frame header, bytes, text) for one store or loan."""
        with self._lock:
            self._claim()
            try:
                if self._writing >= CS_MAX_WRITING:
                    raise RuntimeError(f"more than {CS_MAX_WRITING} stores and loans of one shared session at once")
                index = pool_allocate(self, needed)
                self._writing += 1
                return index
            finally:
                self._busy = False

    cdef _unreserve(self, int index):
        with self._lock:
            self._writing -= 1
            self._free.append(index)

    cdef void _give_back(self, int index, bint abandoned) noexcept:
        # No lock, no claim: a loan may be dropped by a finalizer in the middle of a store
        # on this thread. The next store takes it back (_drain_returned).
        self._returned.append((index, abandoned))

    def loan_frame(self, nbytes):
        """Writable memory for one frame of ``nbytes`` bytes, in shared memory; its
        commit() publishes it without a copy."""
        size = v.integer(nbytes, "nbytes", 0, _limits.MAX_LOAN_BYTES)
        index = self._reserve(DATA_OFFSET + size + LOAN_TEXT_ROOM)
        return SharedLoan._lend(self, index, size)

    cdef _copy_in(self, int index, Py_buffer *view):
        cdef char *dst = (<_Segment>self._segments[index]).addr + DATA_OFFSET
        cdef char *from_ = <char *>view.buf
        cdef Py_ssize_t n = view.len
        if n < NOGIL_COPY_MIN:
            memcpy(dst, from_, n)
            return
        with nogil:
            if n >= STREAM_COPY_MIN:
                cs_large_copy(dst, from_, n)
            else:
                memcpy(dst, from_, n)

    cdef _describe(self, int index, uint64_t nbytes, bytes mime, bytes src, int64_t width, int64_t height,
                   int64_t timestamp_ms, int64_t frame_seq, double seconds):
        """Write the frame header and its text (after the bytes, so a loan's bytes sit at
        a fixed offset before the text is known)."""
        cdef _Segment seg = self._segments[index]
        cdef cs_meta *meta = <cs_meta *>seg.addr
        meta.magic = CS_DATA_MAGIC
        meta.nbytes = nbytes
        meta.width = width
        meta.height = height
        meta.timestamp_ms = timestamp_ms
        meta.frame_seq = frame_seq
        meta.received_at = seconds
        meta.mime_len = len(mime)
        meta.source_len = len(src)
        meta.data_offset = DATA_OFFSET
        memcpy(seg.addr + DATA_OFFSET + nbytes, <char *>mime, len(mime))
        memcpy(seg.addr + DATA_OFFSET + nbytes + len(mime), <char *>src, len(src))

    cdef bint _commit(self, int index, Py_ssize_t nbytes, Py_ssize_t keep, int64_t min_ns, double seconds,
                      int64_t now_ns, str source) except -1:
        cdef uint64_t gen
        with self._lock:
            self._claim()
            try:
                self._writing -= 1
                pool_drain_returned(self)
                if self._is_rate_limited(now_ns, min_ns):
                    self._rate_limited += 1
                    self._free.append(index)
                    self._publish()
                    return False
                fan_adopt(self)
                if self._source != source:
                    self._switch_source(source)
                else:
                    while self._slot_count >= keep:
                        oldest = self._slot(0)
                        self._bytes -= oldest.nbytes
                        self._free.append(oldest.index)
                        self._slot_head = (self._slot_head + 1) % CS_MAX_RING
                        self._slot_count -= 1
                newest = self._slot(self._slot_count)
                newest.index = index
                newest.nbytes = nbytes
                newest.received_ns = now_ns
                self._slot_count += 1
                self._bytes += nbytes
                self._last_accepted_ns = now_ns
                self._last_active_s = seconds
                self._accepted += 1
                self._publish()
                gen = cs_load(&cs_buffers(self._h)[index].gen)
                fan_out(self, _pack(gen, index))
                pool_trim(self)
                return True
            finally:
                self._busy = False

    # -- publishing (lock held) -----------------------------------------------------------
    cdef _publish(self):
        cdef cs_header *h = self._h
        cdef cs_buffer *buffers = cs_buffers(h)
        cdef uint64_t i
        cdef _OwnerSlot *slot
        cs_add(&h.seq, 1)  # odd: readers retry
        for i in range(<uint64_t>self._slot_count):
            slot = self._slot(i)
            cs_store(&h.ring[i].entry, _pack(cs_load(&buffers[slot.index].gen), slot.index))
            cs_store(<uint64_t *>&h.ring[i].received_ns, <uint64_t>slot.received_ns)
            cs_store(&h.ring[i].nbytes, slot.nbytes)
        i = self._slot_count
        cs_store(&h.ring_count, i)
        cs_store(&h.accepted, self._accepted)
        cs_store(&h.rate_limited, self._rate_limited)
        cs_store(&h.source_resets, self._source_resets)
        cs_store(&h.frames, i)
        cs_store(&h.bytes, self._bytes)
        cs_add(&h.seq, 1)



    # -- reads: the owner's own attachment ---------------------------------------------------
    def latest_visual_frames(self, ttl, now=None):
        return self._local.latest_visual_frames(ttl, now)

    def visual_stats(self):
        with self._lock:
            return {"accepted": self._accepted, "rate_limited": self._rate_limited,
                    "source_resets": self._source_resets, "frames": self._slot_count, "bytes": self._bytes}

    def shared_stats(self):
        """What sharing costs, beside visual_stats (whose keys stay the in-process ones)."""
        with self._lock:
            held = sum(seg.size for seg in self._segments if seg is not None)
            buffers = sum(1 for seg in self._segments if seg is not None)
        return dict(self._local.shared_stats(), buffers=buffers, buffer_bytes=held)

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
        get what was queued, then SubscriptionClosed) and the names are unlinked. Called
        again (as at exit), it unlinks what readers that died since left behind."""
        cdef cs_sub *subs = cs_subs(self._h)
        cdef uint32_t i
        if self._h == NULL or self._fork_gen != fork_generation:
            return
        with self._lock:
            if self._ended:
                _leave_if_last(self._h, self._local._slot.index, self._data_prefix)
                return
            self._ended = True
            cs_store(&self._h.closed, 1)
            for i in range(CS_MAX_SUBS):
                cs_store(&subs[i].closed, 1)
            wake_readers(self._h)
            self._unlink_all()

    cdef _unlink_all(self):
        # The control name goes now (nobody new can attach); the data segments stay
        # while another process is attached, which may still map a queued frame's
        # buffer by name: the last reader to detach unlinks them (_leave_if_last).
        self._control.unlink()
        _leave_if_last(self._h, self._local._slot.index, self._data_prefix)


# Rings still shared at interpreter exit are ended then, so a normal exit leaves nothing
# in /dev/shm even for sessions nobody closed.
_live_rings = weakref.WeakSet()


def _end_live_rings():
    for ring in list(_live_rings):
        try:
            ring.close_subscriptions()
        except Exception:
            pass


atexit.register(_end_live_rings)
