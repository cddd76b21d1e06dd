"""Sub-command dd: qemu-img dd's subset of dd(1) (if= of= bs= count= skip=).

As qemu-img dd does: the output image is created anew (raw by default, -O qcow2), the
input is read from skip*bs to min(count*bs, input size), and the output's size is that
length (count counts the skipped blocks too, as in qemu-img). Blocks of zeros are not
written: the new image reads zeros there already (unallocated, or a hole).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from .commands import INT64_MAX, SizeRangeError, parse_size
from .errors import InvalidArgumentError, Qcow2Error

_SUFFIX_HELP = ("You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, "
                "terabytes, petabytes and exabytes.")


def dd(infile: str, outfile: str, *, bs: int = 512, count: int | None = None, skip: int = 0,
       in_fmt: str | None = None, out_fmt: str = "raw",
       warn: Callable[[str], None] | None = None) -> int:
    """Copy like qemu-img dd; returns the number of bytes copied. warn receives qemu-img's
    warning for a skip past the end of the input (the output is then empty)."""
    from .convertfull import Source, _Target

    if bs < 1 or bs > 2**31 - 1:
        raise InvalidArgumentError("Invalid bs specified. Must be between 1 and 2147483647.")
    if out_fmt not in ("raw", "qcow2"):
        raise InvalidArgumentError("Unknown file format")
    if not infile:
        raise Qcow2Error("Could not open '': The 'file' block driver requires a file name")
    if not os.path.exists(infile):
        raise Qcow2Error(f"Could not open '{infile}': Could not open '{infile}': "
                         "No such file or directory")
    try:
        src = Source(infile, in_fmt, None)
    except Qcow2Error as exc:
        msg = str(exc)
        if msg.startswith("Could not open ") or msg.startswith("Unknown "):
            raise
        raise Qcow2Error(f"Could not open '{infile}': {msg}") from exc
    try:
        size = src.size
        if count is not None and count <= INT64_MAX // bs and count * bs < size:
            size = count * bs
        start = skip * bs
        if start > size:  # qemu-img goes on with an empty output
            if warn is not None:
                warn(f"{infile}: cannot skip to specified offset")
            start = size
        # a raw output is created in whole sectors, as qemu-img creates it
        out_size = size - start
        if out_fmt == "raw":
            out_size = -(-out_size // 512) * 512
        _check_creatable(outfile)
        target = _Target(outfile, out_fmt, out_size, True, [])
        try:
            copied = _copy(src, target, start, size, bs)
            target.finish()
        finally:
            target.close()
    finally:
        src.close()
    return copied


def _check_creatable(path: str) -> None:
    """qemu-img's message for an output that cannot be created (the common causes)."""
    if not path or not os.path.isdir(os.path.dirname(path) or "."):
        why = "No such file or directory"
    elif os.path.isdir(path):
        why = "Is a directory"
    else:
        return
    raise Qcow2Error(f"{path}: error while creating output image: Could not create "
                     f"'{path}': {why}")


def _copy(src: Any, target: Any, start: int, end: int, bs: int) -> int:
    # whole blocks of bs, read in batches of about 4 MiB
    step = max(bs, (4 << 20) // bs * bs)
    buf = bytearray(step)
    mv = memoryview(buf)
    pos = start
    while pos < end:
        n = min(step, end - pos)
        piece = mv[:n]
        src.readinto(piece, pos)
        if buf.count(0, 0, n) != n:
            target.write(piece, pos - start)
        pos += n
    return max(0, end - start)


def _operand(value: str, what: str, size: bool) -> int:
    try:
        n = parse_size(value) if size else int(value, 0)
    except SizeRangeError:
        n = INT64_MAX + 1
    except ValueError:
        raise InvalidArgumentError(f"Invalid {what} specified. {_SUFFIX_HELP}") from None
    return n


def cmd_dd(args: argparse.Namespace) -> int:
    ops: dict[str, str] = {}
    for item in args.operands:
        key, sep, value = item.partition("=")
        if not sep or key not in ("if", "of", "bs", "count", "skip"):
            # qemu-img names the operand without its value
            raise InvalidArgumentError(f"unrecognized operand {key}")
        ops[key] = value
    if "if" not in ops or "of" not in ops:
        raise InvalidArgumentError("Must specify both input and output files")
    bs = _operand(ops["bs"], "bs", True) if "bs" in ops else 512
    if bs < 1 or bs > 2**31 - 1:
        raise InvalidArgumentError("Invalid bs specified. Must be between 1 and 2147483647.")
    count = _operand(ops["count"], "count", True) if "count" in ops else None
    skip = _operand(ops["skip"], "skip", True) if "skip" in ops else 0
    if count is not None and count > INT64_MAX:
        raise InvalidArgumentError(f"Invalid count specified. {_SUFFIX_HELP}")
    if skip > INT64_MAX:
        raise InvalidArgumentError(f"Invalid skip specified. {_SUFFIX_HELP}")
    dd(ops["if"], ops["of"], bs=bs, count=count, skip=skip, in_fmt=args.fmt,
       out_fmt=args.out_fmt or "raw", warn=lambda msg: print(f"qcow2: {msg}", file=sys.stderr))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dd", help="copy an image like dd(1)",
        description="qemu-img dd: if=INPUT of=OUTPUT [bs=N] [count=N] [skip=N]; the output "
        "is created (raw, or -O qcow2).",
        usage="qcow2 dd [-f FMT] [-O raw|qcow2] [bs=N] [count=N] [skip=N] if=INPUT of=OUTPUT")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="input format (qcow2 or raw)")
    p.add_argument("-O", dest="out_fmt", metavar="FMT", help="output format (raw or qcow2)")
    p.add_argument("-U", "--force-share", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("operands", nargs="*", metavar="OPERAND")
    p.set_defaults(func=cmd_dd)
