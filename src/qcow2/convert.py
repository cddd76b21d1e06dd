"""Sub-command convert: copy the guest content of one or more images (qcow2 or raw,
concatenated) into a new qcow2 or raw image, as `qemu-img convert` does.

Zero areas (4 KiB grains, qemu-img's default -S) are not written: they stay unallocated
in a qcow2 target and holes in a raw one; source ranges that the qcow2 metadata already
says read as zeros are not even read. With -c every qcow2 cluster that holds data is
written compressed (or plain, if it does not compress). With -n the target exists
already and is not assumed to be zeroed: zero areas are written as zeros. The output is
flushed to the disk at the end (qemu-img's default cache mode for convert, unsafe, skips
that; a copy that may vanish in a power cut is no copy).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from .backing import RawFile, probe_format
from .cluster import UNALLOCATED, ZERO, entry_runs
from .errors import InvalidArgumentError, Qcow2Error, SnapshotNotFoundError

CHUNK = 2 << 20  # bytes copied per step
GRAIN = 4096  # zero detection granularity (qemu-img convert -S default)
FORMATS = ("qcow2", "raw")


class Source:
    """One input: a qcow2 image (or one of its snapshots) or a raw file."""

    def __init__(self, path: str, fmt: str | None, snapshot: str | None) -> None:
        from .image import open_image as qopen

        if not os.path.exists(path):
            raise Qcow2Error(f"Could not open '{path}': No such file or directory")
        fmt = fmt or probe_format(path, what="image")
        if fmt not in FORMATS:
            raise InvalidArgumentError(f"Unknown file format '{fmt}'")
        self.raw: RawFile | None = None
        self.img: Any = None
        self.view: Any = None
        if fmt == "raw":
            if snapshot is not None:
                raise InvalidArgumentError("Failed to load snapshot: raw images have no snapshots")
            self.raw = RawFile(path)
            self.size = self.raw.size
            return
        self.img = qopen(path)
        try:
            self.view = self.img if snapshot is None else _snapshot_view(self.img, snapshot)
        except BaseException:
            self.img.close()
            raise
        self.size = self.view.size

    def readinto(self, buf: memoryview, offset: int) -> None:
        (self.raw if self.raw is not None else self.view).readinto(buf, offset)

    def known_zero(self, offset: int, n: int) -> bool:
        """Whether the metadata alone says [offset, offset + n) reads as zeros: the
        qcow2 block status, or for a raw file the file system's holes (SEEK_DATA)."""
        if self.raw is not None:
            return _raw_hole(self.raw.fd, offset, n)
        if self.view is None:
            return False
        return _layer_zero(self.view, self.img.backing, offset, n)

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
        if self.img is not None:
            self.img.close()


def _layer_zero(layer: Any, backing: Any, offset: int, n: int) -> bool:
    """Whether a qcow2 layer's block status (and below unallocated parts, its backing
    chain's) says [offset, offset + n) reads as zeros."""
    for guest, length, kind in _status(layer, offset, n):
        if kind == ZERO:
            continue
        if kind != UNALLOCATED:
            return False
        if backing is None or guest >= backing.size:
            continue  # nothing below, or past the end of the backing file: zeros
        k = min(length, backing.size - guest)
        if isinstance(backing, RawFile):
            if not _raw_hole(backing.fd, guest, k):
                return False
        elif not _layer_zero(backing, backing.backing, guest, k):
            return False
    return True


def _status(layer: Any, offset: int, n: int) -> Iterator[tuple[int, int, int]]:
    """(guest offset, length, kind) of a layer: from the L2 tables with numpy where the
    entries are standard ones, else from its block status."""
    cmap = getattr(layer, "clusters", None)
    if cmap is None or cmap.geo.extended_l2:
        for guest, length, kind, _host in layer.block_status(offset, n):
            yield guest, length, kind
        return
    cbits = cmap.geo.cluster_bits
    end = offset + n
    for c, k, kind, _host in entry_runs(cmap, offset >> cbits, ((end - 1) >> cbits) + 1):
        s, e = max(c << cbits, offset), min((c + k) << cbits, end)
        yield s, e - s, kind


