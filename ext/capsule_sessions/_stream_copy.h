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
 * a copy of 300-700 us) and keeps each method's recent cost per MiB: it uses the cheapest
 * one, and once every CS_COPY_PERIOD copies each other one for CS_COPY_RUN copies, so that a
 * change of the machine's state is seen within a second at 2,000 frames/s, at a cost
 * of about 2% (a run of each of the three others). A method is measured only from the
 * middle of a run of it on, and the cheapest only from CS_COPY_RUN / 2 copies after the
 * others' runs: the first copies after a switch find the destinations in the other
 * method's state (memcpy leaves them cached, and non-temporal stores to cached lines are
 * slow; streaming leaves them uncached, and memcpy then reads every line first). How
 * long that lasts: 1080p stores to one reader on the project's 2-core EPYC VM, after
 * 200 streamed ones, took memcpy_split 355, 298, 283, 223 us for its 1st, 4th, 6th and
 * 8th copies, 186 for the 9th to 16th, and 170 from there on (streaming: 245 throughout).
 * With runs of 8 timed from their 5th copy, the split measured worse than streaming and
 * was never chosen: W10 moved 3,950 frames/s where the split alone moves 4,500-4,900.
 */
#ifndef CAPSULE_SESSIONS_STREAM_COPY_H
#define CAPSULE_SESSIONS_STREAM_COPY_H

#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

/* The methods: each of the two above alone, or split with a helper thread (the copy's
 * chunks shared with another core). One core's copy does not saturate memory on every
 * machine: on this project's 2-core VM a C test of the split measured 1.18-1.34x
 * memcpy; on a machine whose other cores are busy (readers, the model) it loses, which
 * the measured choice sees. */
enum { CS_COPY_PLAIN = 0, CS_COPY_STREAM = 1, CS_COPY_PLAIN_SPLIT = 2, CS_COPY_STREAM_SPLIT = 3,
       CS_COPY_METHODS = 4, CS_COPY_AUTO = -1 };
#define CS_COPY_PERIOD 2048
#define CS_COPY_RUN 32

/* Process-wide, updated with relaxed atomics: a lost update only delays the choice. */
static uint64_t cs_copy_calls;
/* Each method's last CS_COPY_SAMPLES timed copies, in ns per MiB (a ring, filled from
 * cs_copy_timed[m] on); its cost is their median: a copy only ever looks slower than its
 * method is (it was preempted, or faulted in a new segment's pages), and a median
 * ignores up to half of them, where a moving average moved with each. A challenger's run
 * is timed for CS_COPY_SAMPLES copies, so its cost is that run's. */
#define CS_COPY_SAMPLES (CS_COPY_RUN / 2)
static uint64_t cs_copy_samples[CS_COPY_METHODS][CS_COPY_SAMPLES];
static uint64_t cs_copy_timed[CS_COPY_METHODS];
static uint64_t cs_copy_used[CS_COPY_METHODS];
static uint64_t cs_copy_alone;  /* split copies made by one thread: the helper was busy or missing, or the copy small */
static int cs_copy_forced = CS_COPY_AUTO;  /* tests pin one method */
static int cs_copy_last = CS_COPY_AUTO;  /* the method of the last copy, and how many in a row */
static uint64_t cs_copy_streak;

static inline uint64_t cs_copy_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static inline void cs_copy_alone_by(int streaming, char *dst, const char *src, size_t n)
{
    if (streaming)
        cs_stream_copy(dst, src, n);
    else
        memcpy(dst, src, n);
}

/* A split copy is cut into chunks that the storing thread and the helper take in turn
 * from a shared cursor, rather than into two fixed parts: a reader process that wakes
 * on either core (one per frame and reader) delays only the chunk under it, and the
 * other thread takes the rest. With fixed halves the storing thread waited for a
 * preempted helper's whole half, and its core idled meanwhile: 17% of both cores'
 * time with four readers of 1080p frames on this project's 2-core VM. A chunk is
 * 128 KiB, about 10 us of copying: the longest a split waits for the helper's last one. */
#define CS_SPLIT_CHUNK ((size_t)128 * 1024)

/* The helper: one thread per process, started by the first split copy, that takes
 * chunks of one split at a time (a split that finds it busy copies alone). It lives
 * on the heap and names its process: a forked child, which has no such thread (and may
 * have inherited its lock held), starts its own. */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t posted_cond, finished_cond;
    char *dst;
    const char *src;
    size_t n;
    int streaming;
    uint64_t next_chunk;  /* the split's cursor: the index of the next chunk to copy */
    uint64_t posted;  /* splits posted */
    int closed;  /* the posted split needs no more help: the helper must not join it */
    int helping;  /* the helper is copying chunks of the posted split */
    int busy;  /* a split holds the helper */
} cs_copy_helper;

static uint64_t cs_copy_helped;  /* chunks the helper copied */

