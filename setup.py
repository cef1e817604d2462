"""Builds the Cython frame-buffer backend as ``capsule_sessions._framebuf``, and on Linux
the shared-memory ring as ``capsule_sessions._shm``.

A failed compile stops the install: a silent fallback to the pure twin would hide a
10x slowdown. ``CAPSULE_SESSIONS_BACKEND=python pip install .`` installs the pure
backend on purpose, without compiling. ``CAPSULE_SESSIONS_SANITIZE=1`` builds with
AddressSanitizer and UndefinedBehaviorSanitizer (``make sanitize``).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

PURE = os.environ.get("CAPSULE_SESSIONS_BACKEND", "").strip().lower() == "python"
SANITIZE = os.environ.get("CAPSULE_SESSIONS_SANITIZE", "") not in ("", "0")

HOW_TO_GO_PURE = (
    "\n\ncapsule_sessions: the Cython extension did not build (see the compiler output above).\n"
    "Install a C compiler and the Python headers, or install the pure-Python backend on\n"
    "purpose with:  CAPSULE_SESSIONS_BACKEND=python pip install .\n"
)


class BuildExtLoudly(build_ext):
    """Cythonizes at build time (not when setup.py is read), and fails with directions."""

    def run(self):
        try:
            from Cython.Build import cythonize

            for ext in self.extensions:
                (translated,) = cythonize(
                    [ext],
                    language_level=3,
                    compiler_directives={"embedsignature": True},
                    annotate=os.environ.get("CAPSULE_SESSIONS_ANNOTATE", "") not in ("", "0"),
                    quiet=True,
                )
                ext.sources = translated.sources  # keep setuptools' Extension object
            super().run()
        except (Exception, SystemExit) as exc:
            sys.stderr.write(HOW_TO_GO_PURE)
            raise SystemExit(f"error: building the Cython extension failed: {exc!r}") from exc


def extensions():
    if PURE:
        return []
    try:
        import numpy
    except ImportError as exc:
        raise SystemExit(f"error: {exc}.{HOW_TO_GO_PURE}") from exc
    from setuptools import Extension

    compile_args = ["-O3"]
    link_args = []
    if SANITIZE:
        flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        compile_args = ["-O1", "-g"] + flags
        link_args = flags
    def extension(name):
        return Extension(
            f"capsule_sessions.{name}",
            [f"ext/capsule_sessions/{name}.pyx"],
            include_dirs=[numpy.get_include(), "ext", "ext/capsule_sessions"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )

    # _shm (shared sessions) needs POSIX shared memory and Linux futexes.
    names = ["_framebuf", "_shm"] if sys.platform.startswith("linux") else ["_framebuf"]
    return [extension(name) for name in names]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtLoudly})
