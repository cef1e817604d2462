"""The ``capsule-sessions`` command: ``demo``, ``ingest``, ``attach`` and ``bench``.

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``.
Only the module of the subcommand being run is imported, so an optional extra that one
subcommand needs (or a subcommand missing from this build) breaks that subcommand alone,
with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from ._errors import StoreError, UsageError
from ._extras import EXTRA_OF, MissingExtra, missing_message

PROG = "capsule-sessions"
# name -> (module, one-line help); the help is here so `--help` imports nothing.
COMMANDS = {
    "demo": ("capsule_sessions.cli.demo", "simulated multi-camera ingest into one SessionManager"),
    "ingest": ("capsule_sessions.cli.ingest", "decode video files, URLs, cameras or synthetic sources into sessions"),
    "attach": ("capsule_sessions.cli.attach",
               "attach to another process's sessions (shared memory or Redis) and show its drops and latency "
               "from here"),
    "bench": ("capsule_sessions.cli.bench", "benchmark both backends (workloads and targets: docs/bench.md)"),
}
EXIT_STORE_FAILED = 1
EXIT_USAGE = 2


def _load(name: str) -> ModuleType:
    """The subcommand's module, or UsageError/MissingExtra saying why it cannot run."""
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise UsageError(f"the {name!r} command is not part of this build ({module_name} is missing)") from None
        top = (exc.name or "").split(".")[0]
        if top in EXTRA_OF:
            raise MissingExtra(missing_message(top, "this command")) from None
        raise


def _selected(argv: Sequence[str]) -> str | None:
    # The top-level parser has only flags without values, so the first word that is not
    # a flag is the subcommand.
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def _parser(selected: str | None,
            module: ModuleType | None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own parser."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Voice/vision AI sessions with a zero-copy, rate-limited, fan-out frame ring.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = {}
    for name, (_, help_text) in COMMANDS.items():
        command = commands[name] = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected and module is not None:
            module.add_arguments(command)
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = _selected(argv)
    try:
        module = _load(selected) if selected else None
    except (UsageError, MissingExtra) as exc:
        print(f"{PROG} {selected}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parser, commands = _parser(selected, module)
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            # argparse hands a command's unknown flags up to the top-level parser, whose
            # usage says nothing about that command's flags: let the command complain.
            commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse has printed usage and the message
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    # A command is required and it is the first word that is not a flag (_selected), so
    # parsing exits above unless one was named and loaded.
    assert module is not None
    try:
        return int(module.run(args))
    except (UsageError, MissingExtra) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_STORE_FAILED
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