static cs_copy_helper *cs_helper;
static pid_t cs_helper_pid;  /* the process cs_helper runs in; -pid while that one starts it */

/* Chunk ``idx`` of a split of ``n`` bytes to ``dst``: [*start, *end). Every boundary
 * but the ends is on a 64-byte line of dst, so each chunk's streaming stores fill whole
 * lines; returns 0 past the last chunk. */
static inline int cs_split_chunk(uintptr_t dst, size_t n, uint64_t idx, size_t *start, size_t *end)
{
    size_t head = (64 - (dst & 63)) & 63;
    size_t from = idx == 0 ? 0 : head + (size_t)idx * CS_SPLIT_CHUNK;
    size_t to = head + ((size_t)idx + 1) * CS_SPLIT_CHUNK;
    if (idx > n / CS_SPLIT_CHUNK + 1 || from >= n)
        return 0;
    *start = from;
    *end = to < n ? to : n;
    return 1;
}

/* Copies chunks of the split until its cursor passes the end; how many it copied. */
static inline uint64_t cs_split_take(cs_copy_helper *h, int streaming, char *dst, const char *src, size_t n)
{
    uint64_t taken = 0;
    size_t start, end;
    while (cs_split_chunk((uintptr_t)dst, n, __atomic_fetch_add(&h->next_chunk, 1, __ATOMIC_RELAXED), &start,
                          &end)) {
        cs_copy_alone_by(streaming, dst + start, src + start, end - start);
        taken++;
    }
    return taken;
}

static void *cs_copy_helper_main(void *arg)
{
    cs_copy_helper *h = (cs_copy_helper *)arg;
    uint64_t seen = 0, taken;
    pthread_mutex_lock(&h->lock);
    for (;;) {
        char *dst;
        const char *src;
        size_t n;
        int streaming;
        while (h->posted == seen)
            pthread_cond_wait(&h->posted_cond, &h->lock);
        seen = h->posted;
        if (h->closed)
            continue;  /* the storing thread took every chunk before this thread woke */
        h->helping = 1;
        dst = h->dst;
        src = h->src;
        n = h->n;
        streaming = h->streaming;
        pthread_mutex_unlock(&h->lock);
        taken = cs_split_take(h, streaming, dst, src, n);  /* (each chunk's sfence orders its stores) */
        __atomic_fetch_add(&cs_copy_helped, taken, __ATOMIC_RELAXED);
        pthread_mutex_lock(&h->lock);
        h->helping = 0;
        pthread_cond_signal(&h->finished_cond);
    }
    return NULL;
}

/* This process's helper, started now if it has none; NULL while another thread starts
 * it, or when it cannot be started (then it is not tried again in this process). */
static cs_copy_helper *cs_copy_helper_get(void)
{
    pid_t pid = getpid();
    pid_t seen = __atomic_load_n(&cs_helper_pid, __ATOMIC_ACQUIRE);
    cs_copy_helper *h;
    pthread_t thread;
    pthread_attr_t attr;
    sigset_t all, old;
    int started;
    if (seen == pid)
        return __atomic_load_n(&cs_helper, __ATOMIC_ACQUIRE);
    if (seen == -pid || !__atomic_compare_exchange_n(&cs_helper_pid, &seen, -pid, 0, __ATOMIC_ACQ_REL,
                                                     __ATOMIC_ACQUIRE))
        return NULL;
    h = (cs_copy_helper *)calloc(1, sizeof(*h));
    started = h != NULL && pthread_mutex_init(&h->lock, NULL) == 0 && pthread_cond_init(&h->posted_cond, NULL) == 0
              && pthread_cond_init(&h->finished_cond, NULL) == 0 && pthread_attr_init(&attr) == 0;
    if (started) {
        /* No signal is ever handled on the helper (CPython's handlers expect a thread of
         * its own), and nobody joins it. */
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        started = pthread_create(&thread, &attr, cs_copy_helper_main, h) == 0;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
    }
    if (!started) {
        free(h);  /* (a partly initialised one: never used) */
        h = NULL;
    }
    __atomic_store_n(&cs_helper, h, __ATOMIC_RELEASE);
    __atomic_store_n(&cs_helper_pid, pid, __ATOMIC_RELEASE);
    return h;
}

/* The storing thread and the helper take the chunks between them. Once the cursor has
 * passed the end, the split is closed (a helper that wakes later stays out) and the
 * storing thread waits for the chunk the helper may still be copying. */
