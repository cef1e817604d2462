# cython: language_level=3, embedsignature=True, auto_pickle=False
"""Shared sessions: a session's frame ring in POSIX shared memory, one writer (the
owning process) and readers in any number of processes.

The contract is the in-process ring's, result for result (docs/shared-memory.md): the
owner keeps the ring's decisions (rate limit, source, max_recent, counters) in its own
memory, exactly as ``capsule_sessions._framebuf_py._ring`` makes them, and publishes the
result into the control segment (``_shm.h``); readers, the owner's own reads included,
read only what is published. No lock is shared between processes:

- the ring is published under a seqlock; a reader copies it and retries on a change;
- a frame's buffer is leased by the reader that hands it out (a count only it writes)
  and checked against the buffer's generation, which the owner bumps before rewriting a
  buffer nobody leases, queues or rings: a Dekker pair on sequentially consistent
  atomics, so either the owner sees the lease or the reader sees the new generation;
- each subscription is a single-producer queue of buffer numbers whose tail both sides
  advance by compare-and-swap (the reader takes, the owner evicts for drop_oldest);
- a store wakes a subscriber with a futex only when it said it sleeps.

Files: ``_shm_segment.pxi`` (segments, names, liveness, the header),
``_shm_owner.pxi`` (the writer, ``SharedRing``), ``_shm_pool.pxi`` (its buffers),
``_shm_fanout.pxi`` (its subscribers), ``_shm_lease.pxi`` (reader slots and leases),
``_shm_reader.pxi`` (``AttachedSession``, frames), ``_shm_subscription.pxi``
(``SharedSubscription``), ``_shm_loan.pxi`` (``SharedLoan``).
"""

cimport cython
from cpython.buffer cimport PyBUF_FULL_RO, PyBUF_C_CONTIGUOUS, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, EINTR, ENOENT, errno
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from posix.fcntl cimport O_CREAT, O_EXCL, O_RDONLY, O_RDWR
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap, shm_open, shm_unlink
from posix.stat cimport fstat, struct_stat
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close as c_close, ftruncate, getpid

from cpython.buffer cimport PyObject_CheckBuffer
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.unicode cimport PyUnicode_CheckExact
from libc.math cimport fabs, isfinite, isnan
from libc.stdint cimport INT32_MAX, INT64_MAX

cimport numpy as cnp

from capsule_sessions._framebuf cimport Slot

cnp.import_array()

import asyncio
import atexit
import os
import queue as _queue_mod
import threading
import time
import weakref

import numpy as np

from capsule_sessions import _limits, _validate
from capsule_sessions import _validate as v
from capsule_sessions._framebuf_py._buffers import check_buffer, copy_bytes
from capsule_sessions._records import VisualFrame
from capsule_sessions.errors import (FORKED_MESSAGE, LOAN_EXPORTED_MESSAGE, LOAN_FINISHED_MESSAGE,
                                     LOAN_NOT_BY_HAND_MESSAGE, NOT_BY_HAND_MESSAGE, REENTERED_MESSAGE,
                                     SessionExistsError, SharedMemoryError, SubscriptionClosed)

