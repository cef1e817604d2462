# Shared-memory segments, their names and the liveness of the processes behind them.
# Never multiprocessing.shared_memory: its resource tracker unlinks a segment when the
# process that opened it exits, while others still use it (cpython#82300).

cdef class _Segment:
    """One mapped POSIX shared-memory segment. Unmapped when collected; the name is
    unlinked only by ``unlink()`` (the owner's, or a sweep's)."""

    cdef readonly str name
    cdef char *addr
    cdef readonly uint64_t size

    def __cinit__(self):
        self.addr = NULL
        self.size = 0

    def __dealloc__(self):
        if self.addr != NULL:
            munmap(self.addr, self.size)
            self.addr = NULL

    def __reduce_ex__(self, protocol):
        raise TypeError("a shared-memory segment cannot be pickled")

    def unlink(self):
        _unlink_name(self.name)


cdef bytes _c_name(str name):
    # Validated by capsule_sessions.shared; checked again here so no caller can reach
    # shm_open with a path.
    if not name.startswith("/") or "/" in name[1:] or ".." in name or len(name) > 250:
        raise ValueError(f"invalid shared-memory name {name!r}")
    return name.encode("ascii")


cdef _Segment _create_segment(str name, uint64_t size):
    """A new segment of ``size`` bytes, owner-only (0600), failing if the name exists."""
    cdef bytes cname = _c_name(name)
    cdef int fd = shm_open(cname, O_CREAT | O_EXCL | O_RDWR, 0o600)
    if fd < 0:
        code = errno
        if code == 17:  # EEXIST
            raise FileExistsError(code, os.strerror(code), name)
        raise OSError(code, os.strerror(code), name)
    cdef void *addr
    try:
        if ftruncate(fd, <long>size) != 0:
            code = errno
            shm_unlink(cname)
            raise OSError(code, os.strerror(code), name)
        addr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if addr == MAP_FAILED:
            code = errno
            shm_unlink(cname)
            raise OSError(code, os.strerror(code), name)
    finally:
        c_close(fd)
    cdef _Segment seg = _Segment.__new__(_Segment)
    seg.name = name
    seg.addr = <char *>addr
    seg.size = size
    return seg


cdef _Segment _open_segment(str name, bint writable):
    """An existing segment mapped whole; FileNotFoundError when there is none."""
    cdef bytes cname = _c_name(name)
    cdef int fd = shm_open(cname, O_RDWR if writable else O_RDONLY, 0)
    if fd < 0:
        code = errno
        if code == ENOENT:
            raise FileNotFoundError(code, os.strerror(code), name)
        raise OSError(code, os.strerror(code), name)
    cdef struct_stat st
    cdef void *addr
    try:
        if fstat(fd, &st) != 0:
            code = errno
            raise OSError(code, os.strerror(code), name)
        if st.st_size <= 0:
            raise SharedMemoryError(f"shared-memory segment {name!r} is empty (not initialised, or not ours)")
        addr = mmap(NULL, <size_t>st.st_size, (PROT_READ | PROT_WRITE) if writable else PROT_READ,
                    MAP_SHARED, fd, 0)
        if addr == MAP_FAILED:
            code = errno
            raise OSError(code, os.strerror(code), name)
    finally:
        c_close(fd)
    cdef _Segment seg = _Segment.__new__(_Segment)
    seg.name = name
    seg.addr = <char *>addr
    seg.size = <uint64_t>st.st_size
    return seg


cdef _unlink_name(str name):
    shm_unlink(_c_name(name))


def unlink(str name):
    """Unlink the segment ``name`` (no error when it is already gone)."""
    _unlink_name(name)


def process_start_time(int pid):
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), or 0 when
    the process does not exist or has exited (a zombie its parent has not reaped yet):
    with the pid it names one process, even after pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        if fields[0] in (b"Z", b"X"):  # state: exited, only its exit status is left
            return 0
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


cdef uint64_t _own_pid = 0
cdef uint64_t _own_start = 0


cdef uint64_t own_start_time():
    global _own_pid, _own_start
    cdef uint64_t pid = getpid()
    if pid != _own_pid:  # first call, or a forked child
        _own_pid = pid
        _own_start = process_start_time(pid)
    return _own_start


def process_alive(pid, start_time):
    """Whether process ``pid`` that started at ``start_time`` (0: unknown) still runs."""
    if pid <= 0 or pid > 0x7fffffff:
        return False
    if pid == getpid():
        return start_time == 0 or start_time == own_start_time()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    if start_time == 0:
        return True
    started = process_start_time(pid)
    # 0: gone between the calls, or a zombie (signal 0 still reaches one).
    return started == start_time


