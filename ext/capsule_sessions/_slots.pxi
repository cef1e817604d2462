# The ring's slots: a circular array of the newest frames, oldest first, with the bytes
# they hold. Every function here runs with the ring lock held and calls no Python: the
# references a slot lets go of go to the pool or a Grave.


cdef inline Slot *slot_at(SlotRing *slots, Py_ssize_t i) noexcept nogil:
    return &slots.items[(slots.head + i) % slots.cap]


cdef bint slots_reserve(SlotRing *slots, Py_ssize_t needed) noexcept nogil:
    """Room for ``needed`` slots; False (nothing changed) when out of memory."""
    cdef Py_ssize_t newcap, i
    cdef Slot *grown
    if needed <= slots.cap:
        return True
    newcap = slots.cap * 2 if slots.cap else 2
    if newcap < needed:
        newcap = needed
    grown = <Slot *>malloc(newcap * sizeof(Slot))
    if grown == NULL:
        return False
    for i in range(slots.count):
        grown[i] = slot_at(slots, i)[0]
    free(slots.items)
    slots.items = grown
    slots.cap = newcap
    slots.head = 0
    return True


cdef inline Slot *slots_append(SlotRing *slots, const Slot *meta, PyObject *buffer, uint64_t seq) noexcept:
    """Store ``meta`` as the newest slot (room reserved; GIL held for the INCREFs), owning
    the reference to ``buffer`` the caller hands over."""
    cdef Slot *slot = slot_at(slots, slots.count)
    slot[0] = meta[0]
    slot.buffer = buffer
    slot.view = NULL
    slot.frame = NULL
    slot.seq = seq
    Py_INCREF(<object>slot.source)
    Py_INCREF(<object>slot.mime)
    slots.count += 1
    slots.nbytes += meta.nbytes
    return slot


cdef inline void slots_forget_oldest(SlotRing *slots) noexcept nogil:
    slots.nbytes -= slot_at(slots, 0).nbytes
    slots.head = (slots.head + 1) % slots.cap
    slots.count -= 1
    if slots.count == 0:
        slots.head = 0


cdef void slots_evict_oldest(SlotRing *slots, Py_ssize_t k, BufferPool *pool, Grave *grave) noexcept nogil:
    """Drop the k oldest slots; their buffers go to the pool (or the grave)."""
    cdef Py_ssize_t i
    cdef Slot *s
    for i in range(k):
        s = slot_at(slots, 0)
        grave_add(grave, s.frame)
        grave_add(grave, s.view)
        grave_add(grave, s.source)
        grave_add(grave, s.mime)
        pool_retire(pool, s.buffer, grave)
        slots_forget_oldest(slots)


cdef inline PyObject *slots_take_oldest_buffer(SlotRing *slots, Py_ssize_t nbytes, Grave *grave) noexcept nogil:
    """Evict the oldest slot and return its buffer, if nothing was ever made from it and
    only the ring references the buffer (no view or frame of it is alive) and a frame
    of ``nbytes`` fits; else NULL, nothing changed."""
    cdef Slot *s
    cdef PyObject *buffer
    if slots.count == 0:
        return NULL
    s = slot_at(slots, 0)
    if s.frame != NULL or s.view != NULL or _refcnt(s.buffer) != 1 or not buffer_fits(s.buffer, nbytes):
        return NULL
    grave_add(grave, s.source)
    grave_add(grave, s.mime)
    buffer = s.buffer
    slots_forget_oldest(slots)
    return buffer


cdef Slot *slots_find(SlotRing *slots, uint64_t seq) noexcept nogil:
    """The slot holding accept number ``seq``, or NULL when it left the ring."""
    cdef Py_ssize_t i
    cdef Slot *s
    for i in range(slots.count):
        s = slot_at(slots, i)
        if s.seq == seq:
            return s
    return NULL


cdef Slot *slots_pick_recent(SlotRing *slots, int64_t now_ns, int64_t ttl_ns, Py_ssize_t *k) noexcept:
    """Copies of the slots no older than ``ttl_ns`` at ``now_ns`` (GIL held), each with
    a reference to its frame or, when none was made yet, to its buffer, source and mime;
    NULL when out of memory."""
    cdef Py_ssize_t i
    cdef Slot *s
    cdef Slot *picked = <Slot *>malloc((slots.count or 1) * sizeof(Slot))
    if picked == NULL:
        return NULL
    for i in range(slots.count):
        s = slot_at(slots, i)
        if now_ns - s.received_ns <= ttl_ns:
            picked[k[0]] = s[0]
            if s.frame != NULL:
                Py_INCREF(<object>s.frame)
            else:
                Py_INCREF(<object>s.buffer)
                Py_INCREF(<object>s.source)
                Py_INCREF(<object>s.mime)
            k[0] += 1
    return picked


cdef void slots_cache_frames(SlotRing *slots, Slot *made, Py_ssize_t k, Grave *grave) noexcept nogil:
    """Keep frames a reader made in their slots, so the next reader shares them. Each
    made[i] with buffer set carries one view and one frame reference to give."""
    cdef Py_ssize_t i
    cdef Slot *s
    for i in range(k):
        if made[i].buffer == NULL or made[i].frame == NULL:
            continue
        s = slots_find(slots, made[i].seq)
        if s != NULL and s.frame == NULL:
            s.frame = made[i].frame
            s.view = made[i].view
        else:
            grave_add(grave, made[i].frame)
            grave_add(grave, made[i].view)
        made[i].frame = NULL
        made[i].view = NULL
