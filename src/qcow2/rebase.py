"""Sub-commands rebase and commit: change an overlay's backing file (`qemu-img rebase`)
and write an overlay's data into its backing chain (`qemu-img commit`).

rebase, safe mode: where the overlay has no data of its own, the old and the new
backing chains are read a chunk at a time and compared with numpy at cluster
granularity; only the clusters that differ are copied into the overlay (zeros as zero
clusters), so the guest content stays the same. The copies are durable before the
header switch, which rewrites cluster 0 as amend does (old or new after a crash), and
they read the same under the old header. Unsafe mode (-u) only switches the header.
`-b ""` removes the backing file after copying everything it provided (flattening).

commit: every range the overlay holds (data or zeros) is written into the backing file
(or, with -b, into that image of the chain with the images between them too, as qemu-img
commit does); then, unless -d, the overlay's clusters are discarded so that it reads
through to the updated backing file again. A rate limit (-r, bytes per second) paces the
data written, as qemu-img's commit job does: data is copied in 512 KiB pieces and the
job sleeps until the bytes written so far fit the rate; ranges written as zeros do not
count (QEMU does not count efficient zero writes either).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from .errors import (
    BackingFileError,
    FormatError,
    InvalidArgumentError,
    Qcow2Error,
    UnsupportedFeatureError,
)

CHUNK = 4 << 20  # bytes compared or copied per step
COMMIT_PIECE = 512 << 10  # bytes copied between two rate checks (QEMU's commit buffer)
CACHE_MODES = ("none", "off", "writeback", "writethrough", "directsync", "unsafe")
Progress = Callable[[float], None]


class RateLimit:
    """Paces a copy to `rate` bytes per second (0: no limit). After each piece it sleeps
    until the time the bytes accounted so far are due at that rate; clock and sleep are
    injectable so that the pacing can be checked without waiting."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate < 0:
            raise InvalidArgumentError("Invalid rate limit specified. Must be between 0 "
                                       f"and {(1 << 63) - 1}.")
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.start: float | None = None
        self.done = 0

    def account(self, n: int) -> None:
        if not self.rate or n <= 0:
            return
        now = self.clock()
        if self.start is None:
            self.start = now
        self.done += n
        delay = self.start + self.done / self.rate - now
        if delay > 0:
            self.sleep(delay)

    def pieces(self, pos: int, n: int) -> Iterator[tuple[int, int]]:
        """[pos, pos + n) in pieces small enough to pace (whole when unlimited)."""
        step = COMMIT_PIECE if self.rate else max(1, n)
        for p in range(pos, pos + n, step):
            yield p, min(step, pos + n - p)


def _read(layer: Any, n: int, offset: int) -> bytes:
    """Guest bytes of a layer (an Image, a backing Readable or None), zeros past its end."""
    if layer is None:
        return bytes(n)
    from .mapping import guest_size

    size = guest_size(layer)
    m = max(0, min(n, size - offset))
    data = layer.pread(m, offset) if m else b""
    return data + bytes(n - m) if m < n else data


