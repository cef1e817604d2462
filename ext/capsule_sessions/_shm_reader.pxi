# The read side of a shared session, in any process (the owner's own reads included):
# leases, mapped data segments, frames that are read-only views of shared memory.

cdef extern from "<sched.h>" nogil:
    int sched_yield()

# A reader that finds the ring being rewritten this many times in a row gives up.
cdef int SEQLOCK_TRIES = 10000
# |received_ns| of a valid ring entry (instants are within +-2**62 ns).
cdef int64_t MAX_INSTANT_NS = 1 << 62


# no_gc_clear on every class whose __dealloc__ writes to shared memory: the garbage
# collector must not drop the segment it writes to (unmapping it) first.
@cython.final
@cython.no_gc_clear
cdef class AttachedSession:
    """The read side of a shared session: ``latest_visual_frames``,
    ``subscribe_visual_frames``, ``visual_stats``, ``closed``, ``close()``. Made by
    ``capsule_sessions.attach`` (or by the owner for its own reads)."""

    cdef _Segment _control
    cdef cs_header *_h
    cdef _ReaderSlot _slot
    cdef list _maps
    cdef uint64_t *_map_serials
    cdef object _clock
    cdef bint _owner_local
    cdef int64_t _owner_alive_at    # when the owner process was last seen running (ns)
    cdef list _owner_segments
    cdef str _data_prefix
    cdef readonly str session_id
    cdef readonly str namespace
    cdef bint _closed
    cdef object _subscriptions
    cdef list _text_raw             # the last mime type's and source's bytes ...
    cdef list _text_str             # ... and their str
    cdef list _cache_frames         # the frames the last latest_visual_frames handed out
    cdef uint64_t _cache_entries[CS_MAX_RING]  # their ring entries (generation, buffer)
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        if len(args) != 1 or args[0] is not _MAKE or kwargs:
            raise TypeError("attached sessions are made by capsule_sessions.attach()")
        self._map_serials = <uint64_t *>calloc(CS_MAX_BUFFERS, sizeof(uint64_t))
        if self._map_serials == NULL:
            raise MemoryError()

    @staticmethod
    cdef AttachedSession _new(_Segment control, object clock, str session_id, str namespace, bint owner_local):
        cdef AttachedSession self = AttachedSession.__new__(AttachedSession, _MAKE)
        self._control = control
        self._h = <cs_header *>control.addr
        self._clock = clock
        self._maps = [None] * CS_MAX_BUFFERS
        self._data_prefix = f"{control.name}.{self._h.nonce:016x}"
        self.session_id = session_id
        self.namespace = namespace
        self._subscriptions = weakref.WeakSet()
        self._cache_frames = []
        self._text_raw = [b"", b""]
        self._text_str = ["", ""]
        self._owner_local = owner_local
        self._slot = _ReaderSlot.claim(control, owner_local, self._data_prefix, session_id)
        return self

    @staticmethod
    cdef AttachedSession _for_owner(SharedRing owner, _Segment control, object clock, list segments):
        # Not a reference to the ring (it holds this): a cycle of objects that write to
        # shared memory when collected could not be broken safely.
        cdef AttachedSession self = AttachedSession._new(control, clock, owner.session_id, owner.namespace, True)
        # The owner's reads use its own mappings (by index), never a name: they work
        # after the names are gone, and nothing is mapped twice.
        self._owner_segments = segments
        return self

    @staticmethod
    def _attach(str control_name, str session_id, str namespace):
        """The read side of control segment ``control_name`` (capsule_sessions.attach)."""
        control = _open_segment(control_name, True)
        cdef cs_header *h = <cs_header *>(<_Segment>control).addr
        reason = _check_header(h, (<_Segment>control).size, control_name)
        if reason is not None:
            raise SharedMemoryError(f"{control_name!r} is not a capsule_sessions session: {reason}")
        try:
            stored_id = h.id[:h.id_len].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise SharedMemoryError(f"{control_name!r} is corrupted: its session id is not UTF-8") from None
        if stored_id != session_id:
            raise SharedMemoryError(f"{control_name!r} holds session {stored_id!r}, not {session_id!r}")
        return AttachedSession._new(control, time.monotonic, session_id, namespace, False)

    def __dealloc__(self):
        free(self._map_serials)
        self._map_serials = NULL

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle or copy 'AttachedSession' object (attach() again in the other process)")

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return f"<AttachedSession {self.session_id!r} namespace={self.namespace!r} {state}>"

    # -- state ---------------------------------------------------------------------------
    cdef bint _owner_gone(self):
        if cs_load(&self._h.closed):
            return True
        if self._owner_local:
            return False
        if not process_alive(self._h.owner_pid, self._h.owner_start):
            return True
        self._owner_alive_at = monotonic_ns()
        return False

    cdef bint _owner_gone_lately(self):
        """_owner_gone for a subscriber's empty takes: probing the owner reads
        /proc/<pid>/stat (tens of microseconds), and a subscriber that sleeps between
        frames asked before every wait, at thousands of frames/s. A verdict of alive is
        trusted for OWNER_PROBE_NS, well inside a wait's slice; every other question
        (closed, the reads) looks afresh."""
        if cs_load(&self._h.closed):
            return True
        if not self._owner_local and monotonic_ns() - self._owner_alive_at < OWNER_PROBE_NS:
            return False
        return self._owner_gone()

    @property
    def closed(self):
        """True once this handle was closed, or the session ended (or its owner died)."""
        return self._closed or self._owner_gone()

    @property
    def owner_pid(self):
        return self._h.owner_pid

    def close(self):
        """Close this handle and its subscriptions (idempotent). Frames already handed
        out stay valid; the reader slot is given back when the last of them is gone."""
        self._closed = True
        self._cache_frames = []
        for sub in list(self._subscriptions):
            sub.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef _check_open(self):
        if self._closed:
            raise ValueError(f"attached session {self.session_id!r} is closed")

    # -- leases and frames -----------------------------------------------------------------
    cdef _Segment _mapping(self, uint32_t index):
        if self._owner_segments is not None:
            return self._owner_segments[index] if index < len(self._owner_segments) else None
        cdef uint64_t serial = cs_load(&cs_buffers(self._h)[index].serial)
        if serial == 0:
            return None
        if self._map_serials[index] == serial:
            return self._maps[index]
        try:
            seg = _open_segment(f"{self._data_prefix}.{serial}", False)
        except (FileNotFoundError, SharedMemoryError):
            return None  # unlinked since (the session ended)
        if (<_Segment>seg).size < sizeof(cs_meta):
            raise SharedMemoryError(f"data segment {(<_Segment>seg).name!r} is too small to hold a frame")
        self._maps[index] = seg
        self._map_serials[index] = serial
        return seg

    cdef object _frame_of_leased(self, uint64_t entry):
        """The frame in buffer ``entry`` names, which this reader has just leased; None
        (lease ended) when the buffer moved on or its segment is gone."""
        cdef uint32_t index = entry & LOW32
        if (cs_load(&cs_buffers(self._h)[index].gen) & LOW32) != (entry >> 32):
            self._slot.release_raw(index)
            return None
        seg = self._mapping(index)
        if seg is None:
            self._slot.release_raw(index)
            return None
        try:
            return self._build(index, seg)
        except BaseException:
            self._slot.release_raw(index)
            raise

    cdef object _frame(self, uint64_t entry):
        cdef uint32_t index = entry & LOW32
        if index >= CS_MAX_BUFFERS:
            raise SharedMemoryError(f"shared session {self.session_id!r} is corrupted: buffer {index} out of range")
        cs_add32(&self._slot.leases[index], 1)
        return self._frame_of_leased(entry)

    cdef object _build(self, uint32_t index, _Segment seg):
        # The header is read once, into this copy, before anything is checked or used: a
        # copied-out frame's lease ends before the frame object is made (the buffer may
        # hold the next frame by then), and a header another process scribbles on must
        # not change between its bounds check and its use.
        cdef cs_meta meta = (<cs_meta *>seg.addr)[0]
        cdef uint64_t size = seg.size
        if (meta.magic != CS_DATA_MAGIC or meta.data_offset != DATA_OFFSET or meta.data_offset > size
                or meta.nbytes > size - meta.data_offset
                or <uint64_t>meta.mime_len + meta.source_len > size - meta.data_offset - meta.nbytes):
            raise SharedMemoryError(f"data segment {seg.name!r} is corrupted: its frame header is out of bounds")
        cdef char *strings = seg.addr + meta.data_offset + meta.nbytes
        mime_type = self._text(strings, meta.mime_len, 0, seg)
        source = self._text(strings + meta.mime_len, meta.source_len, 1, seg)
        cdef cnp.npy_intp dims = <cnp.npy_intp>meta.nbytes
        cdef cnp.ndarray arr
        cdef _Lease lease
        if self._slot.held >= CS_LEASE_BUDGET:
            # Past the budget a frame is copied out, so a reader that hoards frames pins
            # no more shared memory than its budget (counted in shared_stats).
            arr = cnp.PyArray_EMPTY(1, &dims, cnp.NPY_UINT8, 0)
            memcpy(cnp.PyArray_DATA(arr), seg.addr + meta.data_offset, meta.nbytes)
            self._slot.release_raw(index)
            cs_add(&cs_readers(self._h)[self._slot.index].copied_out, 1)
        else:
            arr = cnp.PyArray_SimpleNewFromData(1, &dims, cnp.NPY_UINT8, seg.addr + meta.data_offset)
            lease = _Lease.__new__(_Lease)
            lease.mapping = seg
            lease.index = index
            lease.slot = self._slot
            self._slot.held += 1
            cnp.set_array_base(arr, lease)
        cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
        frame = _object_new(VisualFrame)
        PyObject_GenericSetAttr(frame, "data", arr)
        PyObject_GenericSetAttr(frame, "mime_type", mime_type)
        PyObject_GenericSetAttr(frame, "width", meta.width)
        PyObject_GenericSetAttr(frame, "height", meta.height)
        PyObject_GenericSetAttr(frame, "source", source)
        PyObject_GenericSetAttr(frame, "timestamp_ms", meta.timestamp_ms)
        PyObject_GenericSetAttr(frame, "frame_seq", meta.frame_seq)
        PyObject_GenericSetAttr(frame, "received_at", meta.received_at)
        return frame

    cdef str _text(self, const char *raw, uint32_t length, int which, _Segment seg):
        """A frame's mime type (``which`` 0) or source (1): the same str as the last
        frame's when the bytes are the same (a camera's never change), else decoded."""
        cdef bytes last = self._text_raw[which]
        if len(last) == length and memcmp(<const char *>last, raw, length) == 0:
            return self._text_str[which]
        try:
            text = raw[:length].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise SharedMemoryError(f"data segment {seg.name!r} is corrupted: a text field is not UTF-8") from None
        self._text_raw[which] = raw[:length]
        self._text_str[which] = text
        return text

    # -- reads ---------------------------------------------------------------------------------
    def latest_visual_frames(self, ttl, now=None):
        """Frames no older than ttl (inclusive), oldest first; [] when ttl <= 0."""
        self._check_open()
        cdef int64_t ttl_ns = parse_duration_ns(ttl, "ttl")
        cdef double seconds
        cdef int64_t now_ns
        read_clock(self._clock, now, &seconds, &now_ns)
        if ttl_ns <= 0:
            return []
        cdef cs_header *h = self._h
        cdef uint64_t entries[CS_MAX_RING]
        cdef int64_t received[CS_MAX_RING]
        cdef uint64_t fresh[CS_MAX_RING]
        cdef uint64_t seq, n, k, fresh_n
        cdef int tries
        for tries in range(SEQLOCK_TRIES):
            seq = cs_load(&h.seq)
            if seq & 1:
                sched_yield()
                continue
            n = cs_load(&h.ring_count)
            if n > CS_MAX_RING:
                raise SharedMemoryError(f"shared session {self.session_id!r} is corrupted: {n} frames in its ring")
            for k in range(n):
                entries[k] = cs_load(&h.ring[k].entry)
                received[k] = <int64_t>cs_load(<uint64_t *>&h.ring[k].received_ns)
            if cs_load(&h.seq) != seq:
                continue
            frames = []
            fresh_n = 0
            for k in range(n):
                if received[k] > MAX_INSTANT_NS or received[k] < -MAX_INSTANT_NS:
                    raise SharedMemoryError(f"shared session {self.session_id!r} is corrupted: a frame's instant")
                if now_ns - received[k] <= ttl_ns:
                    # A frame this handle made for the same buffer and generation is the
                    # same frame (its lease kept the buffer as it was): handed out again,
                    # as in-process.
                    frame = self._cached(entries[k])
                    if frame is None:
                        frame = self._frame(entries[k])
                        if frame is None:  # rewritten since the copy: read the ring again
                            break
                    frames.append(frame)
                    fresh[fresh_n] = entries[k]
                    fresh_n += 1
            else:
                # Only the frames just handed out stay cached: one that left the ring is
                # let go (its lease ends with the caller's last reference), so the cache
                # pins no buffer the ring does not hold anyway.
                memcpy(self._cache_entries, fresh, fresh_n * sizeof(uint64_t))
                self._cache_frames = frames
                return frames
        if self._owner_gone():
            return []
        raise SharedMemoryError(f"shared session {self.session_id!r}: its ring never stopped changing")

    cdef object _cached(self, uint64_t entry):
        """The frame this handle last handed out for ``entry`` (buffer and generation), or
        None: the same frame, since its lease kept the buffer as it was."""
        cdef Py_ssize_t j
        for j in range(len(self._cache_frames)):
            if self._cache_entries[j] == entry:
                return self._cache_frames[j]
        return None

    cdef tuple _stats(self):
        cdef cs_header *h = self._h
        cdef uint64_t seq
        for _ in range(SEQLOCK_TRIES):
            seq = cs_load(&h.seq)
            if seq & 1:
                sched_yield()
                continue
            stats = (cs_load(&h.accepted), cs_load(&h.rate_limited), cs_load(&h.source_resets),
                     cs_load(&h.frames), cs_load(&h.bytes))
            if cs_load(&h.seq) == seq:
                return stats
        if self._owner_gone():  # killed while publishing: the last counters, as they are
            return (cs_load(&h.accepted), cs_load(&h.rate_limited), cs_load(&h.source_resets),
                    cs_load(&h.frames), cs_load(&h.bytes))
        raise SharedMemoryError(f"shared session {self.session_id!r}: its counters never stopped changing")

    cdef uint64_t _copied_out_total(self):
        cdef cs_reader *readers = cs_readers(self._h)
        cdef uint64_t total = 0
        cdef uint32_t r
        for r in range(CS_MAX_READERS):
            total += cs_load(&readers[r].copied_out)
        return total

    def visual_stats(self):
        """The session's counters as the owner published them (the in-process keys)."""
        accepted, rate_limited, source_resets, frames, nbytes = self._stats()
        return {"accepted": accepted, "rate_limited": rate_limited, "source_resets": source_resets,
                "frames": frames, "bytes": nbytes}

    cdef int _reader_count(self):
        cdef cs_reader *readers = cs_readers(self._h)
        cdef uint32_t r
        cdef int count = 0
        for r in range(CS_MAX_READERS):
            if cs_load(&readers[r].pid) != 0:
                count += 1
        return count

    def shared_stats(self):
        """``copied_out``: frames copied out of shared memory because their reader held
        its whole lease budget; ``readers``: attached handles (the owner's own
        included); ``subscriptions``: open subscriptions in every process."""
        return {"copied_out": self._copied_out_total(), "readers": self._reader_count(),
                "subscriptions": self._subscriber_count()}

    cdef int _subscriber_count(self):
        cdef cs_sub *subs = cs_subs(self._h)
        cdef uint32_t i
        cdef int count = 0
        for i in range(CS_MAX_SUBS):
            if cs_load(&subs[i].state) == CS_SUB_ACTIVE and not cs_load(&subs[i].closed):
                count += 1
        return count

    def subscribe_visual_frames(self, buffer=1, *, policy="drop_newest"):
        self._check_open()
        # A queue in the control segment has room for CS_MAX_QUEUE frames: a larger
        # buffer is that one, and maxsize says so.
        maxsize = min(v.count(buffer, "buffer"), CS_MAX_QUEUE)
        policy = v.policy(policy)
        if self._owner_gone():
            return SharedSubscription._born_closed(self, maxsize, policy)
        cdef cs_sub *subs = cs_subs(self._h)
        cdef cs_sub *s
        cdef uint32_t i
        for i in range(CS_MAX_SUBS):
            s = &subs[i]
            if cs_cas(&s.state, CS_SUB_FREE, CS_SUB_CLAIMED_BY(self._slot.index)):
                cs_store(&s.reader, self._slot.index)
                cs_store(&s.policy, 1 if policy == "drop_oldest" else 0)
                cs_store(&s.maxsize, maxsize)
                cs_store(&s.closed, 0)
                cs_store(&s.head, 0)
                cs_store(&s.tail, 0)
                cs_store(&s.dropped, 0)
                cs_store(&s.delivered, 0)
                epoch = cs_add(&s.epoch, 1)
                cs_store(&s.state, CS_SUB_ACTIVE)
                cs_add(&self._h.subs_version, 1)
                sub = SharedSubscription._claimed(self, i, epoch, maxsize, policy)
                self._subscriptions.add(sub)
                return sub
        raise SharedMemoryError(f"shared session {self.session_id!r} already has {CS_MAX_SUBS} subscriptions")