cdef extern from "_shm.h" nogil:
    enum:
        CS_MAX_RING  # an array size below, so a compile-time constant
    uint32_t CS_VERSION
    uint32_t CS_MAX_BUFFERS
    uint32_t CS_MAX_READERS
    uint32_t CS_MAX_SUBS
    uint32_t CS_MAX_QUEUE
    uint32_t CS_LEASE_BUDGET
    uint32_t CS_MAX_WRITING
    uint32_t CS_ID_MAX
    uint64_t CS_SUB_FREE
    uint64_t CS_SUB_CLAIMED
    uint64_t CS_SUB_ACTIVE
    uint64_t CS_SUB_RELEASED
    uint64_t CS_SUB_CLAIMED_BY(uint64_t reader)
    uint64_t CS_MAGIC
    uint64_t CS_DATA_MAGIC
    uint64_t CS_OFF_BUFFERS
    uint64_t CS_OFF_READERS
    uint64_t CS_OFF_LEASES
    uint64_t CS_OFF_SUBS
    uint64_t CS_TOTAL_SIZE
    uint64_t CS_ALIGN(uint64_t n)

    ctypedef struct cs_buffer:
        uint64_t serial
        uint64_t capacity
        uint64_t gen
    ctypedef struct cs_ring_entry:
        uint64_t entry
        int64_t received_ns
        uint64_t nbytes
    ctypedef struct cs_reader:
        uint64_t pid
        uint64_t start_time
        uint64_t copied_out
        uint64_t sleeping
    ctypedef struct cs_sub:
        uint64_t state
        uint64_t epoch
        uint64_t reader
        uint64_t policy
        uint64_t maxsize
        uint64_t closed
        uint64_t head
        uint64_t dropped
        uint64_t tail
        uint64_t delivered
        uint64_t entries[1]
    ctypedef struct cs_header:
        uint64_t magic
        uint32_t version
        uint32_t header_size
        uint64_t total_size
        uint32_t max_ring, max_buffers, max_readers, max_subs, max_queue, lease_budget
        uint64_t off_buffers, off_readers, off_leases, off_subs
        uint64_t owner_pid
        uint64_t owner_start
        uint64_t nonce
        uint64_t closed
        uint64_t id_len
        char id[1]
        uint64_t owner_reader
        uint64_t seq
        uint64_t accepted, rate_limited, source_resets, frames, bytes
        uint64_t ring_count
        uint64_t buffers_version
        uint64_t subs_version
        uint32_t wake
        cs_ring_entry ring[1]
    ctypedef struct cs_meta:
        uint64_t magic
        uint64_t nbytes
        int64_t width, height, timestamp_ms, frame_seq
        double received_at
        uint32_t mime_len, source_len
        uint64_t data_offset

    uint64_t cs_load(uint64_t *p)
    void cs_store(uint64_t *p, uint64_t v)
    uint64_t cs_add(uint64_t *p, uint64_t v)
    uint64_t cs_sub_(uint64_t *p, uint64_t v)
    bint cs_cas(uint64_t *p, uint64_t expected, uint64_t desired)
    uint32_t cs_load32(uint32_t *p)
    uint32_t cs_add32(uint32_t *p, uint32_t v)
    uint32_t cs_sub32(uint32_t *p, uint32_t v)
    void cs_release32(uint32_t *p)
    int cs_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns)
    void cs_futex_wake(uint32_t *word)
    cs_buffer *cs_buffers(cs_header *h)
    cs_reader *cs_readers(cs_header *h)
    uint32_t *cs_leases(cs_header *h, uint32_t reader)
    cs_sub *cs_subs(cs_header *h)

cdef extern from *:
    int __builtin_ctzll(unsigned long long x) nogil

cdef extern from "_stream_copy.h" nogil:
    void cs_large_copy(char *dst, const char *src, size_t n)
    int cs_copy_pick(uint64_t call, const uint64_t *cost, int *measured)
    enum:
        CS_COPY_PLAIN
        CS_COPY_STREAM
        CS_COPY_PLAIN_SPLIT
        CS_COPY_STREAM_SPLIT
        CS_COPY_METHODS
        CS_COPY_AUTO
    uint64_t cs_copy_cost(int m)
    uint64_t cs_copy_timed[CS_COPY_METHODS]
    uint64_t cs_copy_calls
    uint64_t cs_copy_used[CS_COPY_METHODS]
    uint64_t cs_copy_alone
    uint64_t cs_copy_helped
    int cs_split_chunk(uintptr_t dst, size_t n, uint64_t idx, size_t *start, size_t *end)
    int cs_copy_forced

cdef extern from "Python.h":
    int PyObject_GenericSetAttr(object o, object name, object value) except -1
    enum: PyBUF_MAX_NDIM

__all__ = ["SharedRing", "AttachedSession", "SharedSubscription", "SharedLoan", "read_owner", "unlink"]

MAX_RING = CS_MAX_RING
MAX_READERS = CS_MAX_READERS
MAX_SUBSCRIPTIONS = CS_MAX_SUBS
MAX_QUEUE = CS_MAX_QUEUE
LEASE_BUDGET = CS_LEASE_BUDGET
CONTROL_SIZE = CS_TOTAL_SIZE
VERSION = CS_VERSION

# Where a frame's bytes start in its data segment: after the frame header, aligned.
cdef uint64_t DATA_OFFSET = CS_ALIGN(sizeof(cs_meta))
# The key of the classes that only this module makes (as _framebuf's _MAKE).
cdef object _MAKE = object()
# What the compiled ring's argument fast paths (_args.pxi, included below) read.
cdef double MAX_INSTANT_SECONDS = _limits.MAX_INSTANT_SECONDS
cdef Py_ssize_t MAX_COUNT = _limits.MAX_COUNT
_monotonic = time.monotonic
cdef object _object_new = object.__new__

# Bumped in a forked child: a ring inherited through fork() refuses to store (a second
# writer would corrupt the session), without a getpid() call per store.
cdef uint64_t fork_generation = 0


def _forked():
    global fork_generation
    fork_generation += 1


os.register_at_fork(after_in_child=_forked)

