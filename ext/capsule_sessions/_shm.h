/* The layout of a shared session in POSIX shared memory, and the few primitives the
 * protocol needs: sequentially consistent atomics and process-shared futexes.
 *
 * One control segment per session holds this header, the buffer table, the reader
 * table, the lease table and the subscriber queues (docs/shared-memory.md draws it).
 * Frame bytes live in data segments, one per buffer, so a resolution change allocates
 * new buffers without moving anything a reader has mapped.
 *
 * Every field is a fixed-width integer at a fixed offset: a reader built from another
 * version of this file refuses the segment by its version number, never misreads it.
 * Every shared word is read and written through the cs_* atomics: the other side is
 * another process, so nothing here may be cached in a register or torn.
 */
#ifndef CAPSULE_SHM_H
#define CAPSULE_SHM_H

#include <stdint.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#define CS_MAGIC 0x31534e5343415043ULL   /* "CPACSNS1" read little-endian */
#define CS_VERSION 4u
#define CS_MAX_RING 256u        /* max_recent of a shared session */
#define CS_MAX_BUFFERS 4096u    /* > ring + every queue + every lease budget + open stores */
#define CS_MAX_READERS 32u      /* attached handles (processes) at once */
#define CS_MAX_SUBS 32u         /* subscriptions at once, over every reader (<= 64: a bitmask) */
#define CS_MAX_QUEUE 64u        /* buffer= of a shared subscription */
#define CS_LEASE_BUDGET 16u     /* frames one reader holds before it copies out */
#define CS_MAX_WRITING 64u      /* stores and loans in progress at once */
#define CS_ID_MAX 256u
#define CS_DATA_MAGIC 0x41544144534e5343ULL  /* "CSNSDATA" */

/* sub.state */
#define CS_SUB_FREE 0u
#define CS_SUB_CLAIMED 1u
#define CS_SUB_ACTIVE 2u
#define CS_SUB_RELEASED 3u
/* A claim names its reader in the state word itself: a claimant killed before it
 * wrote `reader` leaves a slot that the reaper can still tell is the dead reader's. */
#define CS_SUB_CLAIMED_BY(r) (CS_SUB_CLAIMED | (((uint64_t)(r) + 1u) << 8))

typedef struct {
    uint64_t serial;    /* names the data segment; 0: no segment */
    uint64_t capacity;  /* bytes in the data segment */
    uint64_t gen;       /* bumped each time the buffer is about to be rewritten */
    uint64_t pad;
} cs_buffer;

typedef struct {
    uint64_t entry;        /* gen << 32 | buffer index */
    int64_t received_ns;
    uint64_t nbytes;
    uint64_t pad;
} cs_ring_entry;

typedef struct {
    uint64_t pid;          /* 0: free; claimed by compare-and-swap from 0 */
    uint64_t start_time;   /* /proc/<pid>/stat field 22, so a reused pid is not taken for it */
    uint64_t copied_out;   /* frames copied out past the lease budget */
    uint64_t sleeping;     /* this reader's threads about to sleep on the session's futex */
    uint64_t pad[4];
} cs_reader;