static inline void cs_split_copy(int streaming, char *dst, const char *src, size_t n)
{
    cs_copy_helper *h = cs_copy_helper_get();
    if (h == NULL || n <= CS_SPLIT_CHUNK || __atomic_exchange_n(&h->busy, 1, __ATOMIC_ACQUIRE)) {
        __atomic_fetch_add(&cs_copy_alone, 1, __ATOMIC_RELAXED);
        cs_copy_alone_by(streaming, dst, src, n);
        return;
    }
    pthread_mutex_lock(&h->lock);
    h->dst = dst;
    h->src = src;
    h->n = n;
    h->streaming = streaming;
    __atomic_store_n(&h->next_chunk, 0, __ATOMIC_RELAXED);
    h->closed = 0;
    ++h->posted;
    pthread_cond_signal(&h->posted_cond);
    pthread_mutex_unlock(&h->lock);
    cs_split_take(h, streaming, dst, src, n);
    pthread_mutex_lock(&h->lock);
    h->closed = 1;
    while (h->helping)
        pthread_cond_wait(&h->finished_cond, &h->lock);
    pthread_mutex_unlock(&h->lock);
    __atomic_store_n(&h->busy, 0, __ATOMIC_RELEASE);
}

/* The method of copy number ``call`` given each method's cost; ``*measured``: whether
 * its time counts. A run of each method first; then the cheapest, and once every
 * CS_COPY_PERIOD copies a run of each other one in turn. A run is timed from its middle
 * on, and the cheapest from CS_COPY_RUN / 2 copies after the runs (and the first runs)
 * ended. */
static inline int cs_copy_pick(uint64_t call, const uint64_t *cost, int *measured)
{
    int best = 0, m;
    uint64_t phase = call % CS_COPY_PERIOD;
    uint64_t others = (uint64_t)(CS_COPY_METHODS - 1) * CS_COPY_RUN;
    *measured = call % CS_COPY_RUN >= CS_COPY_RUN / 2;
    if (call < (uint64_t)CS_COPY_METHODS * CS_COPY_RUN)
        return (int)(call / CS_COPY_RUN);
    for (m = 1; m < CS_COPY_METHODS; m++)
        if (cost[m] < cost[best])
            best = m;
    if (phase < others) {
        m = (int)(phase / CS_COPY_RUN);
        return m >= best ? m + 1 : m;
    }
    *measured = phase >= others + CS_COPY_RUN / 2
                && call >= (uint64_t)CS_COPY_METHODS * CS_COPY_RUN + CS_COPY_RUN / 2;
    return best;
}

/* Method ``m``'s cost: the median of its timed copies in ns per MiB (0: none yet). */
static inline uint64_t cs_copy_cost(int m)
{
    uint64_t sorted[CS_COPY_SAMPLES], v;
    uint64_t timed = __atomic_load_n(&cs_copy_timed[m], __ATOMIC_RELAXED);
    int n = timed < CS_COPY_SAMPLES ? (int)timed : CS_COPY_SAMPLES, i, j;
    if (n == 0)
        return 0;
    for (i = 0; i < n; i++) {  /* (insertion sort of at most 16) */
        v = __atomic_load_n(&cs_copy_samples[m][i], __ATOMIC_RELAXED);
        for (j = i; j > 0 && sorted[j - 1] > v; j--)
            sorted[j] = sorted[j - 1];
        sorted[j] = v;
    }
    v = sorted[n / 2];
    return v ? v : 1;
}

static inline void cs_large_copy(char *dst, const char *src, size_t n)
{
    uint64_t call = __atomic_fetch_add(&cs_copy_calls, 1, __ATOMIC_RELAXED);
    int forced = __atomic_load_n(&cs_copy_forced, __ATOMIC_RELAXED), measured = 0, m;
    uint64_t costs[CS_COPY_METHODS];
    uint64_t start, cost, slot;
    int method;
    for (m = 0; m < CS_COPY_METHODS; m++)
        costs[m] = cs_copy_cost(m);
    method = cs_copy_pick(call, costs, &measured);
    if (forced != CS_COPY_AUTO)
        method = forced;
    /* The cheapest changed (or copies from threads at once interleave): not timed until
     * it has made half a run in a row, for the reason of the runs. */
    if (method != __atomic_exchange_n(&cs_copy_last, method, __ATOMIC_RELAXED))
        __atomic_store_n(&cs_copy_streak, 0, __ATOMIC_RELAXED);
    if (__atomic_fetch_add(&cs_copy_streak, 1, __ATOMIC_RELAXED) < CS_COPY_RUN / 2)
        measured = 0;
    start = cs_copy_now_ns();
    if (method >= CS_COPY_PLAIN_SPLIT)
        cs_split_copy(method == CS_COPY_STREAM_SPLIT, dst, src, n);
    else
        cs_copy_alone_by(method == CS_COPY_STREAM, dst, src, n);
    __atomic_fetch_add(&cs_copy_used[method], 1, __ATOMIC_RELAXED);
    if (!measured)
        return;
    cost = (cs_copy_now_ns() - start) * (uint64_t)(1 << 20) / (n ? n : 1);
    slot = __atomic_fetch_add(&cs_copy_timed[method], 1, __ATOMIC_RELAXED) % CS_COPY_SAMPLES;
    __atomic_store_n(&cs_copy_samples[method][slot], cost, __ATOMIC_RELAXED);
}

#endif
