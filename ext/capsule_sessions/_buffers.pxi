# Frame memory: the buffers frames are copied into, the one-pass copy, the read-only
# views and frame objects made over them, and the pool of buffers that left the ring.


@cython.final
cdef class _FrameBuffer:
    """Owns one frame buffer. Holds no Python objects, so it is not GC-tracked and its
    release runs no Python code (it may therefore be dropped under a lock)."""

    def __dealloc__(self):
        free(self.ptr)


cdef _FrameBuffer new_buffer(Py_ssize_t nbytes):
    cdef Py_ssize_t capacity = nbytes if nbytes > BUFFER_ALIGN else BUFFER_ALIGN
    capacity = (capacity + BUFFER_ALIGN - 1) // BUFFER_ALIGN * BUFFER_ALIGN
    cdef void *ptr = NULL
    if posix_memalign(&ptr, BUFFER_ALIGN, capacity) != 0:
        raise MemoryError(f"cannot allocate a {nbytes}-byte frame buffer")
    cdef _FrameBuffer buf = _FrameBuffer.__new__(_FrameBuffer)
    buf.ptr = <char *>ptr
    buf.capacity = capacity
    return buf


cdef inline bint buffer_fits(PyObject *buffer, Py_ssize_t nbytes) noexcept nogil:
    cdef Py_ssize_t capacity = (<_FrameBuffer>buffer).capacity
    return capacity >= nbytes and (capacity <= SHRINK_FLOOR or capacity <= 4 * nbytes)


cdef inline const char *row_start(const Py_buffer *src, const Py_ssize_t *index, Py_ssize_t inner) noexcept nogil:
    """The first item of the innermost row at index[:inner], following suboffsets
    (PIL-style buffers store pointers to their rows)."""
    cdef const char *p = <const char *>src.buf
    cdef Py_ssize_t d
    for d in range(inner):
        p += index[d] * src.strides[d]
        if src.suboffsets != NULL and src.suboffsets[d] >= 0:
            p = (<const char **>p)[0] + src.suboffsets[d]
    return p


cdef int gather(char *dst, const Py_buffer *src, bint contiguous) noexcept nogil:
    """Copy src's bytes in C order into dst: one pass, whatever the strides and
    suboffsets. -1 (nothing copied) for more than PyBUF_MAX_NDIM dimensions, which the
    caller refuses before it gets here."""
    cdef Py_ssize_t index[PyBUF_MAX_NDIM]
    cdef Py_ssize_t ndim = src.ndim, itemsize = src.itemsize, inner, run, i, d
    cdef Py_ssize_t inner_suboffset = -1
    cdef const char *row
    cdef const char *item
    if src.len == 0:
        return 0
    if contiguous or ndim == 0 or src.strides == NULL:
        memcpy(dst, src.buf, src.len)
        return 0
    if ndim > PyBUF_MAX_NDIM:
        return -1
    inner = ndim - 1
    run = src.shape[inner]
    if src.suboffsets != NULL:
        inner_suboffset = src.suboffsets[inner]
    memset(index, 0, ndim * sizeof(Py_ssize_t))
    while True:
        row = row_start(src, index, inner)
        if inner_suboffset < 0 and src.strides[inner] == itemsize:
            memcpy(dst, row, run * itemsize)
            dst += run * itemsize
        else:
            for i in range(run):
                item = row + i * src.strides[inner]
                if inner_suboffset >= 0:
                    item = (<const char **>item)[0] + inner_suboffset
                memcpy(dst, item, itemsize)
                dst += itemsize
        d = inner - 1
        while d >= 0:
            index[d] += 1
            if index[d] < src.shape[d]:
                break
            index[d] = 0
            d -= 1
        if d < 0:
            return 0

cdef object make_view(PyObject *buffer, Py_ssize_t nbytes):
    cdef cnp.npy_intp dims = nbytes
    cdef cnp.ndarray arr = cnp.PyArray_SimpleNewFromData(1, &dims, cnp.NPY_UINT8, (<_FrameBuffer>buffer).ptr)
    cnp.set_array_base(arr, <object>buffer)
    cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
    return arr


