"""Changing the virtual size of a qcow2 image or a raw file (`qemu-img resize`).

Growing a qcow2 image moves the L1 table to a larger home when the new size needs more
entries (the new table is durable before the header points at it), then switches the
size with one header write. What the guest sees past the old end reads as zeros at
every point a crash could leave: the tail of a partly used last cluster and, when the
backing file is longer than the old size, the backing data behind the new range are
zeroed *before* the size switch (they lie past the guest end until then, invisible).

Shrinking (only with shrink=True, as qemu-img wants --shrink) discards every cluster
past the new end, drops the L2 tables wholly past it, makes that durable, and only then
writes the smaller size: a crash in between leaves the old size with zeros past the new
end, never a short image that still points at freed clusters.

Preallocation (metadata, falloc, full) of the grown range happens after the switch, as
a normal allocating operation: a crash leaves part of it preallocated, all of it zeros.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .commands import INT64_MAX, SizeRangeError, parse_size
from .errors import InvalidArgumentError, Qcow2Error, UnsupportedFeatureError

PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def resize(path: str | os.PathLike[str], size: int, *, shrink: bool = False,
           preallocation: str = "off", fmt: str | None = None) -> None:
    """Resize the image at path (qcow2, or a raw file) to size bytes. Shrinking needs
    shrink=True; preallocation applies to the grown range only."""
    from .backing import probe_format

    path = os.fspath(path)
    if preallocation not in PREALLOC_MODES:
        raise InvalidArgumentError(f"Invalid preallocation mode '{preallocation}'")
    if not os.path.exists(path):
        raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                         "No such file or directory")
    fmt = fmt or probe_format(path, what="image")
    if fmt == "raw":
        _check_request(os.path.getsize(path), size, shrink, preallocation)
        resize_raw(path, size, preallocation)
        return
    if fmt != "qcow2":
        raise InvalidArgumentError(f"Unknown file format '{fmt}'")
    from .image import open_image as qopen

    with qopen(path, "r+") as img:
        resize_image(img, size, shrink=shrink, preallocation=preallocation)


def _check_request(current: int, size: int, shrink: bool, preallocation: str) -> None:
    """qemu-img's own refusals, in its order."""
    if size <= 0:
        raise InvalidArgumentError("New image size must be positive")
    if size < current and preallocation != "off":
        raise InvalidArgumentError("Preallocation can only be used for growing images")
    if size < current and not shrink:
        raise InvalidArgumentError("Use the --shrink option to perform a shrink operation.")


def resize_raw(path: str, size: int, preallocation: str = "off") -> None:
    """Truncate or extend a raw file; falloc/full allocate the grown range."""
    if preallocation == "metadata":
        raise UnsupportedFeatureError("Unsupported preallocation mode: metadata")
    from .create import _fallocate, _write_zeros
    from .storage import FileBackend, Storage

    try:
        st = Storage(FileBackend(path, writable=True), writable=True)
    except OSError as exc:
        raise Qcow2Error(f"Could not open '{path}': {exc.strerror}") from exc
    try:
        old = st.size()
        st.truncate(size)
        if size > old and preallocation == "falloc":
            _fallocate(st, old, size - old)
        elif size > old and preallocation == "full":
            _write_zeros(st, old, size - old)
        st.sync()
    finally:
        st.close()


def resize_image(img: Any, size: int, *, shrink: bool = False,
                 preallocation: str = "off") -> None:
    """Resize an open, writable qcow2 Image to size bytes."""
    img._check_writable()
    old = img.size // 512 * 512  # the size qemu-img sees (whole sectors)
    if preallocation not in PREALLOC_MODES:
        raise InvalidArgumentError(f"Invalid preallocation mode '{preallocation}'")
    _check_request(old, size, shrink, preallocation)
    if size % 512:
        raise InvalidArgumentError("The new size must be a multiple of 512")
    if img.header.nb_snapshots and img.header.version < 3:
        # v2 snapshot entries do not record their disk size: a resize would change it
        raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots")
    if size > INT64_MAX:
        raise InvalidArgumentError("The image size is too large")
    if size == img.size:
        return
    img.flush()
    from .dirtybitmaps import rewriting  # the bitmaps follow the size (as QEMU: no bits set)

    with rewriting(img, size):
        if size < img.size:
            _shrink(img, size)
        else:
            _grow(img, size, preallocation)