def _raw_hole(fd: int, offset: int, n: int) -> bool:
    """Whether [offset, offset + n) of a raw file is one hole (or past its end): no data
    from offset on before offset + n. Where SEEK_DATA is unknown, nothing is a hole."""
    seek_data = getattr(os, "SEEK_DATA", None)
    if seek_data is None:
        return False
    try:
        return os.lseek(fd, offset, seek_data) >= offset + n
    except OSError as exc:
        # ENXIO: no data at or after offset (the rest of the file is a hole)
        return exc.errno == errno.ENXIO


def _snapshot_view(img: Any, param: str) -> Any:
    """-l snapshot.name=NAME / snapshot.id=ID (both may be given) or -l/-s ID_OR_NAME."""
    want: dict[str, str] = {}
    if param.startswith("snapshot."):
        for item in param.split(","):
            key, sep, value = item.partition("=")
            if not sep or key not in ("snapshot.name", "snapshot.id"):
                raise InvalidArgumentError(f"Invalid snapshot parameter '{item}'")
            want[key.removeprefix("snapshot.")] = value
    for e in img.snapshots:
        if want:
            if all(getattr(e, k) == v for k, v in want.items()):
                return img.snapshot(e.id)
        elif param in (e.id, e.name):
            return img.snapshot(param)
    raise SnapshotNotFoundError("Failed to load snapshot: Can't find snapshot")


class _Target:
    """The output: an open qcow2 image, or a raw file written through the storage layer."""

    def __init__(self, path: str, fmt: str, size: int, create: bool, options: list[str],
                 compress: bool = False) -> None:
        from .image import open_image as qopen
        from .storage import FileBackend, Storage

        self.img: Any = None
        self.raw: Any = None
        # with compress: the cluster being gathered (guest offset, bytes) before it is
        # written compressed in one piece
        self.compress = compress
        self._cluster: tuple[int, bytearray] | None = None
        if not create and not os.path.exists(path):
            raise Qcow2Error(f"Could not open '{path}': No such file or directory")
        if fmt == "qcow2":
            if create:
                _create_qcow2(path, size, options)
            self.img = qopen(path, "r+")
            have = self.img.size
        else:
            if create and options:
                raise InvalidArgumentError("raw output takes no -o options")
            try:
                backend = FileBackend(path, writable=True, create=create)
            except OSError as exc:
                raise Qcow2Error(f"Could not open '{path}': {exc.strerror}") from None
            self.raw = Storage(backend, True)
            if create:
                self.raw.truncate(size)
            have = self.raw.size()
        if have < size:
            self.close()
            raise InvalidArgumentError(
                f"Target '{path}' is too small: {have} bytes for {size} bytes of input")

    def write(self, data: memoryview, offset: int) -> None:
        if self.compress:
            self._gather(data, offset)
        elif self.img is not None:
            self.img.pwrite(data, offset)
        else:
            self.raw.pwrite(data, offset, "data")

    def _gather(self, data: memoryview, offset: int) -> None:
        """Collect data (coming in increasing offsets) cluster by cluster; a cluster is
        written compressed once the data moves past it. Parts never written are zeros
        (the target is new)."""
        cs = self.img.cluster_size
        pos = 0
        while pos < len(data):
            at = offset + pos
            start = at - at % cs
            if self._cluster is not None and self._cluster[0] != start:
                self._put_cluster()
            if self._cluster is None:
                self._cluster = (start, bytearray(min(cs, self.img.size - start)))
            buf = self._cluster[1]
            k = min(len(data) - pos, len(buf) - (at - start))
            buf[at - start : at - start + k] = data[pos : pos + k]
            pos += k

    def _put_cluster(self) -> None:
        assert self._cluster is not None
        start, buf = self._cluster
        self._cluster = None
        self.img.write_compressed(start, buf)

    def zero(self, offset: int, n: int) -> None:
        if self.img is not None:
            self.img.write_zeroes(offset, n)
        else:
            self.raw.pwrite(bytes(n), offset, "data")

    def finish(self) -> None:
        if self._cluster is not None:
            self._put_cluster()
        if self.img is not None:
            self.img.flush()
        else:
            self.raw.sync()

    def close(self) -> None:
        if self.img is not None:
            self.img.close()
        if self.raw is not None:
            self.raw.close()


