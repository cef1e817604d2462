"""The pytest-benchmark suite's fixtures: every target, the way tests/ has ``backend``.

``target`` runs each benchmark once per library backend in ``available_backends()``
(the Cython one marked ``cython``, as in tests/conftest.py) plus the two reference points
docs/bench.md sets beside them: the naive port and the memcpy limit. Run the suite with
``.venv/bin/python -m pytest bench --benchmark-only``; the default ``pytest`` run
(testpaths = tests) never collects it.
"""

from __future__ import annotations

import pytest

from capsule_sessions.bench.workloads import targets


def _target_params() -> list:
    return [pytest.param(name, id=name, marks=[pytest.mark.cython] if name == "cython" else [])
            for name in targets()]


@pytest.fixture(params=_target_params())
def target(request: pytest.FixtureRequest) -> str:
    """A library backend name, ``"naive"`` or ``"memcpy"``."""
    return request.param
