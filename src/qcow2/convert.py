"""Sub-command convert: copy the guest content of one or more images (qcow2 or raw,
concatenated) into a new qcow2 or raw image, as `qemu-img convert` does.

Zero areas (4 KiB grains, qemu-img's default -S) are not written: they stay unallocated
in a qcow2 target and holes in a raw one; source ranges that the qcow2 metadata already
says read as zeros are not even read. With -c every qcow2 cluster that holds data is
written compressed (or plain, if it does not compress). With -n the target exists
already and is not assumed to be zeroed: zero areas are written as zeros. The output is
flushed to the disk at the end (qemu-img's default cache mode for convert, unsafe, skips
that; a copy that may vanish in a power cut is no copy).

Crash safety: a new output is written under a temporary name beside it and renamed once
complete and synced (the directory synced too), so OUTPUT never names a partial image; a
crash leaves only the temporary `.NAME.convert-PID`, which the next convert to the same
OUTPUT removes once no process PID exists and no live convert holds its lock
(remove_stale_temporaries); an error removes it at once. Since nobody opens that file before the rename, the syncs that order
metadata after data are left out: one sync when it is closed makes it durable. With -n
the target is written in place with every ordering sync, as any image write.

Beyond qemu-img: --snapshots copies every internal snapshot (copy_with_snapshots), and
OUTPUT '-' streams the image to stdout (stream.py).

A plain convert (fastconvert.plan says which) takes fastconvert.py's path, which writes
the same output without numpy (whose import alone costs about what qemu-img takes for
a whole convert of 128 MiB); the general path (convertfull.py, numpy) is imported only
when a convert needs it. QCOW2_CONVERT_FULL_PATH=1 forces the general path (for tests).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from typing import Any

from . import fastconvert
from .errors import InvalidArgumentError, Qcow2Error
from .fastconvert import FORMATS, GRAIN

MAX_SPARSE = 16 << 20  # qemu-img's largest -S


def _sparse_size(text: str) -> int:
    """-S: qemu-img's sparse size (bytes, suffixes), a multiple of 512 up to 16 MiB."""
    from .commands import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        raise InvalidArgumentError(
            "Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E "
            "suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    if value % 512 or value > MAX_SPARSE:
        raise InvalidArgumentError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 "
            f"up to {MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates output).")
    return value