_LARGE_COPY_METHODS = {"memcpy": CS_COPY_PLAIN, "stream": CS_COPY_STREAM, "memcpy_split": CS_COPY_PLAIN_SPLIT,
                       "stream_split": CS_COPY_STREAM_SPLIT}
_LARGE_COPY_NAMES = {m: name for name, m in _LARGE_COPY_METHODS.items()}


def _large_copy_state():
    """How the copies of large stores went in this process (_stream_copy.h): per method
    (``"memcpy"``, ``"stream"``, and each split with the helper thread) its cost in ns per
    MiB (the median of its last timed copies; 0: not measured yet), how many copies used
    it and how many of them were timed; ``"split_alone"``:
    split copies one thread made (the helper was busy with another, or the copy was one
    chunk); ``"split_helped"``: chunks of splits the helper copied; ``"calls"``: large
    copies so far, the policy's clock. For the tests and the curious."""
    state = {name: {"ns_per_mib": cs_copy_cost(m), "copies": cs_copy_used[m], "timed": cs_copy_timed[m]}
             for name, m in _LARGE_COPY_METHODS.items()}
    state["split_alone"] = {"copies": cs_copy_alone}
    state["split_helped"] = {"chunks": cs_copy_helped}
    state["calls"] = {"copies": cs_copy_calls}
    return state


def _split_chunks(uintptr_t dst, size_t n):
    """The [start, end) byte ranges a split copy of ``n`` bytes to address ``dst`` is cut
    into (_stream_copy.h), for the tests."""
    cdef size_t start = 0, end = 0
    cdef uint64_t idx = 0
    chunks = []
    while cs_split_chunk(dst, n, idx, &start, &end):
        chunks.append((start, end))
        idx += 1
    return chunks


def _pick_large_copy(uint64_t call, costs):
    """(method, measured) of large copy number ``call`` given each method's cost (a
    mapping of the method names to ns per MiB): the policy of _stream_copy.h, for the
    tests."""
    cdef uint64_t cost[CS_COPY_METHODS]
    cdef int measured = 0
    for name, m in _LARGE_COPY_METHODS.items():
        cost[m] = costs[name]
    cdef int method = cs_copy_pick(call, cost, &measured)
    return _LARGE_COPY_NAMES[method], bool(measured)


def _force_large_copy(method):
    """Pin the copy of large stores to one method (a name of _large_copy_state), or
    ``None``: choose by measured cost (the default). For the tests, which check each."""
    if method is not None and method not in _LARGE_COPY_METHODS:
        raise ValueError(f"method must be one of {sorted(_LARGE_COPY_METHODS)} or None, got {method!r}")
    global cs_copy_forced
    cs_copy_forced = CS_COPY_AUTO if method is None else _LARGE_COPY_METHODS[method]
cdef int64_t WAIT_SLICE_NS = <int64_t>(_limits.WAIT_SLICE_S * 1e9)
cdef Py_ssize_t NOGIL_COPY_MIN = _limits.NOGIL_COPY_MIN_BYTES
cdef Py_ssize_t STREAM_COPY_MIN = _limits.STREAM_COPY_MIN_BYTES
cdef uint64_t SHRINK_FLOOR = _limits.SHRINK_FLOOR_BYTES
# Free data segments nothing references kept for reuse; more are unlinked.
cdef Py_ssize_t POOL_SPARE = 4
cdef uint64_t LOW32 = 0xffffffffULL
# How often (at most) the owner looks for dead readers to reclaim, in ns.
cdef int64_t REAP_INTERVAL_NS = 200_000_000
# How long a reader trusts that the owner process runs before it looks again, in ns.
cdef int64_t OWNER_PROBE_NS = 20_000_000


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


# The compiled ring's argument parsing, compiled into this module too: the same fast
# paths and the same fall-backs to _validate, so both rings read arguments alike.
include "_args.pxi"


cdef inline int read_clock(object clock, object now, double *seconds, int64_t *ns) except -1:
    """The instant of a call: ``now``, or the session's clock (read in C when it is
    time.monotonic, with the value time.monotonic() would give)."""
    cdef timespec ts
    if now is not None:
        return parse_instant(now, "now", seconds, ns)
    if clock is _monotonic:
        clock_gettime(CLOCK_MONOTONIC, &ts)
        seconds[0] = <double>(<int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9
        ns[0] = <int64_t>(seconds[0] * 1e9)
        return 0
    return parse_instant(clock(), "clock()", seconds, ns)


include "_shm_segment.pxi"
include "_shm_owner.pxi"
include "_shm_pool.pxi"
include "_shm_fanout.pxi"
include "_shm_lease.pxi"
include "_shm_reader.pxi"
include "_shm_subscription.pxi"
include "_shm_loan.pxi"
