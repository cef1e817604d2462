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
 */
#ifndef CAPSULE_SESSIONS_STREAM_COPY_H
#define CAPSULE_SESSIONS_STREAM_COPY_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

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

#endif