typedef struct {
    uint64_t state;
    uint64_t epoch;        /* bumped by each claim, so the owner tells subscribers apart */
    uint64_t reader;
    uint64_t policy;       /* 0 drop_newest, 1 drop_oldest */
    uint64_t maxsize;
    uint64_t closed;       /* the owner or the subscriber closed it */
    uint64_t pad0[2];
    uint64_t head;         /* owner only */
    uint64_t dropped;      /* owner only */
    uint64_t pad1[6];
    uint64_t tail;         /* compare-and-swap by the reader (take) and the owner (evict) */
    uint64_t delivered;
    uint64_t pad2[6];
    uint64_t entries[CS_MAX_QUEUE];
} cs_sub;

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint64_t total_size;
    uint32_t max_ring, max_buffers, max_readers, max_subs, max_queue, lease_budget;
    uint64_t off_buffers, off_readers, off_leases, off_subs;
    uint64_t owner_pid;
    uint64_t owner_start;
    uint64_t nonce;
    uint64_t closed;
    uint64_t id_len;
    char id[CS_ID_MAX];
    uint64_t owner_reader;  /* the owner's own reader slot: it reads by index, never by name */
    uint64_t pad0[3];
    /* published by the owner under the seqlock `seq` (odd while it writes) */
    uint64_t seq;
    uint64_t accepted, rate_limited, source_resets, frames, bytes;
    uint64_t ring_count;
    uint64_t buffers_version;  /* bumped when a data segment is created */
    uint64_t subs_version;     /* bumped by a reader that claims or releases a subscription */
    /* One futex word for the session: bumped after every store's pushes and on every
     * close; a store wakes every sleeper with one syscall, and only if a reader says it
     * sleeps (cs_reader.sleeping, which a dead reader's reclaim clears). */
    uint32_t wake;
    uint32_t pad_wake;
    uint64_t pad1[6];
    cs_ring_entry ring[CS_MAX_RING];
} cs_header;

/* The head of a data segment; the frame's strings follow it, then its bytes. */
typedef struct {
    uint64_t magic;
    uint64_t nbytes;
    int64_t width, height, timestamp_ms, frame_seq;
    double received_at;
    uint32_t mime_len, source_len;
    uint64_t data_offset;
} cs_meta;

#define CS_ALIGN(n) (((n) + 63u) & ~(uint64_t)63u)
#define CS_OFF_BUFFERS CS_ALIGN(sizeof(cs_header))
#define CS_OFF_READERS CS_ALIGN(CS_OFF_BUFFERS + sizeof(cs_buffer) * CS_MAX_BUFFERS)
#define CS_OFF_LEASES CS_ALIGN(CS_OFF_READERS + sizeof(cs_reader) * CS_MAX_READERS)
#define CS_OFF_SUBS CS_ALIGN(CS_OFF_LEASES + sizeof(uint32_t) * CS_MAX_READERS * CS_MAX_BUFFERS)
#define CS_TOTAL_SIZE CS_ALIGN(CS_OFF_SUBS + sizeof(cs_sub) * CS_MAX_SUBS)

static inline uint64_t cs_load(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void cs_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t cs_add(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t cs_sub_(uint64_t *p, uint64_t v) { return __atomic_sub_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline int cs_cas(uint64_t *p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline uint32_t cs_load32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline uint32_t cs_add32(uint32_t *p, uint32_t v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t cs_sub32(uint32_t *p, uint32_t v) { return __atomic_sub_fetch(p, v, __ATOMIC_SEQ_CST); }
/* A lease count never goes below zero, even on a corrupted table: a decrement of 0 is skipped. */
static inline void cs_release32(uint32_t *p) {
    uint32_t seen = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (seen != 0 && !__atomic_compare_exchange_n(p, &seen, seen - 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
}

/* Waits while *word == expected, at most timeout_ns; returns 0 or an errno (EAGAIN: it
 * had changed, ETIMEDOUT, EINTR). Not FUTEX_PRIVATE: the waker is another process. */
static inline int cs_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000);
    ts.tv_nsec = (long)(timeout_ns % 1000000000);
    if (syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0) == 0)
        return 0;
    return errno;
}

static inline void cs_futex_wake(uint32_t *word) {
    syscall(SYS_futex, word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

static inline cs_buffer *cs_buffers(cs_header *h) { return (cs_buffer *)((char *)h + CS_OFF_BUFFERS); }
static inline cs_reader *cs_readers(cs_header *h) { return (cs_reader *)((char *)h + CS_OFF_READERS); }
static inline uint32_t *cs_leases(cs_header *h, uint32_t reader) {
    return (uint32_t *)((char *)h + CS_OFF_LEASES) + (uint64_t)reader * CS_MAX_BUFFERS;
}
static inline cs_sub *cs_subs(cs_header *h) { return (cs_sub *)((char *)h + CS_OFF_SUBS); }

#endif
