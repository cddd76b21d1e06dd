"""Guest-to-host cluster mapping: the L1 table and the L2 tables.

Entries are plain Python ints (l2_entry, bitmap); bitmap is 0 for standard L2 tables and
the subcluster allocation/zero bitmap with extended L2 entries. Changing an entry may
allocate an L2 table or copy a shared one (COW), both from the refcount strategy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .cache import TableCache
from .errors import CorruptImageError, NoSpaceError, ReadOnlyError
from .format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    decode_table,
    encode_table,
)
from .geometry import Geometry, div_round_up
from .refcount import MAX_HOST_OFFSET, RefcountStrategy
from .storage import Storage

# Cluster kinds as seen by readers
UNALLOCATED, NORMAL, ZERO, COMPRESSED = 0, 1, 2, 3

BITMAP_ALLOC_ALL = 0xFFFFFFFF
_CLEAR_COPIED = ~QCOW_OFLAG_COPIED & 0xFFFFFFFFFFFFFFFF
BITMAP_ZERO_ALL = 0xFFFFFFFF << 32


class ClusterMap:
    def __init__(
        self,
        storage: Storage,
        geometry: Geometry,
        l1_table: np.ndarray,
        l1_offset: int,
        refcounts: RefcountStrategy | None,
        cache_tables: int,
        version: int,
    ) -> None:
        self.storage = storage
        self.geo = geometry
        self.l1 = l1_table
        self.l1_offset = l1_offset
        self.refcounts = refcounts
        self.version = version
        self._l1_dirty_lo = self._l1_dirty_hi = -1
        # guest cluster -> host offset of an owned data cluster that small writes may
        # overwrite in place, filled by the image's write path once contiguous_host and the
        # metadata guard passed. Any change to the mapping (an entry, the L1 table, a
        # table installed or dropped) empties it, as does the image on every write that
        # allocates (metadata may move) and on close or corruption.
        self.owned: dict[int, int] = {}
        self.l2cache = TableCache(cache_tables, self._load_l2, self._write_l2,
                                  on_change=self.owned.clear)
        self._ext = geometry.extended_l2
        self._file_limit: Callable[[], int] | None = None
        # write_guard(offset, length, what) raises instead of writing onto other metadata;
        # load_guard(offset) raises instead of reading an L2 table from a bad place
        self.write_guard: Callable[[int, int, str], None] | None = None
        self.load_guard: Callable[[int], None] | None = None
        # L2 tables allocated since the L1 table was last written: no durable metadata
        # points at them yet, so they may be written in any order. Every other table is
        # reachable from the on-disk L1 and is written only once the data its new
        # entries point at is durable (see _write_l2).
        self._fresh: set[int] = set()
        # Geometry properties recompute on every access; the lookup hot path uses these.
        self._l2_bits = geometry.l2_bits
        self._l2_mask = geometry.l2_entries - 1
        self._cmask = geometry.cluster_size - 1

    # -- L2 table I/O ----------------------------------------------------------------
    def _load_l2(self, offset: int) -> np.ndarray:
        if self.load_guard is not None:
            self.load_guard(offset)
        return decode_table(self.storage.pread(self.geo.cluster_size, offset))

    def _write_l2(self, offset: int, table: np.ndarray) -> None:
        if self.write_guard is not None:
            self.write_guard(offset, self.geo.cluster_size, "an L2 table")
        if offset not in self._fresh and self.refcounts is not None:
            self.refcounts.ensure_durable()
        if offset not in self._fresh and self.storage.unsynced_data_writes:
            # A reachable table may point at clusters whose data (a COW copy, a new
            # write) is not durable yet: sync first, or a power cut could leave the
            # entry pointing at garbage.
            self.storage.sync()
        self.storage.pwrite(encode_table(table), offset, "l2")

    def l2_offset(self, l1_index: int) -> int:
        if l1_index >= len(self.l1):
            return 0
        off = int(self.l1[l1_index]) & L1E_OFFSET_MASK
        if off & (self.geo.cluster_size - 1):
            raise CorruptImageError(
                f"L2 table offset {off:#x} in L1 entry {l1_index} is not cluster aligned"
            )
        return off

    def l2_table(self, l1_index: int) -> np.ndarray | None:
        off = self.l2_offset(l1_index)
        return self.l2cache.get(off) if off else None

    # -- lookups ---------------------------------------------------------------------
    def get(self, guest_cluster: int) -> tuple[int, int]:
        """(l2_entry, bitmap) of a guest cluster; (0, 0) if no L2 table."""
        # hot path of every small read/write: l2_offset/l2_table inlined
        l1i = guest_cluster >> self._l2_bits
        l1 = self.l1
        if l1i >= len(l1):
            return 0, 0
        off = l1.item(l1i) & L1E_OFFSET_MASK  # .item(): a Python int, faster than int(l1[i])
        if not off:
            return 0, 0
        if off & self._cmask:
            self.l2_offset(l1i)  # raises the corruption error
        table = self.l2cache.get(off)
        i = guest_cluster & self._l2_mask
        e = table.item(2 * i) if self._ext else table.item(i)
        if not l1.item(l1i) & QCOW_OFLAG_COPIED:
            # a table the live state does not own: its entries' COPIED flags speak for
            # the table's owner (owner mode keeps them after a snapshot), not for us
            e &= _CLEAR_COPIED
        return (e, table.item(2 * i + 1)) if self._ext else (e, 0)

    def contiguous_host(self, guest_cluster: int, count: int, owned: bool) -> int:
        """Host offset of guest_cluster if it and the count - 1 clusters after it are
        data clusters (standard L2 entries) stored back to back on the host, else -1.
        With owned, each must also carry the COPIED flag (writable in place).
        Lets a multi-cluster request become one system call without a per-cluster loop."""
        if self._ext:
            return -1
        l1i = guest_cluster >> self._l2_bits
        if (guest_cluster + count - 1) >> self._l2_bits != l1i:
            return -1
        l1 = self.l1
        if l1i >= len(l1):
            return -1
        l1e = l1.item(l1i)
        off = l1e & L1E_OFFSET_MASK
        if not off or off & self._cmask:
            return -1
        if owned and not l1e & QCOW_OFLAG_COPIED:
            return -1  # (see get: the entries' flags are the table owner's)
        table = self.l2cache.get(off)
        i = guest_cluster & self._l2_mask
        e0 = table.item(i)
        host = e0 & L2E_OFFSET_MASK
        if not host or host & self._cmask or e0 & (QCOW_OFLAG_ZERO | QCOW_OFLAG_COMPRESSED):
            return -1
        if owned and not e0 & QCOW_OFLAG_COPIED:
            return -1
        if count > 1:
            # The run must be e0, e0 + cs, e0 + 2 cs, ...: same flags, adjacent hosts.
            # Short runs: comparing Python lists is cheapest; long ones: numpy.
            cs = self._cmask + 1
            if host + count * cs > MAX_HOST_OFFSET:
                return -1
            run = table[i : i + count]
            if count <= 64:
                if run.tolist() != list(range(e0, e0 + count * cs, cs)):
                    return -1
            elif not (np.diff(run) == cs).all():
                return -1
        return host

    def classify(self, entry: int) -> int:
        if entry & QCOW_OFLAG_COMPRESSED:
            return COMPRESSED
        if not self._ext and entry & QCOW_OFLAG_ZERO:
            return ZERO
        if entry & L2E_OFFSET_MASK:
            return NORMAL
        return UNALLOCATED

    def host_offset(self, entry: int) -> int:
        """Validated host cluster offset of a standard entry."""
        host = entry & L2E_OFFSET_MASK
        if host & (self.geo.cluster_size - 1):
            raise CorruptImageError(f"Cluster offset {host:#x} is not cluster aligned")
        return host

    # -- updates ---------------------------------------------------------------------
    def set(self, guest_cluster: int, entry: int, bitmap: int = 0) -> None:
        geo = self.geo
        table, l2off = self._writable_l2(guest_cluster >> geo.l2_bits)
        i = guest_cluster & (geo.l2_entries - 1)
        if self._ext:
            table[2 * i] = entry
            table[2 * i + 1] = bitmap
        else:
            table[i] = entry
        self.l2cache.mark_dirty(l2off)
        self.owned.clear()

    def set_run(self, guest_cluster: int, entries: np.ndarray) -> None:
        """set() for consecutive clusters within one L2 table (standard entries)."""
        assert not self._ext
        l1i = guest_cluster >> self._l2_bits
        assert (guest_cluster + len(entries) - 1) >> self._l2_bits == l1i
        table, l2off = self._writable_l2(l1i)
        i = guest_cluster & self._l2_mask
        table[i : i + len(entries)] = entries
        self.l2cache.mark_dirty(l2off)
        self.owned.clear()

    def _writable_l2(self, l1i: int) -> tuple[np.ndarray, int]:
        """The L2 table for l1i, allocated or copied so that it may be modified."""
        if l1i >= len(self.l1):
            raise NoSpaceError("Guest offset beyond the L1 table")
        l1e = int(self.l1[l1i])
        old = self.l2_offset(l1i)
        if old and l1e & QCOW_OFLAG_COPIED:
            return self.l2cache.get(old), old
        new = self._rc().allocate(1)
        if old:
            # Shared with a snapshot: copy it; the old one loses our reference. The
            # copy's data is not ours either: no entry of it is COPIED.
            table = self.l2cache.get(old).copy()
            if self._ext:
                table[0::2] &= np.uint64(_CLEAR_COPIED)
            else:
                table &= np.uint64(_CLEAR_COPIED)
        else:
            table = np.zeros(self.geo.cluster_size // 8, dtype=np.uint64)
        self._fresh.add(new)
        self.l2cache.put(new, table, dirty=True)  # may write back (and fail) an evicted table
        self.l1[l1i] = new | QCOW_OFLAG_COPIED
        self.mark_l1_dirty(l1i)
        if old:
            # only now that the L1 entry no longer points at it (if put() failed, the old
            # table would still be referenced and must keep its count)
            self.refcounts.release(old)
        return table, new

    def replace_l1(self, l1: np.ndarray, offset: int) -> None:
        """The header now names this L1 table (written and durable): make it the
        in-memory one. Cached tables and the in-place memo speak for the old tree."""
        self.l1 = l1
        self.l1_offset = offset
        self.owned.clear()
        self._l1_dirty_lo = self._l1_dirty_hi = -1
        self.l2cache.drop_all()

    def mark_l1_dirty(self, lo: int, hi: int | None = None) -> None:
        self.owned.clear()
        hi = lo + 1 if hi is None else hi
        if self._l1_dirty_lo < 0:
            self._l1_dirty_lo, self._l1_dirty_hi = lo, hi
        else:
            self._l1_dirty_lo = min(self._l1_dirty_lo, lo)
            self._l1_dirty_hi = max(self._l1_dirty_hi, hi)

    @property
    def l1_dirty(self) -> bool:
        return self._l1_dirty_lo >= 0

    def write_l1(self) -> None:
        """Write the dirty span of the L1 table (512-byte aligned)."""
        if self._l1_dirty_lo < 0:
            return
        lo = (self._l1_dirty_lo // 64) * 64
        hi = min(len(self.l1), div_round_up(self._l1_dirty_hi, 64) * 64)
        if self.refcounts is not None:
            self.refcounts.ensure_durable()
        self.storage.pwrite(encode_table(self.l1[lo:hi]), self.l1_offset + lo * 8, "l1")
        self._l1_dirty_lo = self._l1_dirty_hi = -1
        self._fresh.clear()  # (maybe) reachable from now on

    def flush_l2(self, fresh_only: bool = False) -> None:
        """Write back dirty L2 tables (with fresh_only, only those no durable L1 entry
        points at yet, which need no ordering)."""
        self.l2cache.flush(self._fresh.__contains__ if fresh_only else None)

    @property
    def reachable_dirty(self) -> bool:
        """Whether a dirty L2 table is reachable from the on-disk L1 table."""
        return any(off not in self._fresh for off in self.l2cache.dirty_offsets())

    def _rc(self) -> RefcountStrategy:
        """The refcounts for a change of the mapping; a read-only map has none (the
        change is refused as a write to a read-only image)."""
        if self.refcounts is None:
            raise ReadOnlyError("Image is opened read-only")
        return self.refcounts

    def grow_l1(self, min_size: int, write_header: Callable[[int, int], None]) -> None:
        """Move the L1 table to a larger home (crash-safe: new table durable before the
        header points at it; the old one is released after)."""
        if min_size <= len(self.l1):
            return
        self.owned.clear()
        rc = self._rc()
        if min_size * 8 > 32 * 1024 * 1024:
            raise NoSpaceError("L1 table would exceed its maximum size")
        new_size = min_size
        clusters = div_round_up(new_size * 8, self.geo.cluster_size)
        new_off = rc.allocate(clusters)
        if new_off + clusters * self.geo.cluster_size > MAX_HOST_OFFSET:
            raise NoSpaceError("Image file would exceed the maximum host offset")
        table = np.zeros(new_size, dtype=np.uint64)
        table[: len(self.l1)] = self.l1
        self.flush_l2()
        self.storage.pwrite(encode_table(table), new_off, "l1")
        self.storage.sync()
        old_off, old_clusters = self.l1_offset, div_round_up(len(self.l1) * 8, self.geo.cluster_size)
        write_header(new_off, new_size)
        self.l1, self.l1_offset = table, new_off
        self._l1_dirty_lo = self._l1_dirty_hi = -1
        self._fresh.clear()
        if old_off and len(table) and old_clusters:
            rc.release(old_off, old_clusters)


def entry_runs(cmap: ClusterMap, first: int, end: int) -> list[tuple[int, int, int, int]]:
    """Runs (first guest cluster, count, kind, host offset) over [first, end) for a
    standard L2 image, computed per L2 table with numpy. Hosts are contiguous in a
    NORMAL run and in a ZERO run that keeps its clusters (other ZERO runs and
    COMPRESSED runs carry host 0)."""
    geo = cmap.geo
    out: list[tuple[int, int, int, int]] = []
    c = first
    while c < end:
        l1i = c >> geo.l2_bits
        base = l1i << geo.l2_bits
        stop = min(end, base + geo.l2_entries)
        table = cmap.l2_table(l1i)
        if table is None:
            # a run of empty L1 entries (or the range past the L1 table, as large as a
            # damaged disk size says) is one step, not one per table
            last = min(len(cmap.l1), ((end - 1) >> geo.l2_bits) + 1)
            nz = np.flatnonzero(cmap.l1[l1i + 1 : last] & np.uint64(L1E_OFFSET_MASK))
            nxt = (l1i + 1 + int(nz[0])) << geo.l2_bits if len(nz) else end
            stop = min(end, max(stop, nxt))
            _append(out, c, stop - c, UNALLOCATED, 0)
            c = stop
            continue
        ent = table[c - base : stop - base]
        kinds = np.full(len(ent), UNALLOCATED, dtype=np.int8)
        offs = ent & np.uint64(L2E_OFFSET_MASK)
        comp = (ent & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
        zero = (ent & np.uint64(QCOW_OFLAG_ZERO)) != 0
        kinds[offs != 0] = NORMAL
        kinds[zero] = ZERO
        kinds[comp] = COMPRESSED
        hosts = np.where(kinds == NORMAL, offs, 0).astype(np.int64)
        if ((hosts & (geo.cluster_size - 1)) != 0).any():
            raise CorruptImageError("Cluster offset is not cluster aligned")
        # a zero cluster that keeps its allocation reports its host offset too (as QEMU)
        hosts = np.where(kinds == ZERO, offs, hosts).astype(np.int64)
        # a run breaks where the kind changes or a host offset is not contiguous
        brk = np.ones(len(ent), dtype=bool)
        if len(ent) > 1:
            same = kinds[1:] == kinds[:-1]
            contig = ((hosts[1:] == 0) & (hosts[:-1] == 0)) | \
                (hosts[1:] == hosts[:-1] + geo.cluster_size)
            brk[1:] = ~(same & contig)
        starts = np.flatnonzero(brk)
        lens = np.diff(np.append(starts, len(ent)))
        for s, n in zip(starts.tolist(), lens.tolist()):
            _append(out, c + s, n, int(kinds[s]), int(hosts[s]), geo.cluster_size)
        c = stop
    return out


def _append(out: list[tuple[int, int, int, int]], c: int, n: int, kind: int, host: int,
            cluster_size: int = 0) -> None:
    if out:
        pc, pn, pk, ph = out[-1]
        if pk == kind and pc + pn == c and ((ph == 0 and host == 0) or ph + pn * cluster_size == host):
            out[-1] = (pc, pn + n, pk, ph)
            return
    out.append((c, n, kind, host))
