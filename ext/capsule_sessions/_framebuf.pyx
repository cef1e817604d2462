# cython: language_level=3, embedsignature=True, auto_pickle=False
"""The compiled frame-buffer backend: the twin of ``capsule_sessions._framebuf_py``.

Same interface and results as the pure twin (its module docstring is the contract);
what differs is how the bytes move:

- A ring slot owns a reusable ``_FrameBuffer`` (malloc'd, 64-byte aligned). ``store``
  validates with the GIL, takes a buffer nothing else references, copies into it with
  exactly one pass (a gather for strided or PIL-style input) without the ring lock and,
  for frames of ``NOGIL_COPY_MIN_BYTES`` bytes or more, without the GIL (below that, handing
  the GIL over costs more than the copy), then takes the ring lock again to decide and
  commit.
- Readers get read-only numpy views whose base is the buffer. A buffer is written again
  only when the ring's reference is its only one: no view, frame or export of it is
  alive, so no weak reference can be turned into a strong one to it either. The copy
  goes into the buffer of the slot the store evicts when nothing was ever made from it
  (a camera loop nobody reads cycles through max_recent buffers), else a free pool
  buffer, else a new one. In steady state no frame memory is allocated.
- Buffer size policy: a buffer is reused for a frame that fits in it and fills at least
  a quarter of it (buffers up to ``SHRINK_FLOOR_BYTES`` are always reused when they fit);
  otherwise it is released and a right-sized one is allocated. The pool keeps at most
  ``POOL_MAX_BUFFERS`` buffers that left the ring, free ones before ones readers still hold; a
  free pool buffer too large for the frame being stored (by the same rule) is released,
  so after frames get smaller memory shrinks back to (max_recent + POOL_MAX) x the
  current frame size, plus what readers still hold.
- Frame objects (``VisualFrame``) are made lazily: by the first ``latest_visual_frames``
  that returns a slot (then cached in the slot), or by the fan-out when at least one
  subscriber takes the frame. Storing into a ring nobody reads, or whose subscribers
  are full with ``drop_newest``, makes no Python object at all.

Locks (pthread mutexes, so they work without the GIL):
- one per ring (``FrameRing._lock``) and one per subscriber queue (``_Queue.lock``);
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
accepted frames wait in ``_FanOut.pending`` and one thread at a time (the runner)
offers them in accept order; a store that finds a runner at work waits (GIL released)
until its frame was offered, except on a thread that runs a fan-out itself, which never
waits. Each queue books an accept number once, so an offer interrupted by an error is
made again, and the error reaches the storing caller after every queue was settled.
A ring or queue inherited through ``fork()`` refuses use (``fork_generation``).

This file holds the module's set-up; each job has its own include file, and
``_framebuf.pxd`` declares every struct and class: ``_release.pxi`` (deferred releases),
``_locks.pxi`` (locks and the clock), ``_args.pxi`` (argument parsing),
``_buffers.pxi`` (frame memory and the pool), ``_slots.pxi`` (the ring's slots),
``_queue.pxi`` (the subscriber queue), ``_subscription.pxi`` (its handle),
``_fanout.pxi`` (offering accepted frames), ``_ring.pxi`` (the ring), ``_loan.pxi``
(frame loans: a pool buffer written in place, then made the frame's).
docs/architecture.md maps them onto the pure twin's modules.
"""

cimport cython
from cpython.buffer cimport (PyBUF_FULL_RO, PyBuffer_IsContiguous, PyBuffer_Release, PyObject_CheckBuffer,
                             PyObject_GetBuffer)
from cpython.exc cimport PyErr_CheckSignals
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.object cimport PyObject_GenericSetAttr
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from cpython.unicode cimport PyUnicode_CheckExact
from libc.errno cimport ETIMEDOUT
from libc.math cimport fabs, isfinite, isnan
from libc.stdint cimport INT32_MAX, INT64_MAX, int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset
from posix.stdlib cimport posix_memalign
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cimport numpy as cnp

from capsule_sessions._pthread cimport (pthread_cond_broadcast, pthread_cond_destroy, pthread_cond_init, pthread_cond_signal,
                       pthread_cond_t, pthread_cond_timedwait, pthread_condattr_destroy, pthread_condattr_init,
                       pthread_condattr_setclock, pthread_condattr_t, pthread_mutex_destroy, pthread_mutex_init,
                       pthread_mutex_lock, pthread_mutex_t, pthread_mutex_trylock, pthread_mutex_unlock)

cnp.import_array()

import asyncio
import inspect
import os
import queue as _queue_mod

import numpy

from capsule_sessions import _limits, _validate
from capsule_sessions._records import VisualFrame
from capsule_sessions.errors import (FORKED_MESSAGE, LOAN_EXPORTED_MESSAGE, LOAN_FINISHED_MESSAGE,
                                     LOAN_NOT_BY_HAND_MESSAGE, NOT_BY_HAND_MESSAGE, SubscriptionClosed)

cdef extern from "Python.h":
    # Only ever called with the GIL held; declared nogil so the ring's C helpers can
    # stay plain C.
    Py_ssize_t _refcnt "Py_REFCNT"(PyObject *o) nogil
    int PyUnicode_Compare(object left, object right) except? -1
    unsigned long PyThread_get_thread_ident() nogil
    # The most dimensions a buffer may have: what memoryview (so the pure twin) accepts.
    enum: PyBUF_MAX_NDIM

cdef extern from "_forward.h":
    object capsule_forward_new(object reference, object name, object refit, object owner, object ring_slot)

__all__ = ["FrameLoan", "FrameRing", "Subscription"]

# The limits both twins share come from capsule_sessions._limits.
cdef Py_ssize_t NOGIL_COPY_MIN = _limits.NOGIL_COPY_MIN_BYTES
cdef Py_ssize_t SHRINK_FLOOR = _limits.SHRINK_FLOOR_BYTES
cdef double MAX_INSTANT_SECONDS = _limits.MAX_INSTANT_SECONDS
cdef Py_ssize_t MAX_COUNT = _limits.MAX_COUNT
cdef int64_t MAX_LOAN = _limits.MAX_LOAN_BYTES
cdef int64_t WAIT_SLICE_NS = <int64_t>(_limits.WAIT_SLICE_S * 1e9)
cdef Py_ssize_t BUFFER_ALIGN = 64
cdef uint64_t NO_FAN_OUT = <uint64_t>-1

NOGIL_COPY_MIN_BYTES = NOGIL_COPY_MIN
SHRINK_FLOOR_BYTES = SHRINK_FLOOR
POOL_MAX_BUFFERS = POOL_MAX

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


include "_fork.pxi"
include "_release.pxi"
include "_locks.pxi"
include "_args.pxi"
include "_buffers.pxi"
include "_slots.pxi"
include "_queue.pxi"
include "_subscription.pxi"
include "_fanout.pxi"
include "_ring.pxi"
include "_loan.pxi"