def _create_qcow2(path: str, size: int, options: list[str]) -> None:
    from .commands import CREATE_KWARGS, parse_create_options, valid_option_list
    from .create import create

    for chunk in options:
        if not valid_option_list(chunk):
            raise InvalidArgumentError(f"Invalid option list: {chunk}")
    opts = parse_create_options(",".join(options)) if options else {}
    for name in ("backing_file", "backing_fmt", "size"):
        if name in opts:
            raise InvalidArgumentError(f"Parameter '{name}' is not supported by convert")
    kw = {name: value for name, (_text, value) in opts.items() if name in CREATE_KWARGS}
    try:
        create(path, size, **kw)
    except Qcow2Error as exc:
        raise InvalidArgumentError(f"{path}: error while converting qcow2: {exc}") from None


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """(first, end, value) of each run of equal values in a boolean array."""
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    starts = np.r_[0, edges]
    ends = np.r_[edges, len(mask)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield s, e, bool(mask[s])


def copy(sources: list[Source], target: _Target, zero_target: bool, progress: Any = None) -> None:
    """Copy the concatenated sources into target. With zero_target (a new image), zero
    areas are left alone; otherwise they are written as zeros."""
    # one buffer for every chunk (a fresh one each time costs page faults), padded
    # with zeros to whole grains; zero grains are found on 64-bit words
    buf = np.zeros(CHUNK // 8, dtype=np.uint64)
    whole = memoryview(buf).cast("B")
    base = 0
    for src in sources:
        pos = 0
        while pos < src.size:
            n = min(CHUNK, src.size - pos)
            if src.known_zero(pos, n):
                if not zero_target:
                    target.zero(base + pos, n)
            else:
                mv = whole[:n]
                src.readinto(mv, pos)
                grains = -(-n // GRAIN)
                if n % GRAIN:
                    whole[n : grains * GRAIN] = bytes(grains * GRAIN - n)
                nonzero = buf[: grains * GRAIN // 8].reshape(grains, GRAIN // 8).any(axis=1)
                for g0, g1, has_data in _runs(nonzero):
                    s, e = g0 * GRAIN, min(g1 * GRAIN, n)
                    if has_data:
                        target.write(mv[s:e], base + pos + s)
                    elif not zero_target:
                        target.zero(base + pos + s, e - s)
            pos += n
            if progress is not None:
                progress.update(n)
        base += src.size


def check_bitmaps(src: Source, skip_broken: bool) -> None:
    """qemu-img convert --bitmaps' refusals, before anything is created."""
    if src.img is None:
        raise InvalidArgumentError("Source lacks bitmap support")
    for ent in src.img.bitmaps:
        if ent.in_use and not skip_broken:
            raise InvalidArgumentError(
                f"Cannot copy inconsistent bitmap '{ent.name}'\n"
                "Try --skip-broken-bitmaps, or use 'qcow2 bitmap --remove' to delete it")


def copy_bitmaps(src: Source, img: Any, skip_broken: bool) -> None:
    """Every persistent bitmap of the source into the target image: same name,
    granularity, enabled state and bits."""
    from .bitmaps import supported

    if img.header.version < 3:
        raise InvalidArgumentError("Format driver 'qcow2' does not support bitmaps")
    have = {b.name for b in img.bitmaps}
    for ent in reversed(src.img.bitmaps):  # (QEMU's order of its bitmap list)
        if ent.name in have:
            raise InvalidArgumentError(
                f"Failed to create bitmap {ent.name}: Bitmap already exists: {ent.name}")
    for ent in src.img.bitmaps:
        if ent.in_use or not supported(ent):
            if skip_broken:
                print(f"qcow2: warning: Skipping inconsistent bitmap '{ent.name}'",
                      file=sys.stderr)
                continue
            raise InvalidArgumentError(f"Cannot copy inconsistent bitmap '{ent.name}'")
        img.add_bitmap(ent.name, ent.granularity, disabled=not ent.auto)
        img.merge_bitmap(ent.name, ent.name, src.img)


def cmd_convert(args: argparse.Namespace) -> int:
    if len(args.files) < 2:
        raise InvalidArgumentError("Must specify image file name")
    out_fmt = args.out_fmt or "raw"  # qemu-img convert's default
    if out_fmt not in FORMATS:
        raise InvalidArgumentError(f"Unknown file format '{out_fmt}'")
    if args.compress and out_fmt != "qcow2":
        raise InvalidArgumentError("Compression not supported for this file format")
    if args.compress and args.no_create:
        raise InvalidArgumentError("Compression needs a new target image (not -n): compressed "
                                   "clusters are written only where there is no data yet")
    if args.fmt is not None and args.fmt not in FORMATS:
        raise InvalidArgumentError(f"Unknown file format '{args.fmt}'")
    *inputs, output = args.files
    snapshot = args.snapshot_param if args.snapshot_param is not None else args.snapshot
    if args.skip_broken_bitmaps and not args.bitmaps:
        raise InvalidArgumentError("Use of --skip-broken-bitmaps requires --bitmaps")
    if args.bitmaps and len(inputs) > 1:
        raise InvalidArgumentError("Copying bitmaps only possible with single source")
    if args.bitmaps and out_fmt != "qcow2":
        raise InvalidArgumentError(f"Format driver '{out_fmt}' does not support bitmaps")
    if snapshot is not None and len(inputs) > 1:
        raise InvalidArgumentError("No support for concatenating multiple snapshot")
    if output in inputs:
        raise InvalidArgumentError(f"Output '{output}' is also an input")
    sources: list[Source] = []
    created = False
    try:
        for path in inputs:
            sources.append(Source(path, args.fmt, snapshot))
        if args.bitmaps:
            check_bitmaps(sources[0], args.skip_broken_bitmaps)
        size = sum(s.size for s in sources)
        create = not args.no_create
        target = _Target(output, out_fmt, size, create, args.options, args.compress)
        created = create
        try:
            from tqdm import tqdm

            with tqdm(total=size, unit="B", unit_scale=True, disable=not args.progress or args.quiet,
                      file=sys.stderr, desc="convert") as bar:
                copy(sources, target, zero_target=create, progress=bar)
            if args.bitmaps:  # after the data, which would mark them
                copy_bitmaps(sources[0], target.img, args.skip_broken_bitmaps)
            target.finish()
        finally:
            target.close()
    except BaseException:
        if created:
            try:  # a half-written new image is of no use to anyone
                os.unlink(output)
            except OSError:
                pass
        raise
    finally:
        for s in sources:
            s.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("convert", help="copy images into a new qcow2 or raw image",
                       description="Convert (copy) the concatenated guest content of the input "
                       "images into OUTPUT, like `qemu-img convert`. Zero areas are not written.")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="input format (qcow2 or raw; probed)")
    p.add_argument("-O", dest="out_fmt", metavar="FMT", help="output format (raw, default, or qcow2)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="qcow2 creation options, as for create")
    p.add_argument("-l", dest="snapshot_param", metavar="SNAPSHOT",
                   help="copy this internal snapshot: snapshot.name=NAME, snapshot.id=ID or ID_OR_NAME")
    p.add_argument("-s", dest="snapshot", metavar="SNAPSHOT", help="the same as -l ID_OR_NAME")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="write into an existing OUTPUT (not assumed to be zeroed)")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="write compressed clusters (qcow2 output; compression_type in -o)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("--bitmaps", action="store_true",
                   help="copy the persistent dirty bitmaps too (qcow2 to qcow2)")
    p.add_argument("--skip-broken-bitmaps", action="store_true",
                   help="with --bitmaps: skip inconsistent bitmaps instead of failing")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("files", metavar="FILE", nargs="*", help="input images, then OUTPUT")
    p.set_defaults(func=cmd_convert)
