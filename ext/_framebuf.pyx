# cython: language_level=3, embedsignature=True
"""The compiled frame-buffer backend: the twin of ``capsule_sessions._framebuf_py``.

Same interface and results as the pure twin (its module docstring is the contract);
what differs is how the bytes move:

- A ring slot owns a reusable ``_FrameBuffer`` (malloc'd, 64-byte aligned). ``store``
  validates with the GIL, takes the ring lock, decides, then does exactly one memcpy
  (a strided gather for non-contiguous input) into the chosen buffer, with the GIL
  released for frames of ``NOGIL_COPY_MIN`` bytes or more (below that, handing the GIL
  over costs more than the copy).
- Readers get read-only numpy views whose base is the buffer. A buffer that anything
  besides the ring still references (a frame, a view, a subscriber queue) is never
  written again: the ring takes a free buffer from its small pool or allocates a new
  one. In steady state no frame memory is allocated.
- Buffer size policy: a buffer is reused for a frame that fits in it and fills at least
  a quarter of it (buffers up to ``SHRINK_FLOOR`` are always reused when they fit);
  otherwise it is released and a right-sized one is allocated. The pool keeps at most
  ``POOL_MAX`` buffers that readers still held when they left the ring; a free pool
  buffer too large for the frame being stored (by the same rule) is released, so after
  frames get smaller memory shrinks back to (max_recent + POOL_MAX) x the current frame
  size, plus what readers still hold.
- Frame objects (``VisualFrame``) are made lazily: by the first ``latest_visual_frames``
  that returns a slot (then cached in the slot), or by the fan-out when at least one
  subscriber takes the frame. Storing into a ring nobody reads, or whose subscribers
  are full with ``drop_newest``, makes no Python object at all.

Locks (pthread mutexes, so they work without the GIL):
- one per ring (``FrameRing.mu``) and one per subscriber queue (``_SubQueue.mu``);
- lock order: ring lock, then a queue lock; never the other way round;
- a thread that holds the GIL never blocks on one of these locks: it tries once, and
  otherwise waits with the GIL released, because the holder may be copying without the
  GIL and need it back before it unlocks (``lock_with_gil``; ``__dealloc__`` included);
- under a lock: only C, and reference-count changes on objects whose release cannot
  run Python code. Releases that could (frames, views) are deferred to a ``Grave`` and
  done after unlocking. No Python call and no exception happen under a lock.

Fan-out happens after the ring lock is dropped (making a frame object is a Python call),
in the order frames were accepted: each accepted store draws a ticket under the ring
lock and fans out when its ticket is served.
"""

cimport cython
from cpython.buffer cimport PyBUF_RECORDS_RO, PyBuffer_IsContiguous, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
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
import queue as _queue_mod

from capsule_sessions import _validate
from capsule_sessions._records import VisualFrame
from capsule_sessions.errors import SubscriptionClosed

cdef extern from "Python.h":
    # Only ever called with the GIL held; declared nogil so the ring's C helpers can
    # stay plain C.
    Py_ssize_t _refcnt "Py_REFCNT"(PyObject *o) nogil
    int PyUnicode_Compare(object left, object right) except? -1
    int posix_memalign(void **memptr, size_t alignment, size_t size) nogil

__all__ = ["FrameRing", "Subscription"]

cdef Py_ssize_t NOGIL_COPY_MIN = 16384
cdef Py_ssize_t SHRINK_FLOOR = 256 * 1024
cdef enum:
    POOL_MAX = 8
    GRAVE_INLINE = 16
    FEW_SUBS = 16
cdef Py_ssize_t BUFFER_ALIGN = 64
cdef double MAX_INSTANT_SECONDS = 4611686018.427388  # 2**62 ns, as in _validate
cdef Py_ssize_t MAX_COUNT = 2147483647
cdef int64_t WAIT_SLICE_NS = 100000000  # blocking waits wake this often to see Ctrl-C

NOGIL_COPY_MIN_BYTES = NOGIL_COPY_MIN
SHRINK_FLOOR_BYTES = SHRINK_FLOOR
POOL_MAX_BUFFERS = POOL_MAX

