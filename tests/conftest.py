"""Fixtures every test module shares: the backend under test, a fake clock, factories.

Every frame-buffer and session test takes the ``backend`` fixture, so the whole suite
runs once per backend in ``available_backends()``: the Cython backend is tested by the
same tests the day it builds. With ``CAPSULE_SESSIONS_REQUIRE_CYTHON=1`` (``make test``)
a missing extension is an error, never a quiet python-only run.
"""

from __future__ import annotations

import faulthandler
import os
import uuid

import pytest

import capsule_sessions
from capsule_sessions import Session, SessionManager, available_backends
from support import FakeClock, backend_params

REQUIRE_CYTHON_ENV = "CAPSULE_SESSIONS_REQUIRE_CYTHON"


def cython_required() -> bool:
    return os.environ.get(REQUIRE_CYTHON_ENV, "") == "1"


def pytest_configure(config: pytest.Config) -> None:
    from redis_server import sweep_orphaned_servers

    sweep_orphaned_servers()  # what a killed earlier run left running
    if cython_required() and "cython" not in available_backends():
        from capsule_sessions import _backend

        raise pytest.UsageError(
            f"{REQUIRE_CYTHON_ENV}=1 but the Cython backend did not load: "
            f"{_backend._cython_import_error}. Build it (make build) before testing."
        )


# A test that blocks forever (a lost wake-up, say) must fail, not stall `make test`.
DEFAULT_TEST_TIMEOUT = 300


def _python_and_shared(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("sharing") == "shared" and params.get("backend") != "cython"


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    # Shared sessions exist on the compiled backend only: the pure one's ImportError is
    # tested on its own, not once per test.
    deselected = [item for item in items if _python_and_shared(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not _python_and_shared(item)]
    for item in items:
        if item.get_closest_marker("timeout") is None and item.get_closest_marker("soak") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))


