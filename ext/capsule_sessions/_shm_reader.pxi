# The read side of a shared session, in any process (the owner's own reads included):
# leases, mapped data segments, frames that are read-only views of shared memory.

cdef extern from "<sched.h>" nogil:
    int sched_yield()

# A reader that finds the ring being rewritten this many times in a row gives up.
cdef int SEQLOCK_TRIES = 10000
# |received_ns| of a valid ring entry (instants are within +-2**62 ns).
cdef int64_t MAX_INSTANT_NS = 1 << 62


@cython.final
@cython.no_gc_clear  # __dealloc__ writes through the mapping its attributes keep alive
cdef class _Lease:
    """A reader's hold on one buffer, the base of the arrays handed out over it: while it
    lives, the owner does not rewrite the buffer (it is leased); collecting it ends the
    lease. It also keeps the mapping alive, so the view stays valid after unlink."""
    cdef AttachedSession reader
    cdef _Segment mapping
    cdef uint32_t index

    def __dealloc__(self):
        if self.reader is not None:
            self.reader._release(self.index)

    def __reduce_ex__(self, protocol):
        raise TypeError("a shared frame's lease cannot be pickled; copy the frame's data instead")


@cython.final
@cython.no_gc_clear  # __dealloc__ writes through the mapping its attributes keep alive
cdef class AttachedSession:
    """The read side of a shared session: ``latest_visual_frames``,
    ``subscribe_visual_frames``, ``visual_stats``, ``closed``, ``close()``. Made by
    ``capsule_sessions.attach`` (or by the owner for its own reads)."""

    cdef _Segment _control
    cdef cs_header *_h
    cdef uint32_t *_leases
    cdef int _index
    cdef list _maps
    cdef uint64_t *_map_serials
    cdef Py_ssize_t _held
    cdef object _clock
    cdef object _owner  # a weak reference to the owner's SharedRing (None: another process's)
    cdef str _data_prefix
    cdef readonly str session_id
    cdef readonly str namespace
    cdef bint _closed
    cdef object _subscriptions
    cdef object __weakref__

    def __cinit__(self):
        self._index = -1
        self._map_serials = <uint64_t *>calloc(CS_MAX_BUFFERS, sizeof(uint64_t))
        if self._map_serials == NULL:
            raise MemoryError()

    def __init__(self, *args, **kwargs):
        raise TypeError("attached sessions are made by capsule_sessions.attach()")

    @staticmethod
    cdef AttachedSession _new(_Segment control, object clock, str session_id, str namespace):
        cdef AttachedSession self = AttachedSession.__new__(AttachedSession)
        self._control = control
        self._h = <cs_header *>control.addr
        self._clock = clock
        self._maps = [None] * CS_MAX_BUFFERS
        self._data_prefix = f"{control.name}.{self._h.nonce:016x}"
        self.session_id = session_id
        self.namespace = namespace
        self._subscriptions = weakref.WeakSet()
        self._claim_reader_slot()
        return self

    @staticmethod
    cdef AttachedSession _for_owner(SharedRing owner, _Segment control, object clock):
        cdef AttachedSession self = AttachedSession._new(control, clock, owner.session_id, owner.namespace)
        self._owner = weakref.ref(owner)  # not the ring itself: the two would form a cycle
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
        return AttachedSession._new(control, time.monotonic, session_id, namespace)

    cdef _claim_reader_slot(self):
        cdef cs_reader *readers = cs_readers(self._h)
        cdef uint64_t pid = getpid()
        cdef uint32_t r
        for r in range(CS_MAX_READERS):
            if cs_cas(&readers[r].pid, 0, pid):
                cs_store(&readers[r].copied_out, 0)
                cs_store(&readers[r].start_time, own_start_time())
                self._index = r
                self._leases = cs_leases(self._h, r)
                return
        raise SharedMemoryError(f"shared session {self.session_id!r} already has {CS_MAX_READERS} readers attached")

    def __dealloc__(self):
        cdef cs_reader *readers
        if self._index >= 0 and self._h != NULL:
            # Every lease and subscription holds this object, so none is left: the slot
            # is free for the next reader.
            readers = cs_readers(self._h)
            memset(self._leases, 0, CS_MAX_BUFFERS * sizeof(uint32_t))
            cs_store(&readers[self._index].start_time, 0)
            cs_store(&readers[self._index].pid, 0)
        free(self._map_serials)
        self._map_serials = NULL

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle an attached session: attach() again in the other process")

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return f"<AttachedSession {self.session_id!r} namespace={self.namespace!r} {state}>"

    # -- state ---------------------------------------------------------------------------
    cdef bint _owner_gone(self):
        if self._owner is not None:
            owner = self._owner()
            return owner is None or (<SharedRing>owner)._ended
        if cs_load(&self._h.closed):
            return True
        return not process_alive(self._h.owner_pid, self._h.owner_start)

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
    cdef void _release(self, uint32_t index) noexcept:
        cs_release32(&self._leases[index])
        self._held -= 1

    cdef _Segment _mapping(self, uint32_t index):
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
            self._release_raw(index)
            return None
        seg = self._mapping(index)
        if seg is None:
            self._release_raw(index)
            return None
        try:
            return self._build(index, seg)
        except BaseException:
            self._release_raw(index)
            raise

    cdef inline void _release_raw(self, uint32_t index) noexcept:
        cs_release32(&self._leases[index])

    cdef object _frame(self, uint64_t entry):
        cdef uint32_t index = entry & LOW32
        if index >= CS_MAX_BUFFERS:
            raise SharedMemoryError(f"shared session {self.session_id!r} is corrupted: buffer {index} out of range")
        cs_add32(&self._leases[index], 1)
        return self._frame_of_leased(entry)

    cdef object _build(self, uint32_t index, _Segment seg):
        cdef cs_meta *meta = <cs_meta *>seg.addr
        cdef uint64_t size = seg.size
        if (meta.magic != CS_DATA_MAGIC or meta.data_offset > size or meta.nbytes > size - meta.data_offset
                or <uint64_t>sizeof(cs_meta) + meta.mime_len + meta.source_len > meta.data_offset):
            raise SharedMemoryError(f"data segment {seg.name!r} is corrupted: its frame header is out of bounds")
        cdef char *strings = seg.addr + sizeof(cs_meta)
        try:
            mime_type = strings[:meta.mime_len].decode("utf-8", "surrogatepass")
            source = strings[meta.mime_len:meta.mime_len + meta.source_len].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise SharedMemoryError(f"data segment {seg.name!r} is corrupted: a text field is not UTF-8") from None
        cdef cnp.npy_intp dims = <cnp.npy_intp>meta.nbytes
        cdef cnp.ndarray arr
        cdef _Lease lease
        cdef bint copied = self._held >= CS_LEASE_BUDGET
        if copied:
            # Past the budget a frame is copied out, so a reader that hoards frames pins
            # no more shared memory than its budget (counted in visual_stats). The lease
            # ends at the return, once the header fields below are read too.
            arr = cnp.PyArray_EMPTY(1, &dims, cnp.NPY_UINT8, 0)
            memcpy(cnp.PyArray_DATA(arr), seg.addr + meta.data_offset, meta.nbytes)
        else:
            arr = cnp.PyArray_SimpleNewFromData(1, &dims, cnp.NPY_UINT8, seg.addr + meta.data_offset)
            lease = _Lease.__new__(_Lease)
            lease.mapping = seg
            lease.index = index
            lease.reader = self
            self._held += 1
            cnp.set_array_base(arr, lease)
        cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
        frame = VisualFrame.__new__(VisualFrame)
        PyObject_GenericSetAttr(frame, "data", arr)
        PyObject_GenericSetAttr(frame, "mime_type", mime_type)
        PyObject_GenericSetAttr(frame, "width", meta.width)
        PyObject_GenericSetAttr(frame, "height", meta.height)
        PyObject_GenericSetAttr(frame, "source", source)
        PyObject_GenericSetAttr(frame, "timestamp_ms", meta.timestamp_ms)
        PyObject_GenericSetAttr(frame, "frame_seq", meta.frame_seq)
        PyObject_GenericSetAttr(frame, "received_at", meta.received_at)
        if copied:
            self._release_raw(index)
            cs_add(&cs_readers(self._h)[self._index].copied_out, 1)
        return frame

    # -- reads ---------------------------------------------------------------------------------
    def latest_visual_frames(self, ttl, now=None):
        """Frames no older than ttl (inclusive), oldest first; [] when ttl <= 0."""
        self._check_open()
        cdef int64_t ttl_ns = v.duration_ns(ttl, "ttl")
        if now is None:
            _, now_py = v.instant(self._clock(), "clock()")
        else:
            _, now_py = v.instant(now, "now")
        if ttl_ns <= 0:
            return []
        cdef int64_t now_ns = now_py
        cdef cs_header *h = self._h
        cdef uint64_t entries[CS_MAX_RING]
        cdef int64_t received[CS_MAX_RING]
        cdef uint64_t seq, n, k
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
            for k in range(n):
                if received[k] > MAX_INSTANT_NS or received[k] < -MAX_INSTANT_NS:
                    raise SharedMemoryError(f"shared session {self.session_id!r} is corrupted: a frame's instant")
                if now_ns - received[k] <= ttl_ns:
                    frame = self._frame(entries[k])
                    if frame is None:  # rewritten since the copy: read the ring again
                        break
                    frames.append(frame)
            else:
                return frames
        if self._owner_gone():
            return []
        raise SharedMemoryError(f"shared session {self.session_id!r}: its ring never stopped changing")

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
        """The session's counters as the owner published them, and ``copied_out``: frames
        copied out of shared memory because a reader held its whole lease budget."""
        accepted, rate_limited, source_resets, frames, nbytes = self._stats()
        return {"accepted": accepted, "rate_limited": rate_limited, "source_resets": source_resets,
                "frames": frames, "bytes": nbytes, "copied_out": self._copied_out_total()}

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
        maxsize = v.count(buffer, "buffer")
        policy = v.policy(policy)
        if maxsize > CS_MAX_QUEUE:
            raise ValueError(f"buffer must be at most {CS_MAX_QUEUE} for a shared session, got {maxsize}")
        if self._owner_gone():
            return SharedSubscription._born_closed(self, maxsize, policy)
        cdef cs_sub *subs = cs_subs(self._h)
        cdef cs_sub *s
        cdef uint32_t i
        for i in range(CS_MAX_SUBS):
            s = &subs[i]
            if cs_cas(&s.state, CS_SUB_FREE, CS_SUB_CLAIMED):
                cs_store(&s.reader, self._index)
                cs_store(&s.policy, 1 if policy == "drop_oldest" else 0)
                cs_store(&s.maxsize, maxsize)
                cs_store(&s.closed, 0)
                cs_store(&s.head, 0)
                cs_store(&s.tail, 0)
                cs_store(&s.dropped, 0)
                cs_store(&s.delivered, 0)
                epoch = cs_add(&s.epoch, 1)
                cs_store(&s.state, CS_SUB_ACTIVE)
                sub = SharedSubscription._claimed(self, i, epoch, maxsize, policy)
                self._subscriptions.add(sub)
                return sub
        raise SharedMemoryError(f"shared session {self.session_id!r} already has {CS_MAX_SUBS} subscriptions")
