# cython: language_level=3, embedsignature=True, auto_pickle=False
"""The compiled frame-buffer backend: the twin of ``capsule_sessions._framebuf_py``.

Same interface and results as the pure twin (its module docstring is the contract);
what differs is how the bytes move:

- A ring slot owns a reusable ``_FrameBuffer`` (malloc'd, 64-byte aligned). ``store``
  validates with the GIL, takes a buffer nothing else references, copies into it with
  exactly one pass (a gather for strided or PIL-style input) without the ring lock and,
  for frames of ``NOGIL_COPY_MIN`` bytes or more, without the GIL (below that, handing
  the GIL over costs more than the copy), then takes the ring lock again to decide and
  commit.
- Readers get read-only numpy views whose base is the buffer. A buffer is written again
  only when the ring's reference is its only one: no view, frame or export of it is
  alive, so no weak reference can be turned into a strong one to it either. The copy
  goes into the buffer of the slot the store evicts when nothing was ever made from it
  (a camera loop nobody reads cycles through max_recent buffers), else a free pool
  buffer, else a new one. In steady state no frame memory is allocated.
- Buffer size policy: a buffer is reused for a frame that fits in it and fills at least
  a quarter of it (buffers up to ``SHRINK_FLOOR`` are always reused when they fit);
  otherwise it is released and a right-sized one is allocated. The pool keeps at most
  ``POOL_MAX`` buffers that left the ring, free ones before ones readers still hold; a
  free pool buffer too large for the frame being stored (by the same rule) is released,
  so after frames get smaller memory shrinks back to (max_recent + POOL_MAX) x the
  current frame size, plus what readers still hold.
- Frame objects (``VisualFrame``) are made lazily: by the first ``latest_visual_frames``
  that returns a slot (then cached in the slot), or by the fan-out when at least one
  subscriber takes the frame. Storing into a ring nobody reads, or whose subscribers
  are full with ``drop_newest``, makes no Python object at all.

Locks (pthread mutexes, so they work without the GIL):
- one per ring (``FrameRing.mu``) and one per subscriber queue (``_SubQueue.mu``);
- lock order: ring lock, then a queue lock; never the other way round;
- a thread that holds the GIL never blocks on one of these locks: it tries once, and
  otherwise waits with the GIL released (``lock_with_gil``; ``__dealloc__`` included);
  a lock is never held while the GIL is taken back, so a thread stopped at interpreter
  exit holds none;
- under a lock: only C, and reference-count changes on objects whose release cannot
  run Python code. Releases that could (frames, views) are deferred to a ``Grave`` and
  done after unlocking. No Python call, no allocation of a tracked object (so no
  garbage collection) and no exception happen under a lock.

Fan-out happens after the ring lock is dropped (making a frame object is a Python call):
accepted frames wait in ``FrameRing.pending`` and one thread at a time (the runner)
offers them in accept order; a store that finds a runner at work waits (GIL released)
until its frame was offered, except on a thread that runs a fan-out itself, which never
waits. Each queue books an accept number once, so an offer interrupted by an error is
made again, and the error reaches the storing caller after every queue was settled.
A ring or queue inherited through ``fork()`` refuses use (``fork_generation``).
"""

cimport cython
from cpython.buffer cimport PyBUF_FULL_RO, PyBuffer_IsContiguous, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.object cimport PyObject_GenericSetAttr
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from cpython.unicode cimport PyUnicode_CheckExact
from libc.math cimport fabs, isfinite, isnan
from libc.stdint cimport INT32_MAX, INT32_MIN, INT64_MAX, int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

cimport numpy as cnp

from _pthread cimport *

cnp.import_array()

import asyncio
import inspect
import os
import queue as _queue_mod

from capsule_sessions import _validate
from capsule_sessions._records import VisualFrame
from capsule_sessions.errors import FORKED_MESSAGE, NOT_BY_HAND_MESSAGE, SubscriptionClosed

cdef extern from "Python.h":
    # Only ever called with the GIL held; declared nogil so the ring's C helpers can
    # stay plain C.
    Py_ssize_t _refcnt "Py_REFCNT"(PyObject *o) nogil
    int PyUnicode_Compare(object left, object right) except? -1
    int posix_memalign(void **memptr, size_t alignment, size_t size) nogil
    unsigned long PyThread_get_thread_ident() nogil

cdef extern from *:
    """
    /* How many fan-outs this thread is running: a runner never waits for another
       thread's fan-out, which is what rules out two threads waiting on each other. */
    static __thread int capsule_fan_run_depth = 0;
    /* fork()s into this process; rings and queues made before the last one refuse use. */
    static unsigned long capsule_fork_generation = 0;
    """
    int fan_run_depth "capsule_fan_run_depth"
    unsigned long fork_generation "capsule_fork_generation"

cdef extern from "_forward.h":
    object capsule_forward_new(object reference, object name, object refit, object owner, object ring_slot)

__all__ = ["FrameRing", "Subscription"]

cdef Py_ssize_t NOGIL_COPY_MIN = 16384
cdef Py_ssize_t SHRINK_FLOOR = 256 * 1024
cdef enum:
    POOL_MAX = 8
    GRAVE_INLINE = 16
cdef Py_ssize_t BUFFER_ALIGN = 64
# What memoryview (so the pure twin) accepts; more dimensions are refused on both.
cdef enum:
    GATHER_MAX_NDIM = 64
cdef double MAX_INSTANT_SECONDS = 4611686018.427388  # 2**62 ns, as in _validate
cdef Py_ssize_t MAX_COUNT = 2147483647
cdef uint64_t NO_FAN_OUT = <uint64_t>-1
cdef int64_t WAIT_SLICE_NS = 100000000  # blocking waits wake this often to see Ctrl-C

NOGIL_COPY_MIN_BYTES = NOGIL_COPY_MIN
SHRINK_FLOOR_BYTES = SHRINK_FLOOR
POOL_MAX_BUFFERS = POOL_MAX

cdef object _object_new = object.__new__
# The module's private key for making a Subscription (one made by hand is refused).
cdef object _MAKE = object()


def _after_fork_in_child():
    global fork_generation
    fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


cdef inline int check_not_forked(unsigned long generation) except -1:
    if generation != fork_generation:
        raise RuntimeError(FORKED_MESSAGE)
    return 0


def ring_forward(reference, str name, owner, ring_slot):
    """A method descriptor for ``owner`` (Session) that calls ``ring.<name>`` with the
    caller's arguments, the ring read from the ``ring_slot`` member (``_ring``), for the
    cost of one C call (``_forward.h``); on the class it is ``reference``."""
    return capsule_forward_new(reference, name, _refit, owner, ring_slot)


def _refit(reference, session, args, kwargs):
    # The ring refused a call with a TypeError. When the arguments do not fit Session's
    # signature, CPython words the error for Session's method (and raises it before the
    # method's body runs); otherwise the ring's error stands.
    try:
        inspect.signature(reference).bind(session, *args, **kwargs)
    except TypeError:
        reference(session, *args, **kwargs)
        raise


def _refuse_copy(obj, *protocol):
    raise TypeError(f"cannot pickle or copy {type(obj).__name__!r} object")


# --------------------------------------------------------------------------------------
# Deferred releases


