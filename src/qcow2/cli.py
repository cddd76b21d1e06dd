"""The `qcow2` command: qemu-img compatible syntax, output and exit codes.

Each sub-command module registers itself with `register(subparsers)`; the handler it sets
as `func` returns the exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .errors import Qcow2Error


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 1, as qemu-img does."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (try '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcow2", description="qcow2 image utility (qemu-img compatible)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from . import commands

    commands.register(sub)
    from . import check

    check.register(sub)
    from . import snapshot

    snapshot.register(sub)
    from . import convert

    convert.register(sub)
    from . import compare

    compare.register(sub)
    from .amend import register as register_amend  # (qcow2.amend is the function)

    register_amend(sub)
    from . import measure

    measure.register(sub)
    from . import nbd

    nbd.register(sub)
    from . import resize

    resize.register(sub)
    from . import rebase

    rebase.register(sub)
    from . import dd

    dd.register(sub)
    from . import bench

    bench.register(sub)
    from . import bitmapcmd

    bitmapcmd.register(sub)
    return parser


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
