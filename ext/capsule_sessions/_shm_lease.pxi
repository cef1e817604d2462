# Leases: a reader's slot in the reader table, and its hold on each buffer it hands out
# a frame of (written only by it; the owner reads them before rewriting a buffer).

@cython.final
@cython.no_gc_clear
cdef class _ReaderSlot:
    """One entry of the reader table and the lease counts that go with it, held by the
    attached session and by every lease it gave out: the slot (and its leases) is given
    back only when the last of them is gone, so a frame outliving its handle stays as it
    was. Frames never reference the handle itself, so a handle caching frames makes no
    reference cycle."""
    cdef _Segment control
    cdef cs_header *h
    cdef uint32_t *leases
    cdef int index
    cdef Py_ssize_t held
    cdef bint owner_local
    cdef str data_prefix
    cdef uint64_t fork_gen
    cdef object __weakref__

    def __cinit__(self):
        self.index = -1
        self.fork_gen = fork_generation

    @staticmethod
    cdef _ReaderSlot claim(_Segment control, bint owner_local, str data_prefix, str session_id):
        cdef _ReaderSlot self = _ReaderSlot.__new__(_ReaderSlot)
        self.control = control
        self.h = <cs_header *>control.addr
        self.owner_local = owner_local
        self.data_prefix = data_prefix
        cdef cs_reader *readers = cs_readers(self.h)
        cdef uint64_t pid = getpid()
        cdef uint32_t r
        for r in range(CS_MAX_READERS):
            if cs_cas(&readers[r].pid, 0, pid):
                cs_store(&readers[r].copied_out, 0)
                cs_store(&readers[r].sleeping, 0)
                cs_store(&readers[r].start_time, own_start_time())
                self.index = r
                self.leases = cs_leases(self.h, r)
                _live_slots.add(self)
                return self
        raise SharedMemoryError(f"shared session {session_id!r} already has {CS_MAX_READERS} readers attached")

    def __dealloc__(self):
        self.leave()

    cdef void release(self, uint32_t index) noexcept:
        cs_release32(&self.leases[index])
        self.held -= 1

    cdef inline void release_raw(self, uint32_t index) noexcept:
        cs_release32(&self.leases[index])

    cdef void leave(self) noexcept:
        """Give the slot back (and clean up after an ended session, if last)."""
        if self.index < 0 or self.h == NULL or self.fork_gen != fork_generation:
            return  # (a forked child's copy of a slot is its parent's)
        cdef cs_reader *readers = cs_readers(self.h)
        cdef int index = self.index
        self.index = -1
        # Its subscriptions go first, while the slot still names a live process: one
        # killed after this slot left (between the exit handler and the finalizers that
        # release them) would leave them active with no reader the reaper could find.
        release_subs_of_reader(self.h, index)
        memset(self.leases, 0, CS_MAX_BUFFERS * sizeof(uint32_t))
        cs_store(&readers[index].start_time, 0)
        cs_store(&readers[index].pid, 0)
        if not self.owner_local:
            try:
                _leave_if_last(self.h, index, self.data_prefix)
            except BaseException:
                pass  # a name that cannot be unlinked now is the next sweep's


@cython.final
@cython.no_gc_clear
cdef class _Lease:
    """A reader's hold on one buffer, the base of the arrays handed out over it: while it
    lives, the owner does not rewrite the buffer (it is leased); collecting it ends the
    lease. It also keeps the mapping alive, so the view stays valid after unlink."""
    cdef _ReaderSlot slot
    cdef _Segment mapping
    cdef uint32_t index

    def __dealloc__(self):
        if self.slot is not None:
            self.slot.release(self.index)

    def __reduce_ex__(self, protocol):
        raise TypeError("a shared frame's lease cannot be pickled; copy the frame's data instead")


# Handles still attached at interpreter exit leave then (their frames die with the
# process), so the last process out of an ended session unlinks what it left.
_live_slots = weakref.WeakSet()


def _leave_live_slots():
    for slot in list(_live_slots):
        (<_ReaderSlot>slot).leave()


atexit.register(_leave_live_slots)
