"""The Image object: open, read, write, zero, discard, flush, map."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import backing as _backing
from .bitmaps import BitmapEntry
from .check import CheckResult, _Checker, check_image
from .cluster import (
    BITMAP_ALLOC_ALL,
    BITMAP_ZERO_ALL,
    COMPRESSED,
    NORMAL,
    UNALLOCATED,
    ZERO,
    ClusterMap,
)
from .compress import compress_cluster, decompress_cluster
from .dirtybitmaps import BitmapKeeper, open_for_writing
from .errors import (
    BackingFileError,
    CorruptImageError,
    InvalidArgumentError,
    Qcow2Error,
    ReadOnlyError,
)
from .format import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    ImageLayout,
    decode_table,
)
from .geometry import Geometry
from .header import read_layout
from .imagefile import ImageFile
from .modes import MODES, checker_of, mode_of, set_refcount_mode
from .overlap import OverlapGuard, guard_allocator, validate_reftable
from .refcount import RefcountStrategy, StandardRefcounts
from .snapshot import SnapshotEntry, SnapshotOps, SnapshotView
from .storage import Backend, FileBackend, Stats, Storage

DEFAULT_CACHE_SIZE = 4 * 1024 * 1024  # bytes of L2 tables kept in memory
DEFAULT_REFCOUNT_CACHE_SIZE = 1024 * 1024

_ZEROS = memoryview(bytes(1 << 21))  # one maximal cluster of zeros, sliced without copying
# Largest request served by one system call: Linux transfers at most ~2 GiB per call.
_FAST_MAX = 1 << 30
# Bound on ClusterMap.owned (guest clusters remembered as writable in place)
_OWNED_MAX = 1 << 16


def open_image(path: str | os.PathLike[str], mode: str = "r", *, backing: bool = True,
               **options: Any) -> Image:
    """qcow2.open (which see): the modules of the package use this name, so that none
    imports the package's __init__, which imports them."""
    if mode not in ("r", "r+", "rb", "r+b", "rb+"):
        raise InvalidArgumentError(f"Invalid mode {mode!r}: use 'r' or 'r+'")
    return Image._open(path, writable="+" in mode, backing=backing, **options)


def open_backing_image(path: str, seen: tuple[str, ...]) -> Image:
    """A qcow2 backing file as an Image (read-only, with its own backing chain): the
    opener that backing.open_backing takes."""
    return Image._open(path, writable=False, backing=True, _seen=seen)