cdef struct Grave:
    PyObject **items
    Py_ssize_t n
    Py_ssize_t cap
    PyObject *inline_items[GRAVE_INLINE]


cdef inline void grave_init(Grave *g) noexcept nogil:
    g.items = g.inline_items
    g.n = 0
    g.cap = GRAVE_INLINE


cdef void grave_add(Grave *g, PyObject *o) noexcept nogil:
    """Take over a strong reference, to be released by grave_flush (after unlocking)."""
    cdef PyObject **grown
    cdef Py_ssize_t newcap
    if o == NULL:
        return
    if g.n == g.cap:
        newcap = g.cap * 2
        if g.items == g.inline_items:
            grown = <PyObject **>malloc(newcap * sizeof(PyObject *))
            if grown != NULL:
                memcpy(grown, g.items, g.n * sizeof(PyObject *))
        else:
            grown = <PyObject **>realloc(g.items, newcap * sizeof(PyObject *))
        if grown == NULL:
            # Out of memory: keeping the reference (a leak) is the only safe choice here.
            return
        g.items = grown
        g.cap = newcap
    g.items[g.n] = o
    g.n += 1


cdef void grave_flush(Grave *g) noexcept:
    """Release everything collected. Needs the GIL; no lock may be held."""
    cdef Py_ssize_t i
    for i in range(g.n):
        Py_DECREF(<object>g.items[i])
    if g.items != g.inline_items:
        free(g.items)
    grave_init(g)


# --------------------------------------------------------------------------------------
# Locks and clocks


cdef inline void lock_with_gil(pthread_mutex_t *mu) noexcept:
    # The holder may be running without the GIL and need it back before unlocking, so
    # never block while holding the GIL.
    if pthread_mutex_trylock(mu) != 0:
        with nogil:
            pthread_mutex_lock(mu)


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void to_timespec(int64_t ns, timespec *ts) noexcept nogil:
    ts.tv_sec = ns // 1000000000
    ts.tv_nsec = ns % 1000000000


cdef int init_cond(pthread_cond_t *cond) except -1:
    cdef pthread_condattr_t attr
    if pthread_condattr_init(&attr) != 0:
        raise MemoryError("pthread_condattr_init failed")
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
    cdef int rc = pthread_cond_init(cond, &attr)
    pthread_condattr_destroy(&attr)
    if rc != 0:
        raise MemoryError("pthread_cond_init failed")
    return 0


# --------------------------------------------------------------------------------------
# Argument parsing: C fast paths for the common exact types; everything else goes to
# _validate, so messages and edge cases are the pure twin's by construction.


cdef inline int parse_instant(object value, str name, double *seconds, int64_t *ns) except -1:
    cdef double x
    if PyFloat_CheckExact(value):
        x = PyFloat_AS_DOUBLE(value)
        if isfinite(x) and fabs(x) < MAX_INSTANT_SECONDS:
            seconds[0] = x
            ns[0] = <int64_t>(x * 1e9)
            return 0
    s, n = _validate.instant(value, name)
    seconds[0] = s
    ns[0] = n
    return 0


cdef inline int64_t parse_duration_ns(object value, str name) except? -1:
    cdef double x, scaled
    if PyFloat_CheckExact(value):
        x = PyFloat_AS_DOUBLE(value)
        if not isnan(x):
            scaled = x * 1e9
            if scaled >= 9.223372036854775e18:
                return INT64_MAX
            if scaled <= -9.223372036854775e18:
                return -INT64_MAX
            return <int64_t>scaled
    return _validate.duration_ns(value, name)


cdef inline Py_ssize_t parse_count(object value, str name) except -1:
    cdef int overflow = 0
    cdef long long n
    if PyLong_CheckExact(value):
        n = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow > 0:
            return MAX_COUNT
        if overflow < 0 or n <= 0:
            return 1
        return MAX_COUNT if n > MAX_COUNT else <Py_ssize_t>n
    return _validate.count(value, name)


cdef inline int64_t parse_int(object value, str name, int64_t low, int64_t high) except? -1:
    cdef int overflow = 0
    cdef long long n
    if PyLong_CheckExact(value):
        n = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and low <= n <= high:
            return n
    return _validate.integer(value, name, low, high)


cdef inline str parse_text(object value, str name):
    if PyUnicode_CheckExact(value):
        return <str>value
    return _validate.text(value, name)


# --------------------------------------------------------------------------------------
# Frame memory


@cython.final
cdef class _FrameBuffer:
    """Owns one frame buffer. Holds no Python objects, so it is not GC-tracked and its
    release runs no Python code (it may therefore be dropped under a lock)."""

    cdef char *ptr
    cdef Py_ssize_t capacity

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


