"""Shared-memory segments: permissions, names, and what a corrupted or foreign segment
does to a reader (issue 12, guarantee 8), plus the pure backend's ImportError.

Corruption is fuzzed with hypothesis: bytes of a control segment's header, its ring,
buffer, reader and subscription tables, and a data segment's frame header. The reads
run in a reader process (``shm_child.py``) that must answer every probe: an error it
names (SharedMemoryError and the like) is fine, a signal (a crash) is not.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from capsule_sessions import Session, SessionManager, attach, list_shared
from capsule_sessions import shared as shared_mod
from capsule_sessions.errors import SharedMemoryError
from shm_support import (
    OFF_BUFFERS,
    OFF_LEASES,
    OFF_READERS,
    OFF_SUBS,
    SHM_DIR,
    TOTAL_SIZE,
    ChildError,
    Header,
    Meta,
    Sub,
    entries,
    patch_file,
    stamp,
    sub_offset,
)
from support import child_env

pytestmark = [pytest.mark.cython]
SCALE = float(os.environ.get("CAPSULE_SESSIONS_FUZZ_EXAMPLES", "1"))
DERANDOMIZE = os.environ.get("CAPSULE_SESSIONS_FUZZ_RANDOM", "") in ("", "0")
KB = 1024


def fuzz_settings(examples):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=DERANDOMIZE,
                    database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                          HealthCheck.too_slow, HealthCheck.data_too_large])


def test_layout_mirror_matches_the_build():
    """shm_support's ctypes copy of _shm.h is the build's layout (else the fuzzers
    below would corrupt the wrong fields)."""
    from capsule_sessions import _shm

    assert TOTAL_SIZE == _shm.CONTROL_SIZE
    assert ctypes.sizeof(Sub) == 704 and ctypes.sizeof(Meta) == 72


# -- permissions and names --------------------------------------------------------------


def test_segments_are_owner_only(world):
    """Guarantee 8: the control and data segments are created 0600, owned by us."""
    session = world.session("cam")
    session.store_frame(stamp(1, 1000), source="cam", max_recent=2)
    session.store_frame(stamp(2, 300 * KB), source="cam", max_recent=2)
    names = entries(world.ns)
    assert len(names) == 3 and f"capsule.{world.ns}.cam" in names
    for name in names:
        st_ = os.stat(SHM_DIR / name)
        assert stat.S_IMODE(st_.st_mode) == 0o600, (name, oct(st_.st_mode))
        assert st_.st_uid == os.getuid()


BAD_NAMESPACES = ["", "/", "a/b", "..", "a..b", "../x", ".", "a.b", "x" * 65, "ns\x00", "näme", " ns", "ns\n"]


@pytest.mark.parametrize("bad", BAD_NAMESPACES)
def test_bad_namespaces_are_value_errors(bad):
    with pytest.raises(ValueError):
        Session("x", shared=bad)
    with pytest.raises(ValueError):
        SessionManager(1, shared=bad)
    with pytest.raises(ValueError):
        attach("x", namespace=bad)
    with pytest.raises(ValueError):
        list_shared(bad)
    with pytest.raises(ValueError):
        shared_mod.sweep(bad)


@pytest.mark.parametrize("bad", [1, b"ns", 1.5, ["ns"], object()])
def test_namespaces_that_are_not_str_are_type_errors(bad):
    with pytest.raises(TypeError):
        Session("x", shared=bad)
    with pytest.raises(TypeError):
        SessionManager(1, shared=bad)
    with pytest.raises(TypeError):
        attach("x", namespace=bad)
    with pytest.raises(TypeError):
        list_shared(bad)


def test_the_longest_namespace_works(world):
    ns = world.ns.ljust(64, "n")  # unique, as every test's
    s = Session("cam", shared=ns)
    try:
        assert list_shared(ns) == ["cam"]
    finally:
        s._close()
    assert [e for e in os.listdir(SHM_DIR) if e.startswith(f"capsule.{ns}.")] == []


@pytest.mark.parametrize("session_id", ["../../etc/passwd", "a/b", "..", "cam 1", "kamera-ü", "x" * 200, "a.b.c"])
def test_any_session_id_names_a_segment_in_dev_shm(world, session_id):
    """A session id with '/', '..', dots, spaces or non-ASCII names its segment by a hash:
    nothing outside /dev/shm, one plain name inside, and attach finds it."""
    session = world.session(session_id)
    session.store_frame(stamp(1, 100), source="cam", max_recent=1, frame_seq=1)
    names = entries(world.ns)
    assert len(names) == 2
    control = min(names, key=len)
    assert "/" not in control and control.count(".") == 2 and ".." not in control
    assert attach(session_id, namespace=world.ns).latest_visual_frames(1e9)[0].frame_seq == 1
    assert list_shared(world.ns) == [session_id]


# -- a foreign or corrupted control segment ------------------------------------------------


def write_segment(name: str, data: bytes) -> None:
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


ATTACH_ERRORS = {"SharedMemoryError", "SessionNotFoundError"}
READ_OUTCOMES = {"SharedMemoryError", "Empty", "SubscriptionClosed"}


def assert_probe_ok(result, stamps=True):
    """A probe's outcomes: each step worked or raised an error the API names; with
    ``stamps``, the frames it read carry the bytes of their frame_seq (not when a frame
    header itself is corrupted: it may then claim another frame_seq or size)."""
    assert result["attach"] == "ok" or result["attach"] in ATTACH_ERRORS, result
    for step, what in result.items():
        if step != "attach":
            assert what.startswith("ok") or what in READ_OUTCOMES, result
        assert not stamps or "bad=" not in what, f"a frame with foreign bytes: {result}"


@pytest.mark.timeout(60)
def test_foreign_segments_are_refused(world):
    """A file under a session's name that is not one (empty, short, random, another
    build's version) makes attach raise SharedMemoryError; nothing crashes."""
    reader = world.reader()
    cases = {"empty": b"", "short": b"CPACSNS1", "zeros": bytes(TOTAL_SIZE), "random": os.urandom(4096)}
    good = bytearray(TOTAL_SIZE)
    live = world.session("model")
    good[:] = (SHM_DIR / f"capsule.{world.ns}.model").read_bytes()
    old = bytearray(good)
    struct.pack_into("<I", old, Header.version.offset, 99)
    cases["version"] = bytes(old)
    cases["big"] = bytes(good) + bytes(4096)
    for name, data in cases.items():
        write_segment(f"capsule.{world.ns}.{name}", data)
        result = reader.call("probe", id=name, ns=world.ns)
        assert result == {"attach": "SharedMemoryError"}, (name, result)
        with pytest.raises(SharedMemoryError):
            attach(name, namespace=world.ns)
        assert name not in list_shared(world.ns)
    # a copy of a live session under another name holds another id: refused too
    write_segment(f"capsule.{world.ns}.copy", bytes(good))
    assert reader.call("probe", id="copy", ns=world.ns) == {"attach": "SharedMemoryError"}
    for name in [*cases, "copy"]:
        os.unlink(SHM_DIR / f"capsule.{world.ns}.{name}")
    live._close()
    assert reader.stop() == 0


