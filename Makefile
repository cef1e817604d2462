# Every target sets itself up: .venv, dependencies, the compiled extension.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
EXT_SOURCES := $(wildcard ext/capsule_sessions/*)

.PHONY: demo test lint build bench sanitize soak fuzz valgrind clean redis-server

# A new venv holds the setuptools its Python bundles (65 on 3.11), which warns that
# [tool.setuptools] is beta and loads the wheel package's deprecated bdist_wheel on every
# build; setuptools 77 has neither warning, builds wheels itself and reads the SPDX
# license. So pip and setuptools are upgraded, and wheel is not installed.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77"
	$(PY) -m pip install --quiet "Cython>=3.1" "numpy>=2"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,cli,plot,video,lint,bench,redis]"
	touch $(STAMP)

# build_ext --inplace is a no-op when the .so is newer than its sources.
build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace

# The synthetic multi-camera demo, then the real-video ingest on a sample clip that
# the project encodes itself on first use (cached under .cache/), then across processes:
# the demo again with its sessions in shared memory (namespace "demo", in the
# background, its summary kept in .cache/ and shown after) while a second process
# attaches to every session and shows its own drops and latency. Both must succeed, and
# nothing of the namespace may be left in /dev/shm.
demo: build
	$(PY) -m capsule_sessions demo --seconds 3
	$(PY) -m capsule_sessions ingest --realtime --frame-interval 0.025 --report .cache/demo-report.png \
	  sample synthetic:1280x720@60 synthetic:640x360@30
	mkdir -p .cache
	$(PY) -m capsule_sessions demo --shared demo --seconds 3 --display none > .cache/demo-shared.txt & producer=$$!; \
	$(PY) -m capsule_sessions attach --namespace demo --wait 5 --seconds 10; reader=$$?; \
	wait $$producer; status=$$?; \
	echo; echo "The producer's side (capsule-sessions demo --shared demo):"; cat .cache/demo-shared.txt; \
	if ls /dev/shm 2>/dev/null | grep '^capsule\.demo\.'; then echo "left in /dev/shm (above)"; exit 1; fi; \
	test $$reader -eq 0 && test $$status -eq 0

# Style and types: ruff over every Python file of the project, mypy --strict over the
# package and the program in tests/typing that uses all of its public API.
lint: $(STAMP)
	$(PY) -m ruff check capsule_sessions tests bench fuzz tools setup.py
	$(PY) -m mypy --strict capsule_sessions tests/typing

# The Redis tests start their own redis-server (tests/redis_server.py): Debian's, installed
# here when it or redis-cli (which makes the tests' Redis Cluster; Debian's redis-tools,
# a dependency of redis-server) is missing, as root or through sudo.
redis-server:
	@{ command -v redis-server && command -v redis-cli; } >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server; \
	  $$SUDO service redis-server stop >/dev/null 2>&1 || true; }

# Lint, then the whole suite on both backends; conftest fails (not skips) without the
# extension.
test: lint build redis-server
	CAPSULE_SESSIONS_REQUIRE_CYTHON=1 $(PY) -m pytest -q -p no:cacheprovider tests

bench: build
	$(PY) -m capsule_sessions bench --json bench-results/bench.json --plot bench-results/bench.png

soak: build
	CAPSULE_SESSIONS_REQUIRE_CYTHON=1 CAPSULE_SESSIONS_SOAK_SECONDS=600 $(PY) -m pytest -q -m soak tests

# ASan + UBSan build of the extension in a separate tree, then the Cython-backend tests
# (tools/sanitize.sh runs any other selection against the same build).
sanitize: $(STAMP)
	tools/sanitize.sh --build -x

# libFuzzer-driven (atheris) operation sequences on both twins side by side; a plain
# random loop where atheris does not install.
fuzz: build
	$(PY) -m pip install --quiet "atheris>=2.3" || echo "atheris did not install: running the plain random loop"
	mkdir -p build/fuzz-corpus
	if $(PY) -c "import atheris" 2>/dev/null; then \
	  $(PY) fuzz/fuzz_framebuf.py -max_total_time=60 -max_len=4096 build/fuzz-corpus; \
	else $(PY) fuzz/fuzz_framebuf.py --no-atheris --runs 20000; fi

valgrind: build
	tools/valgrind.sh

clean:
	rm -rf build $(VENV) capsule_sessions/*.so ext/capsule_sessions/*.c ext/capsule_sessions/*.html .cache
