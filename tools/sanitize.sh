#!/usr/bin/env bash
# The AddressSanitizer + UndefinedBehaviorSanitizer run: builds the extension with both
# into build/sanitize/root (with --build, or when there is no such build yet), then runs
# a pytest selection of the Cython-backend tests against it. `make sanitize` is
# `tools/sanitize.sh --build -x`.
#
#   tools/sanitize.sh --build -x      # rebuild, then every Cython test but the soak, stop at the first failure
#   tools/sanitize.sh                 # every Cython-backend test but the soak
#   tools/sanitize.sh ../../../tests/test_fuzz.py -k cython   # paths are relative to the tree
#   SANITIZE_SOAK=1 tools/sanitize.sh   # the soak too (CAPSULE_SESSIONS_SOAK_SECONDS applies)
#
# Leak detection stays off (CPython does not free everything at exit); an ASan report
# aborts the process (abort_on_error), a UBSan report halts it (halt_on_error); a failed
# allocation returns NULL (allocator_may_return_null), as malloc does, so the tests of
# out-of-memory paths see MemoryError instead of an ASan abort.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ROOT=build/sanitize/root

build() {
  rm -rf build/sanitize && mkdir -p build/sanitize
  CAPSULE_SESSIONS_SANITIZE=1 $PY setup.py --quiet build_ext \
    --build-temp build/sanitize/tmp --build-lib build/sanitize/lib --force
  mkdir -p "$ROOT"
  cp -r capsule_sessions "$ROOT/capsule_sessions"
  rm -f "$ROOT"/capsule_sessions/*.so
  cp build/sanitize/lib/capsule_sessions/*.so "$ROOT/capsule_sessions/"
}

if [ "${1:-}" = "--build" ]; then
  shift
  build
elif [ ! -e "$ROOT/capsule_sessions" ]; then
  build
fi

MARK="not soak"
[ "${SANITIZE_SOAK:-0}" = 1 ] && MARK="soak"
[ "$#" -eq 0 ] || [ "$*" = "-x" ] && set -- "$@" ../../../tests -m "$MARK" -k cython

cd "$ROOT"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export CAPSULE_SESSIONS_BACKEND=cython CAPSULE_SESSIONS_REQUIRE_CYTHON=1 PYTHONPATH=.
exec ../../../$PY -m pytest -q -p no:cacheprovider "$@"
