# Frame loans of a shared session: a data segment's bytes lent for the caller to write
# one frame into, then published as that frame without a copy (capsule_sessions.FrameLoan).

# Room kept after a loan's bytes for the frame's mime type and source, which are known
# only at commit; longer ones move the bytes to a bigger buffer (one copy).
cdef uint64_t LOAN_TEXT_ROOM = 1024


@cython.final
cdef class _LoanMemory:
    """A loan's bytes as a writable buffer that counts its exports, as memoryview does:
    every array made from the loan holds one until it is collected."""
    cdef _Segment segment
    cdef char *ptr
    cdef Py_ssize_t nbytes
    cdef Py_ssize_t exports
    cdef Py_ssize_t shape[1]

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self.ptr == NULL:
            raise ValueError(LOAN_FINISHED_MESSAGE)
        self.shape[0] = self.nbytes
        buffer.buf = self.ptr
        buffer.obj = self
        buffer.len = self.nbytes
        buffer.readonly = 0
        buffer.itemsize = 1
        buffer.format = "B"
        buffer.ndim = 1
        buffer.shape = self.shape
        buffer.strides = NULL
        buffer.suboffsets = NULL
        buffer.internal = NULL
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1


@cython.final
@cython.no_gc_clear
cdef class SharedLoan:
    """Writable memory for one frame of a shared session, from ``Session.loan_frame``:
    write the frame into ``array`` or ``as_array(shape)``, drop those views, then
    ``commit(...)`` it as ``store_frame`` would (the memory becomes the frame's, no
    copy), or ``cancel()``. Leaving a ``with`` block without a commit cancels, and so
    does dropping the loan."""

    cdef SharedRing _ring
    cdef int _index
    cdef uint64_t _nbytes
    cdef _LoanMemory _memory
    cdef object _lock

    def __cinit__(self, *args, **kwargs):
        self._index = -1
        if len(args) != 1 or args[0] is not _MAKE or kwargs:
            raise TypeError(LOAN_NOT_BY_HAND_MESSAGE)

    @staticmethod
    cdef SharedLoan _lend(SharedRing ring, int index, uint64_t nbytes):
        cdef SharedLoan self = SharedLoan.__new__(SharedLoan, _MAKE)
        cdef _LoanMemory memory = _LoanMemory.__new__(_LoanMemory)
        memory.segment = ring._segments[index]
        memory.ptr = memory.segment.addr + DATA_OFFSET
        memory.nbytes = nbytes
        self._ring = ring
        self._index = index
        self._nbytes = nbytes
        self._memory = memory
        self._lock = threading.RLock()
        return self

    def __dealloc__(self):
        if self._index >= 0:
            self._finish_unused()

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle or copy 'FrameLoan' object")

    def __copy__(self):
        raise TypeError("cannot pickle or copy 'FrameLoan' object")

    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle or copy 'FrameLoan' object")

    @property
    def nbytes(self):
        return self._nbytes

    cdef _check_open(self):
        if self._index < 0:
            raise ValueError(LOAN_FINISHED_MESSAGE)

    @property
    def array(self):
        """The loan's memory as a writable 1-D uint8 array: a new view on every read, that
        must be gone before ``commit()``. ValueError once the loan is finished."""
        with self._lock:
            self._check_open()
            return np.frombuffer(self._memory, dtype=np.uint8)

    def as_array(self, shape, dtype=np.uint8):
        """A writable view of the loan's memory as ``dtype`` with ``shape``, which must
        cover the ``nbytes`` exactly (ValueError naming ``shape`` otherwise)."""
        self._check_open()
        dims, kind = v.view_layout(shape, dtype, self._nbytes)
        return self.array.view(kind).reshape(dims)

    def commit(self, *, source, max_recent, min_interval=0.0, mime_type="", width=0, height=0, timestamp_ms=0,
               frame_seq=0, now=None):
        """Store the loan's bytes as one frame, as ``store_frame`` would store them: the
        same arguments, checks, errors and result (False when rate-limited). Afterwards
        the loan is finished, rate-limited or not. A bad argument, or a view of the loan
        still alive (BufferError), leaves it open."""
        self._check_open()
        return loan_commit(self._ring, self, source, max_recent, min_interval, mime_type, width, height,
                           timestamp_ms, frame_seq, now)

    def cancel(self):
        """Give the memory back, storing nothing. A finished loan stays as it is."""
        with self._lock:
            if self._index >= 0:
                self._finish_unused()

    cdef void _finish_unused(self) noexcept:
        # A view still alive could write on: that buffer is abandoned, never reused.
        index = self._index
        self._index = -1
        self._memory.ptr = NULL
        self._ring._give_back(index, self._memory.exports != 0)

    cdef int _take(self) except -1:
        """The loan's buffer, for a commit: the loan is finished from here on."""
        with self._lock:
            self._check_open()
            if self._memory.exports:
                raise BufferError(LOAN_EXPORTED_MESSAGE)
            index = self._index
            self._index = -1
            self._memory.ptr = NULL
            return index

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()

    def __repr__(self):
        state = "finished" if self._index < 0 else "open"
        return f"<FrameLoan {state} nbytes={self._nbytes}>"


cdef loan_commit(SharedRing ring, SharedLoan loan, source, max_recent, min_interval, mime_type, width, height,
                 timestamp_ms, frame_seq, now):
    """SharedLoan.commit: _store's checks (a loan is 1-D: no width or height is read
    from a shape), then the loan's bytes published as the frame's, where they are."""
    source = parse_text(source, "source")
    cdef Py_ssize_t keep = min(parse_count(max_recent, "max_recent"), CS_MAX_RING)
    cdef int64_t min_ns = parse_duration_ns(min_interval, "min_interval")
    cdef Slot meta
    mime_type = parse_frame_fields(&meta, mime_type, width, height, timestamp_ms, frame_seq)
    cdef double seconds
    cdef int64_t now_ns
    read_clock(ring._clock, now, &seconds, &now_ns)
    cdef bytes mime = mime_type.encode("utf-8", "surrogatepass")
    cdef bytes src = source.encode("utf-8", "surrogatepass")
    cdef int index = loan._take()
    cdef uint64_t nbytes = loan._nbytes
    cdef int moved
    try:
        limited = ring._count_if_rate_limited(now_ns, min_ns)
    except BaseException:
        ring._give_back(index, False)
        raise
    if limited:
        ring._give_back(index, False)
        return False
    cdef uint64_t needed = DATA_OFFSET + nbytes + len(mime) + len(src)
    if needed > cs_buffers(ring._h)[index].capacity:  # text longer than the room kept for it
        try:
            moved = ring._reserve(needed)
        except BaseException:
            ring._give_back(index, False)
            raise
        memcpy((<_Segment>ring._segments[moved]).addr + DATA_OFFSET,
               (<_Segment>ring._segments[index]).addr + DATA_OFFSET, nbytes)
        ring._give_back(index, False)
        index = moved
    ring._describe(index, nbytes, mime, src, meta.width, meta.height, meta.timestamp_ms, meta.frame_seq, seconds)
    return ring._commit(index, nbytes, keep, min_ns, seconds, now_ns, source)
