"""A real redis-server for the tests: started on a free loopback port with persistence
off, in a temporary directory, and shut down afterwards (never a mock, never fakeredis).

``make test`` installs Debian's redis-server when it is missing (the Makefile's
``redis-server`` target).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STARTUP_SECONDS = 10.0
# A server's directory names the test process that started it, so a server whose test
# process was killed (a timeout, a SIGKILL) is known for an orphan by the next run.
DIR_PREFIX = "capsule-redis-"
_OWNED_DIR = re.compile(rf"^({re.escape(tempfile.gettempdir())}/{DIR_PREFIX}(?:cluster-)?(\d+)-[^/]+)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphaned_servers() -> list[int]:
    """SIGKILL every redis-server whose starting test process is gone, and remove its
    directory (they are started in sessions of their own, so they outlive a killed
    run). Returns their pids."""
    swept = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", "rb") as f:  # (redis-server rewrites its argv)
                program = f.read().strip()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        match = _OWNED_DIR.match(cwd)
        if program != b"redis-server" or match is None or _alive(int(match.group(2))):
            continue
        try:
            os.kill(int(entry), signal.SIGKILL)
        except ProcessLookupError:
            continue
        swept.append(int(entry))
        shutil.rmtree(match.group(1), ignore_errors=True)
    return swept


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
            raise RuntimeError("redis-server is not installed: `make test` installs Debian's redis-server")
        self.binary = binary
        self.extra_args = extra_args
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
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


class RedisClusterServers:
    """A real Redis Cluster: ``MASTERS`` redis-servers with cluster mode on, on free
    loopback ports with persistence off, their slots assigned by ``redis-cli --cluster
    create`` (Debian's redis-server package ships it). ``url`` names one node, as a
    user's URL would; the client finds the others."""

    MASTERS = 3

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}cluster-{os.getpid()}-")
        self.servers: list[RedisServer] = []
        try:
            for i in range(self.MASTERS):
                node_dir = f"{self.dir}/{i}"
                os.mkdir(node_dir)
                # The bus port defaults to the port + 10000, past 65535 for a high free port.
                self.servers.append(RedisServer(("--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                                                 "--cluster-config-file", f"{node_dir}/nodes.conf",
                                                 "--dir", node_dir)))
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed (Debian's redis-server package has it)")
            subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in self.servers),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            deadline = time.monotonic() + STARTUP_SECONDS
            while not all(_cluster_ok(s.port) for s in self.servers):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        self.url = self.servers[0].url

    def flush(self) -> None:
        for server in self.servers:
            flush(server.url)

    def close(self) -> None:
        for server in self.servers:
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _cluster_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"CLUSTER INFO\r\n")
            return b"cluster_state:ok" in s.recv(4096)
    except OSError:
        return False


def raw_client(url: str) -> Any:
    """A plain redis-py client for ``url``: a cluster client when it names a Redis
    Cluster node (which answers only for its own slots)."""
    import redis
    from redis.cluster import RedisCluster

    client = redis.Redis.from_url(url)
    if str(client.info("cluster").get("cluster_enabled", 0)) == "1":
        client.close()
        return RedisCluster.from_url(url)
    return client


def flush(url: str) -> None:
    """Empty the server between tests (FLUSHALL over a raw socket: no client library)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(b"FLUSHALL\r\n")
        s.recv(16)


__all__ = ["RedisClusterServers", "RedisServer", "free_port", "flush", "raw_client", "redis_server"]
