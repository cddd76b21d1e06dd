"""The L1 -> L2 tree walker, vectorized: validating L1 entries, reading L2 tables in
chunks, decoding their entries (data, compressed, zero, unallocated) into arrays,
expanding compressed clusters into the host clusters they touch, and classifying
every bad entry.

Two kinds of caller share it. The strict ones (snapshot create/apply/delete, the
refcount modes' reference counts) raise CorruptImageError on the first problem it
reports; check reports every problem (with qemu-img's messages, which stay in
check.py) and carries on. So the walker never raises: it returns masks of the bad
entries (`L1Entries`, `L2Entries`) or, for the strict byte-level fast path
(`decode_chunk`), the first problem's message.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .format import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
)

if TYPE_CHECKING:
    from .geometry import Geometry

_U64 = np.uint64
_SWAP = sys.byteorder == "little"
BITMAP_ALLOC = 0xFFFFFFFF  # extended L2: the allocation half of the subcluster bitmap
# Byte 0 of a big-endian table entry holds bits 56-63: the COPIED and COMPRESSED flags.
B0_COPIED = 0x80
B0_COMPRESSED = 0x40

# Strict walkers' problems (CorruptImageError messages)
L1_MISALIGNED = "L2 table offset in an L1 table is not cluster aligned"
L1_PAST_EOF = "L2 table offset in an L1 table is past the end of the file"
L2_PAST_EOF = "An L2 entry points past the end of the image file"
COMPRESSED_PAST_EOF = "A compressed cluster lies past the end of the image file"


# ------------------------------------------------------------------------------ L1 --
class L1Entries:
    """Nonzero L1 entries (native values): the L2 table offsets they hold (exact, so a
    misaligned one reads where it points, as QEMU does) and the bad ones."""

    def __init__(self, ent: np.ndarray, cs: int) -> None:
        self.ent = ent
        offs = (ent & _U64(L1E_OFFSET_MASK)).astype(np.int64)
        self.keep = offs != 0  # no table: reads as unallocated
        self.offsets = offs[self.keep]
        self.cs = cs

    def reserved(self) -> np.ndarray:
        """Entries (of ent) with reserved bits set."""
        return (self.ent & _U64(L1E_RESERVED_MASK)) != 0

    def misaligned(self) -> np.ndarray:
        """Offsets (of self.offsets) that are not cluster aligned."""
        return (self.offsets & (self.cs - 1)) != 0

    def strict_problem(self, file_clusters: int, cluster_bits: int) -> str | None:
        """The first problem a strict walker stops at: misalignment, then past EOF."""
        if not len(self.offsets):
            return None
        if self.misaligned().any():
            return L1_MISALIGNED
        if int(self.offsets.max()) >> cluster_bits >= file_clusters:
            return L1_PAST_EOF
        return None


def l2_offsets(l1: np.ndarray, cs: int) -> np.ndarray:
    """The L2 table offsets of an L1 table (one per nonzero entry, in order)."""
    l1 = np.asarray(l1, dtype=np.uint64)
    return L1Entries(l1[l1 != 0], cs).offsets


# -------------------------------------------------------------------------- reading --
def read_regions(storage: Any, offsets: np.ndarray, nbytes: int, file_size: int) -> np.ndarray:
    """(n, nbytes) uint8 array of the regions at offsets (sorted); past-EOF bytes are
    zero. Back-to-back regions are read with one call."""
    n = len(offsets)
    out = np.zeros((n, nbytes), dtype=np.uint8)
    if not n:
        return out
    read_into(storage, np.asarray(offsets, dtype=np.int64), memoryview(out.reshape(-1)), nbytes,
              file_size)
    return out


def read_into(storage: Any, offs: np.ndarray, mv: memoryview, nbytes: int,
              file_size: int | None = None) -> None:
    """Read the regions at offs (nbytes each) into mv back to back, one read per run
    of back-to-back regions. With file_size, bytes past it are left as they are (the
    caller zeroed them); without, the caller knows every region is inside the file."""
    for s, e in runs(offs, nbytes):
        off = int(offs[s])
        avail = (e - s) * nbytes if file_size is None else min((e - s) * nbytes, file_size - off)
        if avail > 0:
            storage.preadv([mv[s * nbytes : s * nbytes + avail]], off)


def to_native(raw: np.ndarray) -> np.ndarray:
    """Big-endian bytes (n, nbytes) -> native uint64 (n, nbytes // 8), in place."""
    t = raw.view(np.uint64)
    if _SWAP:
        t.byteswap(inplace=True)
    return t


def read_tables(storage: Any, offsets: np.ndarray, cs: int, file_size: int) -> np.ndarray:
    """The tables at offsets (sorted) as native uint64 (n, cs // 8); past EOF reads 0."""
    return to_native(read_regions(storage, offsets, cs, file_size))


def table_chunks(storage: Any, offsets: np.ndarray, cs: int, file_size: int,
                 chunk_bytes: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(index of the first, offsets, native tables) of the tables at offsets (sorted,
    distinct), chunk_bytes at a time (memory stays bounded)."""
    per = max(1, chunk_bytes // cs)
    for s in range(0, len(offsets), per):
        offs = offsets[s : s + per]
        yield s, offs, read_tables(storage, offs, cs, file_size)


def runs(offs: np.ndarray, size: int) -> list[tuple[int, int]]:
    """(start, end) index ranges of back-to-back offsets (regions of this size)."""
    if not len(offs):
        return []
    brk = np.flatnonzero(np.diff(offs) != size) + 1
    starts = np.r_[0, brk]
    ends = np.r_[brk, len(offs)]
    return list(zip(starts.tolist(), ends.tolist()))


# ------------------------------------------------------------------------------ L2 --
def plain_clean(ent: np.ndarray, cs: int, scratch: np.ndarray) -> bool:
    """Whether standard-layout entries (native) hold nothing compressed, no reserved
    bit and no misaligned offset: one pass, and then only the offsets matter."""
    odd = _U64(QCOW_OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK | ((cs - 1) & ~0x1FF))
    return not np.bitwise_and(ent, odd, out=scratch).any()


class L2Entries:
    """The entries of a chunk of L2 tables (native uint64 (k, words)), decoded into
    masks: standard (allocated) clusters, compressed ones, and the bad entries of each
    kind. Everything is computed once, on first use."""

    def __init__(self, geo: Geometry, tables: np.ndarray) -> None:
        self.geo = geo
        self.ext = geo.extended_l2
        self.tables = tables
        if self.ext:
            self.ent, self.bmp = tables[:, 0::2], tables[:, 1::2]
        else:
            self.ent, self.bmp = tables, None
        ent = self.ent
        self.comp = (ent & _U64(QCOW_OFLAG_COMPRESSED)) != 0
        self.hoff = ent & _U64(L2E_OFFSET_MASK)
        self.normal = self.hoff != 0
        self.any_comp = bool(self.comp.any())
        if self.any_comp:
            self.normal &= ~self.comp

    def reserved(self) -> np.ndarray:
        """Standard descriptors with reserved bits set."""
        resv = (self.ent & _U64(L2E_STD_RESERVED_MASK)) != 0
        if self.any_comp:
            resv &= ~self.comp
        return resv

    def compressed_copied(self) -> np.ndarray:
        """Compressed descriptors with the COPIED flag (never valid)."""
        return self.comp & ((self.ent & _U64(QCOW_OFLAG_COPIED)) != 0)

    def compressed_bitmap(self) -> np.ndarray:
        """Extended L2: compressed clusters with a nonzero subcluster bitmap."""
        assert self.bmp is not None
        return self.comp & (self.bmp != 0)

    def unallocated_bitmap(self) -> np.ndarray:
        """Extended L2: unallocated clusters with allocated subclusters."""
        assert self.bmp is not None
        return ~self.comp & ~self.normal & ((self.bmp & _U64(BITMAP_ALLOC)) != 0)

    def allocated_bitmap(self) -> np.ndarray:
        """Extended L2: subclusters both allocated and zero."""
        assert self.bmp is not None
        return self.normal & (((self.bmp >> _U64(32)) & self.bmp & _U64(BITMAP_ALLOC)) != 0)

    def misaligned(self) -> np.ndarray:
        """Standard clusters whose offset is not cluster aligned."""
        return self.normal & ((self.hoff & _U64(self.geo.cluster_size - 1)) != 0)

    def has_data(self) -> np.ndarray:
        """Entries that say their cluster holds data (not a preallocated zero cluster)."""
        if self.ext:
            assert self.bmp is not None
            return (self.bmp & _U64(BITMAP_ALLOC)) != 0
        return (self.ent & _U64(QCOW_OFLAG_ZERO)) == 0

    def compressed_regions(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(host offset, byte length) of the compressed entries mask selects."""
        host, length = compressed_ranges(self.geo, self.ent[mask])
        return host.astype(np.int64), length.astype(np.int64)


def entry_bytes(geo: Geometry, buf: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(byte-0 view (k, entries) uint8, big-endian entry view (k, entries)) of a chunk
    of raw tables."""
    words = geo.cluster_size // 8
    step = 2 if geo.extended_l2 else 1
    u8 = np.frombuffer(buf, dtype=np.uint8).reshape(k, words, 8)
    be = np.frombuffer(buf, dtype=">u8").reshape(k, words)
    return u8[:, ::step, 0], be[:, ::step]


def decode_chunk(geo: Geometry, buf: Any, k: int, out: np.ndarray,
                 file_clusters: int) -> tuple[np.ndarray | None, str | None]:
    """The strict walkers' decoding of k raw (big-endian) tables: fill out (k,
    entries) with the host cluster index of every standard entry (0 where
    unallocated or compressed). Returns (the compressed entries (native values) over
    their table rows, shape (2, n), or None; the first problem or None). Works on the
    bytes where it can: the usual tree has no compressed entry and no problem."""
    cs = geo.cluster_size
    b0, be = entry_bytes(geo, buf, k)
    np.bitwise_and(be, np.uint64(L1E_OFFSET_MASK), out=out)
    flags = b0 & B0_COMPRESSED
    comp = None
    if flags.any():
        cmask = flags != 0
        rows = np.nonzero(cmask)[0]
        comp = np.stack([be[cmask].astype(np.uint64), rows.astype(np.uint64)])
        out[cmask] = 0
    if cs > 512:
        if comp is None:
            # bits 9 .. cluster_bits-1 must be clear; on the big-endian bytes, byte 6
            # holds bits 8-15 and byte 5 bits 16-23 (a pass over 1/8 of the data)
            low = (cs - 1) & ~511
            u8 = np.frombuffer(buf, dtype=np.uint8).reshape(k, -1, 8)
            u8 = u8[:, :: 2 if geo.extended_l2 else 1]
            misaligned = bool((u8[:, :, 6] & ((low >> 8) & 0xFF)).any())
            if low >> 16:
                misaligned |= bool((u8[:, :, 5] & (low >> 16)).any())
        else:
            misaligned = bool((out & np.uint64(cs - 1)).any())
        if misaligned:
            bad = int(out[(out & np.uint64(cs - 1)) != 0][0])
            return comp, f"Cluster offset {bad:#x} in an L2 table is not cluster aligned"
    np.right_shift(out, np.uint64(geo.cluster_bits), out=out)
    if len(out) and int(out.max()) >= file_clusters:
        return comp, L2_PAST_EOF
    return comp, None


def strict_chunks(storage: Any, geo: Geometry, offsets: np.ndarray, file_clusters: int,
                  cache: TreeCache | None, fill: bool, chunk_bytes: int
                  ) -> Iterator[tuple[int, np.ndarray, Any, np.ndarray, np.ndarray | None, str | None]]:
    """The strict walkers' pass over the L2 tables at offsets (sorted, distinct), chunk
    by chunk: yields (index of the chunk's first table, its offsets, raw bytes (k x
    cs), host cluster indices (k, entries) as decode_chunk gives them, compressed
    entries or None, the chunk's first problem or None). With fill, the tables the
    cache wants are read straight into it; without, chunks the cache holds come from
    it, not decoded again (their compressed entries: None). Buffers are reused: a
    consumer is done with a chunk before the next."""
    cs = geo.cluster_size
    per = max(1, chunk_bytes // cs)
    idx: np.ndarray | None = None
    whole: memoryview | None = None
    for c0 in range(0, len(offsets), per):
        offs = offsets[c0 : c0 + per]
        k = len(offs)
        if cache is not None and not fill:
            pos = cache.lookup(offs)
            if pos is not None:
                yield c0, offs, cache.rows(cache.raw, pos), cache.rows(cache.clusters, pos), None, None
                continue
        sl = cache.slot(offs) if cache is not None and fill else None
        if sl is not None:
            assert cache is not None
            buf = memoryview(cache.raw[sl]).cast("B")
            out = cache.clusters[sl]
        else:
            if idx is None or whole is None:
                n = min(len(offsets), per)
                idx = np.empty((n, geo.l2_entries), dtype=np.uint64)
                whole = memoryview(bytearray(n * cs))
            buf = whole[: k * cs]
            out = idx[:k]
        read_into(storage, offs, buf, cs)
        comp, problem = decode_chunk(geo, buf, k, out, file_clusters)
        if problem is None:
            if sl is not None:
                assert cache is not None
                cache.filled[sl] = True
            elif cache is not None and fill:
                cache.store(offs, buf, out)
        yield c0, offs, buf, out, comp, problem


class TreeCache:
    """Some L2 tables (sorted distinct offsets) as one pass met them: raw bytes and
    decoded host cluster indices (`decode_chunk`), for a later pass over the same
    tables within one operation (the tables do not change in between)."""

    def __init__(self, offsets: np.ndarray, cs: int, entries: int) -> None:
        self.offsets = offsets
        # np.empty: pages are only touched for the tables actually stored
        self.raw = np.empty((len(offsets), cs), dtype=np.uint8)
        self.clusters = np.empty((len(offsets), entries), dtype=np.uint64)
        self.filled = np.zeros(len(offsets), dtype=bool)

    def _positions(self, offs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(self.offsets, offs), len(self.offsets) - 1)
        return pos, self.offsets[pos] == offs

    def store(self, offs: np.ndarray, buf: Any, out: np.ndarray) -> None:
        """Keep the wanted ones of a chunk of tables (offs sorted, buf their bytes)."""
        pos, hit = self._positions(offs)
        if not hit.any():
            return
        raw = np.frombuffer(buf, dtype=np.uint8).reshape(len(offs), -1)
        if hit.all() and _contiguous(pos):
            sl = slice(int(pos[0]), int(pos[-1]) + 1)
            self.raw[sl] = raw
            self.clusters[sl] = out
            self.filled[sl] = True
            return
        p = pos[hit]
        self.raw[p] = raw[hit]
        self.clusters[p] = out[hit]
        self.filled[p] = True

    def slot(self, offs: np.ndarray) -> slice | None:
        """The rows for these tables when the cache wants every one of them and they
        are consecutive (a chunk of a tree the cache was made for), else None."""
        pos, hit = self._positions(offs)
        if hit.all() and _contiguous(pos):
            return slice(int(pos[0]), int(pos[-1]) + 1)
        return None

    def lookup(self, offs: np.ndarray) -> np.ndarray | None:
        """Rows of these tables, or None unless the cache holds every one."""
        pos, hit = self._positions(offs)
        return pos if hit.all() and self.filled[pos].all() else None

    @staticmethod
    def rows(arr: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """arr[pos]: a view when the rows are consecutive (the usual case), else a copy."""
        if _contiguous(pos):
            return arr[int(pos[0]) : int(pos[-1]) + 1]
        return arr[pos]


def _contiguous(pos: np.ndarray) -> bool:
    return bool(len(pos)) and int(pos[-1]) - int(pos[0]) == len(pos) - 1


# ---------------------------------------------------------------------- compressed --
def compressed_ranges(geo: Geometry, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(host offset, byte length) of compressed L2 entries, vectorized
    (Geometry.compressed_range for many entries)."""
    e = entries.astype(np.uint64)
    host = e & np.uint64(geo.coffset_mask)
    nb = ((e >> np.uint64(geo.csize_shift)) & np.uint64(geo.csize_mask)) + np.uint64(1)
    end = (host & ~np.uint64(511)) + nb * np.uint64(512)
    return host, end - host


def compressed_clusters(geo: Geometry, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the host clusters compressed entries touch, concatenated; how many each)."""
    cbits = np.uint64(geo.cluster_bits)
    host, length = compressed_ranges(geo, entries)
    first = host >> cbits
    n = (((host + length - np.uint64(1)) >> cbits) - first + np.uint64(1)).astype(np.int64)
    return expand_ranges(first.astype(np.int64), n), n


def expand_ranges(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(first[i], first[i] + counts[i])."""
    total = int(counts.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    return np.repeat(first, counts) + (np.arange(total, dtype=np.int64) - np.repeat(starts, counts))
