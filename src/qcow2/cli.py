"""The `qcow2` command: qemu-img compatible syntax, output and exit codes.

Each sub-command module registers itself with `register(subparsers)`; the handler it sets
as `func` returns the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import Qcow2Error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcow2", description="qcow2 image utility (qemu-img compatible)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from . import commands

    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed one line of usage error
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except Qcow2Error as exc:
        print(f"qcow2: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"qcow2: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