cdef object _object_new = object.__new__


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


cdef void gather(char *dst, const Py_buffer *src, bint contiguous) noexcept nogil:
    """Copy src's bytes in C order into dst: one pass, whatever the strides."""
    cdef Py_ssize_t index[64]
    cdef Py_ssize_t ndim = src.ndim, itemsize = src.itemsize, inner, run, i, d
    cdef const char *row
    if src.len == 0:
        return
    if contiguous or ndim == 0:
        memcpy(dst, src.buf, src.len)
        return
    inner = ndim - 1
    run = src.shape[inner]
    memset(index, 0, sizeof(index))
    while True:
        row = <const char *>src.buf
        for d in range(inner):
            row += index[d] * src.strides[d]
        if src.strides[inner] == itemsize:
            memcpy(dst, row, run * itemsize)
            dst += run * itemsize
        else:
            for i in range(run):
                memcpy(dst, row + i * src.strides[inner], itemsize)
                dst += itemsize
        d = inner - 1
        while d >= 0:
            index[d] += 1
            if index[d] < src.shape[d]:
                break
            index[d] = 0
            d -= 1
        if d < 0:
            return


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
    frame = _object_new(VisualFrame)
    frame.data = view
    frame.mime_type = <object>meta.mime
    frame.width = meta.width
    frame.height = meta.height
    frame.source = <object>meta.source
    frame.timestamp_ms = meta.timestamp_ms
    frame.frame_seq = meta.frame_seq
    frame.received_at = meta.received_at
    return frame


# --------------------------------------------------------------------------------------
# Subscriber queues


cdef void wake_future(object fut):
    if not fut.done():
        fut.set_result(None)


_wake_future = wake_future


@cython.final
cdef class _SubQueue:
    """A bounded ring of frame references with its own lock and condition."""

    cdef pthread_mutex_t mu
    cdef pthread_cond_t cond
    cdef bint ready
    cdef PyObject **items
    cdef Py_ssize_t cap, head, n, maxsize
    cdef bint drop_oldest
    cdef bint closed
    cdef uint64_t dropped, delivered
    cdef bint async_hint
    cdef list async_waiters
    cdef str policy

    def __cinit__(self, Py_ssize_t maxsize, str policy):
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
        self.async_waiters = []

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.items != NULL:
            for i in range(self.n):
                Py_DECREF(<object>self.items[(self.head + i) % self.cap])
            free(self.items)
        if self.ready:
            pthread_cond_destroy(&self.cond)
            pthread_mutex_destroy(&self.mu)

    # -- producer side (GIL held) ------------------------------------------------
    cdef bint wants_frame(self) noexcept:
        """False when the offer ends here: closed, or full under drop_newest (counted)."""
        cdef bint wants = True
        lock_with_gil(&self.mu)
        if self.closed:
            wants = False
        elif self.n >= self.maxsize and not self.drop_oldest:
            self.dropped += 1
            wants = False
        pthread_mutex_unlock(&self.mu)
        return wants

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

    cdef void push(self, object frame) noexcept:
        cdef Grave grave
        cdef bint wake_async = False
        grave_init(&grave)
        lock_with_gil(&self.mu)
        if not self.closed:
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

    cdef void wake_async_waiters(self) noexcept:
        waiters = self.async_waiters
        if not waiters:
            return
        self.async_waiters = []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake_future, fut)
            except Exception:  # a closed loop: its waiter went with it
                pass

    cdef void close_c(self) noexcept:
        """Close without calling Python: usable from __dealloc__. Wakes blocked threads
        only (a parked asyncio waiter keeps its Subscription, so none is parked here)."""
        lock_with_gil(&self.mu)
        self.closed = True
        pthread_cond_broadcast(&self.cond)
        pthread_mutex_unlock(&self.mu)

    cdef void close(self) noexcept:
        self.close_c()
        self.wake_async_waiters()

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