cdef object make_writable_view(_FrameBuffer buffer, Py_ssize_t nbytes):
    """A writable 1-D uint8 array over a loaned buffer, based on it: while the array (or
    any view of it) is alive, the buffer has a reference besides the loan's."""
    cdef cnp.npy_intp dims = nbytes
    cdef cnp.ndarray arr = cnp.PyArray_SimpleNewFromData(1, &dims, cnp.NPY_UINT8, buffer.ptr)
    cnp.set_array_base(arr, buffer)
    return arr


cdef object _object_new = object.__new__


cdef object make_frame(object view, const Slot *meta):
    # VisualFrame refuses assignment (it is immutable); the generic setter is what its
    # own __init__ uses to write each field once.
    frame = _object_new(VisualFrame)
    PyObject_GenericSetAttr(frame, "data", view)
    PyObject_GenericSetAttr(frame, "mime_type", <object>meta.mime)
    PyObject_GenericSetAttr(frame, "width", meta.width)
    PyObject_GenericSetAttr(frame, "height", meta.height)
    PyObject_GenericSetAttr(frame, "source", <object>meta.source)
    PyObject_GenericSetAttr(frame, "timestamp_ms", meta.timestamp_ms)
    PyObject_GenericSetAttr(frame, "frame_seq", meta.frame_seq)
    PyObject_GenericSetAttr(frame, "received_at", meta.received_at)
    return frame




cdef list hand_out(Slot *picked, Py_ssize_t k):
    """The frames of k picked slots, in a new list. A picked slot carries a reference to
    its frame (handed to the list; its buffer set to NULL to say so) or, when none was
    made yet, to its buffer, source and mime: then a view and a frame are made, and the
    slot keeps one more reference to each, for the ring to cache."""
    cdef Py_ssize_t i
    result = PyList_New(k)
    for i in range(k):
        if picked[i].frame != NULL:
            PyList_SET_ITEM(result, i, <object>picked[i].frame)  # steals our ref
            picked[i].buffer = NULL
        else:
            view = make_view(picked[i].buffer, picked[i].nbytes)
            frame = make_frame(view, &picked[i])
            Py_INCREF(frame)
            PyList_SET_ITEM(result, i, frame)
            picked[i].view = <PyObject *>view
            picked[i].frame = <PyObject *>frame
            Py_INCREF(view)
            Py_INCREF(frame)
    return result

# -- the pool (ring lock held) ---------------------------------------------------------
cdef void pool_retire(BufferPool *pool, PyObject *buffer, Grave *grave) noexcept nogil:
    """Take over a reference to a buffer that left the ring: into the pool, where it is
    written again only once nothing else references it (no view of it exists)."""
    cdef Py_ssize_t i
    if pool.n < POOL_MAX:
        pool.buffers[pool.n] = buffer
        pool.n += 1
        return
    # Full: a buffer readers still hold is worth less than one free now (subscribers
    # that never drain would otherwise fill the pool and make every store allocate).
    for i in range(pool.n):
        if _refcnt(pool.buffers[i]) > 1:
            grave_add(grave, pool.buffers[i])
            pool.buffers[i] = buffer
            return
    grave_add(grave, buffer)


cdef inline PyObject *pool_take_free(BufferPool *pool, Py_ssize_t nbytes) noexcept nogil:
    """A pool buffer that fits and that only the pool references (so no view or frame
    of it is alive, weakly referenced or not), removed from the pool; or NULL."""
    cdef Py_ssize_t i
    cdef PyObject *found
    for i in range(pool.n):
        found = pool.buffers[i]
        if _refcnt(found) == 1 and buffer_fits(found, nbytes):
            pool.n -= 1
            pool.buffers[i] = pool.buffers[pool.n]
            return found
    return NULL


cdef void pool_release_oversized(BufferPool *pool, Py_ssize_t nbytes, Grave *grave) noexcept nogil:
    """Frames got smaller: let go of free pool buffers this frame would not reuse."""
    cdef Py_ssize_t i = 0, capacity
    while i < pool.n:
        capacity = (<_FrameBuffer>pool.buffers[i]).capacity
        if _refcnt(pool.buffers[i]) == 1 and capacity > SHRINK_FLOOR and capacity > 4 * nbytes:
            grave_add(grave, pool.buffers[i])
            pool.n -= 1
            pool.buffers[i] = pool.buffers[pool.n]
        else:
            i += 1


cdef void pool_clear(BufferPool *pool, Grave *grave) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(pool.n):
        grave_add(grave, pool.buffers[i])
    pool.n = 0