def _unallocated(img: Any, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """Ranges of [offset, offset + length) this layer leaves to its backing file."""
    from .cluster import UNALLOCATED

    run_start, run_end = -1, -1
    for guest, n, kind, _host in img.block_status(offset, length):
        if kind == UNALLOCATED:
            if guest == run_end:
                run_end += n
                continue
            if run_start >= 0:
                yield run_start, run_end - run_start
            run_start, run_end = guest, guest + n
    if run_start >= 0:
        yield run_start, run_end - run_start


# ------------------------------------------------------------------ rebase --
def rebase(path: str | os.PathLike[str], backing_file: str, backing_format: str | None = None,
           *, unsafe: bool = False, progress: Progress | None = None) -> None:
    """Make backing_file (a name as stored in the header; "" for none) the backing file
    of the qcow2 image at path. Safe mode keeps the guest content unchanged."""
    from .image import open_image as qopen

    path = os.fspath(path)
    if backing_format is not None and backing_format not in ("qcow2", "raw"):
        raise InvalidArgumentError(f"Invalid format name: '{backing_format}'")
    if backing_file and backing_format is None:
        raise InvalidArgumentError(f"Could not change the backing file to '{backing_file}': "
                                   "backing format must be specified")
    with qopen(path, "r+", backing=not unsafe) as img:
        rebase_image(img, backing_file, backing_format, unsafe=unsafe, progress=progress)
    if progress:
        progress(100.0)


def rebase_image(img: Any, backing_file: str, backing_format: str | None, *,
                 unsafe: bool = False, progress: Progress | None = None) -> None:
    """rebase() on an open, writable image; afterwards the image reads through its new
    backing file (unsafe mode: when that can be opened)."""
    if backing_file and backing_format is None:
        raise InvalidArgumentError(f"Could not change the backing file to '{backing_file}': "
                                   "backing format must be specified")
    new = None
    if not unsafe:
        new = _open_new_backing(img.path, backing_file, backing_format)
    try:
        if not unsafe:
            _copy_differences(img, new, progress)
        set_backing(img, backing_file or None, backing_format if backing_file else None)
    except BaseException:
        if new is not None:
            new.close()
        raise
    if unsafe and backing_file:
        try:
            new = _open_new_backing(img.path, backing_file, backing_format)
        except Qcow2Error:
            new = None  # (unsafe: the new backing file need not exist yet)
    old, img.backing = img.backing, new
    if old is not None:
        old.close()


def _open_new_backing(path: str, name: str, fmt: str | None) -> Any:
    from .backing import open_backing
    from .image import open_backing_image

    if not name:
        return None
    from .backing import resolve_backing_name

    full = resolve_backing_name(path, name)
    if not os.path.exists(full):
        # the name as QEMU combines it with the image name as given
        shown = name if os.path.isabs(name) or "/" not in path else \
            path[: path.rindex("/") + 1] + name
        raise BackingFileError(f"Could not open new backing file '{name}': Could not open "
                               f"'{shown}': No such file or directory")
    try:
        return open_backing(path, name, fmt, (os.path.realpath(path),), open_backing_image)
    except BackingFileError as exc:
        msg = str(exc).removeprefix("Could not open backing file: ")
        if "loop" in msg:
            msg = "the image would be its own backing file"
        raise BackingFileError(f"Could not open new backing file '{name}': {msg}") from None


def _copy_differences(img: Any, new: Any, progress: Progress | None) -> int:
    """Copy into img the clusters it leaves to its backing chain where the old chain
    and `new` differ. Returns the number of bytes copied."""
    import numpy as np

    old = img.backing
    size = img.size
    unit = img.geo.subcluster_size  # the allocation granularity of the overlay
    copied = 0
    for start, length in list(_unallocated(img, 0, size)):
        pos = start
        end = start + length
        while pos < end:
            n = min(CHUNK, end - pos)
            a = _read(old, n, pos)
            b = _read(new, n, pos)
            if a != b:
                # which allocation units differ (the piece's first and last may be partial)
                lead = pos % unit
                pad_a = np.frombuffer(bytes(lead) + a + bytes(-(lead + n) % unit), dtype=np.uint8)
                pad_b = np.frombuffer(bytes(lead) + b + bytes(-(lead + n) % unit), dtype=np.uint8)
                diff = (pad_a != pad_b).reshape(-1, unit).any(axis=1)
                base = pos - lead
                for i0, i1 in _true_runs(diff):
                    s = max(pos, base + i0 * unit)
                    e = min(pos + n, base + i1 * unit)
                    chunk = a[s - pos : e - pos]
                    if chunk.count(0) == len(chunk):
                        img.write_zeroes(s, e - s)
                    else:
                        img.pwrite(chunk, s)
                    copied += e - s
            pos += n
            if progress:
                progress(100.0 * pos / max(1, size))
    img.flush()
    return copied


def _true_runs(mask: Any) -> Iterator[tuple[int, int]]:
    import numpy as np

    m = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(m[1:] != m[:-1])
    yield from zip(edges[0::2].tolist(), edges[1::2].tolist())


def set_backing(img: Any, backing_file: str | None, backing_format: str | None) -> None:
    """Switch the backing file name and format in the header (crash-atomic)."""
    from .amend import _switch_cluster0
    from .format import ImageLayout

    if backing_file is not None and backing_format is None:
        raise InvalidArgumentError("backing format must be specified")
    layout = ImageLayout(**{**img.layout.__dict__, "backing_file": backing_file,
                            "backing_format": backing_format})
    _switch_cluster0(img, layout)


# ------------------------------------------------------------------ commit --
def commit(path: str | os.PathLike[str], base: str | None = None, *, drop: bool = False,
           progress: Progress | None = None, rate: int | RateLimit = 0) -> None:
    """Write the data of the qcow2 overlay at path into its backing file (or into the
    chain down to `base`, a path or backing file name). Unless drop, the overlay is
    emptied afterwards (it then reads its backing file again); a base implies drop, as
    in qemu-img (emptying the top would expose the older data of the images between).
    rate: at most that many bytes of data per second (0: unlimited), or a RateLimit (for
    its clock and sleep)."""
    from .image import open_image as qopen

    limit = rate if isinstance(rate, RateLimit) else RateLimit(rate)
    drop = drop or base is not None
    path = os.fspath(path)
    with qopen(path, "r+") as img:
        if img.backing is None:
            raise InvalidArgumentError("Image does not have a backing file")
        chain = [img.backing]
        while base is not None and not _is(chain[-1], base, path):
            nxt = getattr(chain[-1], "backing", None)
            if nxt is None:
                raise InvalidArgumentError(
                    f"Did not find '{base}' in the backing chain of '{path}'")
            chain.append(nxt)
        target = chain[-1]
        tpath = target.path if hasattr(target, "path") else target.filename
        _commit_into(img, chain, tpath, progress, limit)
        if not drop:
            _empty(img)
    if progress:
        progress(100.0)


def _is(layer: Any, base: str, top: str) -> bool:
    lp = getattr(layer, "path", None) or getattr(layer, "filename", None)
    cand = base if os.path.isabs(base) else os.path.join(os.path.dirname(os.path.abspath(top)), base)
    return lp is not None and (os.path.realpath(lp) == os.path.realpath(cand)
                               or os.path.realpath(lp) == os.path.realpath(base))


def _commit_into(img: Any, chain: list[Any], tpath: str, progress: Progress | None,
                 limit: RateLimit) -> None:
    """Write what img and the images above the target provide into the target."""
    from .backing import RawFile
    from .image import open_image as qopen
    from .mapping import guest_size

    target = chain[-1]
    size = guest_size(img)
    # the ranges the target does not decide: everything some layer above it holds
    if isinstance(target, RawFile):
        _commit_raw(img, tpath, size, progress, limit)
        return
    if guest_size(target) < size:
        # as qemu-img's commit job: the base grows to the overlay's size first (a resize
        # of its own, crash-safe; what lies past the old end reads as zeros until written)
        from .resize import resize

        resize(tpath, size, fmt="qcow2")
    with qopen(tpath, "r+", backing=True) as out:
        for span, length in _provided(img, chain[:-1], size):
            for pos, n in limit.pieces(span, length):
                data = img.pread(n, pos)
                if data.count(0) == len(data):
                    out.write_zeroes(pos, n)
                else:
                    out.pwrite(data, pos)
                    limit.account(n)
            if progress:
                progress(100.0 * (span + length) / max(1, size))
        out.flush()


def _commit_raw(img: Any, tpath: str, size: int, progress: Progress | None,
                limit: RateLimit) -> None:
    from .storage import FileBackend, Storage

    st = Storage(FileBackend(tpath, writable=True), writable=True)
    try:
        if st.size() < size:  # grown to the overlay's size first, as qemu-img does
            st.truncate(size)
        for span, length in _provided(img, [], size):
            for pos, n in limit.pieces(span, length):
                data = img.pread(n, pos)
                st.pwrite(data, pos, "data")
                if data.count(0) != len(data):
                    limit.account(n)
            if progress:
                progress(100.0 * (span + length) / max(1, size))
        st.sync()
    finally:
        st.close()


def _provided(img: Any, between: list[Any], size: int) -> Iterator[tuple[int, int]]:
    """Chunks of [0, size) that img or an image in `between` holds (not left below)."""
    from .cluster import UNALLOCATED

    layers = [img, *between]
    step = CHUNK
    for pos in range(0, size, step):
        n = min(step, size - pos)
        spans: list[tuple[int, int]] = []
        for layer in layers:
            if not hasattr(layer, "block_status"):
                continue
            lsize = min(n, max(0, layer.size - pos))
            for guest, m, kind, _h in (layer.block_status(pos, lsize) if lsize else ()):
                if kind != UNALLOCATED:
                    spans.append((guest, guest + m))
        for s, e in _merge(spans):
            yield s, e - s


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _empty(img: Any) -> None:
    """Drop every cluster of the overlay (as qemu-img commit empties it): it reads its
    backing file again. Data clusters become unallocated (zeros only where v2 cannot
    express unallocated under a backing file: there nothing is dropped)."""
    from .cluster import UNALLOCATED

    cmap = img.clusters
    cs = img.geo.cluster_size
    img.flush()
    for c in range(-(-img.size // cs)):
        entry, bitmap = cmap.get(c)
        if cmap.classify(entry) == UNALLOCATED and not bitmap:
            continue
        cmap.set(c, 0, 0)
        if entry:
            img._release_entry(entry)
    img.flush()


# ------------------------------------------------------------------ CLI --
def _printer(show: bool, min_skip: float) -> Any:
    """qemu-img's -p lines (progress.py), with its step for the command, or nothing."""
    from .progress import QemuProgress

    return QemuProgress(min_skip) if show else contextlib.nullcontext()


def _open_check(path: str, fmt: str | None, what: str) -> None:
    if not os.path.exists(path):
        raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                         "No such file or directory")
    with open(path, "rb") as f:
        qcow2 = f.read(4) == b"QFI\xfb"
    if (fmt or ("qcow2" if qcow2 else "raw")) != "qcow2":
        raise UnsupportedFeatureError(what)


def cmd_rebase(args: argparse.Namespace) -> int:
    # qemu-img's order: the file count, -b, then the cache modes, before opening anything
    if len(args.filename) != 1:
        raise InvalidArgumentError("Expecting one image file name")
    if args.backing is None and not args.unsafe:
        raise InvalidArgumentError("Must specify backing file (-b) or use unsafe mode (-u)")
    if args.cache is not None and args.cache not in CACHE_MODES:
        raise InvalidArgumentError(f"Invalid cache option: {args.cache}")
    if args.src_cache is not None and args.src_cache not in CACHE_MODES:
        raise InvalidArgumentError(f"Invalid source cache option: {args.src_cache}")
    args.filename = args.filename[0]
    backing = args.backing or ""
    if args.backing_fmt is not None and args.backing_fmt not in ("qcow2", "raw"):
        raise InvalidArgumentError(f"Invalid format name: '{args.backing_fmt}'")
    _open_check(args.filename, args.fmt,
                f"Could not change the backing file to '{backing}': Operation not supported")
    if backing and args.backing_fmt is None:
        raise InvalidArgumentError(f"Could not change the backing file to '{backing}': "
                                   "backing format must be specified")
    with _printer(args.progress and not args.quiet, 2.0) as progress:  # qemu-img's 2% step
        rebase(args.filename, backing, args.backing_fmt, unsafe=args.unsafe, progress=progress)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from .commands import _map_number

    if len(args.filename) != 1:
        raise InvalidArgumentError("Expecting one image file name")
    filename = args.filename[0]
    # qemu-img checks its options in this order before it opens the image
    rate = _map_number("rate limit", args.rate, 0)
    if args.cache is not None and args.cache not in CACHE_MODES:
        raise InvalidArgumentError(f"Invalid cache option: {args.cache}")
    if args.fmt is not None and args.fmt not in ("qcow2", "raw"):
        raise InvalidArgumentError(f"Could not open '{filename}': Unknown driver '{args.fmt}'")
    _open_check(filename, "qcow2", "")  # a missing file: qemu-img's message
    with open(filename, "rb") as f:
        is_qcow2 = f.read(4) == b"QFI\xfb"
    if args.fmt == "qcow2" and not is_qcow2:
        raise FormatError(f"Could not open '{filename}': Image is not in qcow2 format")
    if args.fmt == "raw" or not is_qcow2:  # raw has no backing file to commit into
        raise UnsupportedFeatureError("Image does not have a backing file")
    with _printer(args.progress and not args.quiet, 1.0) as progress:  # qemu-img's 1% step
        commit(filename, args.base, drop=args.drop, progress=progress, rate=rate)
    if not args.quiet:
        print("Image committed.")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "rebase", help="change the backing file of an image",
        description="Change the backing file (qemu-img rebase). Safe mode copies the "
        "clusters where the old and the new backing chains differ; -u only rewrites the "
        "header; -b \"\" removes the backing file.",
        usage="qcow2 rebase [-f qcow2] [-p] [-q] [-u] -b BACKING [-F FMT] FILE")
    p.add_argument("-b", dest="backing", metavar="BACKING")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("-u", dest="unsafe", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-t", dest="cache", help=argparse.SUPPRESS)
    p.add_argument("-T", dest="src_cache", help=argparse.SUPPRESS)
    p.add_argument("filename", metavar="FILE", nargs="*")
    p.set_defaults(func=cmd_rebase)

    p = sub.add_parser(
        "commit", help="write an overlay's data into its backing file",
        description="Commit the changes of an overlay into its backing file (qemu-img "
        "commit); the overlay is emptied unless -d.",
        usage="qcow2 commit [-f qcow2] [-t CACHE] [-b BASE] [-d] [-p] [-q] [-r RATE] FILE")
    p.add_argument("-b", dest="base", metavar="BASE")
    p.add_argument("-d", dest="drop", action="store_true", help="do not empty the overlay")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-r", dest="rate", metavar="RATE",
                   help="rate limit in bytes per second (suffixes k, M, G, ...; 0: none)")
    p.add_argument("-t", dest="cache", metavar="CACHE",
                   help="cache mode (accepted: none, writeback, writethrough, directsync, unsafe)")
    p.add_argument("filename", metavar="FILE", nargs="*")
    p.set_defaults(func=cmd_commit)