cdef inline bint buffer_fits(PyObject *owner, Py_ssize_t nbytes) noexcept nogil:
    cdef Py_ssize_t capacity = (<_FrameBuffer>owner).capacity
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
    suboffsets. -1 (nothing copied) for more than GATHER_MAX_NDIM dimensions, which the
    caller refuses before it gets here."""
    cdef Py_ssize_t index[GATHER_MAX_NDIM]
    cdef Py_ssize_t ndim = src.ndim, itemsize = src.itemsize, inner, run, i, d
    cdef Py_ssize_t inner_suboffset = -1
    cdef const char *row
    cdef const char *item
    if src.len == 0:
        return 0
    if contiguous or ndim == 0 or src.strides == NULL:
        memcpy(dst, src.buf, src.len)
        return 0
    if ndim > GATHER_MAX_NDIM:
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


cdef struct Slot:
    PyObject *owner      # _FrameBuffer
    PyObject *view       # read-only ndarray over owner, or NULL until first read
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
    uint64_t gen


cdef object make_view(PyObject *owner, Py_ssize_t nbytes):
    cdef cnp.npy_intp dims = nbytes
    cdef cnp.ndarray arr = cnp.PyArray_SimpleNewFromData(1, &dims, cnp.NPY_UINT8, (<_FrameBuffer>owner).ptr)
    cnp.set_array_base(arr, <object>owner)
    cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
    return arr


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


# --------------------------------------------------------------------------------------
# Subscriber queues


cdef void wake_future(object fut):
    if not fut.done():
        fut.set_result(None)


_wake_future = wake_future


@cython.final
cdef class _SubQueue:
    """A bounded ring of frame references with its own lock and condition.

    Each accepted frame is booked once, by its accept number (``booked_seq``): queued,
    or counted in ``dropped``.
    """

    cdef pthread_mutex_t mu
    cdef pthread_cond_t cond
    cdef bint ready
    cdef PyObject **items
    cdef Py_ssize_t cap, head, n, maxsize
    cdef bint drop_oldest
    cdef bint closed
    cdef uint64_t dropped, delivered, booked_seq
    cdef bint async_hint
    cdef list async_waiters
    cdef str policy
    cdef unsigned long fork_gen

    def __cinit__(self, Py_ssize_t maxsize, str policy, uint64_t booked_seq):
        if pthread_mutex_init(&self.mu, NULL) != 0:
            raise MemoryError("pthread_mutex_init failed")
        try:
            init_cond(&self.cond)
        except BaseException:
            pthread_mutex_destroy(&self.mu)
            raise
        self.ready = True
        self.maxsize = maxsize
        self.policy = policy
        self.drop_oldest = policy == "drop_oldest"
        self.booked_seq = booked_seq
        self.async_waiters = []
        self.fork_gen = fork_generation

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.items != NULL:
            for i in range(self.n):
                Py_DECREF(<object>self.items[(self.head + i) % self.cap])
            free(self.items)
        if self.ready and self.fork_gen == fork_generation:
            pthread_cond_destroy(&self.cond)
            pthread_mutex_destroy(&self.mu)

    __reduce_ex__ = _refuse_copy

    # -- producer side (GIL held) ------------------------------------------------
    cdef bint wants_frame(self, uint64_t seq) noexcept:
        """False when the offer of ``seq`` ends here: closed, booked already, or full
        under drop_newest (then booked as dropped)."""
        cdef bint wants = True
        lock_with_gil(&self.mu)
        if self.closed or seq <= self.booked_seq:
            wants = False
        elif self.n >= self.maxsize and not self.drop_oldest:
            self.booked_seq = seq
            self.dropped += 1
            wants = False
        pthread_mutex_unlock(&self.mu)
        return wants

    cdef void settle(self, uint64_t seq) noexcept:
        """Offering ``seq`` failed: count it dropped unless it was booked."""
        lock_with_gil(&self.mu)
        if not self.closed and seq > self.booked_seq:
            self.booked_seq = seq
            self.dropped += 1
        pthread_mutex_unlock(&self.mu)

    cdef bint grow(self) noexcept nogil:
        cdef Py_ssize_t newcap = 16 if self.cap == 0 else self.cap * 2, i
        if newcap > self.maxsize:
            newcap = self.maxsize
        cdef PyObject **items = <PyObject **>malloc(newcap * sizeof(PyObject *))
        if items == NULL:
            return False
        for i in range(self.n):
            items[i] = self.items[(self.head + i) % self.cap]
        free(self.items)
        self.items = items
        self.cap = newcap
        self.head = 0
        return True

    cdef int push(self, object frame, uint64_t seq) except -1:
        """Book ``seq`` as queued (or dropped), then wake readers. Raises only what an
        event loop's wake-up raised, after the frame was booked."""
        cdef Grave grave
        cdef bint wake_async = False
        grave_init(&grave)
        lock_with_gil(&self.mu)
        if not self.closed and seq > self.booked_seq:
            self.booked_seq = seq
            if self.n >= self.maxsize:
                self.dropped += 1
                if self.drop_oldest:
                    grave_add(&grave, self.items[self.head])
                    self.head = (self.head + 1) % self.cap
                    self.n -= 1
            if self.n < self.maxsize:
                if self.n == self.cap and not self.grow():
                    self.dropped += 1  # out of memory: the frame is dropped, and counted
                else:
                    Py_INCREF(frame)
                    self.items[(self.head + self.n) % self.cap] = <PyObject *>frame
                    self.n += 1
                    pthread_cond_signal(&self.cond)
                    wake_async = self.async_hint
                    self.async_hint = False
        pthread_mutex_unlock(&self.mu)
        grave_flush(&grave)
        if wake_async:
            self.wake_async_waiters()
        return 0

    cdef int wake_parked(self) except -1:
        """Wake parked asyncio waiters when frames are queued for them."""
        cdef bint wake
        lock_with_gil(&self.mu)
        wake = self.async_hint and self.n > 0
        if wake:
            self.async_hint = False
        pthread_mutex_unlock(&self.mu)
        if wake:
            self.wake_async_waiters()
        return 0

    cdef int wake_async_waiters(self) except -1:
        """Wake every parked asyncio waiter. Waking runs the loop's Python code (where a
        signal handler may raise): the first error is raised after all were tried."""
        waiters = self.async_waiters
        if not waiters:
            return 0
        self.async_waiters = []
        error = None
        for waiter in waiters:
            loop, fut = waiter
            for attempt in range(2):  # an interrupt is raised once: the second try wakes it
                try:
                    loop.call_soon_threadsafe(_wake_future, fut)
                    break
                except RuntimeError:  # a closed loop: its waiter went with it
                    break
                except BaseException as exc:
                    if error is None:
                        error = exc
            else:
                # Still not woken: parked again, so the next frame (or close) tries again.
                self.async_waiters.append(waiter)
        if error is not None:
            lock_with_gil(&self.mu)
            self.async_hint = True
            pthread_mutex_unlock(&self.mu)
            raise error
        return 0

    cdef void close_c(self) noexcept:
        """Close without calling Python: usable from __dealloc__. Wakes blocked threads
        only (a parked asyncio waiter keeps its Subscription, so none is parked here).
        In a forked child the lock may be held by a thread that is gone: no locking."""
        if self.fork_gen != fork_generation:
            self.closed = True
            return
        lock_with_gil(&self.mu)
        self.closed = True
        pthread_cond_broadcast(&self.cond)
        pthread_mutex_unlock(&self.mu)

    cdef int close(self) except -1:
        self.close_c()
        return self.wake_async_waiters()

    # -- consumer side -------------------------------------------------------------
    cdef PyObject *pop_locked(self) noexcept nogil:
        cdef PyObject *frame = self.items[self.head]
        self.head = (self.head + 1) % self.cap
        self.n -= 1
        self.delivered += 1
        return frame

    cdef int wait_pop(self, bint forever, int64_t deadline_ns, PyObject **out) noexcept nogil:
        """0: got a frame (owned reference in out); 1: closed and empty; 2: timed out;
        3: a wait slice ended (the caller checks for signals and calls again)."""
        cdef timespec ts
        cdef int64_t now, until
        cdef int status = 3
        pthread_mutex_lock(&self.mu)
        while True:
            if self.n > 0:
                out[0] = self.pop_locked()
                status = 0
                break
            if self.closed:
                status = 1
                break
            now = monotonic_ns()
            if not forever and now >= deadline_ns:
                status = 2
                break
            until = now + WAIT_SLICE_NS
            if not forever and deadline_ns < until:
                until = deadline_ns
            to_timespec(until, &ts)
            if pthread_cond_timedwait(&self.cond, &self.mu, &ts) == ETIMEDOUT and monotonic_ns() >= until:
                if self.n == 0 and not self.closed and (forever or until < deadline_ns):
                    status = 3
                    break
        pthread_mutex_unlock(&self.mu)
        return status

    cdef object try_pop(self, bint park):
        """A frame, or None (parking an async waiter when park); raises when closed."""
        cdef PyObject *frame = NULL
        cdef bint closed = False
        lock_with_gil(&self.mu)
        if self.n > 0:
            frame = self.pop_locked()
        elif self.closed:
            closed = True
        elif park:
            self.async_hint = True
        pthread_mutex_unlock(&self.mu)
        if frame != NULL:
            result = <object>frame
            Py_DECREF(result)  # the queue's reference moves to `result`
            return result
        if closed:
            raise SubscriptionClosed("subscription is closed")
        return None


cdef object timeout_argument(str method, tuple args, dict kwargs):
    """The ``timeout`` of a ``method(timeout=None)`` call."""
    if not kwargs:
        if len(args) <= 1:
            return args[0] if args else None
    elif not args and len(kwargs) == 1 and "timeout" in kwargs:
        return kwargs["timeout"]
    refuse_call(method, args, kwargs)


