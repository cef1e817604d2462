"""Helpers of the shared-memory tests: reader processes driven over a pipe
(``shm_child.py``), ``World`` (conftest's ``world`` fixture: each test's own namespace,
nothing left behind), stamped payloads, and the control segment's layout as ctypes (so a test can
corrupt a chosen field; held to the build's size at import)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from shm_child import describe, digest, stamp  # noqa: F401  (the child's own, so both agree)
from support import child_env

SHM_DIR = Path("/dev/shm")
CHILD = Path(__file__).resolve().parent / "shm_child.py"


_stamp_digests: dict = {}


def stamp_digest(seq: int, nbytes: int) -> str:
    key = (seq, nbytes)
    if key not in _stamp_digests:
        _stamp_digests[key] = digest(stamp(seq, nbytes))
    return _stamp_digests[key]


def entries(namespace: str) -> list[str]:
    return sorted(e for e in os.listdir(SHM_DIR) if e.startswith(f"capsule.{namespace}."))


def data_entries(namespace: str) -> list[str]:
    return [e for e in entries(namespace) if len(e.split(".")) == 5]


class ChildError(Exception):
    def __init__(self, name: str, msg: str) -> None:
        super().__init__(f"{name}: {msg}")
        self.name = name


class ReaderProcess:
    """A spawned ``shm_child.py``: ``call(cmd, **args)`` sends a command and returns its
    answer (``ChildError`` for an exception in the child), within ``timeout`` seconds."""

    def __init__(self, deadline: float = 60.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-u", str(CHILD), str(deadline)], env=child_env("cython"),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self._buf = b""

    def stacks(self) -> str:
        """Every thread's stack of the child, from faulthandler (SIGUSR1), as far as it
        printed in half a second."""
        if self.proc.poll() is not None:
            return "(ended)"
        self.proc.send_signal(signal.SIGUSR1)
        fd = self.proc.stderr.fileno()
        text = b""
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            text += chunk
        return text.decode(errors="replace")[-4000:]

    def send(self, cmd: str, **args) -> None:
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"reader {self.pid} gave no answer in {timeout} s; its stacks:\n{self.stacks()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self.proc.wait(5)
                    raise RuntimeError(f"reader {self.pid} ended with code {self.proc.returncode}: "
                                       f"{self.proc.stderr.read().decode(errors='replace')[-3000:]}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise ChildError(reply["error"], reply["msg"])
        return reply["ok"]

    def call(self, cmd: str, timeout: float = 15.0, **args):
        self.send(cmd, **args)
        return self.receive(timeout)

    def kill(self) -> None:
        """SIGKILL, then reap (the pid is gone afterwards, not a zombie)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """Ask it to exit; kill it if it does not within a few seconds. Its exit code."""
        if self.proc.poll() is None:
            try:
                self.call("exit", timeout=5)
                self.proc.wait(5)
            except Exception:
                self.kill()
        return self.proc.returncode


def _close_pipes(proc: subprocess.Popen) -> None:
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:  # a write still buffered for a child that is gone
                pass


class World:
    """One test's namespace, and what it started there: reader processes, other child
    processes, sessions and managers that are ended at teardown."""

    def __init__(self) -> None:
        self.ns = "t" + uuid.uuid4().hex[:16]
        self.readers: list[ReaderProcess] = []
        self.procs: list[subprocess.Popen] = []
        self.sessions: list = []
        self.managers: list = []

    def reader(self, deadline: float = 60.0) -> ReaderProcess:
        r = ReaderProcess(deadline)
        self.readers.append(r)
        return r

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        p = subprocess.Popen(*args, **kwargs)
        self.procs.append(p)
        return p

    def session(self, session_id: str, **kwargs):
        from capsule_sessions import Session

        s = Session(session_id, shared=self.ns, **kwargs)
        self.sessions.append(s)
        return s

    def manager(self, max_concurrent: int = 4, **kwargs):
        from capsule_sessions import SessionManager

        m = SessionManager(max_concurrent, shared=self.ns, cleanup_interval=None, **kwargs)
        self.managers.append(m)
        return m

    def teardown(self) -> list[str]:
        for r in self.readers:
            if r.proc.poll() is None:
                r.proc.kill()
            r.proc.wait(10)
            _close_pipes(r.proc)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            _close_pipes(p)
        for m in self.managers:
            m.close()
        for s in self.sessions:
            s._close()
        self.sessions.clear()
        self.managers.clear()
        gc.collect()
        left = entries(self.ns)
        for e in left:  # leave nothing for the next test, then say so
            os.unlink(SHM_DIR / e)
        return left


