"""Fixtures every test module shares: the backend under test, a fake clock, factories.

Every frame-buffer and session test takes the ``backend`` fixture, so the whole suite
runs once per backend in ``available_backends()``: the Cython backend is tested by the
same tests the day it builds. With ``CAPSULE_SESSIONS_REQUIRE_CYTHON=1`` (``make test``)
a missing extension is an error, never a quiet python-only run.
"""

from __future__ import annotations

import os

import pytest

import capsule_sessions
from capsule_sessions import Session, SessionManager, available_backends
from support import FakeClock

REQUIRE_CYTHON_ENV = "CAPSULE_SESSIONS_REQUIRE_CYTHON"


def cython_required() -> bool:
    return os.environ.get(REQUIRE_CYTHON_ENV, "") == "1"


def pytest_configure(config: pytest.Config) -> None:
    if cython_required() and "cython" not in available_backends():
        from capsule_sessions import _backend

        raise pytest.UsageError(
            f"{REQUIRE_CYTHON_ENV}=1 but the Cython backend did not load: "
            f"{_backend._cython_import_error}. Build it (make build) before testing."
        )


# A test that blocks forever (a lost wake-up, say) must fail, not stall `make test`.
DEFAULT_TEST_TIMEOUT = 300


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None and item.get_closest_marker("soak") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))


def _backend_params() -> list:
    return [
        pytest.param(name, id=name, marks=[pytest.mark.cython] if name == "cython" else [])
        for name in available_backends()
    ]


@pytest.fixture(params=_backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name to pass as ``backend=`` to Session/SessionManager."""
    return request.param


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_session(backend: str, clock: FakeClock):
    """``make_session(id="s1", mode=..., character_id="", clock=None)`` on the backend under test."""

    def make(id: str = "s1", mode=capsule_sessions.PipelineMode.OMNI, character_id: str = "", clock=None) -> Session:
        return Session(id, mode, character_id, clock=clock if clock is not None else clock_, backend=backend)

    clock_ = clock
    return make


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
