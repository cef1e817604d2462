"""Every limit both twins share, in one place: the compiled twin reads these at import
and the tests read them here, so a change to one is a change to all.
"""

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Instants stay within +-2**62 ns (about 146 years) so that the difference of any two
# of them still fits an int64.
MAX_INSTANT_SECONDS = 2**62 / 1e9
# max_recent and buffer are clamped here: storage grows with what is stored, not with
# the bound, so a huge bound is harmless and needs no error.
MAX_COUNT = 2**31 - 1
# Blocking waits wake this often, so a signal handler (Ctrl-C) runs promptly.
WAIT_SLICE_S = 0.1
# The compiled twin copies frames of this many bytes or more with the GIL released;
# below it, handing the GIL over costs more than the copy.
NOGIL_COPY_MIN_BYTES = 16384
# A shared session's store copies frames of this many bytes or more with non-temporal
# stores or memcpy, whichever measures cheaper in the process
# (ext/capsule_sessions/_stream_copy.h): a frame this large is read by other processes,
# and caching it on the way may only evict it again. Measured on a 32 MiB-L3 EPYC
# rotating three buffers: memcpy is faster up to 2 MiB, streaming from 4 MiB on.
STREAM_COPY_MIN_BYTES = 4 * 1024 * 1024
# The compiled twin reuses a buffer up to this size for any frame that fits in it;
# a larger one only for a frame that fills at least a quarter of it.
SHRINK_FLOOR_BYTES = 256 * 1024
# Session.loan_frame lends at most this many bytes (1 TiB): beyond any frame, and far
# from the Py_ssize_t edge, where rounding a buffer up to its alignment would overflow.
# A loan this side of it that the machine cannot hold is a MemoryError.
MAX_LOAN_BYTES = 2**40
# The most dimensions FrameLoan.as_array gives a view (numpy's own limit).
MAX_NDIM = 64