cdef str _check_header(cs_header *h, uint64_t size, str name):
    """The reason the control segment at ``h`` is not a session this build can read, or
    None. Every number a reader later trusts is checked here."""
    if size < sizeof(cs_header):
        return "it is smaller than a header"
    if h.magic != CS_MAGIC:
        return "its magic number is not capsule_sessions'"
    if h.version != CS_VERSION:
        return f"it has layout version {h.version}, this build reads {CS_VERSION}"
    if (h.header_size != sizeof(cs_header) or h.total_size != CS_TOTAL_SIZE or size != CS_TOTAL_SIZE
            or h.max_ring != CS_MAX_RING or h.max_buffers != CS_MAX_BUFFERS or h.max_readers != CS_MAX_READERS
            or h.max_subs != CS_MAX_SUBS or h.max_queue != CS_MAX_QUEUE or h.lease_budget != CS_LEASE_BUDGET):
        return "its sizes do not match this build's layout"
    if (h.off_buffers != CS_OFF_BUFFERS or h.off_readers != CS_OFF_READERS or h.off_leases != CS_OFF_LEASES
            or h.off_subs != CS_OFF_SUBS):
        return "its table offsets do not match this build's layout"
    if h.id_len > CS_ID_MAX or h.owner_pid == 0 or h.owner_pid > 0x7fffffff:
        return "its owner fields are out of range"
    return None


def read_owner(str name):
    """(session id, owner pid, owner start time, nonce, closed) of control segment
    ``name``; SharedMemoryError when it is not a valid one, FileNotFoundError when gone."""
    cdef _Segment seg = _open_segment(name, False)
    cdef cs_header *h = <cs_header *>seg.addr
    reason = _check_header(h, seg.size, name)
    if reason is not None:
        raise SharedMemoryError(f"shared-memory segment {name!r} is not a capsule_sessions session: {reason}")
    try:
        session_id = h.id[:h.id_len].decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise SharedMemoryError(f"shared-memory segment {name!r} is corrupted: its session id is not UTF-8") from None
    return session_id, h.owner_pid, h.owner_start, h.nonce, bool(cs_load(&h.closed))


cdef void release_subs_of_reader(cs_header *h, uint32_t reader) noexcept:
    """Release every subscription reader slot ``reader`` holds or is claiming; the
    owner counts their entries out and frees them at its next store."""
    cdef cs_sub *subs = cs_subs(h)
    cdef uint32_t i
    cdef uint64_t state
    cdef bint released = False
    for i in range(CS_MAX_SUBS):
        state = cs_load(&subs[i].state)
        if state == CS_SUB_CLAIMED_BY(reader) or (state == CS_SUB_ACTIVE and cs_load(&subs[i].reader) == reader):
            if cs_cas(&subs[i].state, state, CS_SUB_RELEASED):
                released = True
    if released:
        cs_add(&h.subs_version, 1)


cdef _leave_if_last(cs_header *h, int leaving, str data_prefix):
    """Reader slot ``leaving`` is going away from an ended session: when no other live
    process is attached, unlink every data segment (and the control segment, in case
    its owner was killed and never did); otherwise the last of them will."""
    cdef cs_reader *readers = cs_readers(h)
    cdef uint32_t r
    if not cs_load(&h.closed) and process_alive(h.owner_pid, h.owner_start):
        return
    for r in range(CS_MAX_READERS):
        if <int>r == leaving or r == cs_load(&h.owner_reader):
            continue
        pid = cs_load(&readers[r].pid)
        if pid != 0 and process_alive(pid, cs_load(&readers[r].start_time)):
            return
    cdef cs_buffer *buffers = cs_buffers(h)
    cdef uint32_t i
    for i in range(CS_MAX_BUFFERS):
        serial = cs_load(&buffers[i].serial)
        if serial != 0:
            _unlink_name(f"{data_prefix}.{serial}")
    control_name, nonce = data_prefix.rsplit(".", 1)
    try:
        if read_owner(control_name)[3] == int(nonce, 16):  # not a new session of the same name
            _unlink_name(control_name)
    except (OSError, SharedMemoryError):
        pass


cdef inline void wake_readers(cs_header *h) noexcept nogil:
    """After a push or a close: readers about to sleep see the word change, and those
    asleep are woken, with a syscall only when one sleeps."""
    cdef cs_reader *readers = cs_readers(h)
    cdef uint32_t r
    cs_add32(&h.wake, 1)
    for r in range(CS_MAX_READERS):
        if cs_load(&readers[r].sleeping):
            cs_futex_wake(&h.wake)
            return


cdef header_init(cs_header *h, bytes encoded_id, uint64_t nonce):
    """Fill a new control segment's header (the owner's, before anyone can attach)."""
    h.version = CS_VERSION
    h.header_size = sizeof(cs_header)
    h.total_size = CS_TOTAL_SIZE
    h.max_ring = CS_MAX_RING
    h.max_buffers = CS_MAX_BUFFERS
    h.max_readers = CS_MAX_READERS
    h.max_subs = CS_MAX_SUBS
    h.max_queue = CS_MAX_QUEUE
    h.lease_budget = CS_LEASE_BUDGET
    h.off_buffers = CS_OFF_BUFFERS
    h.off_readers = CS_OFF_READERS
    h.off_leases = CS_OFF_LEASES
    h.off_subs = CS_OFF_SUBS
    h.owner_start = own_start_time()
    h.nonce = nonce
    h.id_len = len(encoded_id)
    memcpy(h.id, <char *>encoded_id, len(encoded_id))
    h.owner_pid = getpid()
    # Last: a reader that sees the magic sees every field above.
    cs_store(&h.magic, CS_MAGIC)
