/* A copy into shared memory that bypasses the producer's caches when it is large.
 *
 * A shared session's frame is written by the owner and read by other processes, never
 * again by the writing core. For a frame much larger than the last-level cache (1080p
 * RGB is 6.2 MB) memcpy's ordinary stores first read every destination line into the
 * cache (read for ownership) and then evict it again: measured on a 32 MiB-L3 EPYC,
 * rotating three 6.2 MB buffers (max_recent=2 plus the one being written), memcpy moves
 * 8-9 GB/s and non-temporal stores 17-18 GB/s. Below about an eighth of the cache the
 * destination stays cached and memcpy is faster (30-41 GB/s against 17), so the caller
 * picks by size (STREAM_COPY_MIN_BYTES in capsule_sessions/_limits.py).
 *
 * The stores are weakly ordered: the sfence at the end makes them visible before the
 * caller publishes the frame with its (sequentially consistent) seqlock write.
 * Elsewhere than x86-64 this is memcpy.
 *
 * Which one is faster also depends on the machine and the moment: on a VM whose host
 * shares its cache with others, the same 1080p copies measured memcpy 8.8 GB/s against
 * streaming 18 GB/s one day, and 14.1 against 13.1 the next. So cs_large_copy, what a
 * store calls from STREAM_COPY_MIN_BYTES on, times its copies (two clock reads, against
 * a copy of 300-700 us) and keeps each method's recent cost per MiB: it uses the cheaper
 * one, and once every CS_COPY_PERIOD copies the other for CS_COPY_RUN copies, so that a
 * change of the machine's state is seen within a second at 2,000 frames/s, at a cost
 * of under 1%. A method is measured only from the middle of a run of it on: the first
 * copies after a switch find the destinations in the other method's state (memcpy
 * leaves them cached, and non-temporal stores to cached lines are slow; streaming
 * leaves them uncached, and memcpy then reads every line first).
 */
#ifndef CAPSULE_SESSIONS_STREAM_COPY_H
#define CAPSULE_SESSIONS_STREAM_COPY_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>

static inline void cs_stream_copy(char *dst, const char *src, size_t n)
{
    /* Up to the next 64-byte line of dst with memcpy: _mm_stream_si128 needs 16-byte
     * alignment, and whole lines fill the write-combining buffers. */
    size_t head = (64 - ((uintptr_t)dst & 63)) & 63;
    size_t i;
    if (head > n)
        head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    for (i = 0; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    _mm_sfence();
    memcpy(dst + i, src + i, n - i);
}
#else
static inline void cs_stream_copy(char *dst, const char *src, size_t n)
{
    memcpy(dst, src, n);
}
#endif

enum { CS_COPY_PLAIN = 0, CS_COPY_STREAM = 1, CS_COPY_AUTO = -1 };
#define CS_COPY_PERIOD 1024
#define CS_COPY_RUN 8

/* Process-wide, updated with relaxed atomics: a lost update only delays the choice. */
static uint64_t cs_copy_calls;
static uint64_t cs_copy_cost[2];  /* ns per MiB, a moving average; 0: not measured yet */
static uint64_t cs_copy_used[2];
static int cs_copy_forced = CS_COPY_AUTO;  /* tests pin one method */

static inline uint64_t cs_copy_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* The method of copy number ``call``; ``*measured``: whether its time counts. */
static inline int cs_copy_pick(uint64_t call, uint64_t plain, uint64_t stream, int *measured)
{
    int best;
    *measured = call % CS_COPY_RUN >= CS_COPY_RUN / 2;
    if (call < 2 * CS_COPY_RUN)
        return call < CS_COPY_RUN ? CS_COPY_PLAIN : CS_COPY_STREAM;  /* a run of each first */
    best = stream < plain ? CS_COPY_STREAM : CS_COPY_PLAIN;
    if (call % CS_COPY_PERIOD < CS_COPY_RUN)
        return 1 - best;
    *measured = 1;
    return best;
}

static inline void cs_large_copy(char *dst, const char *src, size_t n)
{
    uint64_t call = __atomic_fetch_add(&cs_copy_calls, 1, __ATOMIC_RELAXED);
    int forced = __atomic_load_n(&cs_copy_forced, __ATOMIC_RELAXED), measured = 0;
    int method = cs_copy_pick(call, __atomic_load_n(&cs_copy_cost[0], __ATOMIC_RELAXED),
                              __atomic_load_n(&cs_copy_cost[1], __ATOMIC_RELAXED), &measured);
    uint64_t start, cost, old;
    if (forced != CS_COPY_AUTO)
        method = forced;
    start = cs_copy_now_ns();
    if (method == CS_COPY_STREAM)
        cs_stream_copy(dst, src, n);
    else
        memcpy(dst, src, n);
    __atomic_fetch_add(&cs_copy_used[method], 1, __ATOMIC_RELAXED);
    if (!measured)
        return;
    cost = (cs_copy_now_ns() - start) * (uint64_t)(1 << 20) / (n ? n : 1);
    old = __atomic_load_n(&cs_copy_cost[method], __ATOMIC_RELAXED);
    /* Down fast, up slowly: a copy only ever looks slower than its method is (it was
     * preempted, or faulted in a new segment's pages), so a high sample moves the
     * average by an eighth of at most twice it, a low one by three quarters. */
    if (old == 0)
        cost = cost ? cost : 1;
    else if (cost <= old)
        cost = (old + 3 * cost) / 4;
    else
        cost = (7 * old + (cost > 2 * old ? 2 * old : cost)) / 8;
    __atomic_store_n(&cs_copy_cost[method], cost, __ATOMIC_RELAXED);
}

#endif
