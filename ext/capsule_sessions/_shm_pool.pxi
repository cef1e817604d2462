# The shared ring's buffers: data segments handed out for stores and loans only when
# nothing can reach them (ring, queues, leases), kept as a small pool, unlinked beyond it.
# Called with the ring's lock held.

cdef inline bint _fits(uint64_t capacity, uint64_t needed) noexcept nogil:
    # As the compiled twin's pool: a buffer is reused for a frame that fits and fills a
    # quarter of it (small buffers for any frame that fits).
    return capacity >= needed and (capacity <= SHRINK_FLOOR or needed * 4 >= capacity)


cdef bint pool_leased(SharedRing ring, uint64_t index):
    cdef cs_header *h = ring._h
    cdef cs_reader *readers = cs_readers(h)
    cdef uint32_t r
    for r in range(CS_MAX_READERS):
        if cs_load32(&cs_leases(h, r)[index]) != 0:
            return True
    return False


cdef bint pool_retire(SharedRing ring, uint64_t index):
    """Whether buffer ``index`` (leased by nobody a moment ago) can be destroyed: its
    generation is bumped first, then the leases are read again (the Dekker pair of
    pool_allocate), so a reader that leased it in between either fails its generation
    check or is seen here, and never maps the segment that replaces it."""
    cs_add(&cs_buffers(ring._h)[index].gen, 1)
    return not pool_leased(ring, index)


cdef int pool_allocate(SharedRing ring, uint64_t needed) except -1:
    """A buffer of at least ``needed`` bytes that no reader can reach: not in the
    ring, in no queue, leased by nobody; its generation is bumped before it is
    handed out, so a reader racing for its old frame fails its check."""
    cdef cs_buffer *buffers = cs_buffers(ring._h)
    cdef Py_ssize_t i
    cdef uint64_t index
    ring._last_needed = needed
    pool_drain_returned(ring)
    fan_reap_readers(ring, False)
    fan_reap_subscribers(ring, False)
    for attempt in range(2):
        for i in range(len(ring._free) - 1, -1, -1):
            index = ring._free[i]
            if ring._qrefs[index] or pool_leased(ring, index):
                continue
            if not _fits(buffers[index].capacity, needed):
                if not pool_retire(ring, index):
                    continue
                del ring._free[i]
                pool_destroy(ring, index)
                continue
            cs_add(&buffers[index].gen, 1)
            if pool_leased(ring, index):  # a reader leased it before it saw the new generation
                continue
            del ring._free[i]
            return index
        if ring._unused or len(ring._segments) < CS_MAX_BUFFERS:
            return pool_new_buffer(ring, needed)
        fan_reap_readers(ring, True)
    raise SharedMemoryError(f"every one of the {CS_MAX_BUFFERS} buffers of shared session "
                            f"{ring.session_id!r} is in use")


cdef int pool_new_buffer(SharedRing ring, uint64_t needed) except -1:
    cdef uint64_t capacity = (needed + 4095) & ~(<uint64_t>4095)
    if ring._unused:
        index = ring._unused.pop()
    else:
        index = len(ring._segments)
        ring._segments.append(None)
    ring._serial += 1
    name = f"{ring._data_prefix}.{ring._serial}"
    try:
        seg = _create_segment(name, capacity)
    except BaseException:
        ring._unused.append(index)
        raise
    if ring._ended:
        seg.unlink()  # nobody can attach any more: the name would only leak
    ring._segments[index] = seg
    cdef cs_buffer *b = &cs_buffers(ring._h)[index]
    cs_add(&b.gen, 1)
    cs_store(&b.capacity, capacity)
    cs_store(&b.serial, ring._serial)
    cs_add(&ring._h.buffers_version, 1)
    return index


cdef pool_destroy(SharedRing ring, uint64_t index):
    cdef cs_buffer *b = &cs_buffers(ring._h)[index]
    seg = ring._segments[index]
    cs_store(&b.serial, 0)
    cs_add(&b.gen, 1)
    ring._segments[index] = None
    ring._unused.append(index)
    if seg is not None and not ring._ended:
        (<_Segment>seg).unlink()


cdef pool_trim(SharedRing ring):
    """Unlink the free buffers nothing references beyond the newest POOL_SPARE of them,
    and those of a size the frames have left behind (a resolution change): memory
    follows what the ring, the queues and the readers hold (a reader's mapping outlives
    the name). Buffers a queue or a reader still holds are not spares and are never
    counted as such, so readers holding frames never make the next stores fault in new
    segments."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t spares = 0
    cdef uint64_t index
    cdef cs_buffer *buffers = cs_buffers(ring._h)
    while i < len(ring._free):
        index = ring._free[len(ring._free) - 1 - i]  # the newest first: kept as the spares
        referenced = ring._qrefs[index] != 0 or pool_leased(ring, index)
        fits = _fits(buffers[index].capacity, ring._last_needed)
        if not referenced and fits and spares < POOL_SPARE:
            spares += 1
            i += 1
        elif not referenced and pool_retire(ring, index):
            del ring._free[len(ring._free) - 1 - i]
            pool_destroy(ring, index)
        else:
            i += 1


cdef pool_drain_returned(SharedRing ring):
    while ring._returned:
        index, abandoned = ring._returned.pop()
        ring._writing -= 1
        if abandoned:  # a view of the cancelled loan lives on: that memory is its alone
            pool_destroy(ring, index)
        else:
            ring._free.append(index)
