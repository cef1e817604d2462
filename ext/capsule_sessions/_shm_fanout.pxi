# The shared ring's subscribers: adopting new subscriptions, counting taken entries out
# of the buffers' references, pushing accepted frames, reclaiming dead readers.
# Called with the ring's lock held.

@cython.final
cdef class _SubMirror:
    """What the owner remembers of one subscription slot: which claim it belongs to,
    how far it has counted the queue's entries out of the buffer books, and the accept
    number it booked last."""
    cdef uint64_t epoch
    cdef uint64_t seen_tail
    cdef uint64_t booked
    # Read once at adoption: the shared copies are writable by readers, so the owner
    # never divides by, or branches on, what a reader could change afterwards.
    cdef uint64_t maxsize
    cdef bint drop_oldest
    cdef uint64_t head


cdef fan_count_out(SharedRing ring, cs_sub *s, _SubMirror m, uint64_t upto):
    cdef uint64_t k, e
    if upto > m.head:  # a tail past the head: only a corrupted table says so
        upto = m.head
    for k in range(m.seen_tail, upto):
        e = cs_load(&s.entries[k % m.maxsize])
        if (e & LOW32) < CS_MAX_BUFFERS and ring._qrefs[e & LOW32]:
            ring._qrefs[e & LOW32] -= 1
    m.seen_tail = upto


cdef inline int _lowest_bit(uint64_t bits) noexcept nogil:
    return __builtin_ctzll(bits)


cdef fan_forget(SharedRing ring, uint32_t i, uint64_t state):
    ring._mirrors[i] = None
    ring._mirrored &= ~(1ULL << i)
    if state == CS_SUB_RELEASED:
        cs_store(&cs_subs(ring._h)[i].state, CS_SUB_FREE)


cdef fan_reap_subscribers(SharedRing ring, bint full):
    """Count taken entries out of the buffers' references; forget released
    subscriptions. ``full``: also free slots released before they were adopted."""
    cdef cs_sub *subs = cs_subs(ring._h)
    cdef uint32_t i
    cdef uint64_t bits = ring._mirrored
    cdef uint64_t state
    cdef _SubMirror m
    while bits:
        i = _lowest_bit(bits)
        bits &= bits - 1
        m = ring._mirrors[i]
        state = cs_load(&subs[i].state)
        if state == CS_SUB_ACTIVE and cs_load(&subs[i].epoch) == m.epoch:
            fan_count_out(ring, &subs[i], m, cs_load(&subs[i].tail))
        else:  # released (or reclaimed and claimed again): nothing of it is queued
            fan_count_out(ring, &subs[i], m, m.head)
            fan_forget(ring, i, state)
    if full:
        for i in range(CS_MAX_SUBS):
            if not (ring._mirrored >> i) & 1 and cs_load(&subs[i].state) == CS_SUB_RELEASED:
                cs_store(&subs[i].state, CS_SUB_FREE)


cdef fan_adopt(SharedRing ring):
    """Subscriptions claimed since the last store start with the next accept number.
    Readers bump subs_version when they claim or release one, so a store whose
    version is unchanged looks at the adopted subscriptions only."""
    cdef cs_sub *subs = cs_subs(ring._h)
    cdef uint32_t i
    cdef _SubMirror m
    cdef uint64_t version = cs_load(&ring._h.subs_version)
    if version == ring._subs_seen:
        fan_reap_subscribers(ring, False)
        return
    ring._subs_seen = version
    fan_reap_subscribers(ring, True)
    for i in range(CS_MAX_SUBS):
        if not (ring._mirrored >> i) & 1 and cs_load(&subs[i].state) == CS_SUB_ACTIVE:
            maxsize = cs_load(&subs[i].maxsize)
            if maxsize == 0 or maxsize > CS_MAX_QUEUE:  # a corrupted claim: refuse it
                cs_store(&subs[i].closed, 1)
                continue
            m = _SubMirror.__new__(_SubMirror)
            m.epoch = cs_load(&subs[i].epoch)
            m.head = cs_load(&subs[i].head)
            m.seen_tail = m.head
            m.booked = ring._accepted
            m.maxsize = maxsize
            m.drop_oldest = cs_load(&subs[i].policy) == 1
            ring._mirrors[i] = m
            ring._mirrored |= 1ULL << i


cdef fan_out(SharedRing ring, uint64_t entry):
    cdef cs_sub *subs = cs_subs(ring._h)
    cdef cs_sub *s
    cdef uint32_t i
    cdef uint64_t head, tail
    cdef uint64_t bits = ring._mirrored
    cdef _SubMirror m
    cdef bint pushed = False
    while bits:
        i = _lowest_bit(bits)
        bits &= bits - 1
        m = ring._mirrors[i]
        s = &subs[i]
        if cs_load(&s.closed) or m.booked >= ring._accepted:
            continue
        m.booked = ring._accepted
        head = m.head
        tail = cs_load(&s.tail)
        if tail > head or head - tail > m.maxsize:  # corrupted by a reader: closed
            cs_store(&s.closed, 1)
            continue
        if head - tail >= m.maxsize:
            if not m.drop_oldest:
                cs_add(&s.dropped, 1)
                continue
            while head - tail >= m.maxsize and tail <= head:
                if cs_cas(&s.tail, tail, tail + 1):
                    cs_add(&s.dropped, 1)
                tail = cs_load(&s.tail)
            if tail > head:
                cs_store(&s.closed, 1)
                continue
        # Before the push: its slot is the one of entry head - maxsize, which the reader
        # may have taken since the last count, and must be counted out while it names its
        # own buffer, not the new one (from issue12-mptests 0b6736b).
        fan_count_out(ring, s, m, tail)
        cs_store(&s.entries[head % m.maxsize], entry)
        ring._qrefs[entry & LOW32] += 1
        m.head = head + 1
        cs_store(&s.head, head + 1)
        pushed = True
    if pushed:  # every queue first, then one wake-up for all of them
        wake_readers(ring._h)


cdef fan_reap_readers(SharedRing ring, bint now):
    """Reclaim the leases and subscriptions of readers whose process died (at most
    every REAP_INTERVAL_NS unless ``now``)."""
    cdef int64_t t = monotonic_ns()
    if not now and t - ring._reaped_at < REAP_INTERVAL_NS:
        return
    ring._reaped_at = t
    cdef cs_header *h = ring._h
    cdef cs_reader *readers = cs_readers(h)
    cdef uint32_t r
    for r in range(CS_MAX_READERS):
        pid = cs_load(&readers[r].pid)
        if pid == 0 or process_alive(pid, cs_load(&readers[r].start_time)):
            continue
        release_subs_of_reader(h, r)
        memset(cs_leases(h, r), 0, CS_MAX_BUFFERS * sizeof(uint32_t))
        cs_store(&readers[r].start_time, 0)
        cs_store(&readers[r].sleeping, 0)
        cs_store(&readers[r].pid, 0)
    fan_reap_subscribers(ring, False)
