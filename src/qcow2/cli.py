"""The `qcow2` command: qemu-img compatible syntax, output and exit codes.

Each sub-command module registers itself with `register(subparsers)`; the handler it sets
as `func` returns the exit code. Only the module of the command that runs is imported, so
that the commands that need no table pass start without numpy (issue 12, start-up).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import Qcow2Error

# qemu-img's message for a file name too many or missing, per command
_FILE_COUNT = {"info": "Expecting one image file name", "map": "Expecting one image file name",
               "check": "Expecting one image file name", "bench": "Expecting one image file name",
               "amend": "Expecting one image file name", "commit": "Expecting one image file name",
               "rebase": "Expecting one image file name",
               "snapshot": "Expecting one image file name",
               "compare": "Expecting two image file names",
               "resize": "Expecting image file name and size",
               "measure": "At most one filename argument is allowed."}


def _qemu_usage(message: str, command: str | None) -> str | None:
    """argparse's usage error in qemu-img's words (its getopt handlers), or None."""
    if message.startswith("unrecognized arguments: "):
        first = message.split(": ", 1)[1].split(" ")[0]
        if first.startswith("-") and first != "-":
            return f"unrecognized option '{first}'"
        return _FILE_COUNT.get(command or "")
    if message.startswith("the following arguments are required: "):
        return _FILE_COUNT.get(command or "")
    if message.startswith("argument ") and message.endswith(": expected one argument"):
        return f"missing argument for option '{message[9:].split(':')[0].split('/')[0]}'"
    return None


def _help_width() -> int:
    """The width argparse's help formatter takes (shutil.get_terminal_size's columns,
    less 2), without importing shutil: every add_argument makes a formatter, and the
    import is start-up time that a command which prints no help does not need."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _help_width() if width is None else width)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 1, as qemu-img does (in its words
    where it has them)."""

    command: str | None = None  # the sub-command named on the command line

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        qemu = _qemu_usage(message, _Parser.command)
        if qemu is not None:
            print(f"qcow2: {qemu} (try 'qcow2 --help')", file=sys.stderr)
        else:
            print(f"{self.prog}: {message} (try '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(1)


# The sub-commands in `qcow2 --help` order: (module, [(name, help)]). Only the module of
# the command that runs is imported (each costs start-up time, some import numpy); the
# others get a stub parser with the same help line. A module's register() adds exactly
# these names with these help texts (tests/test_startup.py compares both parsers).
COMMANDS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("commands", (("create", "Create a new qcow2 image"),
                  ("info", "Show information about an image"),
                  ("map", "Show the allocation map of an image (and its backing chain)"))),
    ("checkcmd", (("check", "check an image for consistency (and repair it)"),)),
    ("snapshotcmd", (("snapshot", "list, create, apply or delete internal snapshots"),)),
    ("convert", (("convert", "copy images into a new qcow2 or raw image"),)),
    ("compare", (("compare", "compare the guest content of two images"),)),
    ("amend", (("amend", "change the options of an existing image"),)),
    ("measure", (("measure", "compute the size a new image needs"),)),
    ("nbd", (("nbd", "serve an image over NBD (qemu-nbd compatible options)"),)),
    ("resize", (("resize", "change the virtual size of an image"),)),
    ("rebase", (("rebase", "change the backing file of an image"),
                ("commit", "write an overlay's data into its backing file"))),
    ("dd", (("dd", "copy an image like dd(1)"),)),
    ("bench", (("bench", "run a simple I/O benchmark"),)),
    ("bitmapcmd", (("bitmap", "manage persistent dirty bitmaps"),)),
)


def build_parser(command: str | None = "", *, full: bool = False,
                 only: bool = False) -> argparse.ArgumentParser:
    """The parser, with the real sub-parser for `command` only (full: for every command).
    only: without the stubs of the other commands, for a command line that starts with
    the command's name (the top-level parser then neither prints help nor an error)."""
    parser = _Parser(prog="qcow2", description="qcow2 image utility (qemu-img compatible)")
    from . import __version__  # (the package is loaded: this module is part of it)

    parser.add_argument("-V", "--version", action="version", version=f"qcow2 version {__version__}")
    # prog given: argparse would compute the same "qcow2" with a help formatter, which
    # imports shutil (and lzma, bz2) for the terminal width: start-up time
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", prog="qcow2")
    sub.required = True
    for module, names in COMMANDS:
        if full or any(name == command for name, _ in names):
            importlib.import_module(f".{module}", __package__).register(sub)
        elif not only:
            for name, help_text in names:
                sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line: its first positional argument (the
    top-level parser has no option that takes a value)."""
    for i, arg in enumerate(argv):
        if arg == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    # Names from the image (snapshot names, backing file names) are bytes that need not
    # be UTF-8; they are decoded with surrogateescape. Print them back as the raw bytes
    # (as qemu-img does) instead of failing on a strict UTF-8 stdout.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="surrogateescape")
            except (ValueError, OSError):
                pass
    process = argv is None  # the process's entry point (the `qcow2` script, python -m)
    if argv is None:
        argv = sys.argv[1:]
    try:
        command = _command_of(argv)
        _Parser.command = command
        known = any(command == name for _, names in COMMANDS for name, _ in names)
        args = build_parser(command, only=known and argv[0] == command).parse_args(argv)
        if not hasattr(args, "func"):  # a stub ran after all: parse again with every command
            args = build_parser(full=True).parse_args(argv)
    except SystemExit as exc:  # argparse already printed one line of usage error
        return int(exc.code or 0)
    if process:
        # what the imports made lives until the process ends: out of the collector's
        # sight, neither the command's collections nor the one at exit walk it again
        # (several ms of a short command; the interpreter's teardown is the same)
        import gc

        gc.freeze()
    try:
        return int(args.func(args))
    except Qcow2Error as exc:
        print(f"qcow2: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (`qcow2 map x | head`): stop quietly like a C tool killed by
        # SIGPIPE, and keep Python from failing again when it flushes stdout at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except OSError as exc:
        print(f"qcow2: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
