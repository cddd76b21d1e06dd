"""The fast path of `qcow2 convert`: plain copies into a new image, without numpy.

A plain convert (raw files and qcow2 images, with compressed clusters, extended L2
entries and backing chains, into a new raw or qcow2 image; no -c, -n, -l/-s, --snapshots, --bitmaps, standard output or
-o option beyond cluster_size, compat, refcount_bits, lazy_refcounts and
compression_type; see `plan`) spends most of its time starting Python and moving bytes.
This module does that with the standard library only: numpy's import alone costs about
as much as qemu-img's whole convert of 128 MiB. A chunk (2 MiB) that is one data extent
inside its file is read through a read-only mapping, any other into a reused buffer;
zero grains are found with `bytes.startswith` on a view (a memcmp, no copy), and the
data runs go to a writer thread (os.pwrite releases the GIL, so reading and writing
overlap), which starts the disk on each chunk it wrote (sync_file_range), so that the
one sync at the end has little left to wait for.

It writes exactly what the full path (convert.copy) writes: the same data ranges of the
sources (from the L2 tables down the backing chain, or the raw file's holes), widened
to the same grains, the same zero grains left out, each new cluster written whole. A
qcow2 output needs no second pass: cluster 0 is kept for the header, data clusters are
appended in guest order as the first data in them turns up, each L2 table's cluster
just before the first data cluster it maps; the L1 table, the refcount blocks and the
refcount table follow the data, every cluster with refcount 1, and the header goes in
last. The file is new and has a temporary name (convert.py renames it when done), so
one sync at the end makes it durable.

Anything else goes the full way (`plan` returns None), including every source with a
layer that does not look plain at its header, and every error found while opening: the
full path has every check and every message. What only shows later (an L2 table or a
cluster past the end of the file, a bad compressed cluster) is a CorruptImageError with
the full path's message.
"""

from __future__ import annotations

import bisect
import errno
import os
import queue
import re
import stat
import sys
import threading
from array import array
from typing import Any

from .backing import RawFile, probe_format
from .errors import CorruptImageError, Qcow2Error, Qcow2IOError
from .format import (
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_L1_SIZE_BYTES,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    ImageLayout,
)
from .geometry import Geometry, div_round_up
from .header import MAX_HOST_OFFSET
from .storage import FileBackend, map_for_reading

FORMATS = ("qcow2", "raw")  # what convert reads and writes
CHUNK = 2 << 20  # bytes copied per step
GRAIN = 4096  # zero detection granularity (qemu-img convert -S default)
WINDOW = 1 << 30  # zero ranges are looked up this much at a time
# ... and at most this many clusters of a qcow2 layer: each may be an extent of its own
# (about 180 bytes), and 1 GiB of 512-byte clusters is 2 Mi of them
WINDOW_CLUSTERS = 1 << 16
BUFFERS = 4  # chunks in flight: one being read, the others queued for the writer
SYNC_EVERY = 8 << 20  # without sync_file_range: a sync after this many bytes written

# guest extent kinds (as cluster.py's)
_DATA, _ZERO, _COMPRESSED = 1, 2, 3
_SWAP = sys.byteorder == "little"  # tables are big-endian on disk
_NONZERO = re.compile(rb"[^\x00]")
_ALL_SUBCLUSTERS = (1 << 32) - 1


def _be64(data: bytes) -> array[int]:
    a = array("Q", data)
    if _SWAP:
        a.byteswap()
    return a


def _be64_bytes(values: array[int]) -> bytes:
    if _SWAP:
        values = array("Q", values)
        values.byteswap()
    return values.tobytes()


# --------------------------------------------------------------- data ranges --
def add_range(out: list[tuple[int, int]], s: int, e: int) -> None:
    """Append [s, e) to a sorted list of ranges, merged with the last one if they touch."""
    if out and out[-1][1] == s:
        out[-1] = (out[-1][0], e)
    elif s < e:
        out.append((s, e))


def raw_data(fd: int, offset: int, n: int) -> list[tuple[int, int]]:
    """The data ranges of [offset, offset + n) of a raw file, from SEEK_DATA/SEEK_HOLE
    (where the system has none, all of it)."""
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    end = offset + n
    if seek_data is None or seek_hole is None:
        return [(offset, end)] if n else []
    out: list[tuple[int, int]] = []
    pos = offset
    while pos < end:
        try:
            s = os.lseek(fd, pos, seek_data)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after pos
                break
            return [(offset, end)]
        if s >= end:
            break
        e = min(os.lseek(fd, s, seek_hole), end)
        out.append((s, e))
        pos = e
    return out