def _parallel(text: str) -> int:
    from .commands import parse_number

    try:
        value = parse_number(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 16:
        raise InvalidArgumentError(
            "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    return value


def _temporary_name(output: str) -> str:
    if os.path.isdir(output):
        raise Qcow2Error(f"Could not create '{output}': Is a directory")
    head, tail = os.path.split(output)
    return os.path.join(head, f".{tail}.convert-{os.getpid()}")


def _running(pid: int) -> bool:
    """Whether a process with this id exists here (one we may not signal does too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # EPERM, or no id a process here can have: not ours to judge
    return True


def remove_stale_temporaries(output: str) -> list[str]:
    """Remove the temporary files that killed converts to OUTPUT left behind, and return
    their paths. A file goes only when all of these hold: its name is exactly
    `.NAME.convert-PID` beside OUTPUT (PID in decimal, as _temporary_name writes it), it
    is a regular file (a symlink is never followed nor removed), no process PID exists
    here, and nobody holds its lock (a convert holds its temporary file's flock while it
    writes: that covers a convert in another PID namespace or on another host sharing
    the directory, whose PID means nothing here). Anything in doubt is left alone."""
    import fcntl
    import stat

    head, tail = os.path.split(output)
    prefix = f".{tail}.convert-"
    try:
        names = os.listdir(head or ".")
    except OSError:
        return []
    removed = []
    for name in names:
        digits = name[len(prefix):]
        if not name.startswith(prefix) or not (digits.isascii() and digits.isdigit()) \
                or digits[0] == "0":
            continue
        pid = int(digits)
        if pid == os.getpid() or _running(pid):
            continue
        path = os.path.join(head, name)
        try:  # O_NONBLOCK: a FIFO of that name must not stall us
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # a symlink (ELOOP), gone already, or not readable
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):  # not replaced meanwhile
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue  # locked by a live convert, or not ours to remove
        finally:
            os.close(fd)
    return removed


def _claim_temporary(path: str, output: str, fmt: str) -> int:
    """Create the temporary file and hold its lock (see remove_stale_temporaries) until
    the fd is closed: after the rename, or when the file is removed on an error."""
    import fcntl

    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # qemu-img's words (it creates OUTPUT itself)
            raise Qcow2Error(f"{output}: error while converting {fmt}: Could not create "
                             f"'{output}': {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st, now = os.fstat(fd), os.lstat(path)
        except OSError:
            os.close(fd)
            continue
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)  # removed by a cleaner that took it for stale before we locked it
    raise Qcow2Error(f"Could not create '{output}': its temporary file keeps being removed")


def _renamed(exc: Qcow2Error, path: str, output: str) -> Qcow2Error:
    """The error with the output's name where it names the temporary file."""
    from .errors import Qcow2IOError

    msg = exc.args[-1] if exc.args and isinstance(exc.args[-1], str) else str(exc)
    if path not in msg:
        return exc
    msg = msg.replace(path, output)
    if isinstance(exc, Qcow2IOError):
        return Qcow2IOError(exc.errno or errno.EIO, msg)
    try:
        return type(exc)(msg)
    except TypeError:
        return Qcow2Error(msg)


def _publish(path: str, output: str) -> None:
    """Rename the finished (and flushed) output to its name, durably: the directory
    entry is synced too."""
    from .storage import sync_directory

    try:
        os.replace(path, output)
    except OSError as exc:
        raise Qcow2Error(f"Could not create '{output}': {exc.strerror}") from None
    sync_directory(os.path.dirname(output))


@contextlib.contextmanager
def _progress(total: int, show: bool) -> Iterator[Any]:
    """qemu-img convert -p's progress lines on stdout (progress.py: programs parse them),
    updated as the bytes are copied, or None."""
    if not show:
        yield None
        return
    from .progress import QemuProgress

    with QemuProgress(1.0, total) as bar:  # qemu-img convert's 1% step
        yield bar


def _remove(path: str) -> None:
    """A half-written new image is of no use to anyone."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _convert_fast(fast: fastconvert.Plan, output: str, grain: int, show: bool) -> int:
    """A plain convert (fastconvert.plan): the same output as the full path, with the
    same publishing (a temporary name, renamed once complete and synced)."""
    claim: int | None = None  # the temporary output's fd, held for its lock
    try:
        path = _temporary_name(output)
        remove_stale_temporaries(output)
        claim = _claim_temporary(path, output, fast.out_fmt)
        with _progress(fast.total, show) as bar:
            try:
                fastconvert.run(fast, path, grain, bar)
            except Qcow2Error as exc:
                raise _renamed(exc, path, output) from None
        _publish(path, output)
    except BaseException:
        if claim is not None:
            _remove(path)
        raise
    finally:
        if claim is not None:
            os.close(claim)
        fast.close()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    # qemu-img's checks, in its order
    if args.skip_broken_bitmaps and not args.bitmaps:
        raise InvalidArgumentError("Use of --skip-broken-bitmaps requires --bitmaps")
    if args.no_create and args.options:
        raise InvalidArgumentError("-o has no effect when skipping image creation")
    if args.target_is_zero and not args.no_create:
        raise InvalidArgumentError("--target-is-zero requires use of -n flag")
    grain = GRAIN if args.sparse is None else _sparse_size(args.sparse)
    threads = _parallel(args.parallel) if args.parallel is not None else None
    if len(args.files) < 2:
        raise InvalidArgumentError("Must specify image file name")
    out_fmt = args.out_fmt or "raw"  # qemu-img convert's default
    if out_fmt not in FORMATS:
        raise InvalidArgumentError(f"Unknown file format '{out_fmt}'")
    if args.compress and out_fmt != "qcow2":
        raise InvalidArgumentError("Compression not supported for this file format")
    if args.compress and args.no_create and not args.target_is_zero:
        raise InvalidArgumentError("Compression needs a new target image (not -n) or "
                                   "--target-is-zero: compressed clusters are written only "
                                   "where there is no data yet")
    if args.fmt is not None and args.fmt not in FORMATS:
        raise InvalidArgumentError(f"Unknown file format '{args.fmt}'")
    *inputs, output = args.files
    snapshot = args.snapshot_param if args.snapshot_param is not None else args.snapshot
    if args.bitmaps and len(inputs) > 1:
        raise InvalidArgumentError("Copying bitmaps only possible with single source")
    if args.bitmaps and out_fmt != "qcow2":
        raise InvalidArgumentError(f"Format driver '{out_fmt}' does not support bitmaps")
    if snapshot is not None and len(inputs) > 1:
        raise InvalidArgumentError("No support for concatenating multiple snapshot")
    if args.snapshots:
        if snapshot is not None:
            raise InvalidArgumentError("--snapshots copies every snapshot: it cannot be used with -l/-s")
        if len(inputs) > 1:
            raise InvalidArgumentError("--snapshots needs a single source")
        if out_fmt != "qcow2":
            raise InvalidArgumentError("--snapshots needs qcow2 output (-O qcow2)")
        if args.no_create:
            raise InvalidArgumentError("--snapshots needs a new target image (not -n)")
    stream = output == "-"
    if stream and args.no_create:
        raise InvalidArgumentError("-n cannot write to standard output")
    if stream and sys.stdout.isatty():
        raise InvalidArgumentError("Standard output is a terminal: redirect it to a file or a pipe")
    if stream and (args.snapshots or args.bitmaps):
        raise InvalidArgumentError("--snapshots and --bitmaps cannot write to standard output")
    if output in inputs:
        raise InvalidArgumentError(f"Output '{output}' is also an input")
    if not (stream or args.no_create or args.compress or args.snapshots or args.bitmaps
            or snapshot is not None):
        fast = fastconvert.plan(inputs, args.fmt, out_fmt, args.options)
        if fast is not None:
            return _convert_fast(fast, output, grain, args.progress and not args.quiet)
    from .convertfull import (
        Source,
        _Target,
        check_bitmaps,
        check_snapshots,
        copy,
        copy_bitmaps,
        copy_with_snapshots,
    )

    sources: list[Source] = []
    created = False
    claim: int | None = None  # the temporary output's fd, held for its lock
    try:
        for path in inputs:
            sources.append(Source(path, args.fmt, snapshot))
        if args.bitmaps:
            check_bitmaps(sources[0], args.skip_broken_bitmaps)
        if args.snapshots:
            check_snapshots(sources[0])
        size = sum(s.size for s in sources)
        if stream:
            from .stream import stream_convert

            try:
                stream_convert(sources, sys.stdout.buffer, out_fmt, args.options,
                               args.compress, grain, threads)
            except BaseException:
                # what is buffered cannot go out either: point stdout at /dev/null so
                # that the interpreter's last flush does not fail a second time
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
                raise
            return 0
        create = not args.no_create
        # a new output is written under a temporary name next to it and renamed at the
        # end: a crash never leaves a partial image under the output's name
        path = _temporary_name(output) if create else output
        if create:
            remove_stale_temporaries(output)
            claim = _claim_temporary(path, output, out_fmt)
        created = create
        try:
            target = _Target(path, out_fmt, size, create, args.options, args.compress, threads)
        except Qcow2Error as exc:
            raise _renamed(exc, path, output) from None
        try:
            states = len(sources[0].img.snapshots) + 1 if args.snapshots else 1
            with _progress(size * states, args.progress and not args.quiet) as bar:
                if args.snapshots:
                    copy_with_snapshots(sources[0], target, progress=bar, grain=grain)
                else:
                    copy(sources, target, zero_target=create or args.target_is_zero,
                         progress=bar, grain=grain)
            if args.bitmaps:  # after the data, which would mark them
                copy_bitmaps(sources[0], target.img, args.skip_broken_bitmaps)
            target.finish()
        finally:
            target.close()
        if create:
            _publish(path, output)
    except BaseException:
        if created:
            _remove(path)
        raise
    finally:
        if claim is not None:
            os.close(claim)
        for s in sources:
            s.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("convert", help="copy images into a new qcow2 or raw image",
                       description="Convert (copy) the concatenated guest content of the input "
                       "images into OUTPUT, like `qemu-img convert`. Zero areas are not written. "
                       "OUTPUT '-' writes the image to standard output, strictly sequentially "
                       "(a pipe will do). A new OUTPUT is written under a temporary name and "
                       "renamed when complete: a failed or crashed convert leaves no partial "
                       "OUTPUT (the next convert to OUTPUT removes the temporary file "
                       ".OUTPUT.convert-PID of a convert that was killed).")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="input format (qcow2 or raw; probed)")
    p.add_argument("-O", dest="out_fmt", metavar="FMT", help="output format (raw, default, or qcow2)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="qcow2 creation options, as for create")
    p.add_argument("-l", dest="snapshot_param", metavar="SNAPSHOT",
                   help="copy this internal snapshot: snapshot.name=NAME, snapshot.id=ID or ID_OR_NAME")
    p.add_argument("-s", dest="snapshot", metavar="SNAPSHOT", help="the same as -l ID_OR_NAME")
    p.add_argument("--snapshots", action="store_true",
                   help="qcow2 to qcow2: copy every internal snapshot too (ids, names, dates, "
                   "clocks, VM state), keeping the data they share shared")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="write into an existing OUTPUT (not assumed to be zeroed)")
    p.add_argument("--target-is-zero", action="store_true",
                   help="with -n: the existing OUTPUT reads as zeros, zero areas are not written")
    p.add_argument("-S", dest="sparse", metavar="SPARSE_SIZE",
                   help="zero detection unit (default 4k; a multiple of 512 up to 16M; "
                   "0: no sparse detection, everything is written as data)")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="write compressed clusters (qcow2 output; compression_type in -o), "
                   "compressed in a thread pool")
    p.add_argument("-m", dest="parallel", metavar="NUM",
                   help="with -c: compression threads (1 to 16; default: the CPUs); otherwise "
                   "accepted and ignored (qemu-img's coroutines: our copy is sequential)")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="accepted, no effect (qemu-img's out-of-order writes: ours are in order)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("--bitmaps", action="store_true",
                   help="copy the persistent dirty bitmaps too (qcow2 to qcow2)")
    p.add_argument("--skip-broken-bitmaps", action="store_true",
                   help="with --bitmaps: skip inconsistent bitmaps instead of failing")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("files", metavar="FILE", nargs="*", help="input images, then OUTPUT")
    p.set_defaults(func=cmd_convert)
