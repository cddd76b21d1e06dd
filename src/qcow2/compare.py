"""Sub-command compare: whether two images (qcow2 or raw) hold the same guest content,
as `qemu-img compare` says it: "Images are identical." (exit 0), the first mismatching
sector's offset (exit 1), 2 when an image cannot be opened, 4 on a read error.

Images of different sizes compare equal when the larger one's extra part reads as
zeros ("Warning: Image size mismatch!"). qemu-img's -s (strict: also QEMU's internal
block-status flags must match) is not offered: those flags include details of QEMU's
block layer (extents that end at the end of the file, say) that a faithful copy of the
content does not share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np

from .convertfull import CHUNK, Source
from .errors import Qcow2Error

SECTOR = 512
_SKIP = 256 << 20  # the step over ranges both images know to read as zeros


def _read(src: Source, offset: int, n: int, buf: memoryview) -> memoryview | None:
    """The bytes of [offset, offset + n) in buf, or None if the metadata says zeros."""
    if src.known_zero(offset, n):
        return None
    mv = buf[:n]
    src.readinto(mv, offset)
    return mv


def _first_difference(x: memoryview | None, y: memoryview | None, n: int) -> int | None:
    if x is None and y is None:
        return None
    ax = np.frombuffer(x, dtype=np.uint8) if x is not None else np.zeros(n, dtype=np.uint8)
    ay = np.frombuffer(y, dtype=np.uint8) if y is not None else np.zeros(n, dtype=np.uint8)
    diff = np.flatnonzero(ax != ay)
    return int(diff[0]) if len(diff) else None


def compare(a: Source, b: Source, out: Callable[[str], object] = print,
            progress: Callable[[float], object] | None = None) -> int:
    """0 if identical, 1 if not (after saying why, through out). progress, if given, is
    called with the percentage of the larger size compared so far."""
    bufs = (memoryview(bytearray(CHUNK)), memoryview(bytearray(CHUNK)))
    common = min(a.size, b.size)
    whole = max(1, a.size, b.size)
    pos = 0
    while pos < common:
        if progress is not None and pos:
            progress(100.0 * pos / whole)
        # what both sides know to be zeros is skipped in large steps, unread
        span = min(_SKIP, common - pos)
        if span > CHUNK and a.known_zero(pos, span) and b.known_zero(pos, span):
            pos += span
            continue
        n = min(CHUNK, common - pos)
        d = _first_difference(_read(a, pos, n, bufs[0]), _read(b, pos, n, bufs[1]), n)
        if d is not None:
            out(f"Content mismatch at offset {(pos + d) // SECTOR * SECTOR}!")
            return 1
        pos += n
    if a.size != b.size:
        out("Warning: Image size mismatch!")
        big = a if a.size > b.size else b
        while pos < big.size:
            if progress is not None:
                progress(100.0 * pos / whole)
            n = min(CHUNK, big.size - pos)
            d = _first_difference(_read(big, pos, n, bufs[0]), None, n)
            if d is not None:
                out(f"Content mismatch at offset {(pos + d) // SECTOR * SECTOR}!")
                return 1
            pos += n
    if progress is not None:
        progress(100.0)
    out("Images are identical.")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    sources: list[Source] = []
    progress = None
    if args.progress and not args.quiet:
        from .progress import QemuProgress

        progress = QemuProgress(2.0)  # qemu-img compare's 2% step, set up before the opens
    try:
        try:
            sources.append(Source(args.file1, args.fmt1, None))
            sources.append(Source(args.file2, args.fmt2, None))
        except Qcow2Error as exc:
            print(f"qcow2: {exc}", file=sys.stderr)
            return 2
        if progress is not None:
            progress(0.0)
        try:
            return compare(sources[0], sources[1], (lambda _line: None) if args.quiet else print,
                           progress)
        except Qcow2Error as exc:
            print(f"qcow2: Error while comparing: {exc}", file=sys.stderr)
            return 4
    finally:
        if progress is not None:
            progress.close()  # as qemu-img: a newline after the verdict, or the error
        for s in sources:
            s.close()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("compare", help="compare the guest content of two images",
                       description="Compare two images like `qemu-img compare`. Exit codes: "
                       "0 identical, 1 different, 2 an image cannot be opened, 4 read error.")
    p.add_argument("-f", dest="fmt1", metavar="FMT", help="first image's format (qcow2 or raw)")
    p.add_argument("-F", dest="fmt2", metavar="FMT", help="second image's format (qcow2 or raw)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility")
    p.add_argument("file1", metavar="FILE1")
    p.add_argument("file2", metavar="FILE2")
    p.set_defaults(func=cmd_compare)
