# The compiled twin's types: every struct and class with its fields and C methods.
# The code is in the .pxi files that _framebuf.pyx includes, one per job
# (docs/architecture.md maps them onto the pure twin's modules).

cimport cython
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint64_t

from capsule_sessions._pthread cimport pthread_cond_t, pthread_mutex_t


cdef enum:
    # References a Grave holds before it needs the heap.
    GRAVE_INLINE = 16
    # Buffers the ring keeps that left its slots (free, or still held by readers).
    POOL_MAX = 8


# _release.pxi: references collected under a lock, released after it.
cdef struct Grave:
    PyObject **items
    Py_ssize_t n
    Py_ssize_t cap
    PyObject *inline_items[GRAVE_INLINE]


# _buffers.pxi: one stored frame as the ring books it.
cdef struct Slot:
    PyObject *buffer     # _FrameBuffer holding the bytes
    PyObject *view       # read-only ndarray over buffer, or NULL until first read
    PyObject *frame      # VisualFrame, or NULL until first read
    PyObject *source     # str
    PyObject *mime       # str
    Py_ssize_t nbytes
    int64_t width
    int64_t height
    int64_t timestamp_ms
    int64_t frame_seq
    int64_t received_ns
    double received_at
    uint64_t seq         # accept number


# _slots.pxi: the ring's newest frames, oldest first (a circular array).
cdef struct SlotRing:
    Slot *items
    Py_ssize_t cap, head, count
    Py_ssize_t nbytes    # bytes of the stored frames


# _buffers.pxi: buffers that left the ring's slots, for reuse once nothing else holds them.
cdef struct BufferPool:
    PyObject *buffers[POOL_MAX]
    Py_ssize_t n


@cython.final
cdef class _FrameBuffer:
    cdef char *ptr
    cdef Py_ssize_t capacity


@cython.final
cdef class _Queue:
    cdef pthread_mutex_t lock
    cdef pthread_cond_t cond
    cdef bint locks_made
    cdef PyObject **items
    cdef Py_ssize_t cap, head, n, maxsize
    cdef bint drop_oldest
    cdef bint closed
    cdef uint64_t dropped, delivered, booked_seq
    cdef bint async_parked
    cdef list async_waiters
    cdef str policy
    cdef unsigned long fork_gen

    cdef bint wants(self, uint64_t seq) noexcept
    cdef int push(self, object frame, uint64_t seq) except -1
    cdef void settle(self, uint64_t seq) noexcept
    cdef bint grow(self) noexcept nogil
    cdef int wake_parked(self) except -1
    cdef int wake_async_waiters(self) except -1
    cdef void mark_closed(self) noexcept
    cdef int close(self) except -1
    cdef PyObject *take(self) noexcept nogil
    cdef int wait_take(self, bint forever, int64_t deadline_ns, PyObject **out) noexcept nogil
    cdef object try_take(self, bint park)


@cython.final
cdef class Subscription:
    cdef _Queue _queue
    cdef FrameRing _ring

    cdef object _get_blocking(self, object timeout)


@cython.final
cdef class _FanOut:
    # Accepted frames not yet offered to every subscriber: a ring of slot copies that
    # own their buffer/source/mime references.
    cdef Slot *pending
    cdef Py_ssize_t cap, head, n
    cdef bint running
    cdef unsigned long runner
    cdef Py_ssize_t waiters
    cdef uint64_t offered_through
    cdef pthread_cond_t done
    cdef bint locks_made
    cdef unsigned long fork_gen

    cdef bint push(self, const Slot *accepted) noexcept
    cdef void pop(self, Grave *grave) noexcept nogil
    cdef void claim(self) noexcept nogil
    cdef void release(self) noexcept nogil
    cdef int await_offer(self, FrameRing ring, uint64_t seq) except -1
    cdef void wait_for_runner(self, FrameRing ring, uint64_t seq) noexcept nogil
    cdef int run(self, FrameRing ring) except -1
    cdef list next_pending(self, FrameRing ring, Slot *meta)
    cdef int offer_to(self, FrameRing ring, list queues, Slot *meta, bint give_up, bint retry) except -1


# _loan.pxi: a pool buffer lent for one frame, then made the frame's buffer.
@cython.final
@cython.no_gc_clear
cdef class FrameLoan:
    cdef FrameRing _ring
    cdef _FrameBuffer _buffer   # None once the loan is finished
    cdef Py_ssize_t _nbytes
    cdef unsigned long _fork_gen

    cdef int _check_open(self) except -1
    cdef _FrameBuffer _take(self)


@cython.final
cdef class FrameRing:
    cdef pthread_mutex_t _lock
    cdef bint _locks_made
    cdef object _clock
    cdef SlotRing _slots
    cdef PyObject *_source
    cdef bint _has_last
    cdef int64_t _last_accepted_ns
    cdef double _last_active_s
    cdef uint64_t _accepted, _rate_limited, _source_resets
    cdef _FanOut _fan
    cdef BufferPool _pool
    # A list, not a C array, so the garbage collector sees the ring's queues (and an
    # abandoned asyncio waiter parked on one can be collected). Copy-on-write: a fan-out
    # iterates the list it read while others replace it.
    cdef list _subscribers
    cdef bint _ended
    cdef unsigned long _fork_gen

    cdef void _clear_frames(self, Grave *grave) noexcept nogil
    cdef PyObject *_take_evicted_buffer(self, Py_ssize_t nbytes, object source, Py_ssize_t keep,
                                        Grave *grave) noexcept
    cdef void _switch_source(self, object source, Grave *grave) noexcept
    cdef inline bint _is_rate_limited(self, int64_t now_ns, int64_t min_ns) noexcept nogil
    cdef int _read_now(self, object now, double *seconds, int64_t *ns) except -1
    cdef bint _store(self, object data, object source, object max_recent, object min_interval,
                     object mime_type, object width, object height, object timestamp_ms,
                     object frame_seq, object now) except -1
    cdef bint _store_loan(self, FrameLoan loan, object source, object max_recent, object min_interval,
                          object mime_type, object width, object height, object timestamp_ms,
                          object frame_seq, object now) except -1
    cdef bint _accept(self, _FrameBuffer target, Slot *meta, Py_ssize_t keep, int64_t min_ns) except -1
    cdef bint _count_if_rate_limited(self, int64_t now_ns, int64_t min_ns) noexcept
    cdef _FrameBuffer _copy_frame(self, const Py_buffer *buf, object source, Py_ssize_t keep)
    cdef uint64_t _commit(self, _FrameBuffer target, Slot *meta, Py_ssize_t keep, int64_t min_ns,
                          bint *run) except? 0
    cdef uint64_t _queue_for_fan_out(self, const Slot *slot, bint *run) noexcept
    cdef void _remove_queue(self, _Queue q) noexcept
    cdef void _prune_closed(self) noexcept
    cdef void _replace_subscribers(self, _Queue leaving) noexcept
