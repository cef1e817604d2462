#!/usr/bin/env bash
# Run any pytest selection against the AddressSanitizer + UndefinedBehaviorSanitizer
# build that `make sanitize` leaves in build/sanitize/root, without stopping at the
# first failure (make sanitize runs with -x).
#
#   make sanitize                 # builds the tree (and runs the Cython tests with -x)
#   tools/sanitize.sh             # every Cython-backend test but the soak
#   tools/sanitize.sh ../../../tests/test_fuzz.py -k cython   # paths are relative to the tree
#   SANITIZE_SOAK=1 tools/sanitize.sh   # the soak too (CAPSULE_SESSIONS_SOAK_SECONDS applies)
#
# Leak detection stays off (CPython does not free everything at exit); an ASan report
# aborts the process (abort_on_error), a UBSan report halts it (halt_on_error).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=build/sanitize/root
[ -e "$ROOT/capsule_sessions" ] || { echo "no sanitized build: run make sanitize first" >&2; exit 2; }
MARK="not soak"
[ "${SANITIZE_SOAK:-0}" = 1 ] && MARK="soak"
if [ "$#" -eq 0 ]; then
  set -- ../../../tests -m "$MARK" -k cython
fi
cd "$ROOT"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export CAPSULE_SESSIONS_BACKEND=cython CAPSULE_SESSIONS_REQUIRE_CYTHON=1 PYTHONPATH=.
exec ../../../.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
