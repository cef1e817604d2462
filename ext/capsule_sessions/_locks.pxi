# Locks and the monotonic clock. A thread that holds the GIL never blocks on a pthread
# lock (the holder may need the GIL back before it unlocks), and blocking waits run in
# slices so a signal handler (Ctrl-C) runs promptly.


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