class FakeSession:
    """A copy of a live session's segments under another session id ("fake"): the same
    frames, owned (by its header) by this live process; corrupt it at will."""

    def __init__(self, world, fid):
        self.world = world
        self.id = fid
        self.source = world.session(f"src{fid}")
        self.sub = self.source.subscribe_visual_frames(4)  # queued entries in the table
        for seq, nbytes in ((1, 1000), (2, 5000), (3, 300 * KB)):
            self.source.store_frame(stamp(seq, nbytes), source="cam", max_recent=2, frame_seq=seq, width=4, height=2,
                                    mime_type="image/x")
        src_control = f"capsule.{world.ns}.src{fid}"
        raw = bytearray((SHM_DIR / src_control).read_bytes())
        encoded = fid.encode()
        struct.pack_into("<Q", raw, Header.id_len.offset, len(encoded))
        raw[Header.id.offset:Header.id.offset + 256] = encoded.ljust(256, b"\0")
        self.control = bytes(raw)
        self.data = {}
        for entry in entries(world.ns):
            parts = entry.split(".")
            if len(parts) == 5 and parts[2] == f"src{fid}":
                self.data[f"capsule.{world.ns}.{fid}.{parts[3]}.{parts[4]}"] = (SHM_DIR / entry).read_bytes()
        self.names = [f"capsule.{world.ns}.{fid}", *self.data]

    def write(self, control=None, data=None):
        write_segment(self.names[0], self.control if control is None else control)
        for name, content in self.data.items():
            write_segment(name, content if data is None else data.get(name, content))

    def remove(self):
        for name in self.names:
            try:
                os.unlink(SHM_DIR / name)
            except FileNotFoundError:
                pass
        self.source._close()


