"""Sub-command bench: qemu-img bench's options and output lines, so that one benchmark
script runs against both tools.

Requests are issued one after another through the library (there is no asynchronous
queue: -d is the number of requests counted as in flight for --flush-interval, as in
qemu-img, where a flush waits for the requests before it). Offsets advance by the step
size from the start offset and wrap at the end of the image as in qemu-img. -t, -i, -n
and --no-drain are accepted; the I/O always goes through the library's own cache.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Any

from .commands import INT64_MAX, parse_size
from .errors import InvalidArgumentError, Qcow2Error
from .format import MAGIC

CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
AIO_MODES = ("threads", "native", "io_uring")


@dataclass
class BenchOptions:
    count: int = 75000
    depth: int = 64
    size: int = 4096
    offset: int = 0
    step: int | None = None  # default: the request size
    write: bool = False
    pattern: int = 0
    flush_interval: int = 0
    drain_on_flush: bool = True


def bench(img: Any, o: BenchOptions) -> float:
    """Run the requests on an open image (writable for write tests); returns seconds."""
    from .errors import Qcow2Error

    step = o.size if o.step is None else o.step
    size = img.size
    buf = bytes([o.pattern]) * o.size
    offset = o.offset
    start = time.perf_counter()
    for i in range(o.count):
        try:
            if o.write:
                img.pwrite(buf, offset)
                if o.flush_interval and (i + 1) % o.flush_interval == 0:
                    img.flush()
            else:
                img.pread(o.size, offset)
        except InvalidArgumentError:
            # past the end of the image: what qemu-img reports for such a request
            raise Qcow2Error("Failed request: Input/output error") from None
        except Qcow2Error as exc:
            raise Qcow2Error(f"Failed request: {exc}") from None
        # the next offset as qemu-img computes it: modulo the image size, so a request
        # may run past the end (and fail) when the step does not divide it
        offset = 0 if size <= o.size else (offset + step) % size
    if o.write:
        img.flush()
    return time.perf_counter() - start


_SUFFIXES = (". You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, "
             "terabytes, petabytes and exabytes.")


def _num(text: str, what: str, size: bool = False, minimum: int = 0) -> int:
    try:
        n = parse_size(text) if size else int(text, 0)
    except ValueError:
        raise InvalidArgumentError(f"Invalid {what} specified{_SUFFIXES if size else ''}") \
            from None
    limit = INT64_MAX if what == "offset" else (1 << 31) - 1
    if n < minimum or n > limit:
        # sizes (qemu-img's cvtnum) say the range, counts do not
        raise InvalidArgumentError(f"Invalid {what} specified"
                                   + (f". Must be between 0 and {limit}." if size else ""))
    return n


def cmd_bench(args: argparse.Namespace) -> int:
    from .image import open_image as qopen

    o = BenchOptions()
    if args.count is not None:
        o.count = _num(args.count, "request count")
    if args.depth is not None:
        # (qemu-img accepts 0 and then never completes: refused here)
        o.depth = _num(args.depth, "queue depth", minimum=1)
    if args.size is not None:
        o.size = _num(args.size, "buffer size", size=True)
    if args.offset is not None:
        o.offset = _num(args.offset, "offset", size=True)
    if args.step is not None:
        o.step = _num(args.step, "step_size", size=True)
    if args.pattern is not None:
        try:
            o.pattern = int(args.pattern, 0)
        except ValueError:
            raise InvalidArgumentError("Invalid pattern byte specified") from None
        if not 0 <= o.pattern <= 255:
            raise InvalidArgumentError("Invalid pattern byte specified")
    if args.cache is not None and args.cache not in CACHE_MODES:
        raise InvalidArgumentError("Invalid cache mode")
    if args.aio is not None and args.aio not in AIO_MODES:
        raise InvalidArgumentError(f"Invalid aio option: {args.aio}")
    o.write = args.write
    if args.flush_interval is not None:
        o.flush_interval = _num(args.flush_interval, "flush interval")
    o.drain_on_flush = not args.no_drain
    if o.flush_interval and not o.write:
        raise InvalidArgumentError("--flush-interval is only available in write tests")
    if o.flush_interval and o.flush_interval < o.depth:
        raise InvalidArgumentError("Flush interval can't be smaller than depth")
    path = args.filename
    if args.fmt is not None and args.fmt not in ("qcow2", "raw"):
        raise InvalidArgumentError(f"Could not open '{path}': Unknown driver '{args.fmt}'")
    if args.aio == "native" or args.native:
        if args.cache not in ("none", "directsync"):  # qemu's file driver refuses it
            raise InvalidArgumentError(
                f"Could not open '{path}': aio=native was specified, but it requires "
                "cache.direct=on, which was not specified.")
    if not os.path.exists(path):
        raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                         "No such file or directory")
    fmt = args.fmt
    if fmt is None:
        with open(path, "rb") as f:
            fmt = "qcow2" if f.read(4) == MAGIC else "raw"
    if not o.step:  # qemu-img: no step (0) means one request size
        o.step = o.size
    if fmt == "raw":
        from .nbd import RawImage

        img: Any = RawImage(path, o.write)
    else:
        img = qopen(path, "r+" if o.write else "r")
    step = o.step
    try:
        print(f"Sending {o.count} {'write' if o.write else 'read'} requests, {o.size} bytes "
              f"each, {o.depth} in parallel (starting at offset {o.offset}, step size {step})")
        if o.flush_interval:
            print(f"Sending flush every {o.flush_interval} requests")
        elapsed = bench(img, o)
    finally:
        img.close()
    print(f"Run completed in {elapsed:.3f} seconds.")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench", help="run a simple I/O benchmark",
        description="qemu-img bench: COUNT requests of SIZE bytes, reads or (-w) writes.",
        usage="qcow2 bench [-c COUNT] [-d DEPTH] [-f qcow2] [-n] [-o OFFSET] [-q] [-s SIZE] "
        "[-S STEP] [-t CACHE] [-i AIO] [-w] [--pattern=N] [--flush-interval=N] "
        "[--no-drain] FILE")
    p.add_argument("-c", dest="count", metavar="COUNT")
    p.add_argument("-d", dest="depth", metavar="DEPTH")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("-n", dest="native", action="store_true", help="accepted (native AIO)")
    p.add_argument("-o", dest="offset", metavar="OFFSET")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-s", dest="size", metavar="SIZE")
    p.add_argument("-S", dest="step", metavar="STEP")
    p.add_argument("-t", dest="cache", metavar="CACHE")
    p.add_argument("-i", dest="aio", metavar="AIO")
    p.add_argument("-w", dest="write", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pattern", metavar="N")
    p.add_argument("--flush-interval", metavar="N")
    p.add_argument("--no-drain", action="store_true")
    p.add_argument("filename", metavar="FILE")
    p.set_defaults(func=cmd_bench)