class Image:
    """An open qcow2 image. Use `qcow2.open()` to get one."""

    _corrupt = False  # set once a write onto metadata was refused (see _guard)
    _check_only = False
    _dirty: Any = None  # persistent bitmaps kept true while writable (dirtybitmaps.py)

    def __init__(self) -> None:  # use Image._open
        self.closed = True
        # the snapshot table and operations, a collaborator working through the narrow
        # SnapshotHost interface this class provides (snapshot.py)
        self._snapshots = SnapshotOps(self)
        self._bitmaps = BitmapKeeper(self)  # persistent dirty bitmaps (dirtybitmaps.py)

    # ------------------------------------------------------------------ opening --
    @classmethod
    def _open(
        cls,
        path: str | os.PathLike[str],
        writable: bool = False,
        *,
        backing: bool = True,
        cache_size: int = DEFAULT_CACHE_SIZE,
        refcount_cache_size: int = DEFAULT_REFCOUNT_CACHE_SIZE,
        backend: Backend | None = None,
        _seen: tuple[str, ...] = (),
        _repair_dirty: bool = True,
        _check_open: bool = False,
    ) -> Image:
        self = cls()
        self.path = os.fspath(path)
        try:
            be = backend if backend is not None else FileBackend(self.path, writable)
        except OSError as exc:
            raise Qcow2Error(f"Could not open '{self.path}': {exc.strerror}") from exc
        self.storage = Storage(be, writable)
        self._check_only = _check_open  # metadata access only (check, repair)
        self.writable = writable
        self.backing: Any = None
        self.closed = False
        try:
            self._load(cache_size, refcount_cache_size)
            if writable and not _check_open:  # check -r opens corrupt/dirty images to fix them
                self._open_for_writing(_repair_dirty)
            if backing and self.layout.backing_file:
                real = os.path.realpath(self.path)
                try:
                    self.backing = _backing.open_backing(
                        self.path, self.layout.backing_file, self.layout.backing_format,
                        _seen or (real,), open_backing_image,
                    )
                except BackingFileError as exc:
                    if _seen:  # a backing file's own: the level above says which image
                        raise
                    raise BackingFileError(f"Could not open '{self.path}': {exc}") from exc
        except BaseException:
            self._abandon()
            raise
        return self

    def _load(self, cache_size: int, refcount_cache_size: int) -> None:
        layout = read_layout(self.storage, allow_encrypted=self._check_only,
                             lenient=self._check_only)
        self.layout = layout
        h = layout.header
        self.header = h
        self.geo = Geometry(h.cluster_bits, h.refcount_order, bool(h.incompatible_features & INCOMPAT_EXTL2))
        self._cbits = h.cluster_bits
        self._cmask = h.cluster_size - 1
        self._cache_tables = max(4, cache_size // h.cluster_size)
        self._refcount_cache_tables = max(4, refcount_cache_size // h.cluster_size)
        l1 = decode_table(self.storage.pread(h.l1_size * 8, h.l1_table_offset)) if h.l1_size else \
            np.zeros(0, dtype=np.uint64)
        self.refcounts: RefcountStrategy | None = None
        self.clusters = ClusterMap(self.storage, self.geo, l1, h.l1_table_offset, None,
                                   self._cache_tables, h.version)
        self.clusters.write_guard = self._guard
        self.clusters.load_guard = self._l2_load_guard
        self._refblock_set: set[int] | None = None
        self._overlap = OverlapGuard(self)  # metadata map beyond the live state (overlap.py)
        self._compressed_cache: tuple[int, bytes] | None = None
        # where the next compressed cluster may be packed: (next free byte, end of that
        # host cluster), valid only from one write_compressed to the next (see there)
        self._comp_tail: tuple[int, int] | None = None

    def _make_refcounts(self) -> StandardRefcounts:
        h = self.header
        rc = MODES[mode_of(h)](
            self.storage, self.geo, h.refcount_table_offset, h.refcount_table_clusters,
            self._reftable_moved, self._refcount_cache_tables,
        )
        rc.write_guard = self._guard
        rc.alloc_guard = self._alloc_guard
        guard_allocator(rc, self._alloc_guard)
        return rc

    def _reload_metadata(self) -> None:
        """Forget in-memory metadata and read it again (after check repaired it on disk)."""
        had_refcounts = self.refcounts is not None
        cs = self.header.cluster_size
        self._load(self._cache_tables * cs, self._refcount_cache_tables * cs)
        if had_refcounts:
            self._reopen_refcounts()

    def _usage_refcounts(self) -> RefcountStrategy:
        """Refcounts to ask whether host clusters are in use (in_use_many): the open
        ones, or for a read-only image ones made for the question, with what the mode
        keeps in memory about the live tree."""
        rc = self.refcounts
        if rc is None:
            rc = self._make_refcounts()
            if rc.needs_live_map:
                rc.set_live(self._snapshots._live_counts())
        return rc

    def _rc(self) -> RefcountStrategy:
        """The refcounts the write path uses. A read-only image has none: asking is a
        write to it, refused with the error _check_writable gives (not an assert, which
        `python -O` would drop)."""
        rc = self.refcounts
        if rc is None:
            raise ReadOnlyError("Image is opened read-only")
        return rc

    def _reopen_refcounts(self) -> RefcountStrategy:
        """Refcounts (and, where the mode needs it, the live state's references) as the
        header now names them: on open for writing, after a repair or a mode switch."""
        rc = self._make_refcounts()
        self.refcounts = rc
        self.clusters.refcounts = rc
        self.clusters.owned.clear()
        rc.attach(self)
        return rc

    @property
    def refcount_mode(self) -> str:
        """The image's refcount mode: "standard" (plain qcow2), "lazy-count" or "owner"."""
        return mode_of(self.header)

    @property
    def live_weight(self) -> int:
        """What one live reference adds to a stored refcount in the image's mode."""
        return MODES[mode_of(self.header)].live_weight

    @property
    def checker_class(self) -> type[_Checker]:
        """The check pass for the image's refcount mode (check.py asks, knowing no mode)."""
        return checker_of(self.header)

    def set_refcount_mode(self, mode: str) -> None:
        """Convert the image to another refcount mode in place (crash-atomic)."""
        set_refcount_mode(self, mode)

    def _metadata_at(self, host: int, length: int, refblocks: bool = True,
                     l2_tables: bool = False) -> str:
        """Which metadata [host, host + length) overlaps: the header, the active L1
        table, the refcount table, a refcount block or (l2_tables) a cached L2 table."""
        cs = self.geo.cluster_size
        end = host + length
        if host < cs:
            return "the image header"
        cm = self.clusters
        if cm.l1_offset < end and host < cm.l1_offset + 8 * len(cm.l1):
            return "the active L1 table"
        rc = self.refcounts
        rt, rtc = (rc.reftable_offset, rc.reftable_clusters) if rc is not None else \
            (self.header.refcount_table_offset, self.header.refcount_table_clusters)
        if rt < end and host < rt + rtc * cs:
            return "the refcount table"
        cbits = self.geo.cluster_bits
        c0, c1 = host >> cbits, (end - 1) >> cbits
        # (plain loops: this runs on every data write, mostly for a single cluster)
        if refblocks:
            blocks = rc.refblock_clusters if rc is not None else self._refblocks_read()
            if blocks:
                if c1 - c0 < len(blocks):
                    for c in range(c0, c1 + 1):
                        if c in blocks:
                            return "a refcount block"
                elif any(c0 <= b <= c1 for b in blocks):
                    return "a refcount block"
        if l2_tables:
            # an L2 entry pointing at an L2 table (its own, say): the table the entry
            # came from is cached, so this catches such cycles. A cached table the
            # active L1 no longer uses (copied on write, then freed) is not one.
            cached = cm.l2cache.cached
            for c in range(c0, min(c1, c0 + 64) + 1):
                off = c << cbits
                if cached(off) is not None and \
                        bool(((cm.l1 & np.uint64(L1E_OFFSET_MASK)) == np.uint64(off)).any()):
                    return "an L2 table"
        return ""

    def _refblocks_read(self) -> set[int]:
        """Refcount block clusters of an image opened read-only (read once)."""
        if self._refblock_set is None:
            h = self.header
            rt = decode_table(self.storage.pread(h.refcount_table_clusters * self.geo.cluster_size,
                                                 h.refcount_table_offset))
            blk = rt & np.uint64(0xFFFFFFFFFFFFFE00)
            self._refblock_set = set((blk[blk != 0] >> np.uint64(self.geo.cluster_bits)).tolist())
        return self._refblock_set

    def _l2_load_guard(self, offset: int) -> None:
        """An L2 table about to be read must lie inside the file, must not be other
        metadata, and must have a single L1 entry: anything else is a corrupt or hostile
        image (QEMU would return garbage for reads through it and could destroy the
        metadata on writes). Only the guest range behind that L1 entry is refused."""
        if offset >= self.storage.size():
            raise CorruptImageError(f"L2 table offset {offset:#x} is past the end of the image file")
        what = self._metadata_at(offset, self.geo.cluster_size)
        if what:
            raise CorruptImageError(f"L2 table offset {offset:#x} points at {what}")
        l1 = self.clusters.l1
        if np.count_nonzero((l1 & np.uint64(L1E_OFFSET_MASK)) == np.uint64(offset)) > 1:
            raise CorruptImageError(f"L2 table offset {offset:#x} is used by more than one L1 entry")

    def _guard(self, host: int, length: int, what: str) -> None:
        """Refuse to write `what` onto the header, the active L1 table, the refcount table
        or a refcount block (data also not onto a cached L2 table). Only a corrupt or
        hostile image gets here (an L2 entry pointing at metadata, refcounts calling a
        metadata cluster free); as QEMU does, the image is then marked corrupt and
        nothing more is written."""
        hit = self._metadata_at(host, length, refblocks=what != "a refcount block",
                                l2_tables=what == "data")
        if not hit and what == "data":
            hit = self._overlap.check_data(host, length)
        if hit:
            self._mark_corrupt(f"Preventing invalid write of {what} on metadata "
                               f"(overlaps with {hit}) at offset {host:#x}")

    def _guard_data(self, host: int, n: int) -> None:
        """_guard for guest data written inside one host cluster: a few set and range
        tests rule out metadata in the common case (this runs on every small write);
        anything that might be metadata gets the full test."""
        cbits = self._cbits
        c = host >> cbits
        cm = self.clusters
        rc = self._rc()
        l1_first = cm.l1_offset >> cbits
        rt_first = rc.reftable_offset >> cbits
        if (c and c not in rc.refblock_clusters and cm.l2cache.cached(c << cbits) is None
                and not l1_first <= c <= (cm.l1_offset + 8 * len(cm.l1) - 1) >> cbits
                and not rt_first <= c < rt_first + rc.reftable_clusters
                and not self._overlap.static_hit(c)):
            return
        self._guard(host, n, "data")

    def _alloc_guard(self, host: int, length: int, what: str) -> None:
        self._overlap.check_alloc(host, length, what)

    def _meta_guard(self, host: int, length: int, kind: str) -> None:
        self._overlap.check_metadata_write(host, length, kind)

    def _mark_corrupt(self, reason: str) -> None:
        self._corrupt = True
        self.clusters.owned.clear()
        try:
            self._update_header(incompatible_features=self.header.incompatible_features | INCOMPAT_CORRUPT)
        except Qcow2Error:
            pass
        raise CorruptImageError(f"Marking image as corrupt: {reason}; run 'qcow2 check -r all'")

    def _open_for_writing(self, repair_dirty: bool) -> None:
        h = self.header
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise CorruptImageError(
                "qcow2: Image is corrupt; cannot be opened read/write "
                "(run 'qcow2 check -r all' to repair it)"
            )
        if h.incompatible_features & INCOMPAT_DIRTY:
            if not repair_dirty:
                raise CorruptImageError("Image is dirty (refcounts may be stale); repair it first")
            self._repair_dirty()
            h = self.header
        rc = self._reopen_refcounts()
        validate_reftable(self, rc.reftable, rc.live_weight)
        self.storage.meta_guard = self._meta_guard
        # We maintain the persistent bitmaps and no other auto-clear feature: clearing
        # those bits tells other readers that their data may be stale.
        open_for_writing(self)

    def _repair_dirty(self) -> None:
        check_image(self, repair="all", from_dirty_open=True)

    # ------------------------------------------------------------------ header --
    def _update_header(self, **changes: Any) -> None:
        """Rewrite the fixed header fields (extensions untouched) and sync. This is the
        commit point of every switch (tables moved, snapshots): on return the new header
        is durable; on an error the file holds the old one again, which the caller (who
        sees the error) still believes in."""
        old = self.header
        header = old.with_(**changes)
        self.storage.pwrite(header.pack(), 0, "header")
        try:
            self.storage.sync()
        except Qcow2Error:
            # Whether the new header is durable is unknown: put the old one back (what it
            # points at is intact, as nothing is freed before a switch is durable).
            try:
                self.storage.pwrite(old.pack(), 0, "header")
                self.storage.sync()
            except Qcow2Error:
                pass  # the device keeps failing: nothing later will be written either
            raise
        self.header = header
        self.layout = ImageLayout(**{**self.layout.__dict__, "header": header})
        self._overlap.invalidate()  # tables, snapshots or refcounts may have switched

    def _reftable_moved(self, offset: int, clusters: int) -> None:
        self._update_header(refcount_table_offset=offset, refcount_table_clusters=clusters)

    def _l1_moved(self, offset: int, size: int) -> None:
        self._update_header(l1_table_offset=offset, l1_size=size)

    # ------------------------------------------------------------------ properties --
    @property
    def size(self) -> int:
        return self.header.size

    @property
    def cluster_size(self) -> int:
        return self.geo.cluster_size

    @property
    def stats(self) -> Stats:
        return self.storage.stats

    @property
    def backing_file(self) -> str | None:
        return self.layout.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.layout.backing_format

    @property
    def compression_type(self) -> str:
        return COMPRESSION_NAMES[self.header.compression_type]

    # ------------------------------------------------------------------ reading --
    def _check_range(self, offset: int, length: int, size: int | None = None) -> None:
        if self.closed:
            raise Qcow2Error("I/O operation on a closed image")
        size = self.size if size is None else size
        if offset < 0 or length < 0:
            raise InvalidArgumentError("Offset and length must not be negative")
        if offset + length > size:
            raise InvalidArgumentError(
                f"Request [{offset}, {offset + length}) is beyond the end of the image ({size} bytes)"
            )

    def pread(self, n: int, offset: int) -> bytes:
        """Read n bytes at offset (like os.pread; reading past the end is an error)."""
        self._check_range(offset, n)
        if 0 < n <= _FAST_MAX:
            # Fast path: data clusters stored back to back on the host (the common case
            # for sequentially written images) are one pread straight into the result,
            # with no zero-filled buffer and no copy.
            cbits = self.geo.cluster_bits
            first = offset >> cbits
            host = self.clusters.contiguous_host(first, ((offset + n - 1) >> cbits) - first + 1, False)
            if host >= 0 and host + n <= self.storage.size():  # else: checked cluster by cluster
                return self.storage.pread(n, host + offset - (first << cbits))
        buf = bytearray(n)
        self._read_into(memoryview(buf), offset)
        return bytes(buf)

    def readinto(self, buf: memoryview | bytearray, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        self._check_range(offset, len(mv))
        self._read_into(mv, offset)
        return len(mv)

    def _read_into(self, out: memoryview, offset: int, clusters: ClusterMap | None = None,
                   backing: Any = "self") -> None:
        """Fill out (zero-initialised) with guest data from offset."""
        cmap = clusters or self.clusters
        n = len(out)
        if 0 < n <= _FAST_MAX:
            # host-contiguous data clusters: one read straight into out (see pread)
            cbits = self.geo.cluster_bits
            first = offset >> cbits
            host = cmap.contiguous_host(first, ((offset + n - 1) >> cbits) - first + 1, False)
            if host >= 0 and host + n <= self.storage.size():  # else: checked cluster by cluster
                self.storage.preadv([out], host + offset - (first << cbits))
                return
        bk = self.backing if backing == "self" else backing
        host_runs: list[tuple[int, int, int]] = []  # (out_pos, host, length)
        backing_runs: list[tuple[int, int, int]] = []  # (out_pos, guest, length)
        for out_pos, guest, length, kind, host in self._segments(cmap, offset, len(out)):
            if kind == NORMAL:
                if host_runs:
                    p, h, ln = host_runs[-1]
                    if p + ln == out_pos and h + ln == host:
                        host_runs[-1] = (p, h, ln + length)
                        continue
                host_runs.append((out_pos, host, length))
            elif kind == UNALLOCATED:
                if bk is not None:
                    if backing_runs and backing_runs[-1][0] + backing_runs[-1][2] == out_pos:
                        p, g, ln = backing_runs[-1]
                        backing_runs[-1] = (p, g, ln + length)
                    else:
                        backing_runs.append((out_pos, guest, length))
                else:
                    out[out_pos : out_pos + length] = _ZEROS[:length]
            elif kind == COMPRESSED:
                data = self._read_compressed(host)
                in_off = guest & (self.geo.cluster_size - 1)
                out[out_pos : out_pos + length] = data[in_off : in_off + length]
            else:  # ZERO
                out[out_pos : out_pos + length] = _ZEROS[:length]
        for out_pos, host, length in host_runs:
            self.storage.preadv([out[out_pos : out_pos + length]], host)
        for out_pos, guest, length in backing_runs:
            self._read_backing(bk, out[out_pos : out_pos + length], guest)

    @staticmethod
    def _read_backing(bk: Any, out: memoryview, guest: int) -> None:
        avail = max(0, min(len(out), bk.size - guest))
        if avail:
            out[:avail] = bk.pread(avail, guest)
        if avail < len(out):
            out[avail:] = bytes(len(out) - avail)

    def _segments(self, cmap: ClusterMap, offset: int, length: int
                  ) -> Iterator[tuple[int, int, int, int, int]]:
        """Yield (out_pos, guest_offset, length, kind, host) pieces of a guest range.
        For NORMAL, host is the byte offset of the data; for COMPRESSED, the L2 entry."""
        geo = self.geo
        cs = geo.cluster_size
        ext = geo.extended_l2
        scs = geo.subcluster_size
        pos = 0
        while pos < length:
            guest = offset + pos
            in_off = guest & (cs - 1)
            n = min(cs - in_off, length - pos)
            entry, bitmap = cmap.get(guest >> geo.cluster_bits)
            kind = cmap.classify(entry)
            if kind == COMPRESSED:
                yield pos, guest, n, COMPRESSED, entry
            elif not ext:
                if kind == NORMAL:
                    host = cmap.host_offset(entry)
                    self._check_host(host)
                    yield pos, guest, n, NORMAL, host + in_off
                else:
                    yield pos, guest, n, kind, 0
            else:
                if bitmap & (bitmap >> 32) & BITMAP_ALLOC_ALL:
                    raise CorruptImageError(
                        f"Subcluster of guest offset {guest:#x} is both allocated and zero"
                    )
                host = entry & L2E_OFFSET_MASK
                if bitmap & BITMAP_ALLOC_ALL:
                    host = cmap.host_offset(entry)
                    if not host:
                        raise CorruptImageError(f"Allocated subcluster without host offset at {guest:#x}")
                    self._check_host(host)
                sub = in_off
                end = in_off + n
                while sub < end:
                    sc = sub // scs
                    # extend over subclusters with the same state
                    state = _sc_state(bitmap, sc)
                    stop = (sc + 1) * scs
                    while stop < end and _sc_state(bitmap, stop // scs) == state:
                        stop += scs
                    stop = min(stop, end)
                    k = NORMAL if state == 1 else ZERO if state == 2 else UNALLOCATED
                    yield pos + sub - in_off, guest - in_off + sub, stop - sub, k, (host + sub if k == NORMAL else 0)
                    sub = stop
            pos += n

    def _check_host(self, host: int) -> None:
        if host >= 1 << 56:
            raise CorruptImageError(f"Cluster offset {host:#x} is beyond the host offset limit")
        if host >= self.storage.size():
            # QEMU reads zeros there; it is a damaged entry (check counts it corrupt)
            raise CorruptImageError(f"Data cluster offset {host:#x} is past the end of the image file")

    def _read_compressed(self, entry: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        host, length = self.geo.compressed_range(entry)
        if host + length > self.storage.size() + 512:
            raise CorruptImageError(f"Compressed cluster at {host:#x} runs past the end of the file")
        raw = self.storage.pread(min(length, 2 * self.geo.cluster_size + 512), host)
        data = decompress_cluster(raw, self.header.compression_type, self.geo.cluster_size)
        self._compressed_cache = (entry, data)
        return data

    # ------------------------------------------------------------------ writing --
    def _check_writable(self) -> None:
        if self.closed:
            raise Qcow2Error("I/O operation on a closed image")
        if not self.writable:
            raise ReadOnlyError("Image is opened read-only")
        if self._corrupt:
            raise CorruptImageError("Image was marked corrupt: no further writes")

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write data at offset (like os.pwrite); returns the number of bytes written."""
        if self._dirty is not None:
            self._dirty.mark(offset, memoryview(data).nbytes)
        if type(data) is bytes or type(data) is bytearray:
            # Hottest path: a small overwrite inside a cluster that an earlier write
            # found owned and clear of metadata (see ClusterMap.owned: only a writable,
            # open, healthy image fills it, and any mapping change empties it).
            n = len(data)
            gc = offset >> self._cbits
            host = self.clusters.owned.get(gc)
            if host is not None and n and (offset + n - 1) >> self._cbits == gc and \
                    offset + n <= self.header.size:
                self.storage.pwrite(data, host + (offset & self._cmask), "data")
                return n
        self._check_writable()
        if type(data) is not bytes and type(data) is not bytearray:
            data = memoryview(data).cast("B")
        n = len(data)
        if offset < 0 or offset + n > self.header.size:
            self._check_range(offset, n)  # raises
        if n == 0:
            return 0
        geo = self.geo
        cs = geo.cluster_size
        cbits = geo.cluster_bits
        cmap = self.clusters
        first = offset >> cbits
        if (offset + n - 1) >> cbits == first:
            # Hottest path: a small overwrite inside one cluster we own.
            base = cmap.contiguous_host(first, 1, True)
            if base >= 0:
                host = base + (offset & (cs - 1))
                self._guard_data(host, n)
                self.storage.pwrite(data, host, "data")
                if len(cmap.owned) >= _OWNED_MAX:
                    cmap.owned.clear()
                cmap.owned[first] = base
                return n
        # what follows may allocate (and so place metadata): forget what was checked
        cmap.owned.clear()
        self._comp_tail = None
        mv = memoryview(data)
        if n <= _FAST_MAX and (offset + n - 1) >> cbits != first:
            # Fast path: overwriting clusters we own that are back to back on the host
            # is one pwrite, with no metadata change (one cluster: done above).
            host = cmap.contiguous_host(first, ((offset + n - 1) >> cbits) - first + 1, True)
            if host >= 0:
                host += offset - (first << cbits)
                self._guard(host, n, "data")
                self.storage.pwrite(mv, host, "data")
                return n
        writes: list[tuple[int, memoryview]] = []
        updates: list[tuple[int, int, int, int]] = []  # guest cluster, entry, bitmap, release
        runs: list[tuple[int, list[int]]] = []  # (first guest cluster, new hosts)
        pos = 0
        while pos < n:
            guest = offset + pos
            in_off = guest & (cs - 1)
            if not in_off and n - pos >= 2 * cs and not geo.extended_l2:
                k = self._plan_fresh_run(guest >> cbits, (n - pos) >> cbits, mv[pos:], writes, runs)
                if k:
                    pos += k << cbits
                    continue
            length = min(cs - in_off, n - pos)
            self._plan_cluster_write(guest >> cbits, in_off, mv[pos : pos + length], writes, updates)
            pos += length
        self._issue_writes(writes)
        for gc, hosts in runs:
            cmap.set_run(gc, np.array(hosts, dtype=np.uint64) | np.uint64(QCOW_OFLAG_COPIED))
        self._apply_updates(updates)
        return n

    def _plan_fresh_run(self, gc: int, count: int, data: memoryview,
                        writes: list[tuple[int, memoryview]],
                        runs: list[tuple[int, list[int]]]) -> int:
        """Plan whole-cluster writes over the unallocated clusters (entry 0) from gc on,
        up to count of them and within one L2 table, without a per-cluster lookup: new
        clusters, no copy-on-write (every byte is overwritten), one L2 update. Returns how
        many clusters were planned (0 if fewer than two qualify)."""
        cmap = self.clusters
        geo = self.geo
        i = gc & (geo.l2_entries - 1)
        k = min(count, geo.l2_entries - i)
        table = cmap.l2_table(gc >> geo.l2_bits)
        if table is not None:
            used = np.flatnonzero(table[i : i + k])
            if len(used):
                k = int(used[0])
        if k < 2:
            return 0
        rc = self._rc()
        cs = geo.cluster_size
        hosts = [rc.allocate(1) for _ in range(k)]
        # pooled clusters are usually adjacent: one buffer per host-contiguous piece
        start = 0
        for j in range(1, k + 1):
            if j == k or hosts[j] != hosts[j - 1] + cs:
                writes.append((hosts[start], data[start * cs : j * cs]))
                start = j
        runs.append((gc, hosts))
        return k

    def _issue_writes(self, writes: list[tuple[int, memoryview]]) -> None:
        i = 0
        while i < len(writes):
            host, buf = writes[i]
            bufs = [buf]
            end = host + len(buf)
            j = i + 1
            while j < len(writes) and writes[j][0] == end and len(bufs) < 1024:
                bufs.append(writes[j][1])
                end += len(writes[j][1])
                j += 1
            if (end - 1) >> self._cbits == host >> self._cbits:
                self._guard_data(host, end - host)
            else:
                self._guard(host, end - host, "data")
            if len(bufs) == 1:
                self.storage.pwrite(buf, host, "data")
            else:
                self.storage.pwritev(bufs, host, "data")
            i = j

    def _apply_updates(self, updates: list[tuple[int, int, int, int]]) -> None:
        cmap = self.clusters
        for gc, entry, bitmap, release in updates:
            cmap.set(gc, entry, bitmap)
            if release:
                self._release_entry(release)

    def _release_entry(self, old_entry: int) -> None:
        """Queue the release of the host clusters an overwritten L2 entry pointed at."""
        rc = self._rc()
        if old_entry & QCOW_OFLAG_COMPRESSED:
            host, length = self.geo.compressed_range(old_entry)
            first = host >> self.geo.cluster_bits
            last = (host + length - 1) >> self.geo.cluster_bits
            rc.release_compressed(first << self.geo.cluster_bits, last - first + 1)
            return
        host = old_entry & L2E_OFFSET_MASK
        if host:
            rc.release(host)

    def _plan_cluster_write(self, gc: int, in_off: int, data: memoryview,
                            writes: list[tuple[int, memoryview]],
                            updates: list[tuple[int, int, int, int]]) -> None:
        geo = self.geo
        cs = geo.cluster_size
        cmap = self.clusters
        entry, bitmap = cmap.get(gc)
        kind = cmap.classify(entry)
        guest_base = gc << geo.cluster_bits
        length = len(data)
        rc = self._rc()
        if not geo.extended_l2:
            if kind == NORMAL and entry & QCOW_OFLAG_COPIED:
                host = cmap.host_offset(entry)
                writes.append((host + in_off, data))
                return
            if kind == ZERO and entry & QCOW_OFLAG_COPIED and entry & L2E_OFFSET_MASK:
                # preallocated zero cluster that we own: fill it in place
                host = cmap.host_offset(entry)
                release = 0
            else:
                host = rc.allocate(1)
                release = entry if (entry & (L2E_OFFSET_MASK | QCOW_OFLAG_COMPRESSED)) else 0
            if length == cs:
                writes.append((host, data))
            else:
                buf = bytearray(cs)
                mvb = memoryview(buf)
                old = entry & L2E_OFFSET_MASK
                if kind == NORMAL and not old & (cs - 1) and \
                        old + cs <= self.storage.size() and guest_base + cs <= self.size:
                    # copy a shared cluster: one read of all of it (the new data then
                    # goes over its middle), not a head read and a tail read
                    self.storage.preadv([mvb], old)
                elif kind in (NORMAL, COMPRESSED, UNALLOCATED):
                    # copy the old contents around the new data (COW)
                    if in_off:
                        self._read_into(mvb[:in_off], guest_base)
                    tail = in_off + length
                    if tail < cs:
                        self._read_guest_tail(mvb, guest_base, tail)
                mvb[in_off : in_off + length] = data
                writes.append((host, mvb))
            updates.append((gc, host | QCOW_OFLAG_COPIED, 0, release))
            return

        # extended L2: per-subcluster allocation
        scs = geo.subcluster_size
        first_sc = in_off // scs
        last_sc = (in_off + length - 1) // scs
        touched = ((1 << (last_sc + 1)) - 1) & ~((1 << first_sc) - 1)
        alloc = bitmap & BITMAP_ALLOC_ALL
        if kind == NORMAL and entry & QCOW_OFLAG_COPIED:
            host = cmap.host_offset(entry)
            new_alloc = alloc | touched
            lo, hi = first_sc * scs, (last_sc + 1) * scs
            if (touched & ~alloc) and (in_off != lo or in_off + length != hi):
                # partially written subclusters that were not allocated need filling
                buf = bytearray(hi - lo)
                mvb = memoryview(buf)
                self._read_into(mvb, guest_base + lo)
                mvb[in_off - lo : in_off - lo + length] = data
                writes.append((host + lo, mvb))
            else:
                writes.append((host + in_off, data))
            if new_alloc != alloc:
                updates.append((gc, entry, new_alloc | ((bitmap >> 32) & ~new_alloc) << 32, 0))
            return
        # new cluster: write the touched subclusters plus every old allocated one
        host = rc.allocate(1)
        if kind == COMPRESSED:
            keep = BITMAP_ALLOC_ALL
        else:
            keep = alloc if kind == NORMAL else 0
        new_alloc = keep | touched
        lo_sc = (new_alloc & -new_alloc).bit_length() - 1
        hi_sc = new_alloc.bit_length()
        lo, hi = lo_sc * scs, hi_sc * scs
        buf = bytearray(hi - lo)
        mvb = memoryview(buf)
        self._read_into(mvb, guest_base + lo)
        mvb[in_off - lo : in_off - lo + length] = data
        writes.append((host + lo, mvb))
        zero_bits = ((bitmap >> 32) & ~new_alloc) if kind != COMPRESSED else 0
        release = entry if kind in (NORMAL, COMPRESSED) else 0
        updates.append((gc, host | QCOW_OFLAG_COPIED, new_alloc | (zero_bits << 32), release))

    def _read_guest_tail(self, mvb: memoryview, guest_base: int, tail: int) -> None:
        end = min(self.geo.cluster_size, self.size - guest_base)
        if tail < end:
            self._read_into(mvb[tail:end], guest_base + tail)

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview, *,
                         compressed: bytes | None = None) -> int:
        """Write one cluster at a cluster-aligned offset as a compressed cluster, as QEMU's
        compressed writes (`qemu-io write -c`, `qemu-img convert -c`) do: only where this
        image has no data cluster yet (unallocated or zero), one whole cluster (the last
        cluster of an image whose size is not a multiple of it may be shorter: it is
        zero-padded). Data that does not compress below a cluster is written as a normal
        cluster. Consecutive compressed clusters are packed into shared host clusters.
        Returns len(data)."""
        self._check_writable()
        mv = memoryview(data).cast("B")
        n = len(mv)
        self._check_range(offset, n)
        if self._dirty is not None:
            self._dirty.mark(offset, n)
        cs = self.geo.cluster_size
        if offset & (cs - 1) or not (n == cs or (0 < n < cs and offset + n == self.size)):
            raise InvalidArgumentError(
                "A compressed write must cover one whole cluster at a cluster-aligned offset")
        gc = offset >> self._cbits
        cmap = self.clusters
        entry, _bitmap = cmap.get(gc)
        if entry & (L2E_OFFSET_MASK | QCOW_OFLAG_COMPRESSED):
            raise InvalidArgumentError(
                f"Compressed writes go only where there is no data yet: the cluster at guest "
                f"offset {offset:#x} is allocated")
        comp = compressed if compressed is not None else \
            compress_cluster(bytes(mv) + bytes(cs - n), self.header.compression_type)
        if len(comp) >= cs:  # QEMU's rule: it must fit in cluster_size - 1 bytes
            self.pwrite(mv, offset)
            return n
        cmap.owned.clear()  # what follows allocates
        host = self._alloc_compressed(len(comp))
        try:
            self._guard(host, len(comp), "data")
            self.storage.pwrite(comp, host, "data")
        except BaseException:
            self._comp_tail = None  # (the bytes taken leak; nothing points at them)
            raise
        self._compressed_cache = None
        cmap.set(gc, QCOW_OFLAG_COMPRESSED | self.geo.compressed_descriptor(host, len(comp)))
        return n

    def _alloc_compressed(self, nbytes: int) -> int:
        """Host bytes for compressed data: packed after the previous compressed cluster
        when it fits in that host cluster (one more reference to it), else at the start of
        fresh clusters. The packing position is forgotten by everything else that changes
        the image (flush, other writes, discard, snapshots), so that it never points into
        a cluster that was freed meanwhile."""
        rc = self._rc()
        cs = self.geo.cluster_size
        tail = self._comp_tail
        self._comp_tail = None
        if tail is not None and not rc.may_pack(tail[0] >> self._cbits):
            tail = None  # one more reference would overflow its refcount: start afresh
        if tail is not None and tail[0] + nbytes <= tail[1]:
            host = tail[0]
            rc.add_reference(host >> self._cbits)
        else:
            host = rc.allocate(-(-nbytes // cs))
            rc.note_compressed(host, -(-nbytes // cs))
            if tail is not None and host == tail[1] and nbytes < cs:
                # the new cluster follows the packed one: continue into it, as QEMU does
                # (the data then counts as a reference to both)
                host = tail[0]
                rc.add_reference(host >> self._cbits)
        end = host + nbytes
        cluster_end = ((end - 1) | (cs - 1)) + 1
        if end < cluster_end:
            self._comp_tail = (end, cluster_end)
        return host

    # ------------------------------------------------------------------ zero / discard --
    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros, without writing data where the
        format allows it (zero flag on v3, subcluster zero bits with extended L2)."""
        self._check_writable()
        self._check_range(offset, length)
        self._zero_or_discard(offset, length, discard=False)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate whole clusters in the range (partial clusters are left alone, as
        discard is advisory). Discarded clusters read as zeros. On a v2 image with a
        backing file discard does nothing, as in QEMU: v2 has no zero flag, so the
        clusters would fall through to stale backing data."""
        self._check_writable()
        self._check_range(offset, length)
        if self.header.version < 3 and self.layout.backing_file:
            return
        self._zero_or_discard(offset, length, discard=True)

    def _zero_or_discard(self, offset: int, length: int, discard: bool) -> None:
        self._comp_tail = None
        if self._dirty is not None:
            self._dirty.mark(offset, length)
        geo = self.geo
        cs = geo.cluster_size
        # QEMU discards whole clusters only, also with subclusters (partial ones are
        # ignored); zeroing works on subclusters where extended L2 allows it
        unit = geo.subcluster_size if geo.extended_l2 and not discard else cs
        end = offset + length
        # the image end counts as aligned, so a tail cluster can be handled whole
        a_start = -(-offset // unit) * unit
        a_end = end if end == self.size else (end // unit) * unit
        if a_end <= a_start:
            if not discard:
                self.pwrite(bytes(length), offset)
            return
        if not discard:
            if offset < a_start:
                self.pwrite(bytes(a_start - offset), offset)
            if a_end < end:
                self.pwrite(bytes(end - a_end), a_end)
        v3 = self.header.version >= 3
        pos = a_start
        while pos < a_end:
            gc = pos >> geo.cluster_bits
            c_start = gc << geo.cluster_bits
            n = min(c_start + cs, a_end) - pos
            self._zero_cluster(gc, pos - c_start, n, discard, v3)
            pos += n

    def _zero_cluster(self, gc: int, in_off: int, n: int, discard: bool, v3: bool) -> None:
        geo = self.geo
        cmap = self.clusters
        entry, bitmap = cmap.get(gc)
        kind = cmap.classify(entry)
        whole = in_off == 0 and (n == geo.cluster_size or (gc << geo.cluster_bits) + n >= self.size)
        if geo.extended_l2:
            scs = geo.subcluster_size
            first, last = in_off // scs, (in_off + n - 1) // scs
            bits = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
            if whole or kind == COMPRESSED:
                if kind == COMPRESSED and not whole:
                    # cannot zero part of a compressed cluster without decompressing it
                    self.pwrite(bytes(n), (gc << geo.cluster_bits) + in_off) if not discard else None
                    return
                release = entry if kind in (NORMAL, COMPRESSED) else 0
                keep = 0 if discard or kind == COMPRESSED or not entry & QCOW_OFLAG_COPIED else entry
                if keep:
                    release = 0
                cmap.set(gc, keep, BITMAP_ZERO_ALL)
                if release:
                    self._release_entry(release)
                return
            alloc = (bitmap & BITMAP_ALLOC_ALL) & ~bits
            zero = ((bitmap >> 32) | bits) & BITMAP_ALLOC_ALL
            cmap.set(gc, entry, alloc | (zero << 32))
            return
        if not whole:
            if not discard:
                self.pwrite(bytes(n), (gc << geo.cluster_bits) + in_off)
            return
        if not v3:
            # v2 has no zero flag
            if discard:
                if kind != UNALLOCATED:
                    cmap.set(gc, 0)
                    self._release_entry(entry)
                return
            if kind == UNALLOCATED and self.backing is None:
                return
            self.pwrite(bytes(n), gc << geo.cluster_bits)
            return
        if discard:
            if kind == ZERO and not entry & L2E_OFFSET_MASK:
                return
            if kind == UNALLOCATED and self.backing is None:
                return
            cmap.set(gc, QCOW_OFLAG_ZERO)
            self._release_entry(entry)
            return
        if kind == NORMAL and entry & QCOW_OFLAG_COPIED:
            # keep the preallocation, mark it zero (as QEMU does without unmap)
            cmap.set(gc, entry | QCOW_OFLAG_ZERO)
            return
        if kind == ZERO and (entry & QCOW_OFLAG_COPIED or not entry & L2E_OFFSET_MASK):
            return
        cmap.set(gc, QCOW_OFLAG_ZERO)
        self._release_entry(entry)

    # ------------------------------------------------------------------ durability --
    def flush(self) -> None:
        """Make everything written so far durable."""
        if self.closed:
            raise Qcow2Error("I/O operation on a closed image")
        if not self.writable:
            return
        self._comp_tail = None  # releases may free the cluster it points into
        rc = self._rc()
        cmap = self.clusters
        st = self.storage
        # Ordering: (1) L2 tables no on-disk L1 entry points at yet and refcount blocks
        # (their increments were durable before use; decrements follow durable reference
        # drops) go out in any order with the data; (2) one sync makes the data and the
        # new tables durable; (3) then the reachable L2 tables and the L1 table that point
        # at them; (4) a sync; (5) only then are the dropped references released.
        cmap.flush_l2(fresh_only=True)
        rc.write_back()
        if (cmap.l1_dirty and st.unsynced_writes) or \
                (st.unsynced_data_writes and cmap.reachable_dirty):
            st.sync()
        cmap.flush_l2()
        cmap.write_l1()
        if st.unsynced_writes:  # nothing written since the last sync: already durable
            st.sync()
        rc.apply_releases()
        if self._dirty is not None:  # after the data they describe is durable
            self._dirty.store()

    def close(self) -> None:
        if self.closed:
            return
        try:
            # after a corruption was detected nothing more is written (as QEMU does)
            if self.writable and self.refcounts is not None and not self._corrupt:
                self.flush()
                self.refcounts.close()
                self.clusters.flush_l2()
                if self.storage.unsynced_writes:
                    self.storage.sync()
        finally:
            self._abandon()

    def _abandon(self) -> None:
        self.closed = True
        if hasattr(self, "clusters"):
            self.clusters.owned.clear()
        if getattr(self, "backing", None) is not None:
            try:
                self.backing.close()
            finally:
                self.backing = None
        if hasattr(self, "storage"):
            self.storage.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self.writable:
            # still try to leave a consistent image behind
            try:
                self.close()
            except Qcow2Error:
                self._abandon()
            return
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("r+" if self.writable else "r")
        return f"<qcow2.Image {self.path!r} size={getattr(self, 'header', None) and self.size} {state}>"

    # ------------------------------------------------------------------ map --
    def map(self) -> list[dict[str, Any]]:
        """Extents as `qemu-img map --output=json` reports them."""
        from .mapping import image_map

        return image_map(self)

    def info(self) -> dict[str, Any]:
        """Image information with the fields and values of `qemu-img info --output=json`."""
        from .info import image_info

        return image_info(self)

    def block_status(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield (guest offset, length, kind, host offset) in cluster or subcluster pieces
        for this layer only."""
        for _pos, guest, n, kind, host in self._segments(self.clusters, offset, length):
            if kind == COMPRESSED:
                yield guest, n, COMPRESSED, 0
            else:
                yield guest, n, kind, host

    # ------------------------------------------------------------------ snapshots --
    @property
    def snapshots(self) -> list[SnapshotEntry]:
        """The snapshot records, in table order (id, name, date, date_sec, date_nsec,
        vm_clock, vm_clock_nsec, vm_state_size, disk_size, icount)."""
        return self._snapshots.snapshots

    def find_snapshot(self, name_or_id: str) -> SnapshotEntry:
        """The snapshot with this id, else the first one with this name."""
        return self._snapshots.find_snapshot(name_or_id)

    def snapshot(self, name_or_id: str) -> SnapshotView:
        """A read-only view of a snapshot (pread, size, map, file), without applying it."""
        return self._snapshots.snapshot(name_or_id)

    def read_vm_state(self, name_or_id: str) -> bytes:
        """The VM state saved with a snapshot (b"" for a disk-only snapshot)."""
        return self._snapshots.read_vm_state(name_or_id)

    def create_snapshot(self, name: str, vm_state: Any = None, *, vm_clock_nsec: int = 0,
                        icount: int | None = 0, date_sec: int | None = None,
                        date_nsec: int | None = None,
                        snapshot_id: str | None = None) -> SnapshotEntry:
        """Create an internal snapshot of the current state, as `qemu-img snapshot -c`.

        vm_state (bytes-like, any size) is stored past the end of the disk in the
        snapshot's L1 range, where QEMU keeps VM state. Returns the new record. icount
        defaults to 0 as qemu-img writes it (None means "no icount", QEMU's -1).
        snapshot_id: the id to record instead of QEMU's choice (convert --snapshots keeps
        the input's ids); it must not be in use.
        """
        return self._snapshots.create_snapshot(
            name, vm_state, vm_clock_nsec=vm_clock_nsec, icount=icount,
            date_sec=date_sec, date_nsec=date_nsec, snapshot_id=snapshot_id)

    def apply_snapshot(self, name_or_id: str) -> None:
        """Make the active state equal to the snapshot (as `qemu-img snapshot -a`),
        including its disk size. The discarded active state's clusters are released."""
        self._snapshots.apply_snapshot(name_or_id)

    def delete_snapshot(self, name_or_id: str) -> None:
        """Delete a snapshot (as `qemu-img snapshot -d`): remove its entry, then release
        what its L1 table reached, then fix the COPIED flags of the active tree."""
        self._snapshots.delete_snapshot(name_or_id)

    def share_from_snapshot(self, name_or_id: str, offset: int, length: int) -> bool:
        """Make [offset, offset + length) of the active state read what the snapshot
        reads there by pointing the active L2 entries at the snapshot's clusters (one
        more reference each, no COPIED flag: the first write copies them), not by
        copying data: a revert of one range that keeps the data shared.

        offset and length are whole clusters (the range may end at the disk's end).
        Returns False, changing nothing, where the refcount mode cannot express the
        sharing (a count would overflow; owner mode unless the snapshot is the live
        state's parent): the caller copies the data instead. The new references are
        durable before any table points at them and the old entries are released once
        the tables that dropped them are, as for any write (flush makes it durable)."""
        self._check_writable()
        e = self._snapshots.find_snapshot(str(name_or_id))
        cs = self.geo.cluster_size
        end = offset + length
        disk = int(e.disk_size if e.disk_size is not None else self.size)
        if offset < 0 or length < 0 or end > min(self.size, disk):
            raise InvalidArgumentError(
                f"Range {offset}+{length} is not inside the disk and snapshot '{e.name}'")
        if offset % cs or (length % cs and end != min(self.size, disk)):
            raise InvalidArgumentError("share_from_snapshot takes whole clusters")
        if not length:
            return True
        self._snapshots._check_disk_size(e)
        geo = self.geo
        cmap = self.clusters
        snap = ClusterMap(self.storage, geo, self._snapshots._snapshot_l1(e), e.l1_table_offset,
                          None, self._cache_tables, self.header.version)
        first, stop = offset >> geo.cluster_bits, -(-end // cs)
        # (guest cluster, the snapshot's entry, its bitmap, the live entry it replaces)
        plan: list[tuple[int, int, int, int]] = []
        refs: list[int] = []
        for gc in range(first, stop):
            new, bitmap = snap.get(gc)
            new &= ~QCOW_OFLAG_COPIED
            old, old_bitmap = cmap.get(gc)
            if (old & ~QCOW_OFLAG_COPIED, old_bitmap) == (new, bitmap):
                continue  # shared already
            if new & QCOW_OFLAG_COMPRESSED:
                host, n = geo.compressed_range(new)
                c0 = host >> geo.cluster_bits
                refs.extend(range(c0, ((host + n - 1) >> geo.cluster_bits) + 1))
            elif new & L2E_OFFSET_MASK:
                refs.append(snap.host_offset(new) >> geo.cluster_bits)
            plan.append((gc, new, bitmap, old))
        rc = self._rc()
        clusters = np.array(refs, dtype=np.int64)
        if not rc.may_share(self._snapshots, e, clusters):
            return False
        cmap.owned.clear()
        self._comp_tail = None
        self._compressed_cache = None
        if self._dirty is not None:
            self._dirty.mark(offset, length)
        rc.share(clusters)
        for gc, new, bitmap, old in plan:
            cmap.set(gc, new, bitmap)
            if old & (L2E_OFFSET_MASK | QCOW_OFLAG_COMPRESSED):
                self._release_entry(old)
        return True

    def _switch_l1(self, l1: np.ndarray, offset: int) -> None:
        """The header now names this active L1 table: make it the in-memory one."""
        self.clusters.replace_l1(l1, offset)
        self._compressed_cache = None

    # ------------------------------------------------------------------ bitmaps --
    @property
    def bitmaps(self) -> list[BitmapEntry]:
        """Persistent dirty bitmaps (bitmaps.BitmapEntry: name, granularity, flags)."""
        return self._bitmaps.bitmaps

    def dirty_ranges(self, name: str) -> Iterator[tuple[int, int]]:
        """(offset, length) runs of guest data marked dirty in bitmap name."""
        return self._bitmaps.dirty_ranges(name)

    def add_bitmap(self, name: str, granularity: int | None = None, *,
                   disabled: bool = False) -> None:
        """Add an empty persistent bitmap (enabled unless disabled; granularity by
        default the cluster size, at least 4 KiB, as qemu-img's)."""
        self._bitmaps.add_bitmap(name, granularity, disabled=disabled)

    def remove_bitmap(self, name: str) -> None:
        self._bitmaps.remove_bitmap(name)

    def clear_bitmap(self, name: str) -> None:
        self._bitmaps.clear_bitmap(name)

    def enable_bitmap(self, name: str) -> None:
        self._bitmaps.enable_bitmap(name)

    def disable_bitmap(self, name: str) -> None:
        self._bitmaps.disable_bitmap(name)

    def merge_bitmap(self, name: str, source: str, source_image: Any = None) -> None:
        """Set in bitmap name every granule dirty in bitmap source (of this image, or
        of source_image)."""
        self._bitmaps.merge_bitmap(name, source, source_image)

    # ------------------------------------------------------------------ check --
    def check(self, repair: str | None = None) -> CheckResult:
        """Check the image like `qemu-img check`; with repair="leaks" or "all" (image
        opened read-write) repair it and report the re-check."""
        # a repair rewrites metadata wholesale, from what it counted: no overlap guard
        st = self.storage
        guard, st.meta_guard = st.meta_guard, None
        try:
            return check_image(self, repair)
        finally:
            st.meta_guard = guard

    # ------------------------------------------------------------------ file view --
    def file(self) -> ImageFile:
        """A file-like (io.RawIOBase) view of the virtual disk."""
        return ImageFile(self)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.header.compatible_features & COMPAT_LAZY_REFCOUNTS)


def _sc_state(bitmap: int, sc: int) -> int:
    """1 allocated, 2 zero, 0 unallocated."""
    if bitmap >> sc & 1:
        return 1
    if bitmap >> (32 + sc) & 1:
        return 2
    return 0
