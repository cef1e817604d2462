"""A Redis session's frames give the in-process ring's results, call for call.

The in-process frame tests (tests/test_visual_input.py, test_subscription.py and
test_loans.py) run here once more on sessions whose frames are in a real redis-server
(ON_REDIS: tests/conftest.py's make_session builds a RingSession around a
RedisFrameRing); then the tests of what only Redis has: the keys it writes, corrupted
keys, the asyncio twin, and a differential run of the pure ring against the Redis one.
"""

from __future__ import annotations

import inspect

import pytest
import test_loans
import test_subscription
import test_visual_input

ON_REDIS = True

# The in-process tests that cannot hold on Redis, and why.
NOT_ON_REDIS = {
    # The message it checks names Session.loan_frame: Session's own signature, which a
    # Redis session has, not its ring.
    "test_loan_frame_is_called_as_a_method",
}


def _collect() -> dict[str, object]:
    tests: dict[str, object] = {}
    for module in (test_visual_input, test_subscription, test_loans):
        for name, obj in vars(module).items():
            if not name.startswith("test_") or not inspect.isfunction(obj):
                continue
            params = inspect.signature(obj).parameters
            if "session" not in params or name in NOT_ON_REDIS:
                continue
            assert name not in tests, f"{name} is in two modules"
            tests[name] = obj
    return tests


globals().update(_collect())


def redis_kinds(function) -> list[str]:
    """Each test runs on the sync ring and on the asyncio twin (driven from its own loop:
    tests/redis_frames_support.py), the loan tests on the sync ring (an asyncio loan's
    commit is a coroutine: tested below)."""
    return ["redis"] if function.__module__ == "test_loans" else ["redis", "redis-async"]


@pytest.fixture
def backend() -> str:
    # The frames are in Redis whatever the backend: each test runs once.
    return "python"