@cython.final
cdef class Subscription:
    """A subscriber's handle on a bounded queue of the frames a session accepts.

    Dropping the last reference closes it, so a forgotten subscriber stops costing
    the producer anything.
    """

    cdef _SubQueue q
    cdef FrameRing ring

    def __init__(self):
        raise TypeError("subscriptions are made by Session.subscribe_visual_frames()")

    def __dealloc__(self):
        if self.q is not None:
            self.q.close_c()

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

    def qsize(self):
        return self.q.n

    def get(self, timeout=None):
        """Next frame; blocks (GIL released) up to ``timeout`` s, then ``queue.Empty``.
        After close(): the frames still queued, then ``SubscriptionClosed``."""
        cdef bint forever = True
        cdef int64_t deadline_ns = 0
        cdef PyObject *frame = NULL
        cdef int status
        if timeout is not None:
            seconds = _validate.timeout_seconds(timeout)
            if seconds is not None:
                forever = False
                deadline_ns = monotonic_ns() + <int64_t>(<double>seconds * 1e9)
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

    def get_nowait(self):
        result = self.q.try_pop(False)
        if result is None:
            raise _queue_mod.Empty
        return result

    async def aget(self, timeout=None):
        """Await the next frame without blocking the loop; ``queue.Empty`` on timeout."""
        seconds = _validate.timeout_seconds(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
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

    def close(self):
        """Stop receiving; wakes every waiter. Idempotent."""
        self.q.close()
        self.ring.remove_queue(self.q)

    unsubscribe = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        while True:
            try:
                yield self.get()
            except SubscriptionClosed:
                return

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.aget()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return (f"<Subscription {state} policy={self.policy} maxsize={self.maxsize} "
                f"queued={self.qsize()} dropped={self.dropped} delivered={self.delivered}>")


# --------------------------------------------------------------------------------------
# The ring


cdef struct Plan:
    Py_ssize_t evict           # how many of the oldest slots leave the ring
    bint reset                 # the source changed: every slot leaves
    Py_ssize_t reuse_slot      # logical index of an evicted slot whose buffer we reuse, or -1
    Py_ssize_t reuse_pool      # pool index whose buffer we reuse, or -1


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
    cdef uint64_t accepted, rate_limited, source_resets, gen
    cdef uint64_t fan_next, fan_serving
    cdef PyObject *pool[POOL_MAX]
    cdef Py_ssize_t pool_n
    # A list, not a C array, so the garbage collector sees the ring's queues (and an
    # abandoned asyncio waiter parked on one can be collected).
    cdef list subs
    cdef bint ended

    def __cinit__(self, clock, created_at):
        if pthread_mutex_init(&self.mu, NULL) != 0:
            raise MemoryError("pthread_mutex_init failed")
        try:
            init_cond(&self.fan_cond)
        except BaseException:
            pthread_mutex_destroy(&self.mu)
            raise
        self.ready = True
        self.subs = []
        empty = ""
        Py_INCREF(empty)
        self.active_source = <PyObject *>empty

    def __init__(self, clock, created_at):
        cdef int64_t ignored
        self.clock = _validate.clock(clock)
        parse_instant(created_at, "created_at", &self.last_active, &ignored)

    def __dealloc__(self):
        cdef Grave grave
        cdef Py_ssize_t i
        grave_init(&grave)
        self.evict_oldest(self.count, &grave, -1)
        for i in range(self.pool_n):
            grave_add(&grave, self.pool[i])
        self.pool_n = 0
        grave_add(&grave, self.active_source)
        self.active_source = NULL
        grave_flush(&grave)
        free(self.slots)
        if self.ready:
            pthread_cond_destroy(&self.fan_cond)
            pthread_mutex_destroy(&self.mu)

    # -- slot bookkeeping (ring lock held) -------------------------------------------
    cdef inline Slot *slot_at(self, Py_ssize_t i) noexcept nogil:
        return &self.slots[(self.head + i) % self.slot_cap]

    cdef inline bint exclusive(self, Slot *s) noexcept nogil:
        # Who may hold what: the slot holds frame and view; the frame holds the view;
        # the view holds the owner. Any reference beyond those is a reader's.
        if s.frame != NULL and _refcnt(s.frame) != 1:
            return False
        if s.view != NULL and _refcnt(s.view) != 1 + (s.frame != NULL):
            return False
        return _refcnt(s.owner) == 1 + (s.view != NULL)

    cdef void retire_owner(self, PyObject *owner, Grave *grave) noexcept nogil:
        if self.pool_n < POOL_MAX:
            self.pool[self.pool_n] = owner
            self.pool_n += 1
        else:
            grave_add(grave, owner)

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

    cdef void evict_oldest(self, Py_ssize_t k, Grave *grave, Py_ssize_t keep_owner_of) noexcept nogil:
        """Drop the k oldest slots. The owner of logical slot keep_owner_of is left in
        the slot struct for the caller to take; the others go to the pool or the grave."""
        cdef Py_ssize_t i
        cdef Slot *s
        for i in range(k):
            s = self.slot_at(0)
            grave_add(grave, s.frame)
            grave_add(grave, s.view)
            grave_add(grave, s.source)
            grave_add(grave, s.mime)
            if i != keep_owner_of:
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
        if now is None:
            return parse_instant(self.clock(), "clock()", seconds, ns)
        return parse_instant(now, "now", seconds, ns)

    @property
    def last_active_at(self):
        cdef double value
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
            self.evict_oldest(self.count, &grave, -1)
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
            self.evict_oldest(self.count, &grave, -1)
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

    cdef bint plan_store(self, Plan *plan, object source, Py_ssize_t keep, Py_ssize_t nbytes,
                         _FrameBuffer spare) noexcept:
        """Decide, without changing anything, which slots leave and whose buffer the
        new frame reuses. False when no buffer is free (the caller allocates one)."""
        cdef Py_ssize_t i
        cdef Slot *s
        plan.reset = PyUnicode_Compare(<object>self.active_source, source) != 0
        if plan.reset:
            plan.evict = self.count
        else:
            plan.evict = self.count - keep + 1 if self.count >= keep else 0
        plan.reuse_slot = -1
        plan.reuse_pool = -1
        for i in range(plan.evict):
            s = self.slot_at(i)
            if buffer_fits(s.owner, nbytes) and self.exclusive(s):
                plan.reuse_slot = i
                return True
        for i in range(self.pool_n):
            if _refcnt(self.pool[i]) == 1 and buffer_fits(self.pool[i], nbytes):
                plan.reuse_pool = i
                return True
        return spare is not None and buffer_fits(<PyObject *>spare, nbytes)

    cdef bint store(self, object data, object source, object max_recent, object min_interval,
                    object mime_type, object width, object height, object timestamp_ms,
                    object frame_seq, object now) except -1:
        cdef Py_ssize_t keep
        cdef int64_t min_ns, w, h, ts_ms, seq, now_ns
        cdef double now_s
        cdef Py_buffer buf
        cdef bint contiguous
        cdef Plan plan
        cdef Grave grave
        cdef PyObject *owner
        cdef Slot *slot
        cdef Slot meta
        cdef _FrameBuffer spare = None
        cdef PyObject **fan_subs = NULL
        cdef PyObject *few_subs[FEW_SUBS]  # no allocation per frame for a handful of subscribers
        cdef Py_ssize_t fan_n = 0, i
        cdef uint64_t ticket = 0
        cdef bint fan = False

        if not PyObject_CheckBuffer(data):
            raise TypeError("data must support the buffer protocol (bytes, bytearray, "
                            f"memoryview, numpy array), got {type(data).__name__}")
        source = parse_text(source, "source")
        keep = parse_count(max_recent, "max_recent")
        min_ns = parse_duration_ns(min_interval, "min_interval")
        mime_type = parse_text(mime_type, "mime_type")
        w = parse_int(width, "width", INT32_MIN, INT32_MAX)
        h = parse_int(height, "height", INT32_MIN, INT32_MAX)
        ts_ms = parse_int(timestamp_ms, "timestamp_ms", -INT64_MAX - 1, INT64_MAX)
        seq = parse_int(frame_seq, "frame_seq", -INT64_MAX - 1, INT64_MAX)
        self.read_now(now, &now_s, &now_ns)

        # Cheap early rejection: most calls of a rate-limited camera loop end here.
        lock_with_gil(&self.mu)
        if self.is_rate_limited(now_ns, min_ns):
            self.rate_limited += 1
            pthread_mutex_unlock(&self.mu)
            return False
        pthread_mutex_unlock(&self.mu)

        try:
            PyObject_GetBuffer(data, &buf, PyBUF_RECORDS_RO)
        except (ValueError, BufferError) as exc:
            raise TypeError(f"data cannot be read as bytes: {exc}") from None
        grave_init(&grave)
        try:
            contiguous = PyBuffer_IsContiguous(&buf, b'C')
            while True:
                lock_with_gil(&self.mu)
                if self.is_rate_limited(now_ns, min_ns):
                    self.rate_limited += 1
                    pthread_mutex_unlock(&self.mu)
                    return False
                if self.plan_store(&plan, source, keep, buf.len, spare):
                    if self.ensure_slots(self.count - plan.evict + 1):
                        break
                    pthread_mutex_unlock(&self.mu)
                    raise MemoryError("cannot grow the frame ring")
                pthread_mutex_unlock(&self.mu)
                # Allocate outside the lock, then decide again: the ring may have moved.
                spare = new_buffer(buf.len)

            # Committed from here on; nothing below can fail or call Python.
            if plan.reset:
                self.reset_source(source, &grave)
            if plan.reuse_slot >= 0:
                owner = self.slot_at(plan.reuse_slot).owner
            elif plan.reuse_pool >= 0:
                owner = self.pool[plan.reuse_pool]
                self.pool_n -= 1
                self.pool[plan.reuse_pool] = self.pool[self.pool_n]
            else:
                owner = <PyObject *>spare
                Py_INCREF(spare)
            self.evict_oldest(plan.evict, &grave, plan.reuse_slot)
            self.release_oversized_spares(buf.len, &grave)

            slot = self.slot_at(self.count)
            slot.owner = owner
            slot.view = NULL
            slot.frame = NULL
            Py_INCREF(source)
            slot.source = <PyObject *>source
            Py_INCREF(mime_type)
            slot.mime = <PyObject *>mime_type
            slot.nbytes = buf.len
            slot.width = w
            slot.height = h
            slot.timestamp_ms = ts_ms
            slot.frame_seq = seq
            slot.received_ns = now_ns
            slot.received_at = now_s
            self.gen += 1
            slot.gen = self.gen
            self.count += 1
            self.total_bytes += buf.len
            self.has_last = True
            self.last_accepted_ns = now_ns
            self.last_active = now_s
            self.accepted += 1

            fan_n = PyList_GET_SIZE(self.subs)
            if fan_n > 0:
                if fan_n <= FEW_SUBS:
                    fan_subs = few_subs
                else:
                    fan_subs = <PyObject **>malloc(fan_n * sizeof(PyObject *))
                if fan_subs != NULL:
                    fan = True
                    for i in range(fan_n):
                        fan_subs[i] = PyList_GET_ITEM(self.subs, i)
                        Py_INCREF(<object>fan_subs[i])
                    meta = slot[0]  # its references are taken just below
                    Py_INCREF(<object>meta.owner)
                    Py_INCREF(<object>meta.source)
                    Py_INCREF(<object>meta.mime)
                    ticket = self.fan_next
                    self.fan_next += 1
                else:
                    # Out of memory for the subscriber list: count the frame as dropped
                    # for every subscriber rather than lose it silently.
                    for i in range(fan_n):
                        (<_SubQueue>PyList_GET_ITEM(self.subs, i)).dropped += 1
                    fan_n = 0

            if buf.len >= NOGIL_COPY_MIN:
                with nogil:
                    gather((<_FrameBuffer>owner).ptr, &buf, contiguous)
            else:
                gather((<_FrameBuffer>owner).ptr, &buf, contiguous)
            pthread_mutex_unlock(&self.mu)
        finally:
            PyBuffer_Release(&buf)
            grave_flush(&grave)

        if fan:
            self.fan_out(&meta, fan_subs, fan_n, ticket)
        return True

    cdef void fan_out(self, Slot *meta, PyObject **subs, Py_ssize_t n, uint64_t ticket) noexcept:
        """Offer one accepted frame to a snapshot of the subscribers, in accept order.
        Owns meta's owner/source/mime references and the subs array (freed when it was
        malloc'd, i.e. n > FEW_SUBS)."""
        cdef Py_ssize_t i = 0, j
        cdef bint saw_closed = False
        cdef _SubQueue q
        frame = None
        lock_with_gil(&self.mu)
        if self.fan_serving != ticket:
            with nogil:
                while self.fan_serving != ticket:
                    pthread_cond_wait(&self.fan_cond, &self.mu)
        pthread_mutex_unlock(&self.mu)
        try:
            while i < n:
                q = <_SubQueue>subs[i]
                if q.closed:
                    saw_closed = True
                elif q.wants_frame():
                    if frame is None:
                        frame = make_frame(make_view(meta.owner, meta.nbytes), meta)
                    q.push(frame)
                i += 1
        except BaseException:
            # Only making the frame can fail (MemoryError): the subscribers from i on
            # never got it, so it is counted as dropped for them and the books balance.
            for j in range(i, n):
                q = <_SubQueue>subs[j]
                lock_with_gil(&q.mu)
                if not q.closed:
                    q.dropped += 1
                pthread_mutex_unlock(&q.mu)
        finally:
            lock_with_gil(&self.mu)
            self.fan_serving += 1
            pthread_cond_broadcast(&self.fan_cond)
            pthread_mutex_unlock(&self.mu)
            for i in range(n):
                Py_DECREF(<object>subs[i])
            if n > FEW_SUBS:
                free(subs)
            Py_DECREF(<object>meta.owner)
            Py_DECREF(<object>meta.source)
            Py_DECREF(<object>meta.mime)
        if saw_closed:
            self.prune_closed()

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
        policy = _validate.policy(policy)
        cdef _SubQueue q = _SubQueue(maxsize, policy)
        cdef Subscription sub = Subscription.__new__(Subscription)
        sub.q = q
        sub.ring = self
        lock_with_gil(&self.mu)
        try:
            if self.ended:
                # Nothing would ever close it: it starts closed, so a reader finishes at once.
                q.closed = True
            else:
                # A list append runs no Python code; it can only raise MemoryError.
                self.subs.append(q)
        finally:
            pthread_mutex_unlock(&self.mu)
        return sub

    @property
    def subscriber_count(self):
        cdef Py_ssize_t n
        self.prune_closed()
        lock_with_gil(&self.mu)
        n = PyList_GET_SIZE(self.subs)
        pthread_mutex_unlock(&self.mu)
        return n

    cdef void remove_queue(self, _SubQueue q) noexcept:
        cdef Py_ssize_t i
        cdef list subs = self.subs
        lock_with_gil(&self.mu)
        for i in range(PyList_GET_SIZE(subs)):
            if PyList_GET_ITEM(subs, i) == <PyObject *>q:
                # The list drops its reference here, but the caller's `q` still holds
                # one, so nothing is freed (and no Python runs) under the lock.
                del subs[i:i + 1]
                break
        pthread_mutex_unlock(&self.mu)

    cdef void prune_closed(self) noexcept:
        """Forget queues whose handle was dropped (closed from __dealloc__)."""
        cdef Py_ssize_t i
        cdef list open_subs = []  # made before locking: no allocation under the lock
        cdef list old
        lock_with_gil(&self.mu)
        old = self.subs
        for i in range(PyList_GET_SIZE(old)):
            if not (<_SubQueue>PyList_GET_ITEM(old, i)).closed:
                open_subs.append(<object>PyList_GET_ITEM(old, i))
        self.subs = open_subs
        pthread_mutex_unlock(&self.mu)
        # `old` is released here, after unlocking: a queue's last reference may go with it.

    def close_subscriptions(self):
        """Close every live subscription (the session ended): their readers wake up."""
        cdef list none_left = []  # made before locking: no allocation under the lock
        cdef list subs
        cdef _SubQueue q
        lock_with_gil(&self.mu)
        self.ended = True
        subs = self.subs
        self.subs = none_left
        pthread_mutex_unlock(&self.mu)
        for q in subs:
            q.close()