@pytest.fixture
def deadlock_watchdog():
    """A hang with the GIL held would also stop pytest-timeout; faulthandler's C watchdog
    still dumps every thread's stack and ends the run. (Opted into with
    ``pytest.mark.usefixtures("deadlock_watchdog")``.)"""
    faulthandler.dump_traceback_later(240.0, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name to pass as ``backend=`` to Session/SessionManager."""
    return request.param


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# A module that sets ALSO_SHARED = True runs each test that makes its sessions with
# make_session/session once more on a shared session (shared memory, compiled backend):
# the shared ring promises the in-process results, and these tests are the proof.
ALSO_SHARED = "ALSO_SHARED"


def _shm_available() -> bool:
    try:
        import capsule_sessions._shm  # noqa: F401
    except ImportError:
        return False
    return True


# A module that sets ON_REDIS = True runs its tests that make their sessions with
# make_session/session on sessions whose frames are in Redis (tests/redis_frames_support.py,
# a real redis-server): tests/test_redis_frames.py collects the in-process frame tests so.
ON_REDIS = "ON_REDIS"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sharing" not in metafunc.fixturenames:
        return
    if getattr(metafunc.module, ON_REDIS, False):
        kinds = getattr(metafunc.module, "redis_kinds", lambda function: ["redis"])(metafunc.function)
        metafunc.parametrize("sharing", kinds, indirect=True)
    elif getattr(metafunc.module, ALSO_SHARED, False):
        kinds = ["local", "shared"] if _shm_available() else ["local"]
        metafunc.parametrize("sharing", kinds, indirect=True)


@pytest.fixture
def sharing(request: pytest.FixtureRequest) -> str:
    """"local" (an in-process ring), "shared" (the ring in shared memory), "redis" (the
    frames in Redis) or "redis-async" (in Redis, through the asyncio twin)."""
    return getattr(request, "param", "local")


@pytest.fixture
def make_session(backend: str, clock: FakeClock, sharing: str, request: pytest.FixtureRequest):
    """``make_session(id="s1", mode=..., character_id="", clock=None)`` on the backend under
    test; on a shared session too where the module asks for it (ALSO_SHARED), or on a
    session whose frames are in Redis (ON_REDIS)."""
    made: list[Session] = []
    if sharing in ("redis", "redis-async"):
        from redis_frames_support import AsyncRingSession, RingSession, client_for

        url = request.getfixturevalue("redis_url")
        client = client_for(url)
        rings: list = []

        def make_on_redis(id: str = "s1", mode=None, character_id: str = "", clock=None):
            clock = clock if clock is not None else clock_
            s = RingSession(id, client, url, clock) if sharing == "redis" else AsyncRingSession(id, url, clock)
            rings.append(s)
            return s

        clock_ = clock
        yield make_on_redis
        for s in rings:
            s.close()
        client.close()
        return

    def make(id: str = "s1", mode=capsule_sessions.PipelineMode.OMNI, character_id: str = "", clock=None) -> Session:
        shared = None if sharing == "local" else f"test-{uuid.uuid4().hex[:16]}"
        s = Session(id, mode, character_id, clock=clock if clock is not None else clock_, backend=backend,
                    shared=shared)
        made.append(s)
        return s

    clock_ = clock
    yield make
    for s in made:
        if s.shared is not None:
            s._ring.close_subscriptions()
            left = [e for e in os.listdir("/dev/shm") if e.startswith(f"capsule.{s.shared}.")]
            assert left == [], f"shared memory left behind: {left}"


@pytest.fixture
def session(make_session) -> Session:
    return make_session()


@pytest.fixture
def make_manager(backend: str, clock: FakeClock):
    """A SessionManager factory on the backend under test; every manager is stopped at teardown.

    ``cleanup_interval`` defaults to None (no background thread): tests drive eviction
    with the fake clock and ``evict_idle()``.
    """
    managers = []

    def make(max_concurrent: int = 8, idle_timeout=300.0, *, cleanup_interval=None, on_session_end=None, clock=None):
        manager = SessionManager(
            max_concurrent,
            idle_timeout,
            cleanup_interval=cleanup_interval,
            on_session_end=on_session_end,
            clock=clock if clock is not None else clock_,
            backend=backend,
        )
        managers.append(manager)
        return manager

    clock_ = clock
    yield make
    for manager in managers:
        manager.stop()


@pytest.fixture(scope="session")
def redis_server_process():
    """One real redis-server for the whole run (tests/redis_server.py)."""
    from redis_server import RedisServer

    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server_process):
    """The URL of the run's redis-server, emptied before the test (restarted first if a
    fault test killed it)."""
    from redis_server import _answers_ping, flush

    if redis_server_process.proc is None or redis_server_process.proc.poll() is not None \
            or not _answers_ping(redis_server_process.port):
        redis_server_process.restart()
    flush(redis_server_process.url)
    return redis_server_process.url


@pytest.fixture
def raw(redis_url):
    """A plain redis-py client of the test's server (a cluster client on a Redis Cluster):
    what a test reads and plants keys with, beside the library."""
    from redis_server import raw_client

    client = raw_client(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster_process():
    """One real Redis Cluster (three masters) for the whole run, made on first use
    (tests/redis_server.py)."""
    from redis_server import RedisClusterServers

    cluster = RedisClusterServers()
    yield cluster
    cluster.close()


@pytest.fixture
def redis_cluster_url(redis_cluster_process):
    """The URL of one node of the run's Redis Cluster, every node emptied before the test."""
    redis_cluster_process.flush()
    return redis_cluster_process.url


@pytest.fixture
def world():
    """For the shared-memory tests: a unique namespace (``world.ns``) and what the test
    started in it (``world.reader()``, ``world.session()``, ...). At teardown every child
    is killed, every session ended, and /dev/shm must hold no ``capsule.<ns>.*`` entry."""
    from shm_support import World

    w = World()
    yield w
    left = w.teardown()
    assert left == [], f"segments left in /dev/shm: {left}"