# Where to hit: any byte of the header, or a chosen field of a table entry in use.
HEADER_END = Header.ring.offset + 4 * 32
REGIONS = {
    "header": (0, HEADER_END),
    "buffers": (OFF_BUFFERS, OFF_BUFFERS + 8 * 32),
    "readers": (OFF_READERS, OFF_READERS + 2 * 64),
    "leases": (OFF_LEASES, OFF_LEASES + 16),
    "subs": (OFF_SUBS, OFF_SUBS + 2 * ctypes.sizeof(Sub)),
}
SPECIAL = [0, 1, 2, 3, 31, 32, 63, 64, 65, 255, 256, 257, 4095, 4096, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**62,
           2**63, 2**64 - 1]
patch = st.tuples(
    st.sampled_from(sorted(REGIONS)),
    st.integers(0, 2**20),
    st.one_of(st.binary(min_size=1, max_size=16),
              st.sampled_from(SPECIAL).map(lambda v: struct.pack("<Q", v)),
              st.sampled_from(SPECIAL).map(lambda v: struct.pack("<I", v & 0xFFFFFFFF))),
    st.booleans(),  # aligned to 8 bytes (a whole field) or anywhere
)


@pytest.mark.timeout(120)
def test_corrupted_control_segments_never_crash_a_reader(world):
    """Guarantee 8, the attach fuzzer: a copy of a live session's control segment with
    hypothesis-chosen bytes overwritten (header fields, ring entries, the buffer,
    reader, lease and subscription tables) or cut short. attach and every read either
    work (intact frames) or raise SharedMemoryError / SessionNotFoundError / queue.Empty
    / SubscriptionClosed; the reader process never dies; list_shared and sweep of the
    namespace go on working. (This caught a session id that is not UTF-8 escaping
    read_owner as UnicodeDecodeError, out of attach, list_shared and sweep.)"""
    reader = world.reader(deadline=110)
    counter = [0]

    @fuzz_settings(40)
    @example(patches=[("header", Header.id.offset, b"\x80", False)], cut=None)  # an id that is not UTF-8
    @given(patches=st.lists(patch, min_size=1, max_size=4),
           cut=st.integers(0, 9).flatmap(lambda k: st.integers(0, TOTAL_SIZE) if k == 0 else st.none()))
    def run(patches, cut):
        counter[0] += 1
        fake = FakeSession(world, f"f{counter[0]}")
        try:
            raw = bytearray(fake.control)
            for region, where, data, aligned in patches:
                start, end = REGIONS[region]
                offset = start + where % (end - start)
                if aligned:
                    offset -= offset % 8
                raw[offset:offset + len(data)] = data
            if cut is not None:
                del raw[cut:]
            fake.write(control=bytes(raw))
            assert_probe_ok(reader.call("probe", id=fake.id, ns=world.ns, timeout=30))
            # and the namespace still works around it: listed or not, swept or not, no error
            assert f"src{fake.id}" in list_shared(world.ns)
            shared_mod.sweep(world.ns)
        finally:
            fake.remove()

    run()
    assert reader.stop() == 0, "the reader process did not exit cleanly"


@pytest.mark.timeout(60)
def test_an_intact_copy_reads_like_the_original(world):
    """The fake-session helper itself: uncorrupted, a reader gets both frames intact."""
    reader = world.reader()
    fake = FakeSession(world, "plain")
    try:
        fake.write()
        result = reader.call("probe", id=fake.id, ns=world.ns)
        assert result["attach"] == "ok" and result["latest"] == "ok:2", result
    finally:
        fake.remove()


# -- a corrupted data segment -------------------------------------------------------------

META_FIELDS = [name for name, _ in Meta._fields_]