# ------------------------------------------------------------------ shrinking --
def _shrink(img: Any, size: int) -> None:
    import numpy as np

    from .format import L1E_OFFSET_MASK

    geo = img.geo
    cs = geo.cluster_size
    cmap = img.clusters
    rc = img.refcounts
    end_c = -(-size // cs)
    if size % cs and _stored(cmap, size // cs):
        # the part of the last cluster past the new end: zeros, so that a later grow
        # shows zeros there (QEMU leaves the old bytes)
        img.write_zeroes(size, min(end_c * cs, img.size) - size)
    keep_l1 = geo.l1_size_for(size)
    per = geo.l2_entries
    step = 2 if geo.extended_l2 else 1
    # the L2 table that holds the new end: clear its entries past it
    if end_c < keep_l1 * per:
        table = cmap.l2_table(end_c // per)
        if table is not None:
            base = (end_c // per) * per
            entries = table[0::step][end_c - base:] if step == 2 else table[end_c - base:]
            bitmaps = table[1::2][end_c - base:] if step == 2 else None
            used = entries != 0
            if bitmaps is not None:
                used |= bitmaps != 0
            for i in np.flatnonzero(used).tolist():
                entry, _bitmap = cmap.get(end_c + i)
                cmap.set(end_c + i, 0, 0)
                if entry:
                    img._release_entry(entry)
    # L2 tables wholly past the new end: dropped from the L1 table
    for l1i in range(keep_l1, len(cmap.l1)):
        if not int(cmap.l1[l1i]) & L1E_OFFSET_MASK:
            continue
        off = cmap.l2_offset(l1i)  # validated
        # every cluster reachable through this L1 entry loses the active image's
        # reference (also when the table is shared with a snapshot: refcounts count
        # the L1 tables that reach a cluster, as snapshot deletion assumes)
        table = cmap.l2cache.get(off)
        entries = table[0::step] if step == 2 else table
        for e in entries[entries != 0].tolist():
            img._release_entry(int(e))
        cmap.l1[l1i] = 0
        cmap.mark_l1_dirty(l1i)
        cmap.l2cache.discard(off)
        rc.release(off)
    img.flush()  # the discards are durable before the size says they are past the end
    img._update_header(size=size)


# ------------------------------------------------------------------ growing --
@contextmanager
def _widened(img: Any, size: int) -> Iterator[None]:
    """Let writes reach [old size, size) before the header says so: the in-memory size
    is widened, and any header written meanwhile (a refcount table move) keeps the old
    size on disk."""
    real = img.header.size
    orig = img._update_header

    def update(**changes: Any) -> None:
        wide = img.header
        img.header = wide.with_(size=real)
        try:
            orig(**changes)
        finally:
            img.header = img.header.with_(size=size)

    img._update_header = update
    img.header = img.header.with_(size=size)
    try:
        yield
        img.flush()
    finally:
        img.header = img.header.with_(size=real)
        del img._update_header


def _grow(img: Any, size: int, preallocation: str) -> None:
    from .mapping import guest_size

    geo = img.geo
    cs = geo.cluster_size
    cmap = img.clusters
    old = img.size
    need_l1 = geo.l1_size_for(size)
    if need_l1 * 8 > 32 * 1024 * 1024:
        raise InvalidArgumentError("The image size is too large for this cluster size "
                                   "(L1 table limit)")
    if need_l1 > len(cmap.l1):
        cmap.grow_l1(need_l1, img._l1_moved)
    # what would show through in [old, size) once the size switches: backing data
    # (backing file longer than the old size), old bytes in the last cluster's tail
    backing_end = min(size, guest_size(img.backing)) if img.backing is not None else 0
    tail_end = min(size, -(-old // cs) * cs)
    zero_to = max(backing_end, tail_end if old % cs else old)
    if old % cs and backing_end <= old and not _stored(cmap, old // cs):
        zero_to = max(backing_end, old)  # nothing stored in the tail: it reads zeros
    if zero_to > old:
        with _widened(img, size):
            img.write_zeroes(old, zero_to - old)
    img._update_header(size=size)
    if preallocation != "off":
        _preallocate(img, old, size, preallocation)
        img.flush()


def _preallocate(img: Any, start: int, end: int, mode: str) -> None:
    """Allocate host clusters for the unallocated clusters of [start, end), their
    content zeros (written, fallocated or past the end of the file)."""
    import numpy as np

    from .create import _fallocate, _write_zeros
    from .format import QCOW_OFLAG_COPIED

    geo = img.geo
    cs = geo.cluster_size
    cmap = img.clusters
    rc = img.refcounts
    st = img.storage
    per = geo.l2_entries
    c = start // cs
    if start % cs and img.backing is not None and not geo.extended_l2:
        c += 1  # a zero cluster there would hide the backing data below the old end
    last = -(-end // cs)
    while c < last:
        stop = min(last, (c // per + 1) * per)
        free = [gc for gc in range(c, stop) if _unallocated(cmap, gc)]
        runs: list[list[int]] = []
        for gc in free:
            if runs and runs[-1][-1] == gc - 1:
                runs[-1].append(gc)
            else:
                runs.append([gc])
        for run in runs:
            n = len(run)
            file_end = st.size()
            host = rc.allocate(n)
            run_end = host + n * cs
            inside = max(0, min(run_end, file_end) - host)
            if inside:
                _write_zeros(st, host, inside)  # reused clusters may hold old data
            if run_end > file_end:
                past = max(host, file_end)
                if mode == "full":
                    _write_zeros(st, past, run_end - past)
                else:
                    st.truncate(run_end)
                    if mode == "falloc":
                        _fallocate(st, past, run_end - past)
            if geo.extended_l2:
                for i, gc in enumerate(run):
                    # allocated, every subcluster still unallocated (reads as zeros or
                    # the backing file), as QEMU preallocates extended L2 images
                    cmap.set(gc, (host + i * cs) | QCOW_OFLAG_COPIED, 0)
            else:
                hosts = np.uint64(host) + np.arange(n, dtype=np.uint64) * np.uint64(cs)
                cmap.set_run(run[0], hosts | np.uint64(QCOW_OFLAG_COPIED))
        c = stop


def _stored(cmap: Any, gc: int) -> bool:
    """Whether the cluster holds data of its own (not unallocated, not zero)."""
    from .cluster import NORMAL, UNALLOCATED, ZERO

    entry, bitmap = cmap.get(gc)
    kind = cmap.classify(entry)
    if cmap.geo.extended_l2 and kind != UNALLOCATED:
        return bool(bitmap & 0xFFFFFFFF) or kind != NORMAL  # allocated subclusters, compressed
    return kind not in (UNALLOCATED, ZERO)


def _unallocated(cmap: Any, gc: int) -> bool:
    from .cluster import UNALLOCATED

    entry, bitmap = cmap.get(gc)
    return cmap.classify(entry) == UNALLOCATED and not bitmap


# ------------------------------------------------------------------ CLI --
def parse_resize_size(text: str, current: int) -> int:
    """[+|-]SIZE as qemu-img resize reads it: relative to the current size with a sign;
    a result that does not fit in 63 bits comes out negative, as in qemu-img."""
    relative = 0
    body = text
    if text[:1] == "+":
        relative, body = 1, text[1:]
    elif text[:1] == "-":
        relative, body = -1, text[1:]
    try:
        n = parse_size(body)
    except SizeRangeError:
        raise InvalidArgumentError(f"Value '{body}' is out of range for parameter 'size'") \
            from None
    except ValueError:
        raise InvalidArgumentError(
            "Parameter 'size' expects a non-negative number below 2^64") from None
    total = current + relative * n if relative else n
    total &= (1 << 64) - 1
    return total - (1 << 64) if total >> 63 else total


def cmd_resize(args: argparse.Namespace) -> int:
    from .backing import probe_format

    if args.size is None:
        raise InvalidArgumentError("Not enough arguments")
    # qemu-img checks the options (while parsing them) before the file name count
    prealloc = "off" if args.preallocation is None else args.preallocation
    if prealloc not in PREALLOC_MODES:
        raise InvalidArgumentError(f"Invalid preallocation mode '{prealloc}'")
    if args.filename is None:
        raise InvalidArgumentError("Expecting image file name and size")
    path = args.filename
    if not os.path.exists(path):
        raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                         "No such file or directory")
    fmt = args.fmt or probe_format(path, what="image")
    if fmt not in ("qcow2", "raw"):
        raise InvalidArgumentError(f"Could not open '{path}': Unknown driver '{fmt}'")
    if fmt == "qcow2":
        from .errors import FormatError
        from .image import open_image as qopen

        try:
            img = qopen(path, "r+")
        except FormatError as exc:
            raise FormatError(f"Could not open '{path}': {exc}") from None
        with img:
            size = parse_resize_size(args.size, img.size // 512 * 512)
            resize_image(img, size, shrink=args.shrink, preallocation=prealloc)
    else:
        current = -(-os.path.getsize(path) // 512) * 512
        size = parse_resize_size(args.size, current)
        _check_request(current, size, args.shrink, prealloc)
        resize_raw(path, size, prealloc)
    if not args.quiet:
        print("Image resized.")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "resize", help="change the virtual size of an image",
        description="Grow or (with --shrink) shrink an image, as qemu-img resize does. "
        "SIZE may be relative: +SIZE or -SIZE.",
        usage="qcow2 resize [--shrink] [--preallocation=off|metadata|falloc|full] "
        "[-f qcow2|raw] [-q] FILE [+|-]SIZE")
    p.add_argument("--shrink", action="store_true", help="allow shrinking (data past the "
                   "new end is lost)")
    p.add_argument("--preallocation", metavar="MODE",
                   help="off (default), metadata, falloc or full, for the grown range")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (qcow2 or raw)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("filename", metavar="FILE", nargs="?")
    p.set_defaults(func=cmd_resize, size=None)
    plain = p.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        # as qemu-img: fewer than two arguments are not enough; else the last one is the
        # size, taken before the options are parsed, so that "-1G" is a size, not an
        # option, and "--preallocation FILE SIZE" takes FILE as the mode
        args = list(args or ())
        if "-h" in args or "--help" in args:
            return plain(args, namespace)
        if len(args) < 2:
            return plain([], namespace)
        ns, extra = plain(args[:-1], namespace)
        ns.size = args[-1]
        return ns, extra

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]