# -- the control segment's layout (ext/capsule_sessions/_shm.h) -------------------------
U64 = ctypes.c_uint64


class RingEntry(ctypes.Structure):
    _fields_ = [("entry", U64), ("received_ns", ctypes.c_int64), ("nbytes", U64), ("pad", U64)]


class Header(ctypes.Structure):
    _fields_ = [("magic", U64), ("version", ctypes.c_uint32), ("header_size", ctypes.c_uint32), ("total_size", U64),
                ("max_ring", ctypes.c_uint32), ("max_buffers", ctypes.c_uint32), ("max_readers", ctypes.c_uint32),
                ("max_subs", ctypes.c_uint32), ("max_queue", ctypes.c_uint32), ("lease_budget", ctypes.c_uint32),
                ("off_buffers", U64), ("off_readers", U64), ("off_leases", U64), ("off_subs", U64),
                ("owner_pid", U64), ("owner_start", U64), ("nonce", U64), ("closed", U64), ("id_len", U64),
                ("id", ctypes.c_char * 256), ("pad0", U64 * 4), ("seq", U64), ("accepted", U64),
                ("rate_limited", U64), ("source_resets", U64), ("frames", U64), ("bytes", U64),
                ("ring_count", U64), ("buffers_version", U64), ("pad1", U64 * 8), ("ring", RingEntry * 256)]


class Sub(ctypes.Structure):
    _fields_ = [("state", U64), ("epoch", U64), ("reader", U64), ("policy", U64), ("maxsize", U64), ("closed", U64),
                ("pad0", U64 * 2), ("head", U64), ("dropped", U64), ("pad1", U64 * 6), ("tail", U64),
                ("delivered", U64), ("pad2", U64 * 6),
                ("entries", U64 * 64)]


class Meta(ctypes.Structure):
    _fields_ = [("magic", U64), ("nbytes", U64), ("width", ctypes.c_int64), ("height", ctypes.c_int64),
                ("timestamp_ms", ctypes.c_int64), ("frame_seq", ctypes.c_int64), ("received_at", ctypes.c_double),
                ("mime_len", ctypes.c_uint32), ("source_len", ctypes.c_uint32), ("data_offset", U64)]


def _align(n: int) -> int:
    return (n + 63) & ~63


OFF_BUFFERS = _align(ctypes.sizeof(Header))
OFF_READERS = _align(OFF_BUFFERS + 32 * 4096)
OFF_LEASES = _align(OFF_READERS + 64 * 32)
OFF_SUBS = _align(OFF_LEASES + 4 * 32 * 4096)
TOTAL_SIZE = _align(OFF_SUBS + ctypes.sizeof(Sub) * 32)


def claimed_by(reader: int) -> int:
    """A subscription slot's state while reader slot ``reader`` claims it (CS_SUB_CLAIMED_BY)."""
    return 1 | (reader + 1) << 8


def patch_file(path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def header_of(raw: bytes) -> Header:
    return Header.from_buffer_copy(raw[:ctypes.sizeof(Header)])


def sub_offset(slot: int) -> int:
    return OFF_SUBS + slot * ctypes.sizeof(Sub)


def field_offset(struct, name: str) -> int:
    return getattr(struct, name).offset