cdef int refuse_call(str method, tuple args, dict kwargs) except -1:
    """Raise the TypeError the pure twin's Subscription.<method>() raises for arguments
    that do not fit its signature (CPython checks them before running the body)."""
    from capsule_sessions import _framebuf_py
    getattr(_framebuf_py.Subscription, method)(None, *args, **kwargs)
    raise AssertionError(f"Subscription.{method}() accepted arguments its compiled twin refused")


@cython.final
cdef class Subscription:
    """A subscriber's handle on a bounded queue of the frames a session accepts.

    Dropping the last reference closes it, so a forgotten subscriber stops costing
    the producer anything.
    """

    cdef _SubQueue q
    cdef FrameRing ring

    def __cinit__(self, *args, **kwargs):
        # At the door: a handle without a queue behind it must never exist.
        if len(args) != 1 or args[0] is not _MAKE or kwargs:
            raise TypeError(NOT_BY_HAND_MESSAGE)

    def __dealloc__(self):
        if self.q is not None:
            self.q.close_c()

    # A second handle on one queue would close it when collected (as threading.Lock, it
    # is neither copied nor pickled).
    __reduce_ex__ = _refuse_copy

    @property
    def maxsize(self):
        return self.q.maxsize

    @property
    def policy(self):
        return self.q.policy

    @property
    def closed(self):
        return self.q.closed

    @property
    def dropped(self):
        return self.q.dropped

    @property
    def delivered(self):
        return self.q.delivered

    # The public methods take *args/**kwargs and unpack them by hand: a call that does
    # not fit gets the pure twin's own TypeError (refuse_call), word for word.
    def qsize(self, *args, **kwargs):
        if args or kwargs:
            refuse_call("qsize", args, kwargs)
        return self.q.n

    def empty(self, *args, **kwargs):
        if args or kwargs:
            refuse_call("empty", args, kwargs)
        return self.q.n == 0

    def full(self, *args, **kwargs):
        if args or kwargs:
            refuse_call("full", args, kwargs)
        return self.q.n >= self.q.maxsize

    def get(self, *args, **kwargs):
        """get(block=True, timeout=None), as ``queue.Queue.get``: the next frame, waiting
        (GIL released) up to ``timeout`` seconds (forever when None), or at once when
        ``block`` is false; ``queue.Empty`` when there is none. After close(): the
        frames still queued, then ``SubscriptionClosed``."""
        cdef Py_ssize_t n = len(args)
        block = True
        timeout = None
        if n <= 2 and (not kwargs or kwargs.keys() <= {"block", "timeout"}):
            if n >= 1:
                block = args[0]
                if "block" in kwargs:
                    refuse_call("get", args, kwargs)
            if n == 2:
                timeout = args[1]
                if "timeout" in kwargs:
                    refuse_call("get", args, kwargs)
            block = kwargs.get("block", block)
            timeout = kwargs.get("timeout", timeout)
        else:
            refuse_call("get", args, kwargs)
        if not block:
            return self.get_nowait()
        return self.get_frame(timeout)

    cdef object get_frame(self, object timeout):
        cdef bint forever = True
        cdef int64_t deadline_ns = 0
        cdef PyObject *frame = NULL
        cdef int status
        if timeout is not None:
            seconds = _validate.timeout_seconds(timeout)
            if seconds is not None:
                forever = False
                deadline_ns = monotonic_ns() + <int64_t>(<double>seconds * 1e9)
        check_not_forked(self.q.fork_gen)
        result = self.q.try_pop(False)
        if result is not None:
            return result
        while True:
            with nogil:
                status = self.q.wait_pop(forever, deadline_ns, &frame)
            if status == 0:
                result = <object>frame
                Py_DECREF(result)
                return result
            if status == 1:
                raise SubscriptionClosed("subscription is closed")
            if status == 2:
                raise _queue_mod.Empty
            PyErr_CheckSignals()

    def get_nowait(self, *args, **kwargs):
        if args or kwargs:
            refuse_call("get_nowait", args, kwargs)
        check_not_forked(self.q.fork_gen)
        result = self.q.try_pop(False)
        if result is None:
            raise _queue_mod.Empty
        return result

    def aget(self, *args, **kwargs):
        """aget(timeout=None): await the next frame without blocking the loop;
        ``queue.Empty`` on timeout."""
        # A plain method returning the coroutine, so a wrong call fails when made, as an
        # `async def` of the pure twin does, not when awaited.
        return self._await_frame(timeout_argument("aget", args, kwargs))

    async def _await_frame(self, timeout):
        seconds = _validate.timeout_seconds(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        check_not_forked(self.q.fork_gen)
        while True:
            fut = loop.create_future()
            # Strong, like asyncio.Queue: a live session keeps a task parked on it alive.
            # An abandoned one is still collected: the GC sees ring -> subs -> queue ->
            # waiter -> task -> subscription -> ring as a cycle.
            waiter = (loop, fut)
            result = self.q.try_pop(True)
            if result is not None:
                return result
            # Still holding the GIL since try_pop unlocked: no producer can wake the
            # queue between the park and this append.
            self.q.async_waiters.append(waiter)
            try:
                if deadline is None:
                    await fut
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise _queue_mod.Empty
                    try:
                        await asyncio.wait_for(fut, remaining)
                    except asyncio.TimeoutError:
                        raise _queue_mod.Empty from None
            finally:
                try:
                    self.q.async_waiters.remove(waiter)
                except ValueError:
                    pass

    def close(self, *args, **kwargs):
        """Stop receiving; wakes every waiter. Idempotent."""
        if args or kwargs:
            refuse_call("close", args, kwargs)
        check_not_forked(self.q.fork_gen)
        try:
            self.q.close()
        finally:
            self.ring.remove_queue(self.q)

    unsubscribe = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        while True:
            try:
                yield self.get_frame(None)
            except SubscriptionClosed:
                return

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self._await_frame(None)
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return (f"<Subscription {state} policy={self.policy} maxsize={self.maxsize} "
                f"queued={self.qsize()} dropped={self.dropped} delivered={self.delivered}>")


# --------------------------------------------------------------------------------------
# The ring


@cython.final
cdef class FrameRing:
    """One session's newest frames, rate limiter, source, subscribers and counters."""

    cdef pthread_mutex_t mu
    cdef pthread_cond_t fan_cond
    cdef bint ready
    cdef object clock
    cdef Slot *slots
    cdef Py_ssize_t slot_cap, head, count
    cdef Py_ssize_t total_bytes
    cdef PyObject *active_source
    cdef bint has_last
    cdef int64_t last_accepted_ns
    cdef double last_active
    cdef uint64_t accepted, rate_limited, source_resets
    # Accepted frames not yet offered to every subscriber (a ring of slot copies that
    # own their owner/source/mime references), and the fan-out runner's state.
    cdef Slot *pending
    cdef Py_ssize_t pending_cap, pending_head, pending_n
    cdef bint fanning
    cdef unsigned long fan_runner
    cdef Py_ssize_t fan_waiters
    cdef uint64_t offered_through
    cdef PyObject *pool[POOL_MAX]
    cdef Py_ssize_t pool_n
    # A list, not a C array, so the garbage collector sees the ring's queues (and an
    # abandoned asyncio waiter parked on one can be collected). Copy-on-write: a fan-out
    # iterates the list it read while others replace it.
    cdef list subs
    cdef bint ended
    cdef unsigned long fork_gen

    def __cinit__(self, clock, created_at):
        cdef int64_t ignored
        self.clock = _validate.clock(clock)
        parse_instant(created_at, "created_at", &self.last_active, &ignored)
        self.subs = []
        empty = ""
        Py_INCREF(empty)
        self.active_source = <PyObject *>empty
        self.fork_gen = fork_generation
        if pthread_mutex_init(&self.mu, NULL) != 0:
            raise MemoryError("pthread_mutex_init failed")
        try:
            init_cond(&self.fan_cond)
        except BaseException:
            pthread_mutex_destroy(&self.mu)
            raise
        self.ready = True

    def __dealloc__(self):
        cdef Grave grave
        cdef Py_ssize_t i
        grave_init(&grave)
        self.evict_oldest(self.count, &grave)
        while self.pending_n > 0:
            self.pop_pending(&grave)
        for i in range(self.pool_n):
            grave_add(&grave, self.pool[i])
        self.pool_n = 0
        grave_add(&grave, self.active_source)
        self.active_source = NULL
        grave_flush(&grave)
        free(self.slots)
        free(self.pending)
        if self.ready and self.fork_gen == fork_generation:
            pthread_cond_destroy(&self.fan_cond)
            pthread_mutex_destroy(&self.mu)

    __reduce_ex__ = _refuse_copy

    # -- slot bookkeeping (ring lock held) -------------------------------------------
    cdef inline Slot *slot_at(self, Py_ssize_t i) noexcept nogil:
        return &self.slots[(self.head + i) % self.slot_cap]

    cdef void retire_owner(self, PyObject *owner, Grave *grave) noexcept nogil:
        """Take over a reference to a buffer that left the ring: into the pool, where it
        is written again only once nothing else references it (no view of it exists)."""
        cdef Py_ssize_t i
        if self.pool_n < POOL_MAX:
            self.pool[self.pool_n] = owner
            self.pool_n += 1
            return
        # Full: a buffer readers still hold is worth less than one free now (subscribers
        # that never drain would otherwise fill the pool and make every store allocate).
        for i in range(self.pool_n):
            if _refcnt(self.pool[i]) > 1:
                grave_add(grave, self.pool[i])
                self.pool[i] = owner
                return
        grave_add(grave, owner)

    cdef PyObject *take_free_buffer(self, Py_ssize_t nbytes) noexcept nogil:
        """A pool buffer that fits and that only the pool references (so no view or frame
        of it is alive, weakly referenced or not), removed from the pool; or NULL."""
        cdef Py_ssize_t i
        cdef PyObject *found
        for i in range(self.pool_n):
            found = self.pool[i]
            if _refcnt(found) == 1 and buffer_fits(found, nbytes):
                self.pool_n -= 1
                self.pool[i] = self.pool[self.pool_n]
                return found
        return NULL

    cdef PyObject *take_evicted_buffer(self, Py_ssize_t nbytes, object source, Py_ssize_t keep,
                                       Grave *grave) noexcept:
        """When this store evicts the oldest slot anyway (same source, ring full) and only
        the ring references its buffer (no view or frame of it is alive), evict it now and
        return the buffer, so a camera loop cycles through max_recent buffers, not one
        more. If the store is then rate-limited after all (another producer stored during
        the copy), the evicted frame stays gone: it was the next to leave."""
        cdef Slot *s
        if self.count == 0 or self.count < keep:
            return NULL
        if PyUnicode_Compare(<object>self.active_source, source) != 0:
            return NULL
        s = self.slot_at(0)
        if s.frame != NULL or s.view != NULL or _refcnt(s.owner) != 1 or not buffer_fits(s.owner, nbytes):
            return NULL
        grave_add(grave, s.source)
        grave_add(grave, s.mime)
        self.total_bytes -= s.nbytes
        self.head = (self.head + 1) % self.slot_cap
        self.count -= 1
        if self.count == 0:
            self.head = 0
        return s.owner

    cdef void release_oversized_spares(self, Py_ssize_t nbytes, Grave *grave) noexcept nogil:
        """Frames got smaller: let go of free pool buffers this frame would not reuse."""
        cdef Py_ssize_t i = 0, capacity
        while i < self.pool_n:
            capacity = (<_FrameBuffer>self.pool[i]).capacity
            if _refcnt(self.pool[i]) == 1 and capacity > SHRINK_FLOOR and capacity > 4 * nbytes:
                grave_add(grave, self.pool[i])
                self.pool_n -= 1
                self.pool[i] = self.pool[self.pool_n]
            else:
                i += 1

    cdef void evict_oldest(self, Py_ssize_t k, Grave *grave) noexcept nogil:
        """Drop the k oldest slots; their buffers go to the pool (or the grave)."""
        cdef Py_ssize_t i
        cdef Slot *s
        for i in range(k):
            s = self.slot_at(0)
            grave_add(grave, s.frame)
            grave_add(grave, s.view)
            grave_add(grave, s.source)
            grave_add(grave, s.mime)
            self.retire_owner(s.owner, grave)
            self.total_bytes -= s.nbytes
            self.head = (self.head + 1) % self.slot_cap
            self.count -= 1
        if self.count == 0:
            self.head = 0

    cdef bint ensure_slots(self, Py_ssize_t needed) noexcept nogil:
        cdef Py_ssize_t newcap, i
        cdef Slot *grown
        if needed <= self.slot_cap:
            return True
        newcap = self.slot_cap * 2 if self.slot_cap else 2
        if newcap < needed:
            newcap = needed
        grown = <Slot *>malloc(newcap * sizeof(Slot))
        if grown == NULL:
            return False
        for i in range(self.count):
            grown[i] = self.slot_at(i)[0]
        free(self.slots)
        self.slots = grown
        self.slot_cap = newcap
        self.head = 0
        return True

    cdef bint push_pending(self, const Slot *accepted) noexcept:
        """Queue a copy of an accepted slot for the fan-out (GIL and ring lock held: the
        references are taken here, and no Python runs). False when out of memory."""
        cdef Py_ssize_t newcap, i
        cdef Slot *grown
        cdef Slot *entry
        if self.pending_n == self.pending_cap:
            newcap = self.pending_cap * 2 if self.pending_cap else 4
            grown = <Slot *>malloc(newcap * sizeof(Slot))
            if grown == NULL:
                return False
            for i in range(self.pending_n):
                grown[i] = self.pending[(self.pending_head + i) % self.pending_cap]
            free(self.pending)
            self.pending = grown
            self.pending_cap = newcap
            self.pending_head = 0
        entry = &self.pending[(self.pending_head + self.pending_n) % self.pending_cap]
        entry[0] = accepted[0]
        entry.view = NULL
        entry.frame = NULL
        Py_INCREF(<object>entry.owner)
        Py_INCREF(<object>entry.source)
        Py_INCREF(<object>entry.mime)
        self.pending_n += 1
        return True

    cdef void pop_pending(self, Grave *grave) noexcept nogil:
        cdef Slot *entry = &self.pending[self.pending_head]
        grave_add(grave, entry.owner)
        grave_add(grave, entry.source)
        grave_add(grave, entry.mime)
        self.pending_head = (self.pending_head + 1) % self.pending_cap
        self.pending_n -= 1

    cdef inline bint is_rate_limited(self, int64_t now_ns, int64_t min_ns) noexcept nogil:
        return self.has_last and min_ns > 0 and now_ns - self.last_accepted_ns < min_ns

    cdef void reset_source(self, object source, Grave *grave) noexcept:
        # Called with the GIL and the ring lock: the INCREF needs the GIL; no Python runs.
        if (<object>self.active_source) != "":
            self.source_resets += 1
        grave_add(grave, self.active_source)
        Py_INCREF(source)
        self.active_source = <PyObject *>source

    # -- time ---------------------------------------------------------------------
    cdef int read_now(self, object now, double *seconds, int64_t *ns) except -1:
        check_not_forked(self.fork_gen)
        if now is None:
            return parse_instant(self.clock(), "clock()", seconds, ns)
        return parse_instant(now, "now", seconds, ns)

    @property
    def last_active_at(self):
        cdef double value
        check_not_forked(self.fork_gen)
        lock_with_gil(&self.mu)
        value = self.last_active
        pthread_mutex_unlock(&self.mu)
        return value

    def touch(self, now=None):
        cdef double seconds
        cdef int64_t ns
        self.read_now(now, &seconds, &ns)
        lock_with_gil(&self.mu)
        self.last_active = seconds
        pthread_mutex_unlock(&self.mu)

    # -- visual input -------------------------------------------------------------
    def start_visual_input(self, source, now=None):
        cdef double seconds
        cdef int64_t ns
        cdef Grave grave
        source = parse_text(source, "source")
        self.read_now(now, &seconds, &ns)
        grave_init(&grave)
        lock_with_gil(&self.mu)
        if PyUnicode_Compare(<object>self.active_source, source) != 0:
            self.reset_source(source, &grave)
            self.evict_oldest(self.count, &grave)
            self.has_last = False
        self.last_active = seconds
        pthread_mutex_unlock(&self.mu)
        grave_flush(&grave)

    def stop_visual_input(self, source="", now=None):
        cdef double seconds
        cdef int64_t ns
        cdef Grave grave
        source = parse_text(source, "source")
        self.read_now(now, &seconds, &ns)
        grave_init(&grave)
        lock_with_gil(&self.mu)
        active = <object>self.active_source
        if not source or not active or PyUnicode_Compare(active, source) == 0:
            self.evict_oldest(self.count, &grave)
            grave_add(&grave, self.active_source)
            empty = ""
            Py_INCREF(empty)
            self.active_source = <PyObject *>empty
            self.has_last = False
        del active
        self.last_active = seconds
        pthread_mutex_unlock(&self.mu)
        grave_flush(&grave)

    def store_frame(self, data, *, source, max_recent, min_interval=0.0, mime_type="",
                    width=0, height=0, timestamp_ms=0, frame_seq=0, now=None):
        """Store one frame's bytes (one copy); False when rate-limited."""
        return self.store(data, source, max_recent, min_interval, mime_type, width, height,
                          timestamp_ms, frame_seq, now)

    def store_visual_frame(self, frame, max_recent, min_interval=0.0, now=None):
        if not isinstance(frame, VisualFrame):
            raise TypeError(f"frame must be a VisualFrame, got {type(frame).__name__}")
        return self.store(frame.data, frame.source, max_recent, min_interval, frame.mime_type,
                          frame.width, frame.height, frame.timestamp_ms, frame.frame_seq, now)

    cdef bint store(self, object data, object source, object max_recent, object min_interval,
                    object mime_type, object width, object height, object timestamp_ms,
                    object frame_seq, object now) except -1:
        cdef Slot meta
        cdef Py_ssize_t keep
        cdef int64_t min_ns
        cdef Py_buffer buf
        cdef _FrameBuffer target
        cdef uint64_t seq
        cdef bint run

        if not PyObject_CheckBuffer(data):
            raise TypeError("data must support the buffer protocol (bytes, bytearray, "
                            f"memoryview, numpy array), got {type(data).__name__}")
        source = parse_text(source, "source")
        keep = parse_count(max_recent, "max_recent")
        min_ns = parse_duration_ns(min_interval, "min_interval")
        mime_type = parse_text(mime_type, "mime_type")
        meta.width = parse_int(width, "width", 0, INT32_MAX)
        meta.height = parse_int(height, "height", 0, INT32_MAX)
        if (meta.width == 0 or meta.height == 0) and cnp.PyArray_Check(data) and cnp.PyArray_NDIM(<cnp.ndarray>data) >= 2:
            # An image array describes itself: height, width = shape[:2].
            if meta.height == 0:
                meta.height = min(cnp.PyArray_DIM(<cnp.ndarray>data, 0), INT32_MAX)
            if meta.width == 0:
                meta.width = min(cnp.PyArray_DIM(<cnp.ndarray>data, 1), INT32_MAX)
        meta.timestamp_ms = parse_int(timestamp_ms, "timestamp_ms", -INT64_MAX - 1, INT64_MAX)
        meta.frame_seq = parse_int(frame_seq, "frame_seq", -INT64_MAX - 1, INT64_MAX)
        self.read_now(now, &meta.received_at, &meta.received_ns)
        meta.source = <PyObject *>source
        meta.mime = <PyObject *>mime_type

        # Cheap early rejection: most calls of a rate-limited camera loop end here.
        if self.count_if_rate_limited(meta.received_ns, min_ns):
            return False
        try:
            PyObject_GetBuffer(data, &buf, PyBUF_FULL_RO)
        except (ValueError, BufferError) as exc:
            raise TypeError(f"data cannot be read as bytes: {exc}") from None
        try:
            target = self.copy_into_free_buffer(&buf, source, keep)
            meta.nbytes = buf.len
        finally:
            PyBuffer_Release(&buf)
        seq = self.commit(target, &meta, keep, min_ns, &run)
        if seq == 0:
            return False
        if run:
            self.run_fan_out()
        elif seq != NO_FAN_OUT:
            self.await_offer(seq)
        return True

    cdef bint count_if_rate_limited(self, int64_t now_ns, int64_t min_ns) noexcept:
        cdef bint limited
        lock_with_gil(&self.mu)
        limited = self.is_rate_limited(now_ns, min_ns)
        if limited:
            self.rate_limited += 1
        pthread_mutex_unlock(&self.mu)
        return limited

    cdef _FrameBuffer copy_into_free_buffer(self, const Py_buffer *buf, object source, Py_ssize_t keep):
        """Copy buf's bytes into a buffer nothing else references: the buffer of the slot
        this store evicts, a free pool buffer, else a new one. The copy runs without the
        ring lock (readers never wait behind it, and a thread stopped at interpreter exit
        holds no lock) and, for large frames, without the GIL."""
        cdef PyObject *free_buffer
        cdef _FrameBuffer target
        cdef Grave grave
        cdef bint contiguous = PyBuffer_IsContiguous(buf, b'C')
        if buf.ndim > GATHER_MAX_NDIM:
            # memoryview's own refusal, word for word: the pure twin raises it.
            raise TypeError("data cannot be read as bytes: memoryview: number of "
                            f"dimensions must not exceed {GATHER_MAX_NDIM}")
        grave_init(&grave)
        lock_with_gil(&self.mu)
        free_buffer = self.take_evicted_buffer(buf.len, source, keep, &grave)
        if free_buffer == NULL:
            free_buffer = self.take_free_buffer(buf.len)
        pthread_mutex_unlock(&self.mu)
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

    cdef uint64_t commit(self, _FrameBuffer target, Slot *meta, Py_ssize_t keep, int64_t min_ns,
                         bint *run) except? 0:
        """Accept the copied frame into the ring and queue it for the fan-out. Returns its
        accept number (``run``: this thread is now the fan-out's runner), 0 when
        rate-limited (another producer stored meanwhile), or NO_FAN_OUT when nobody
        subscribes. Nothing here calls Python or fails half-way."""
        cdef Grave grave
        cdef Slot *slot
        cdef Py_ssize_t evict
        cdef bint reset
        cdef uint64_t result
        grave_init(&grave)
        Py_INCREF(target)  # from here on the ring's: a slot's, or back in the pool
        lock_with_gil(&self.mu)
        if self.is_rate_limited(meta.received_ns, min_ns):
            self.rate_limited += 1
            self.retire_owner(<PyObject *>target, &grave)
            pthread_mutex_unlock(&self.mu)
            grave_flush(&grave)
            return 0
        reset = PyUnicode_Compare(<object>self.active_source, <object>meta.source) != 0
        evict = self.count if reset else (self.count - keep + 1 if self.count >= keep else 0)
        if not self.ensure_slots(self.count - evict + 1):
            self.retire_owner(<PyObject *>target, &grave)
            pthread_mutex_unlock(&self.mu)
            grave_flush(&grave)
            raise MemoryError("cannot grow the frame ring")
        if reset:
            self.reset_source(<object>meta.source, &grave)
        self.evict_oldest(evict, &grave)
        self.release_oversized_spares(meta.nbytes, &grave)

        self.accepted += 1
        slot = self.slot_at(self.count)
        slot[0] = meta[0]
        slot.owner = <PyObject *>target
        slot.view = NULL
        slot.frame = NULL
        slot.gen = self.accepted
        Py_INCREF(<object>slot.source)
        Py_INCREF(<object>slot.mime)
        self.count += 1
        self.total_bytes += meta.nbytes
        self.has_last = True
        self.last_accepted_ns = meta.received_ns
        self.last_active = meta.received_at
        result = NO_FAN_OUT
        run[0] = False
        if PyList_GET_SIZE(self.subs) > 0:
            if self.push_pending(slot):
                result = self.accepted
                run[0] = not self.fanning
                if run[0]:
                    self.claim_fan_out()
            else:
                # Out of memory for the fan-out: counted as dropped for every subscriber
                # rather than lost silently.
                for q in self.subs:
                    (<_SubQueue>q).settle(self.accepted)
        pthread_mutex_unlock(&self.mu)
        grave_flush(&grave)
        return result

    # -- fan-out ---------------------------------------------------------------------
    # One thread at a time offers the pending frames, oldest first: the runner. A store
    # that finds a runner at work leaves its frame to it and waits until it was offered,
    # so each subscriber receives frames in accept order and has been offered a frame
    # when its store returns. A runner never waits for another thread's fan-out (a store
    # made by a finalizer or signal handler that interrupted a fan-out returns at once:
    # the runner offers its frame), so no two threads can wait for each other.

    cdef int await_offer(self, uint64_t seq) except -1:
        """Wait until accepted frame ``seq`` was offered, or run the fan-out ourselves
        if its runner left (an error made it stop early)."""
        cdef unsigned long me = PyThread_get_thread_ident()
        cdef bint run
        while True:
            lock_with_gil(&self.mu)
            if self.offered_through >= seq or self.pending_n == 0 or (
                    self.fanning and (fan_run_depth > 0 or self.fan_runner == me)):
                pthread_mutex_unlock(&self.mu)
                return 0
            run = not self.fanning
            if run:
                self.claim_fan_out()
            else:
                self.fan_waiters += 1
            pthread_mutex_unlock(&self.mu)
            if run:
                return self.run_fan_out()
            with nogil:
                self.wait_for_runner(seq)
            # Interrupted here (Ctrl-C): the frame stays pending, so the runner still
            # offers it and the books balance.
            PyErr_CheckSignals()

    cdef inline void claim_fan_out(self) noexcept nogil:
        self.fanning = True
        self.fan_runner = PyThread_get_thread_ident()

    cdef void wait_for_runner(self, uint64_t seq) noexcept nogil:
        # The lock is released before the GIL is taken back: a thread stopped at
        # interpreter exit while it waits for the GIL then holds no lock.
        cdef timespec ts
        pthread_mutex_lock(&self.mu)
        if self.offered_through < seq and self.fanning:
            to_timespec(monotonic_ns() + WAIT_SLICE_NS, &ts)
            pthread_cond_timedwait(&self.fan_cond, &self.mu, &ts)
        self.fan_waiters -= 1
        pthread_mutex_unlock(&self.mu)

    cdef int run_fan_out(self) except -1:
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
        lock_with_gil(&self.mu)
        if self.pending_n == 0:
            self.release_fan_out()
            pthread_mutex_unlock(&self.mu)
            return 0
        meta = self.pending[self.pending_head]  # its references stay the entry's until popped
        queues = self.subs
        pthread_mutex_unlock(&self.mu)
        fan_run_depth += 1
        try:
            while more:
                try:
                    self.offer_to(queues, &meta, failures >= 2, failures > 0)
                except BaseException as exc:
                    if error is None:
                        error = exc
                    failures += 1
                    continue  # offers book each frame once: making it again is safe
                failures = 0
                queues = self.next_pending(&meta)
                more = queues is not None
        finally:
            fan_run_depth -= 1
        if error is not None:
            raise error
        return 0

    cdef inline void release_fan_out(self) noexcept nogil:
        self.fanning = False
        if self.fan_waiters:
            pthread_cond_broadcast(&self.fan_cond)

    cdef list next_pending(self, Slot *meta):
        """Forget the frame just offered and take the next (into meta): the subscribers
        to offer it to, or None when none is left (the runner role is then handed back
        under the same lock, so no frame is stranded)."""
        cdef Grave grave
        cdef bint more
        cdef list queues = None
        grave_init(&grave)
        lock_with_gil(&self.mu)
        self.pop_pending(&grave)
        self.offered_through = meta.gen
        more = self.pending_n > 0
        if more:
            meta[0] = self.pending[self.pending_head]
            queues = self.subs
            if self.fan_waiters:
                pthread_cond_broadcast(&self.fan_cond)
        else:
            self.release_fan_out()
        pthread_mutex_unlock(&self.mu)
        grave_flush(&grave)
        return queues

    cdef int offer_to(self, list queues, Slot *meta, bint give_up, bint retry) except -1:
        """Offer one pending frame to every open queue (made into a frame object only if
        one takes it); the first error is raised after every queue had its offer."""
        cdef Py_ssize_t i, n = PyList_GET_SIZE(queues)
        cdef _SubQueue q
        cdef bint saw_closed = False
        error = None
        frame = None
        for i in range(n):
            q = <_SubQueue>PyList_GET_ITEM(queues, i)
            if q.closed:
                saw_closed = True
            elif give_up:  # offering it failed over and over: counted as dropped instead
                q.settle(meta.gen)
            else:
                try:
                    if q.wants_frame(meta.gen):
                        if frame is None:
                            frame = make_frame(make_view(meta.owner, meta.nbytes), meta)
                        q.push(frame, meta.gen)
                    elif retry:
                        # Booked by the interrupted try, whose wake-up may have failed.
                        q.wake_parked()
                except BaseException as exc:
                    if error is None:
                        error = exc
                    q.settle(meta.gen)  # a no-op when push booked it before the error
        if saw_closed:
            self.prune_closed()
        if error is not None:
            raise error
        return 0

    def latest_visual_frames(self, ttl, now=None):
        """Frames no older than ttl (inclusive), oldest first; [] when ttl <= 0."""
        cdef int64_t ttl_ns = parse_duration_ns(ttl, "ttl")
        cdef double now_s
        cdef int64_t now_ns
        cdef Py_ssize_t i, k = 0, n
        cdef Slot *s
        cdef Slot *picked
        cdef Grave grave
        self.read_now(now, &now_s, &now_ns)
        if ttl_ns <= 0:
            return []
        lock_with_gil(&self.mu)
        n = self.count
        picked = <Slot *>malloc((n if n else 1) * sizeof(Slot))
        if picked == NULL:
            pthread_mutex_unlock(&self.mu)
            raise MemoryError()
        for i in range(n):
            s = self.slot_at(i)
            if now_ns - s.received_ns <= ttl_ns:
                picked[k] = s[0]
                if s.frame != NULL:
                    Py_INCREF(<object>s.frame)
                else:
                    Py_INCREF(<object>s.owner)
                    Py_INCREF(<object>s.source)
                    Py_INCREF(<object>s.mime)
                k += 1
        pthread_mutex_unlock(&self.mu)

        result = PyList_New(k)
        grave_init(&grave)
        try:
            for i in range(k):
                if picked[i].frame != NULL:
                    PyList_SET_ITEM(result, i, <object>picked[i].frame)  # steals our ref
                    picked[i].owner = NULL
                else:
                    view = make_view(picked[i].owner, picked[i].nbytes)
                    frame = make_frame(view, &picked[i])
                    Py_INCREF(frame)
                    PyList_SET_ITEM(result, i, frame)
                    picked[i].view = <PyObject *>view
                    picked[i].frame = <PyObject *>frame
                    Py_INCREF(view)
                    Py_INCREF(frame)
            self.cache_frames(picked, k, &grave)
        finally:
            for i in range(k):
                if picked[i].owner != NULL:
                    # Made here but not handed to a slot (an error stopped us first).
                    grave_add(&grave, picked[i].frame)
                    grave_add(&grave, picked[i].view)
                    grave_add(&grave, picked[i].owner)
                    grave_add(&grave, picked[i].source)
                    grave_add(&grave, picked[i].mime)
            free(picked)
            grave_flush(&grave)
        return result

    cdef void cache_frames(self, Slot *made, Py_ssize_t k, Grave *grave) noexcept:
        """Keep frames made by a reader in their slots so the next reader shares them.
        Each made[i] with owner set carries one view and one frame reference to give."""
        cdef Py_ssize_t i, j
        cdef Slot *s
        lock_with_gil(&self.mu)
        for i in range(k):
            if made[i].owner == NULL or made[i].frame == NULL:
                continue
            for j in range(self.count):
                s = self.slot_at(j)
                if s.gen == made[i].gen:
                    if s.frame == NULL:
                        s.frame = made[i].frame
                        s.view = made[i].view
                        made[i].frame = NULL
                        made[i].view = NULL
                    break
            if made[i].frame != NULL:
                grave_add(grave, made[i].frame)
                grave_add(grave, made[i].view)
                made[i].frame = NULL
                made[i].view = NULL
        pthread_mutex_unlock(&self.mu)

    def visual_stats(self):
        cdef uint64_t accepted, rate_limited, resets
        cdef Py_ssize_t frames, nbytes
        check_not_forked(self.fork_gen)
        lock_with_gil(&self.mu)
        accepted = self.accepted
        rate_limited = self.rate_limited
        resets = self.source_resets
        frames = self.count
        nbytes = self.total_bytes
        pthread_mutex_unlock(&self.mu)
        return {"accepted": accepted, "rate_limited": rate_limited, "source_resets": resets,
                "frames": frames, "bytes": nbytes}

    # -- subscribers ----------------------------------------------------------------
    def subscribe_visual_frames(self, buffer=1, *, policy="drop_newest"):
        cdef Py_ssize_t maxsize = parse_count(buffer, "buffer")
        cdef _SubQueue q
        cdef list old, grown
        policy = _validate.policy(policy)
        check_not_forked(self.fork_gen)
        # Made before locking: no allocation (so no garbage collection) under the lock.
        q = _SubQueue.__new__(_SubQueue, maxsize, policy, 0)
        while True:
            old = self.subs
            grown = old + [q]
            lock_with_gil(&self.mu)
            if self.subs is old or self.ended:
                break
            pthread_mutex_unlock(&self.mu)
        # Frames accepted before now are not this subscriber's, even those still waiting
        # for the fan-out.
        q.booked_seq = self.accepted
        if self.ended:
            # Nothing would ever close it: it starts closed, so a reader finishes at once.
            q.closed = True
        else:
            self.subs = grown
        pthread_mutex_unlock(&self.mu)
        sub = Subscription.__new__(Subscription, _MAKE)
        (<Subscription>sub).q = q
        (<Subscription>sub).ring = self
        return sub

    @property
    def subscriber_count(self):
        cdef Py_ssize_t n
        check_not_forked(self.fork_gen)
        self.prune_closed()
        lock_with_gil(&self.mu)
        n = PyList_GET_SIZE(self.subs)
        pthread_mutex_unlock(&self.mu)
        return n

    cdef void remove_queue(self, _SubQueue q) noexcept:
        self.replace_subs(q)

    cdef void prune_closed(self) noexcept:
        """Forget queues whose handle was dropped (closed from __dealloc__)."""
        self.replace_subs(None)

    cdef void replace_subs(self, _SubQueue leaving) noexcept:
        """Replace the subscriber list by one without ``leaving`` (None: without the
        closed queues). The list is built with the GIL but without the lock, then
        swapped in if nobody replaced it meanwhile."""
        cdef list old, kept
        while True:
            old = self.subs
            if leaving is None:
                kept = [q for q in old if not (<_SubQueue>q).closed]
            else:
                kept = [q for q in old if q is not leaving]
            if len(kept) == len(old):
                return
            lock_with_gil(&self.mu)
            if self.subs is old:
                self.subs = kept
                pthread_mutex_unlock(&self.mu)
                return  # `old` is released after unlocking: a queue's last reference may go with it
            pthread_mutex_unlock(&self.mu)

    def close_subscriptions(self):
        """Close every live subscription (the session ended): their readers wake up."""
        cdef list none_left = []  # made before locking: no allocation under the lock
        cdef list subs
        cdef _SubQueue q
        check_not_forked(self.fork_gen)
        lock_with_gil(&self.mu)
        self.ended = True
        subs = self.subs
        self.subs = none_left
        pthread_mutex_unlock(&self.mu)
        error = None
        for q in subs:
            try:
                q.close()
            except BaseException as exc:  # every reader is still woken, then it is raised
                if error is None:
                    error = exc
        if error is not None:
            raise error