@pytest.mark.timeout(120)
def test_corrupted_frame_headers_never_crash_a_reader(world):
    """A data segment's frame header (cs_meta: magic, sizes, offsets, string lengths)
    overwritten, or the segment cut short, before a reader maps it: the read raises
    SharedMemoryError or returns frames whose bytes are intact, never a crash."""
    reader = world.reader(deadline=110)
    counter = [0]

    @fuzz_settings(30)
    @given(field=st.sampled_from(META_FIELDS), value=st.sampled_from(SPECIAL) | st.integers(0, 2**64 - 1),
           which=st.integers(1, 2), cut=st.integers(0, 9).flatmap(
               lambda k: st.integers(0, 400 * KB) if k == 0 else st.none()))
    def run(field, value, which, cut):
        counter[0] += 1
        fake = FakeSession(world, f"d{counter[0]}")
        try:
            name = sorted(fake.data, key=lambda n: len(fake.data[n]))[which]  # frame 2 or 3: in the ring
            content = bytearray(fake.data[name])
            f = getattr(Meta, field)
            fmt = {8: "<Q", 4: "<I"}[f.size]
            struct.pack_into(fmt, content, f.offset, value & ((1 << (8 * f.size)) - 1))
            if cut is not None:
                del content[cut:]
            fake.write(data={name: bytes(content)})
            assert_probe_ok(reader.call("probe", id=fake.id, ns=world.ns, timeout=30), stamps=False)
        finally:
            fake.remove()

    run()
    assert reader.stop() == 0


@pytest.mark.timeout(120)
def test_a_reader_corrupting_its_own_queue_never_breaks_the_producer(world):
    """The subscription table is writable by readers: hypothesis-chosen words of a
    reader's subscription slot (state, maxsize, head, tail, entries, ...), its reader
    slot and its leases are overwritten while its queue holds entries. The producer
    goes on storing without an error, its own reads stay correct, and the reader's reads
    raise SharedMemoryError / SubscriptionClosed / Empty or work, promptly: nothing
    crashes or hangs. (This caught get_nowait() looping for ever on a queue whose head
    was corrupted to far past its tail.)"""
    reader = world.reader(deadline=110)
    counter = [0]
    # (name, offset in the slot, width): entries is hit in its first word (and its second below)
    sub_fields = [(name, getattr(Sub, name).offset, min(getattr(Sub, name).size, 8)) for name, _ in Sub._fields_
                  if not name.startswith("pad")]

    @fuzz_settings(30)
    # a queue the producer no longer serves (its state overwritten) that claims 2**40 entries
    @example(hits=[(("state", Sub.state.offset, 8), 31), (("head", Sub.head.offset, 8), 2**40)])
    @given(hits=st.lists(st.tuples(st.sampled_from(sub_fields + [("entries+", Sub.entries.offset + 8, 8),
                                                                 ("reader", -1, 8), ("lease", -2, 4)]),
                                   st.sampled_from(SPECIAL) | st.integers(0, 2**64 - 1)), min_size=1, max_size=3))
    def run(hits):
        counter[0] += 1
        sid = f"q{counter[0]}"
        session = world.session(sid)
        try:
            reader.call("attach", h="h", id=sid, ns=world.ns)
            reader.call("subscribe", h="h", s="q", buffer=4, policy="drop_oldest")
            for seq in range(1, 4):
                session.store_frame(stamp(seq, 2000), source="cam", max_recent=2, frame_seq=seq)
            # the reader's slots: the one subscription in use, the second reader slot
            control = SHM_DIR / f"capsule.{world.ns}.{sid}"
            raw = control.read_bytes()
            slot = next(i for i in range(32) if struct.unpack_from("<Q", raw, sub_offset(i))[0] == 2)
            for (name, offset, size), value in hits:
                if name == "reader":
                    where = OFF_READERS + 64 * 1 + (value % 3) * 8
                elif name == "lease":
                    where = OFF_LEASES + 4 * 4096 * 1 + 4 * (value % 8)
                else:
                    where = sub_offset(slot) + offset
                patch_file(control, where, struct.pack("<Q" if size == 8 else "<I", value % (1 << (8 * size))))
            for seq in range(4, 40):
                session.store_frame(stamp(seq, 2000 + seq % 3 * 100_000), source="cam", max_recent=2, frame_seq=seq)
            own = session.latest_visual_frames(1e9)
            assert [f.frame_seq for f in own] == [38, 39]
            assert all(bytes(f.data) == stamp(f.frame_seq, len(f.data)).tobytes() for f in own)
            for cmd, args in (("drain", {"s": "q"}), ("latest", {"h": "h", "ttl": 1e9}), ("counters", {"s": "q"})):
                try:
                    reader.call(cmd, timeout=10, **args)
                except ChildError as exc:
                    assert exc.name in READ_OUTCOMES | {"SharedMemoryError"}, exc
            reader.call("reset")
        finally:
            session._close()

    run()
    assert reader.stop() == 0


