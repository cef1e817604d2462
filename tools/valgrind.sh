#!/usr/bin/env bash
# Memcheck over a shorter Cython-backend test run (about 5-10 minutes on 2 cores).
#
#   tools/valgrind.sh                 # the default selection below
#   tools/valgrind.sh tests/test_subscription.py -k cython   # any pytest arguments
#
# PYTHONMALLOC=malloc sends every Python allocation through malloc, so memcheck sees
# each object's bounds; tools/valgrind-python.supp holds the CPython/loader noise (why
# each entry is safe to suppress is written there). Any error left fails the run
# (--error-exitcode=1). Children are not traced: tests that fork or spawn interpreters
# are deselected, they would only run natively.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
"$PY" -c "import capsule_sessions._framebuf" 2>/dev/null || { echo "the Cython extension is not built (make build)" >&2; exit 2; }

if [ "$#" -eq 0 ]; then
  # Everything the compiled ring does, each at least once; minus what only stresses time
  # (soak, stress), 64 MB copies, a 1 TiB refused allocation, and the subprocess tests.
  subprocesses="ctrl_c or fork or dropping_a_subscription or keyboard_interrupt_during_stores or interpreter_exit"
  set -- tests/test_subscription.py tests/test_visual_input.py tests/test_session.py \
         tests/test_faults.py tests/test_fuzz.py \
         -k "cython and not 64_megabyte and not absurd and not ($subprocesses)"
fi

export PYTHONMALLOC=malloc
export CAPSULE_SESSIONS_REQUIRE_CYTHON=1
# A twentieth of the hypothesis examples: each still runs every entry point.
export CAPSULE_SESSIONS_FUZZ_EXAMPLES=${CAPSULE_SESSIONS_FUZZ_EXAMPLES:-0.05}
exec valgrind --tool=memcheck --error-exitcode=1 --errors-for-leak-kinds=none --leak-check=no \
  --suppressions=tools/valgrind-python.supp --num-callers=40 --trace-children=no \
  "$PY" -m pytest -q -p no:cacheprovider -p no:randomly -m "not soak and not stress" \
  -o addopts="" --timeout=1800 "$@"
