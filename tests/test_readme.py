"""The README's examples are executed, so they cannot drift from the code.

Every ```python block of README.md runs top to bottom in ONE shared namespace (a block
may use names that the blocks above it defined), once per available backend. Each run is
a fresh subprocess with CAPSULE_SESSIONS_BACKEND set, because that is how a user picks a
backend and because the README asserts what ``BACKEND`` then is. A failure names the
block, its README line and its first line of code, with the traceback pointing at the
README's own line numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import capsule_sessions

README = Path(__file__).resolve().parent.parent / "README.md"
# The package the parent process imported: under `make sanitize` that is the sanitized
# build tree, not the checkout, and the child must test the same build.
PACKAGE_ROOT = Path(capsule_sessions.__file__).resolve().parent.parent

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# Runs in the child: blocks arrive as JSON on stdin; line padding makes tracebacks
# report README line numbers.
_RUNNER = r"""
import json, sys, traceback
path, blocks = json.load(sys.stdin)
namespace = {"__name__": "__readme__"}
for index, (line, code) in enumerate(blocks, 1):
    try:
        exec(compile("\n" * line + code, path, "exec"), namespace)
    except BaseException:
        first = next((l for l in code.splitlines() if l.strip()), "")
        print(f"README python block {index} of {len(blocks)} (README.md line {line}) failed: {first}")
        traceback.print_exc(file=sys.stdout)
        sys.exit(1)
print(f"ran {len(blocks)} blocks")
"""


def python_blocks(text: str) -> list:
    """(line of the block's first code line minus one, code) for each ```python block."""
    return [(text.count("\n", 0, m.start(1)), m.group(1)) for m in _FENCE.finditer(text)]


def test_block_extraction_keeps_order_and_line_numbers():
    text = "# t\n```python\na = 1\n```\n\n```sh\nnope\n```\n```python\nb = a\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (9, "b = a\n")]


def test_readme_has_python_blocks():
    assert python_blocks(README.read_text(encoding="utf-8")), f"no ```python blocks in {README}"


@pytest.mark.parametrize("backend", capsule_sessions.available_backends())
def test_readme_examples_run(backend):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, f"no ```python blocks in {README}"
    env = dict(os.environ, CAPSULE_SESSIONS_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps([str(README), blocks]),
        capture_output=True,
        text=True,
        cwd=PACKAGE_ROOT,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, f"[backend={backend}]\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip().endswith(f"ran {len(blocks)} blocks")