# -- the pure backend ------------------------------------------------------------------------


def test_the_pure_backend_cannot_share():
    """shared= needs the compiled backend: ImportError on the pure one."""
    with pytest.raises(ImportError, match="compiled backend"):
        Session("x", backend="python", shared="ns")
    with pytest.raises(ImportError, match="compiled backend"):
        SessionManager(1, backend="python", shared="ns")
    assert Session("x", backend="python").backend == "python"  # not shared: fine


@pytest.mark.timeout(60)
def test_without_the_shm_module_sharing_is_an_import_error():
    """Where capsule_sessions._shm is missing (not built, not Linux), shared=, attach,
    list_shared and sweep raise ImportError saying so; in-process sessions still work."""
    code = textwrap.dedent("""
        import sys
        sys.modules["capsule_sessions._shm"] = None  # as if it was never built
        from capsule_sessions import Session, SessionManager, attach, list_shared
        from capsule_sessions.shared import sweep
        for call in (lambda: Session("x", shared="ns"), lambda: SessionManager(1, shared="ns"),
                     lambda: attach("x", namespace="ns"), lambda: list_shared("ns"), lambda: sweep("ns")):
            try:
                call()
            except ImportError as exc:
                assert "_shm" in str(exc) or "compiled" in str(exc), exc
            else:
                raise SystemExit("no ImportError")
        Session("x").store_frame(b"abc", source="cam", max_recent=1)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=child_env("cython"), capture_output=True, text=True,
                          timeout=50)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# -- collected by the cyclic garbage collector ------------------------------------------------


@pytest.mark.timeout(60)
def test_shared_objects_collected_in_cycles_do_not_crash(world):
    """A shared session dropped without being ended, or held in a reference cycle (its
    clock a bound method of an object that holds it; a subscription and an attached
    handle in a cycle), is freed by gc.collect() without touching unmapped memory, and
    leaves nothing in /dev/shm. (This caught a segfault: the ring and its own read
    handle formed a cycle, and the garbage collector's clearing unmapped the control
    segment before their __dealloc__ wrote to it.)"""
    code = textwrap.dedent(f"""
        import gc, os, time
        from capsule_sessions import Session, attach
        ns = {world.ns!r}
        gc.disable()
        s = Session("plain", shared=ns)
        s.store_frame(b"abc", source="cam", max_recent=1)
        sub = s.subscribe_visual_frames(2)
        del s, sub
        gc.collect()

        class Cam:
            def __init__(self, name):
                self.session = Session(name, shared=ns, clock=self.now)
                self.sub = self.session.subscribe_visual_frames(2)
                self.session.store_frame(b"abcd", source="cam", max_recent=1)
                assert self.session.latest_visual_frames(10)  # leases, ended with the frames
                self.handle = attach(name, namespace=ns)
                self.hsub = self.handle.subscribe_visual_frames(2)
                assert self.handle.latest_visual_frames(10)
                # (not frames kept in the cycle: numpy arrays are not tracked by the
                # collector, so a cycle through one is never found, here as in-process)
                # self.sub is the owner's own handle's: its clock is self.now, so the cycle
                # runs through the subscription, the handle and the ring too

            def now(self):
                return time.monotonic()

        for i in range(20):
            Cam(f"cam{{i}}")
            if i % 3 == 0:
                Cam(f"closed{{i}}").session._close()
            gc.collect()
        left = [e for e in os.listdir("/dev/shm") if e.startswith(f"capsule.{{ns}}.")]
        assert left == [], left
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], env=child_env("cython"),
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-3000:])
