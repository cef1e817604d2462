"""The pytest-benchmark suite's fixtures: every target, the way tests/ has ``backend``.

``target`` runs each benchmark once per library backend in ``available_backends()``
(the Cython one marked ``cython``: the parameters of tests/conftest.py's ``backend``,
from tests/support.py's ``backend_params``) plus the two reference points
docs/bench.md sets beside them: the naive port and the memcpy limit. Run the suite with
``.venv/bin/python -m pytest bench --benchmark-only``; the default ``pytest`` run
(testpaths = tests) never collects it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from capsule_sessions.bench.workloads import targets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/support.py
from support import backend_params  # noqa: E402


@pytest.fixture(params=backend_params(targets()))
def target(request: pytest.FixtureRequest) -> str:
    """A library backend name, ``"naive"`` or ``"memcpy"``."""
    return request.param