def aligned(ranges: list[tuple[int, int]], grain: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Ranges widened to whole grains (within [lo, hi)) and merged, so that zero
    detection looks at the same grains whatever the input's cluster size."""
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        s, e = max(lo, s - s % grain), min(hi, -(-e // grain) * grain)
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


# -------------------------------------------------------------------- sources --
class _NotPlain(Exception):
    """The full path's: a layer is not one the fast path reads."""


class _RawSource:
    """A raw file: a source, or the backing file of a qcow2 one."""

    def __init__(self, file: RawFile) -> None:
        self.file = file
        self.size = file.size
        st = os.fstat(self.file.fd)
        # only a regular file's bytes are mapped (and only below its end: past it, a
        # mapping faults; the partial last sector reads as zeros through read())
        self.mappable = st.st_size if stat.S_ISREG(st.st_mode) else 0

    def view(self, offset: int, n: int) -> memoryview | None:
        if offset + n > self.mappable:
            return None
        return map_for_reading(self.file.fd, offset, n)

    def data_ranges(self, offset: int, n: int) -> list[tuple[int, int]]:
        return raw_data(self.file.fd, offset, n)

    def load(self, start: int, end: int) -> None:
        pass

    def window(self) -> int:
        return WINDOW

    def next_data(self, pos: int) -> int:
        """The first offset at or after pos that may hold data (the size: none)."""
        seek_data = getattr(os, "SEEK_DATA", None)
        if pos >= self.size or seek_data is None:
            return min(pos, self.size)
        try:
            return min(os.lseek(self.file.fd, pos, seek_data), self.size)
        except OSError as exc:
            return self.size if exc.errno == errno.ENXIO else pos

    def ranges(self, start: int, end: int, out: list[tuple[int, int]]) -> None:
        for s, e in raw_data(self.file.fd, start, end - start):
            add_range(out, s, e)

    def read(self, mv: memoryview, offset: int) -> None:
        self.file.readinto(mv, offset)

    def close(self) -> None:
        self.file.close()


class _Qcow2Source:
    """A qcow2 image (extended L2 entries too) without refcount mode, dirty bit or
    external data file, read through its active L1 table, over its backing file (a plain qcow2
    image or a raw file, or None). The L2 tables are read (and checked) a window at a
    time into extents (guest start, guest end, kind, host); unallocated clusters (no
    extent) read from the backing file, as zeros past its end."""

    def __init__(self, path: str, fd: int, layout: ImageLayout, file_size: int) -> None:
        h = layout.header
        self.path = path
        self.backing: _RawSource | _Qcow2Source | None = None
        self.fd = fd
        self.size = h.size
        self.file_size = file_size
        self.ctype = h.compression_type
        self.geo = Geometry(h.cluster_bits, h.refcount_order,
                            bool(h.incompatible_features & INCOMPAT_EXTL2))
        cs = self.geo.cluster_size
        # read_layout checked the L1 table's size, alignment and place in the file
        self.l1 = _be64(_pread(fd, h.l1_size * 8, h.l1_table_offset)) if h.l1_size else array("Q")
        self.l1_range = (h.l1_table_offset, h.l1_table_offset + h.l1_size * 8)
        self.rt_range = (h.refcount_table_offset,
                         h.refcount_table_offset + h.refcount_table_clusters * cs)
        seen: set[int] = set()
        refblocks: set[int] | None = None
        self.tables: list[int] = []  # the L1 indexes that have an L2 table, ascending
        for i, e in enumerate(self.l1):
            off = e & L1E_OFFSET_MASK
            if not off:
                continue
            self.tables.append(i)
            if off & (cs - 1):
                raise CorruptImageError(
                    f"L2 table offset {off:#x} in L1 entry {i} is not cluster aligned")
            if off >= file_size:
                raise CorruptImageError(
                    f"L2 table offset {off:#x} is past the end of the image file")
            for what, (a, b) in (("the active L1 table", self.l1_range),
                                 ("the refcount table", self.rt_range)):
                if off < b and a < off + cs:
                    raise CorruptImageError(f"L2 table offset {off:#x} points at {what}")
            if refblocks is None:
                refblocks = self._refblocks(h.refcount_table_offset,
                                            h.refcount_table_clusters * cs)
            if off >> h.cluster_bits in refblocks:
                # (read as an L2 table, a block of 64-bit refcounts of 1 is all zero
                # clusters: the full path refuses it, so must this one)
                raise CorruptImageError(f"L2 table offset {off:#x} points at a refcount block")
            if off in seen:
                raise CorruptImageError(
                    f"L2 table offset {off:#x} is used by more than one L1 entry")
            seen.add(off)
        self.extents: list[tuple[int, int, int, int]] = []
        self._cursor = 0
        self._cached: tuple[int, bytes] | None = None  # the last compressed cluster read
        self._l2: tuple[int, bytes, array[int]] | None = None  # the last L2 table read

    def _refblocks(self, offset: int, n: int) -> set[int]:
        """The host clusters of the refcount blocks (read_layout bounded the table's size
        and checked its place in the file)."""
        rt = _be64(_pread(self.fd, n, offset).ljust(n, b"\0"))
        cbits = self.geo.cluster_bits
        return {(e & REFT_OFFSET_MASK) >> cbits for e in rt if e & REFT_OFFSET_MASK}

    def data_ranges(self, offset: int, n: int) -> list[tuple[int, int]]:
        """The ranges of [offset, offset + n) that may hold data (what the full path's
        block status does not call zeros). Loads the window's extents (down the backing
        chain), which view() and read() then use."""
        self.load(offset, offset + n)
        out: list[tuple[int, int]] = []
        self.ranges(offset, offset + n, out)
        return out

    def window(self) -> int:
        """The guest bytes whose extents are loaded at a time (down the chain)."""
        w = min(WINDOW, self.geo.cluster_size * WINDOW_CLUSTERS)
        return w if self.backing is None else min(w, self.backing.window())

    def next_data(self, pos: int) -> int:
        """The first guest offset at or after pos that may hold data: the start of the
        next L2 table's range, or the backing file's next data (the size: none). A
        hostile header can claim exabytes over a few tables: the copy skips the rest."""
        if pos >= self.size:
            return self.size
        cover = self.geo.l1_coverage
        k = bisect.bisect_left(self.tables, pos // cover)
        nxt = max(pos, self.tables[k] * cover) if k < len(self.tables) else self.size
        if self.backing is not None and pos < self.backing.size:
            nxt = min(nxt, self.backing.next_data(pos))
        return min(nxt, self.size)

    def load(self, start: int, end: int) -> None:
        self.extents = self._extents(start, end)
        self._cursor = 0
        if self.backing is not None and start < self.backing.size:
            self.backing.load(start, min(end, self.backing.size))

    def ranges(self, start: int, end: int, out: list[tuple[int, int]]) -> None:
        pos = start
        for s, e, kind, _host in self.extents:
            s, e = max(s, start), min(e, end)
            if s >= e:
                continue
            if s > pos:
                self._below(pos, s, out)
            if kind != _ZERO:
                add_range(out, s, e)
            pos = e
        if pos < end:
            self._below(pos, end, out)

    def _below(self, start: int, end: int, out: list[tuple[int, int]]) -> None:
        """The data ranges of unallocated [start, end): the backing file's."""
        if self.backing is not None and start < self.backing.size:
            self.backing.ranges(start, min(end, self.backing.size), out)

    def _extents(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """The data, zero and compressed extents of the clusters of [start, end)
        (unallocated ones are left out), from the L2 tables."""
        geo = self.geo
        cbits, l2_bits = geo.cluster_bits, geo.l2_bits
        out: list[tuple[int, int, int, int]] = []
        c, c_end = start >> cbits, ((end - 1) >> cbits) + 1 if end > start else start >> cbits
        while c < c_end:
            l1i = c >> l2_bits
            first = l1i << l2_bits
            stop = min(c_end, first + (1 << l2_bits))
            l2_off = self.l1[l1i] & L1E_OFFSET_MASK if l1i < len(self.l1) else 0
            if l2_off:
                self._scan_l2(l2_off, c - first, stop - first, first, out)
            c = stop
        return out

    def _scan_l2(self, l2_off: int, i0: int, i1: int, first: int,
                 out: list[tuple[int, int, int, int]]) -> None:
        geo = self.geo
        cbits, cs = geo.cluster_bits, geo.cluster_size
        if self._l2 is not None and self._l2[0] == l2_off:
            # (a table of 2 MiB clusters maps 512 windows: read it once)
            _, raw, table = self._l2
        else:
            raw = _pread(self.fd, cs, l2_off)
            if len(raw) < cs:
                raw += bytes(cs - len(raw))
            table = _be64(raw)
            self._l2 = (l2_off, raw, table)
        search = _NONZERO.search
        ext = geo.extended_l2
        w = 2 if ext else 1  # words per entry (extended: the entry, its subcluster bitmap)
        i = i0
        while i < i1:
            # skip unallocated entries (all-zero words) in C: find the next nonzero byte
            if table[w * i] == 0 and (not ext or table[w * i + 1] == 0):
                m = search(raw, i * 8 * w, i1 * 8 * w)
                if m is None:
                    break
                i = m.start() // (8 * w)
            e = table[w * i]
            g = (first + i) << cbits
            if e & QCOW_OFLAG_COMPRESSED:
                host, length = geo.compressed_range(e)
                if host + length > self.file_size + 512:
                    raise CorruptImageError(
                        f"Compressed cluster at {host:#x} runs past the end of the file")
                out.append((g, g + cs, _COMPRESSED, e))
            elif ext:
                self._subclusters(g, e, table[w * i + 1], out)
            elif e & QCOW_OFLAG_ZERO:
                _merge(out, g, cs, _ZERO, 0)
            elif e & L2E_OFFSET_MASK:
                _merge(out, g, cs, _DATA, self._host(e))
            i += 1

    def _host(self, entry: int) -> int:
        """The checked host offset of a data cluster (the full path's messages)."""
        host = entry & L2E_OFFSET_MASK
        if host & (self.geo.cluster_size - 1):
            raise CorruptImageError(f"Cluster offset {host:#x} is not cluster aligned")
        if host >= self.file_size:
            raise CorruptImageError(
                f"Data cluster offset {host:#x} is past the end of the image file")
        return host

    def _subclusters(self, g: int, entry: int, bitmap: int,
                     out: list[tuple[int, int, int, int]]) -> None:
        """The extents of an extended L2 entry: runs of allocated (data) and zero
        subclusters; the others are unallocated (the backing file's)."""
        alloc, zero = bitmap & _ALL_SUBCLUSTERS, bitmap >> 32
        if alloc & zero:
            raise CorruptImageError(f"Subcluster of guest offset {g:#x} is both allocated and zero")
        host = 0
        if alloc:
            if not entry & L2E_OFFSET_MASK:
                raise CorruptImageError(f"Allocated subcluster without host offset at {g:#x}")
            host = self._host(entry)
        scs = self.geo.subcluster_size
        sc = 0
        while sc < 32:
            stop = sc + 1
            if alloc >> sc & 1:
                while stop < 32 and alloc >> stop & 1:
                    stop += 1
                _merge(out, g + sc * scs, (stop - sc) * scs, _DATA, host + sc * scs)
            elif zero >> sc & 1:
                while stop < 32 and zero >> stop & 1:
                    stop += 1
                _merge(out, g + sc * scs, (stop - sc) * scs, _ZERO, 0)
            sc = stop

    def view(self, offset: int, n: int) -> memoryview | None:
        """The guest bytes [offset, offset + n) mapped from the file, where they are one
        data extent inside the file (as measured when it was opened); else None."""
        ext = self.extents
        k = self._cursor
        while k < len(ext) and ext[k][1] <= offset:
            k += 1
        self._cursor = k
        if k >= len(ext):
            return None
        s, e, kind, host = ext[k]
        if kind != _DATA or s > offset or e < offset + n:
            return None
        host += offset - s
        if host + n > self.file_size:
            return None
        return map_for_reading(self.fd, host, n)

    def read(self, mv: memoryview, offset: int) -> None:
        """Fill mv with the guest bytes at offset (within the window data_ranges loaded)."""
        n = len(mv)
        end = offset + n
        ext = self.extents
        k = self._cursor
        while k < len(ext) and ext[k][1] <= offset:
            k += 1
        self._cursor = k
        pos = offset
        while pos < end:
            if k >= len(ext) or ext[k][0] >= end:
                self._read_below(mv[pos - offset :], pos)
                return
            s, e, kind, host = ext[k]
            if s > pos:
                self._read_below(mv[pos - offset : s - offset], pos)
                pos = s
            stop = min(e, end)
            part = mv[pos - offset : stop - offset]
            if kind == _DATA:
                got = os.preadv(self.fd, [part], host + (pos - s))
                if got < len(part):
                    part[got:] = bytes(len(part) - got)
            elif kind == _ZERO:
                part[:] = bytes(len(part))
            else:
                data = self._decompress(host)
                part[:] = data[pos - s : stop - s]
            pos = stop
            if stop == e:
                k += 1

    def _read_below(self, mv: memoryview, offset: int) -> None:
        """Unallocated guest bytes: the backing file's, zeros past its end."""
        n = len(mv)
        k = 0
        if self.backing is not None and offset < self.backing.size:
            k = min(n, self.backing.size - offset)
            self.backing.read(mv[:k], offset)
        if k < n:
            mv[k:] = bytes(n - k)

    def _decompress(self, entry: int) -> bytes:
        if self._cached is not None and self._cached[0] == entry:
            return self._cached[1]
        from .compress import decompress_cluster  # only for images that have any

        host, length = self.geo.compressed_range(entry)
        cs = self.geo.cluster_size
        raw = _pread(self.fd, min(length, 2 * cs + 512), host)
        data = decompress_cluster(raw, self.ctype, cs)
        self._cached = (entry, data)
        return data

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _merge(out: list[tuple[int, int, int, int]], g: int, n: int, kind: int, host: int) -> None:
    """Append an extent, merged into the last one where it continues it (same kind,
    adjacent guest and, for data, host bytes)."""
    if out:
        s, e, k, h = out[-1]
        if k == kind and e == g and (kind != _DATA or h + (e - s) == host):
            out[-1] = (s, g + n, k, h)
            return
    out.append((g, g + n, kind, host))


def _pread(fd: int, n: int, offset: int) -> bytes:
    try:
        return os.pread(fd, n, offset)
    except OSError as exc:
        err = exc.errno or errno.EIO
        raise Qcow2IOError(err, f"Read failed: {os.strerror(err)}") from None


def _open_source(path: str, fmt: str | None) -> _RawSource | _Qcow2Source | None:
    """The source, or None where the full path must do it (anything but a plain image
    or chain; errors too: the full path reports them with its own messages)."""
    if fmt is None:
        fmt = probe_format(path, what="image")
    if fmt == "raw":
        return _RawSource(RawFile(path))
    if fmt != "qcow2":
        return None
    try:
        return _open_qcow2(path, (os.path.realpath(path),))
    except _NotPlain:
        return None


def _open_qcow2(path: str, seen: tuple[str, ...]) -> _Qcow2Source:
    """A plain qcow2 image and its backing chain (backing.open_backing's rules: no loop,
    a bounded depth); _NotPlain where any layer is not."""
    from .backing import open_backing
    from .header import read_layout
    from .storage import Storage

    be = FileBackend(path, False)
    src: _Qcow2Source | None = None
    try:
        storage = Storage(be, False)
        layout = read_layout(storage)
        h = layout.header
        if layout.data_file or h.crypt_method \
                or h.incompatible_features & ~(INCOMPAT_COMPRESSION | INCOMPAT_EXTL2):
            raise _NotPlain
        src = _Qcow2Source(path, be.fd, layout, storage.size())
        if layout.backing_file:
            below: Any = open_backing(path, layout.backing_file, layout.backing_format, seen,
                                      _open_qcow2)
            src.backing = _RawSource(below) if isinstance(below, RawFile) else below
    except BaseException:
        if src is not None:
            src.close()
        else:
            be.close()
        raise
    return src


# --------------------------------------------------------------------- writer --
class _Writer:
    """A thread that writes (offset, memoryview) lists to the output file, starts the
    disk on them and gives the buffer slots back; where the system cannot start
    writeback (no sync_file_range), another thread syncs behind it every SYNC_EVERY
    bytes. Either way the disk works while the copy goes on and the last sync has
    little left to wait for."""

    def __init__(self, out: FileBackend, nbufs: int) -> None:
        self.out = out
        # nbufs slots, each a buffer once a chunk needed one (a mapped chunk does not):
        # taking a slot per chunk bounds the chunks queued
        self.free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for _ in range(nbufs):
            self.free.put(None)
        self.jobs: queue.SimpleQueue[
            tuple[bytearray | None, list[tuple[int, memoryview]]] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.kick = threading.Event()
        self.done = False
        self.thread = threading.Thread(target=self._run, name="convert-writer", daemon=True)
        self.syncer: threading.Thread | None = None  # started where it is needed
        self.thread.start()

    def _sync(self) -> None:
        while True:
            self.kick.wait()
            self.kick.clear()
            if self.done:
                return
            try:
                self.out.sync()
            except BaseException as exc:  # (an error is reported once: keep it)
                self.error = exc
                return

    def _run(self) -> None:
        from .storage import start_writeback  # (looked up here: tests replace it)

        unsynced = 0
        hint = True  # sync_file_range: the disk starts on each chunk as soon as it is written
        while True:
            job = self.jobs.get()
            if job is None:
                return
            buf, writes = job
            if self.error is None:
                try:
                    lo, hi = 1 << 63, 0
                    for offset, data in writes:
                        _pwrite_all(self.out, data, offset)
                        unsynced += len(data)
                        lo, hi = min(lo, offset), max(hi, offset + len(data))
                    if hint and hi:
                        hint = start_writeback(self.out.fd, lo, hi - lo)
                    if not hint and unsynced >= SYNC_EVERY:
                        if self.syncer is None:
                            self.syncer = threading.Thread(target=self._sync, daemon=True,
                                                           name="convert-sync")
                            self.syncer.start()
                        self.kick.set()
                        unsynced = 0
                except BaseException as exc:  # reported by the main thread
                    self.error = exc
            self.free.put(buf)

    def buffer(self) -> bytearray | None:
        self.check()
        return self.free.get()

    def submit(self, buf: bytearray | None, writes: list[tuple[int, memoryview]]) -> None:
        self.jobs.put((buf, writes))

    def check(self) -> None:
        if self.error is not None:
            raise _write_error(self.error)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.done = True
        self.kick.set()
        if self.syncer is not None:
            self.syncer.join()


def _pwrite_all(out: FileBackend, data: bytes | memoryview, offset: int) -> None:
    mv = memoryview(data)
    while len(mv):
        n = out.pwrite(mv, offset)
        if n <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        mv = mv[n:]
        offset += n


def _write_error(exc: BaseException) -> BaseException:
    if isinstance(exc, OSError):
        err = exc.errno or errno.EIO
        return Qcow2IOError(err, f"Write failed: {os.strerror(err)}")
    return exc


# --------------------------------------------------------------------- target --
class _RawTarget:
    def __init__(self, out: FileBackend, size: int) -> None:
        self.out = out
        try:
            out.truncate(size)
        except OSError as exc:  # (EFBIG: a hostile image's virtual size) the full path's words
            err = exc.errno or errno.EIO
            raise Qcow2IOError(err, f"Truncate failed: {os.strerror(err)}") from None

    def place(self, s: int, e: int, writes: list[tuple[int, memoryview]],
              data: memoryview) -> None:
        writes.append((s, data))

    def finish(self) -> None:
        pass


class _Qcow2Target:
    """Data clusters appended in guest order after cluster 0, each L2 table's cluster
    just before the first data cluster it maps (a table is written once the copy has
    moved past its range: one table in memory); then the L1 table, the refcount blocks
    and table; cluster 0 last."""

    def __init__(self, out: FileBackend, size: int, version: int, geo: Geometry, lazy: bool,
                 compression_type: str) -> None:
        self.out = out
        self.size = size
        self.version = version
        self.geo = geo
        self.lazy = lazy
        self.ctype = compression_type
        self.next = geo.cluster_size  # next free host offset
        self.l1 = array("Q", bytes(geo.l1_size_for(size) * 8))
        self.l1i = -1  # the L1 index of the table being filled
        self.table: bytearray | None = None
        self.table_host = 0
        self.last_gc = -1  # the last guest cluster allocated, and its host offset
        self.last_host = 0

    def place(self, s: int, e: int, writes: list[tuple[int, memoryview]],
              data: memoryview) -> None:
        """Queue the write of guest [s, e) (data), allocating the clusters not allocated
        yet: cut where an L2 table's range ends (its next cluster may be the next table)."""
        cover = self.geo.l1_coverage
        while s < e:
            stop = min(e, (s // cover + 1) * cover)
            self._place(s, stop, writes, data[: stop - s])
            data = data[stop - s :]
            s = stop

    def _place(self, s: int, e: int, writes: list[tuple[int, memoryview]],
               data: memoryview) -> None:
        """place() within one L2 table's range. The range is contiguous in the file: a
        cluster already allocated can only be the last one allocated. A new cluster is
        written whole, the bytes around the data as zeros, as the full path's image
        writes it: later data in it overwrites them."""
        geo = self.geo
        cbits, cs = geo.cluster_bits, geo.cluster_size
        cmask = cs - 1
        first, last = s >> cbits, (e - 1) >> cbits
        if first == self.last_gc:
            host = self.last_host + (s & cmask)
            new = first + 1
        else:
            l1i = first >> geo.l2_bits
            if l1i != self.l1i:
                self._flush_table(writes)
                self.l1i, self.table, self.table_host = l1i, bytearray(cs), self.next
                self.next += cs
            host = self.next + (s & cmask)
            new = first
            if s & cmask:
                writes.append((host - (s & cmask), memoryview(_zero(cs))[: s & cmask]))
        writes.append((host, data))
        if last >= new:
            if e & cmask:
                writes.append((host + (e - s), memoryview(_zero(cs))[: cs - (e & cmask)]))
            assert self.table is not None
            count = last - new + 1
            i = new & (geo.l2_entries - 1)
            e0 = self.next | QCOW_OFLAG_COPIED
            self.table[i * 8 : (i + count) * 8] = _be64_bytes(
                array("Q", range(e0, e0 + (count << cbits), cs)))
            self.next += count << cbits
            self.last_gc, self.last_host = last, self.next - cs
            if self.next > MAX_HOST_OFFSET:
                raise Qcow2Error("Image is too large: the host offset limit is reached")

    def _flush_table(self, writes: list[tuple[int, memoryview]]) -> None:
        if self.table is not None:
            writes.append((self.table_host, memoryview(bytes(self.table))))
            self.l1[self.l1i] = self.table_host | QCOW_OFLAG_COPIED
            self.table = None

    def finish(self) -> None:
        """The last L2 table, the L1 table, the refcount blocks and table after the
        data, then cluster 0."""
        from .create import new_header
        from .header import pack_cluster0

        geo = self.geo
        cs, cbits = geo.cluster_size, geo.cluster_bits
        last: list[tuple[int, memoryview]] = []
        self._flush_table(last)
        for offset, data in last:
            _pwrite_all(self.out, data, offset)
        pos = self.next
        l1_size = len(self.l1)
        l1_clusters = div_round_up(l1_size * 8, cs)
        l1_off = pos if l1_size else 0
        if l1_size:
            _pwrite_all(self.out, _be64_bytes(self.l1).ljust(l1_clusters * cs, b"\0"), l1_off)
            pos += l1_clusters * cs
        used = pos >> cbits
        rblocks, rtable = geo.refcount_clusters_needed(used)
        total = used + rblocks + rtable
        per = geo.refblock_entries
        rb_off = pos
        # every cluster of the file has refcount 1: whole blocks of ones, a partial last
        full, batch = _ones(per, geo.refcount_order, cs), max(1, (16 << 20) // cs)
        b = 0
        while b < rblocks:
            k = min(batch, rblocks - b)
            if b + k == rblocks and total % per:
                k -= 1
                tail = _ones(total % per, geo.refcount_order, cs)
            else:
                tail = b""
            _pwrite_all(self.out, full * k + tail, rb_off + b * cs)
            b += k + (1 if tail else 0)
        rt = array("Q", range(rb_off, rb_off + rblocks * cs, cs))
        rt_off = rb_off + rblocks * cs
        _pwrite_all(self.out, _be64_bytes(rt).ljust(rtable * cs, b"\0"), rt_off)
        header = new_header(self.version, geo, self.size, l1_size, l1_off, rt_off, rtable,
                            self.lazy, self.ctype)
        _pwrite_all(self.out, pack_cluster0(ImageLayout(header=header), cs), 0)


def _ones(count: int, order: int, cs: int) -> bytes:
    """A refcount block whose first count entries are 1, the rest 0."""
    bits = 1 << order
    if bits >= 8:
        return ((1).to_bytes(bits // 8, "big") * count).ljust(cs, b"\0")
    per = 8 // bits  # entries per byte, the first in the least significant bits
    q, r = divmod(count, per)
    full = sum(1 << (i * bits) for i in range(per))
    out = bytes([full]) * q
    if r:
        out += bytes([sum(1 << (i * bits) for i in range(r))])
    return out.ljust(cs, b"\0")


# ----------------------------------------------------------------------- plan --
_QCOW2_OPTIONS = ("cluster_size", "compat", "refcount_bits", "lazy_refcounts",
                  "compression_type", "extended_l2", "preallocation", "refcount_mode")


class Plan:
    """An eligible convert: its open sources and the output's parameters."""

    def __init__(self, sources: list[Any], out_fmt: str) -> None:
        self.sources = sources
        self.out_fmt = out_fmt
        self.total = sum(s.size for s in sources)
        self.qcow2: tuple[int, int, Geometry, bool, str] | None = None

    def close(self) -> None:
        for s in self.sources:
            s.close()


def _qcow2_output(options: list[str], size: int) -> tuple[int, int, Geometry, bool, str] | None:
    """(version, size, geometry, lazy_refcounts, compression_type) for -o options the
    fast path creates, or None (anything else, errors included, is the full path's)."""
    from .commands import parse_create_options, valid_option_list
    from .create import standard_params

    try:
        if not all(valid_option_list(o) for o in options):
            return None
        opts = {k: v for k, (_t, v) in parse_create_options(",".join(options)).items()} \
            if options else {}
        if any(k not in _QCOW2_OPTIONS for k in opts) or opts.get("extended_l2", False) \
                or opts.get("preallocation", "off") != "off" \
                or opts.get("refcount_mode", "standard") != "standard":
            return None
        cluster_size = opts.get("cluster_size", 65536)
        refcount_bits = opts.get("refcount_bits", 16)
        lazy = bool(opts.get("lazy_refcounts", False))
        ctype = opts.get("compression_type", "zlib")
        version, size = standard_params(size, cluster_size, refcount_bits,
                                        opts.get("compat", "1.1"), lazy, ctype)
    except (Qcow2Error, TypeError, ValueError):
        return None
    geo = Geometry(cluster_size.bit_length() - 1, refcount_bits.bit_length() - 1, False)
    if geo.l1_size_for(size) * 8 > MAX_L1_SIZE_BYTES:
        return None
    return version, size, geo, lazy, ctype


def plan(inputs: list[str], fmt: str | None, out_fmt: str, options: list[str]) -> Plan | None:
    """Open the sources of a convert the fast path can do; None: the full path's."""
    if out_fmt not in FORMATS or (out_fmt == "raw" and options):
        return None
    if os.environ.get("QCOW2_CONVERT_FULL_PATH"):  # tests: force the full path
        return None
    sources: list[Any] = []
    try:
        for path in inputs:
            if not os.path.isfile(path):
                raise _NotPlain
            src = _open_source(path, fmt)
            if src is None:
                raise _NotPlain
            sources.append(src)
        p = Plan(sources, out_fmt)
        if out_fmt == "qcow2":
            p.qcow2 = _qcow2_output(options, p.total)
            if p.qcow2 is None:
                raise _NotPlain
    except (_NotPlain, Qcow2Error, OSError):
        for s in sources:
            s.close()
        return None
    return p


# ----------------------------------------------------------------------- copy --
def run(p: Plan, path: str, grain: int, progress: Any = None) -> None:
    """Write the plan's output to path (a new file, synced when done)."""
    try:
        out = FileBackend(path, writable=True, create=True)
    except OSError as exc:
        raise Qcow2Error(f"Could not create '{path}': {exc.strerror}") from None
    try:
        target: _RawTarget | _Qcow2Target
        if p.qcow2 is not None:
            version, size, geo, lazy, ctype = p.qcow2
            target = _Qcow2Target(out, size, version, geo, lazy, ctype)
        else:
            target = _RawTarget(out, p.total)
        writer = _Writer(out, BUFFERS)
        try:
            base = 0
            for src in p.sources:
                _copy(src, target, writer, base, grain, progress)
                base += src.size
        finally:
            writer.close()
        writer.check()
        try:
            target.finish()
            out.sync()
        except OSError as exc:
            raise _write_error(exc) from None
    finally:
        out.close()


def _copy(src: Any, target: Any, writer: _Writer, base: int, grain: int, progress: Any) -> None:
    """The full path's copy_range over the whole source into a new (zeroed) target."""
    end = src.size
    window = src.window()
    pos = 0
    while pos < end:
        w_end = min(end, pos + window)
        data = aligned(src.data_ranges(pos, w_end - pos), grain, pos, w_end) if grain \
            else [(pos, w_end)]
        if not grain and isinstance(src, _Qcow2Source):
            src.data_ranges(pos, w_end - pos)  # (read() needs the window's extents)
        for s, e in data:
            if progress is not None and s > pos:
                progress.update(s - pos)
            _copy_data(src, target, writer, s, e, base, grain, progress)
            pos = e
        if pos < w_end:
            # on to where data may be: a window at a time, a huge virtual size over
            # few tables would take hours (1 PiB: a million windows)
            nxt = max(w_end, src.next_data(w_end))
            if progress is not None:
                progress.update(nxt - pos)
            pos = nxt


_zeros: dict[int, bytes] = {}


def _zero(n: int) -> bytes:
    """n zero bytes, made once (a fresh 2 MiB of zeros per chunk costs a memset)."""
    z = _zeros.get(n)
    if z is None:
        z = _zeros[n] = bytes(n)
    return z


def _copy_data(src: Any, target: Any, writer: _Writer, start: int, end: int, base: int,
               grain: int, progress: Any) -> None:
    size = max(CHUNK, grain)
    chunk = size if not grain else size // grain * grain
    zero_grain = _zero(grain)
    zero_chunk = _zero(chunk)
    pos = start
    while pos < end:
        n = min(chunk, end - pos)
        buf = writer.buffer()
        mv = src.view(pos, n)
        if mv is None:
            if buf is None:
                buf = bytearray(size)
            mv = memoryview(buf)[:n]
            src.read(mv, pos)
        writes: list[tuple[int, memoryview]] = []
        # a partial last grain is tested as if padded with zeros: on its own bytes
        if not grain:
            target.place(base + pos, base + pos + n, writes, mv)
        elif not zero_chunk.startswith(mv):
            for s, e in _nonzero_runs(mv, n, grain, zero_grain):
                target.place(base + pos + s, base + pos + e, writes, mv[s:e])
        del mv
        writer.submit(buf, writes)
        pos += n
        if progress is not None:
            progress.update(n)


def _nonzero_runs(mv: memoryview, n: int, grain: int, zero: bytes) -> list[tuple[int, int]]:
    """(start, end) of the runs of grains of mv[:n] that hold a nonzero byte (zero
    .startswith(view) is a memcmp of the view's own memory, no copy)."""
    out: list[tuple[int, int]] = []
    startswith = zero.startswith
    run = -1
    for i in range(0, n, grain):
        if startswith(mv[i : i + grain]):
            if run >= 0:
                out.append((run, i))
                run = -1
        elif run < 0:
            run = i
    if run >= 0:
        out.append((run, n))
    return out
