# Frame loans: a buffer of the ring's pool (or a new one) lent for the caller to write
# one frame into, then handed to the ring as that frame's buffer, without a copy; or
# given back to the pool. A loan's views are numpy arrays based on the buffer, so the
# buffer's reference count says whether one is alive, by the rule the pool already
# reuses buffers by: written only while nothing but its owner references it.

cdef frozenset COMMIT_KEYWORDS = frozenset(("source", "max_recent", "min_interval", "mime_type", "width",
                                            "height", "timestamp_ms", "frame_seq", "now"))
cdef frozenset AS_ARRAY_KEYWORDS = frozenset(("shape", "dtype"))
cdef object _uint8 = numpy.uint8


cdef int refuse_loan_call(str method, tuple args, dict kwargs) except -1:
    """Raise the TypeError the pure twin's FrameLoan.<method>() raises for arguments that
    do not fit its signature (CPython checks them before running the body)."""
    from capsule_sessions import _framebuf_py
    getattr(_framebuf_py.FrameLoan, method)(None, *args, **kwargs)
    raise AssertionError(f"FrameLoan.{method}() accepted arguments its compiled twin refused")


cdef tuple as_array_arguments(tuple args, dict kwargs):
    """(shape, dtype) of an ``as_array(shape, dtype=numpy.uint8)`` call."""
    cdef Py_ssize_t n = len(args)
    if not kwargs and 1 <= n <= 2:
        return (args[0], args[1] if n == 2 else _uint8)
    if n > 1 or not AS_ARRAY_KEYWORDS.issuperset(kwargs) or (n == 1) == ("shape" in kwargs):
        refuse_loan_call("as_array", args, kwargs)
    return (args[0] if n else kwargs["shape"], kwargs.get("dtype", _uint8))


cdef FrameLoan lend(FrameRing ring, Py_ssize_t nbytes):
    """A loan of ``nbytes``: a free pool buffer that fits (only the pool references it, as
    for a store), else a new one."""
    cdef PyObject *free_buffer
    cdef FrameLoan loan = FrameLoan.__new__(FrameLoan, _MAKE)
    loan._ring = ring
    loan._nbytes = nbytes
    loan._fork_gen = ring._fork_gen
    lock_with_gil(&ring._lock)
    free_buffer = pool_take_free(&ring._pool, nbytes)
    pthread_mutex_unlock(&ring._lock)
    if free_buffer != NULL:
        loan._buffer = <_FrameBuffer>free_buffer
        Py_DECREF(loan._buffer)  # the pool's reference is now the loan's
    else:
        loan._buffer = new_buffer(nbytes)
    return loan


cdef void give_back(FrameRing ring, _FrameBuffer buffer) noexcept:
    """A cancelled loan's buffer, into the ring's pool: written again only once no view of
    it is alive."""
    cdef Grave grave
    grave_init(&grave)
    Py_INCREF(buffer)  # the pool's
    lock_with_gil(&ring._lock)
    pool_retire(&ring._pool, <PyObject *>buffer, &grave)
    pthread_mutex_unlock(&ring._lock)
    grave_flush(&grave)


@cython.final
cdef class FrameLoan:
    """Writable memory for one frame, from ``Session.loan_frame(nbytes)``: write the frame
    into ``array`` or ``as_array(shape)``, drop those views, then ``commit(...)`` it as
    ``store_frame`` would store it (the memory becomes the frame's), or ``cancel()``.
    Leaving a ``with`` block without a commit cancels, and so does dropping the loan."""

    def __cinit__(self, *args, **kwargs):
        # At the door: a loan without a ring and a buffer behind it must never exist.
        if len(args) != 1 or args[0] is not _MAKE or kwargs:
            raise TypeError(LOAN_NOT_BY_HAND_MESSAGE)

    def __dealloc__(self):
        # Dropped unfinished: cancelled. In a forked child the ring's lock may be held by
        # a thread that is gone, so the buffer is only released.
        if self._buffer is not None and self._ring is not None and self._fork_gen == fork_generation:
            give_back(self._ring, self._buffer)

    # Two loans of one buffer would commit it twice.
    __reduce_ex__ = _refuse_copy

    @property
    def nbytes(self):
        return self._nbytes

    @property
    def array(self):
        """The loan's memory as a writable 1-D uint8 array: a new view on every read, that
        must be gone before ``commit()``. ValueError once the loan is finished."""
        # Held while the view is made: a commit in another thread meanwhile sees it.
        cdef _FrameBuffer buffer = self._buffer
        check_not_forked(self._fork_gen)
        if buffer is None:
            raise ValueError(LOAN_FINISHED_MESSAGE)
        return make_writable_view(buffer, self._nbytes)

    # The public methods take *args/**kwargs and unpack them by hand: a call that does
    # not fit gets the pure twin's own TypeError (refuse_loan_call), word for word.
    def as_array(self, *args, **kwargs):
        """as_array(shape, dtype=numpy.uint8): a writable view of the loan's memory as
        ``dtype`` with ``shape``, which must cover the ``nbytes`` exactly (ValueError
        naming ``shape`` otherwise)."""
        shape, dtype = as_array_arguments(args, kwargs)
        self._check_open()
        # Checked before a view exists: a refused call leaves nothing exported.
        dims, kind = _validate.view_layout(shape, dtype, self._nbytes)
        return self.array.view(kind).reshape(dims)

    def commit(self, *args, **kwargs):
        """commit(*, source, max_recent, min_interval=0.0, mime_type="", width=0, height=0,
        timestamp_ms=0, frame_seq=0, now=None) -> bool: store the loan's bytes as one
        frame, as ``store_frame`` would store them (False when rate-limited); the buffer
        becomes the frame's. Afterwards the loan is finished, rate-limited or not. A bad
        argument, or a view of the loan still alive (BufferError), leaves it open."""
        if args or not COMMIT_KEYWORDS.issuperset(kwargs) or "source" not in kwargs or "max_recent" not in kwargs:
            refuse_loan_call("commit", args, kwargs)
        self._check_open()
        get = kwargs.get
        return self._ring._store_loan(self, kwargs["source"], kwargs["max_recent"], get("min_interval", 0.0),
                                      get("mime_type", ""), get("width", 0), get("height", 0),
                                      get("timestamp_ms", 0), get("frame_seq", 0), get("now"))

    def cancel(self, *args, **kwargs):
        """Give the memory back, storing nothing. A finished loan stays as it is."""
        cdef _FrameBuffer buffer
        if args or kwargs:
            refuse_loan_call("cancel", args, kwargs)
        check_not_forked(self._fork_gen)
        buffer = self._buffer
        if buffer is None:
            return
        self._buffer = None
        give_back(self._ring, buffer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()

    cdef int _check_open(self) except -1:
        check_not_forked(self._fork_gen)
        if self._buffer is None:
            raise ValueError(LOAN_FINISHED_MESSAGE)
        return 0

    cdef _FrameBuffer _take(self):
        """The loan's buffer, for a commit: the loan is finished from here on. ValueError
        when it is already, BufferError (and the loan stays open) while a view of it is
        alive: while anything but the loan references the buffer. Checked and taken with
        no Python code in between, so two threads cannot both take it."""
        cdef _FrameBuffer buffer
        self._check_open()
        if _refcnt(<PyObject *>self._buffer) != 1:
            raise BufferError(LOAN_EXPORTED_MESSAGE)
        buffer = self._buffer
        self._buffer = None
        return buffer

    def __repr__(self):
        state = "open" if self._buffer is not None else "finished"
        return f"<FrameLoan {state} nbytes={self._nbytes}>"
