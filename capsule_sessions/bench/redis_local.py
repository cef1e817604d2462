"""A private redis-server for the Redis workloads (W14-W17): started on a free loopback
port with persistence off, in a temporary directory, and shut down afterwards, so a
benchmark never touches a server it did not start. docs/bench.md: "one server on
loopback"."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

STARTUP_SECONDS = 10.0


def unavailable() -> str | None:
    """Why the Redis workloads cannot run here, or None."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (the 'redis' extra)"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def server() -> Iterator[str]:
    """The URL of a fresh redis-server, for the duration of the block."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = _free_port()
    directory = tempfile.mkdtemp(prefix="capsule-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory,
         "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
