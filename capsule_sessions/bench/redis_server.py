"""A real redis-server for the Redis benchmarks (W14-W17), which start their own: on a
free loopback port, with persistence off, in a temporary directory, and shut down
afterwards. The same server class as the tests' (tests/redis_server.py), in the package
because the package must not import tests/.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

STARTUP_SECONDS = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``url`` is where it listens. ``kill()`` (SIGKILL) and
    ``restart()`` (same port, empty, as after a crash without persistence) are for the
    fault tests."""

    def __init__(self, extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server; "
                               "`make test` installs it)")
        self.binary = binary
        self.extra_args = extra_args
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="capsule-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _answers_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def redis_server(*extra_args: str) -> Iterator[RedisServer]:
    server = RedisServer(tuple(extra_args))
    try:
        yield server
    finally:
        server.close()


def flush(url: str) -> None:
    """Empty the server (FLUSHALL over a raw socket: no client library)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(b"FLUSHALL\r\n")
        s.recv(16)


__all__ = ["RedisServer", "free_port", "flush", "redis_server"]
