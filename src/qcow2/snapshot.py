"""Internal snapshots, laid out and reference-counted exactly as QEMU does it.

A snapshot is an entry of the snapshot table plus an L1 table. Its L2 tables and data
clusters are shared with the active image: QEMU counts one reference per L1 table that
reaches a cluster (an L2 table shared by two L1 tables counts its data clusters twice),
and `qemu-img check` verifies exactly that, so creating a snapshot adds one to every
cluster the active L1 reaches and deleting one subtracts what its L1 reaches.

The whole-tree passes are vectorized: the L2 tables of a tree are read in large
contiguous runs, decoded with numpy (flag bits are tested on the big-endian bytes
directly), and their references become one dense count per host cluster that the
refcount layer applies block by block (`update_dense`).

Crash safety: every operation is one refcount transaction (`begin_atomic` ..
`commit_atomic`). Nothing the current image uses is written in place: changed refcount
blocks, the refcount table, the new active L1 table, L2 tables whose COPIED flags change
and the snapshot table all go to clusters that are free both before and after, and one
header write (a single sector: refcount table, L1 table, size, nb_snapshots,
snapshots_offset) switches from the old image to the new one. A crash at any point
leaves either image, complete, without even a leak; `qemu-img check` never sees a
refcount or COPIED flag half changed (which in-place updates, QEMU's way, cannot avoid).
The one in-place write, clearing stale COPIED flags in tables only snapshots use, is
invisible to the old image's check.

VM state is stored where QEMU stores it: at guest offsets past the end of the disk in the
snapshot's own L1 table, starting at the first L1 entry beyond the disk
(`qcow2_vm_state_offset`). We build those clusters directly into the snapshot's L1 copy,
so they never pass through the active L1 table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import (
    CorruptImageError,
    InvalidArgumentError,
    Qcow2Error,
    ReadOnlyError,
    SnapshotError,
    SnapshotNotFoundError,
)
from .format import (
    L1E_OFFSET_MASK,
    MAX_L1_SIZE_BYTES,
    MAX_SNAPSHOTS,
    QCOW_OFLAG_COPIED,
    SnapshotEntry,
    decode_table,
    encode_table,
)
from .geometry import div_round_up
from .info import format_snapshot_list  # (imported from here too)
from .modes import MODES, mode_of
from .snaptable import (  # the table's records (numpy-free), also imported from here
    ICOUNT_NONE,
    MAX_NAME_BYTES,
    CachedTable,
    cached_snapshot_table,
    find_snapshot,
    next_snapshot_id,
    pack_snapshot_table,
    read_snapshot_table,
    size_to_str,
)
from .tree import (
    B0_COPIED,
    COMPRESSED_PAST_EOF,
    L1Entries,
    TreeCache,
    compressed_clusters,
    entry_bytes,
    read_into,
    runs,
    strict_chunks,
)

if TYPE_CHECKING:
    from .cluster import ClusterMap
    from .format import Header
    from .geometry import Geometry
    from .imagefile import ImageFile
    from .refcount import RefcountStrategy
    from .storage import Storage

__all__ = ["SnapshotHost", "SnapshotOps", "SnapshotView", "read_snapshot_table",
           "pack_snapshot_table", "format_snapshot_list", "find_snapshot", "next_snapshot_id",
           "size_to_str", "ICOUNT_NONE", "MAX_NAME_BYTES"]

_MAX_L1_ENTRIES = MAX_L1_SIZE_BYTES // 8
_CHUNK_BYTES = 8 << 20  # L2 tables decoded per step: arrays stay in cache-friendly sizes
_IO_MAX = 256 << 20  # largest single data write (Linux caps one call below 2 GiB)
# L2 tables kept between two passes of one operation (raw + decoded); a 256 GiB image
# with 64 KiB clusters needs 64 MiB, larger trees are read again instead
_CACHE_MAX_BYTES = 512 << 20
_COPIED_MASK_CLEAR = np.uint64(~QCOW_OFLAG_COPIED & 0xFFFFFFFFFFFFFFFF)


# ===================================================================== tree scans ==
class SnapshotView:
    """Read-only view of one snapshot: pread/readinto/map/file like an Image, without
    applying the snapshot. Reads fall through to the backing file as QEMU's do."""

    def __init__(self, ops: SnapshotOps, entry: SnapshotEntry) -> None:
        from .cluster import ClusterMap

        img = ops._img
        self._img = img
        self._ops = ops
        self.entry = entry
        self.size = int(entry.disk_size or 0)
        self.geo = img.geo
        self.storage = img.storage
        self.backing = img.backing
        self.refcounts = img.refcounts  # (as the image's: None when read-only)
        self.writable = False
        self.path = img.path
        ops._check_disk_size(entry)
        l1 = ops._snapshot_l1(entry)
        self.clusters: ClusterMap = ClusterMap(img.storage, img.geo, l1, entry.l1_table_offset,
                                               None, img._cache_tables, img.header.version)
        self._gen = ops._snapshot_gen

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def name(self) -> str:
        return self.entry.name

    def _check(self, offset: int, length: int) -> None:
        ops = self._ops
        if ops.closed:
            raise Qcow2Error("I/O operation on a closed image")
        if self._gen != ops._snapshot_gen:
            # the table changed: make sure this snapshot (and so its clusters) still exists
            if not any(e.id == self.entry.id and e.l1_table_offset == self.entry.l1_table_offset
                       for e in ops._snapshot_entries()):
                raise SnapshotNotFoundError(f"Snapshot '{self.entry.name}' was deleted")
            self._gen = ops._snapshot_gen
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgumentError(
                f"Request [{offset}, {offset + length}) is beyond the end of the snapshot "
                f"({self.size} bytes)")

    def pread(self, n: int, offset: int) -> bytes:
        self._check(offset, n)
        buf = bytearray(n)
        self._img._read_into(memoryview(buf), offset, clusters=self.clusters)
        return bytes(buf)

    def readinto(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        self._check(offset, len(mv))
        self._img._read_into(mv, offset, clusters=self.clusters)
        return len(mv)

    def block_status(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        from .cluster import COMPRESSED

        self._check(offset, length)
        for _pos, guest, n, kind, host in self._img._segments(self.clusters, offset, length):
            yield (guest, n, kind, 0 if kind == COMPRESSED else host)

    def map(self) -> list[dict[str, Any]]:
        """Extents as `qemu-img map --output=json` reports them for this snapshot."""
        from .mapping import image_map

        self._check(0, 0)
        return image_map(self)

    def _usage_refcounts(self) -> Any:
        return self._img._usage_refcounts()

    def file(self) -> ImageFile:
        from .imagefile import ImageFile

        return ImageFile(self)

    def flush(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<qcow2.SnapshotView id={self.entry.id!r} name={self.entry.name!r} size={self.size}>"


class SnapshotHost(Protocol):
    """What the snapshot operations need from the image they work on (Image is one):
    its storage, header, geometry, live cluster map and refcount strategy (all of which
    an image may replace while open, so they are read through the host), and the few
    image operations a snapshot operation calls."""

    path: str
    storage: Storage
    header: Header
    geo: Geometry
    clusters: ClusterMap
    refcounts: RefcountStrategy | None
    closed: bool
    backing: Any
    _cache_tables: int

    def flush(self) -> None: ...
    def _check_writable(self) -> None: ...
    def _update_header(self, **changes: Any) -> None: ...
    def _switch_l1(self, l1: np.ndarray, offset: int) -> None: ...
    def _usage_refcounts(self) -> RefcountStrategy: ...
    def _read_into(self, out: memoryview, offset: int, clusters: ClusterMap | None = None,
                   backing: Any = "self") -> None: ...
    def _segments(self, clusters: ClusterMap, offset: int, length: int) -> Any: ...


class SnapshotOps:
    """The snapshot operations of one image (Image holds one as `_snapshots` and
    delegates snapshots, create_snapshot, apply_snapshot, delete_snapshot,
    read_vm_state and snapshot(name_or_id) to it): the parsed snapshot table, the
    generic parts of create/apply/delete, and the L1->L2 tree passes the refcount modes
    use (a mode's hooks receive this object)."""

    def __init__(self, host: SnapshotHost) -> None:
        self._img = host

    # the host's state, read through it (an image replaces these on reload)
    @property
    def storage(self) -> Storage:
        return self._img.storage

    @property
    def header(self) -> Header:
        return self._img.header

    @property
    def geo(self) -> Geometry:
        return self._img.geo

    @property
    def clusters(self) -> ClusterMap:
        return self._img.clusters

    @property
    def refcounts(self) -> RefcountStrategy | None:
        return self._img.refcounts

    @property
    def closed(self) -> bool:
        return self._img.closed

    def flush(self) -> None:
        self._img.flush()

    def _check_writable(self) -> None:
        self._img._check_writable()

    def _update_header(self, **changes: Any) -> None:
        self._img._update_header(**changes)

    def _switch_l1(self, l1: np.ndarray, offset: int) -> None:
        self._img._switch_l1(l1, offset)

    _snap_cache: CachedTable | None = None
    _snapshot_gen = 0

    # ------------------------------------------------------------------ table --
    def _snapshot_entries(self) -> list[SnapshotEntry]:
        """The parsed table, cached for the current header (nb_snapshots, offset)."""
        self._snap_cache = cached_snapshot_table(self.storage, self.header, self._snap_cache)
        return self._snap_cache[2]

    @property
    def snapshots(self) -> list[SnapshotEntry]:
        """The snapshot records, in table order (id, name, date, date_sec, date_nsec,
        vm_clock, vm_clock_nsec, vm_state_size, disk_size, icount)."""
        if self.closed:
            raise Qcow2Error("I/O operation on a closed image")
        visible = MODES[mode_of(self.header)].visible
        return [e for e in self._snapshot_entries() if visible(e)]

    def _find_index(self, name_or_id: str) -> int:
        """Index in the table of the snapshot with this id, else of the first one with
        this name (entries users do not see are not found)."""
        entries = self._snapshot_entries()
        visible = MODES[mode_of(self.header)].visible
        shown = [i for i, e in enumerate(entries) if visible(e)]
        i = find_snapshot([entries[k] for k in shown], str(name_or_id))
        if i < 0:
            raise SnapshotNotFoundError(f"Snapshot '{name_or_id}' not found")
        return shown[i]

    def find_snapshot(self, name_or_id: str) -> SnapshotEntry:
        """The snapshot with this id, else the first one with this name."""
        return self._snapshot_entries()[self._find_index(name_or_id)]

    def _vm_state_index(self, disk_size: int) -> int:
        """First L1 index past the disk: where the VM state starts (qcow2_vm_state_offset)."""
        return div_round_up(disk_size, self.geo.l1_coverage)

    def _check_disk_size(self, e: SnapshotEntry) -> None:
        """Refuse a disk size no L1 table can map: the field is damaged, and a loop or
        an allocation sized by it would never end (deleting the snapshot still works)."""
        if e.disk_size is not None and div_round_up(e.disk_size, self.geo.l1_coverage) > _MAX_L1_ENTRIES:
            raise CorruptImageError(f"Snapshot '{e.name}': disk size {e.disk_size} is too large")

    def _snapshot_l1(self, e: SnapshotEntry) -> np.ndarray:
        """The snapshot's L1 table, validated as QEMU validates it."""
        if e.l1_size == 0:
            return np.zeros(0, dtype=np.uint64)
        cs = self.geo.cluster_size
        if e.l1_size > _MAX_L1_ENTRIES:
            raise CorruptImageError(f"Snapshot '{e.name}': L1 table too large")
        if e.l1_table_offset % cs or e.l1_table_offset == 0:
            raise CorruptImageError(f"Snapshot '{e.name}': L1 table offset invalid")
        if e.l1_table_offset + e.l1_size * 8 > self.storage.size():
            raise CorruptImageError(f"Snapshot '{e.name}': L1 table runs past the end of the file")
        return decode_table(self.storage.pread(e.l1_size * 8, e.l1_table_offset))

    # ------------------------------------------------------------------ public API --
    def snapshot(self, name_or_id: str) -> SnapshotView:
        """A read-only view of a snapshot (pread, size, map, file), without applying it."""
        if self.closed:
            raise Qcow2Error("I/O operation on a closed image")
        return SnapshotView(self, self.find_snapshot(name_or_id))

    def read_vm_state(self, name_or_id: str) -> bytes:
        """The VM state saved with a snapshot (b"" for a disk-only snapshot)."""
        if self.closed:
            raise Qcow2Error("I/O operation on a closed image")
        e = self.find_snapshot(name_or_id)
        if not e.vm_state_size:
            return b""
        from .cluster import ClusterMap

        sn_l1 = self._snapshot_l1(e)
        first = self._vm_state_index(int(e.disk_size or 0))
        if e.vm_state_size > max(0, len(sn_l1) - first) * self.geo.l1_coverage:
            # the VM state lives in the snapshot's L1 range past the disk: this size
            # cannot be stored there (a damaged field; the buffer would be unbounded)
            raise CorruptImageError(
                f"Snapshot '{e.name}': VM state size {e.vm_state_size} exceeds its L1 table")
        cmap = ClusterMap(self.storage, self.geo, sn_l1, e.l1_table_offset, None,
                          self._img._cache_tables, self.header.version)
        start = first * self.geo.l1_coverage
        buf = bytearray(e.vm_state_size)
        mv = memoryview(buf)
        for pos in range(0, len(buf), _IO_MAX):
            self._img._read_into(mv[pos : pos + _IO_MAX], start + pos, clusters=cmap, backing=None)
        return bytes(buf)

    def create_snapshot(self, name: str, vm_state: Any = None, *, vm_clock_nsec: int = 0,
                        icount: int | None = 0, date_sec: int | None = None,
                        date_nsec: int | None = None,
                        snapshot_id: str | None = None) -> SnapshotEntry:
        """Image.create_snapshot (which documents the arguments)."""
        self._check_writable()
        if not isinstance(name, str):
            raise InvalidArgumentError("Snapshot name must be a string")
        if "\0" in name:
            raise InvalidArgumentError("Snapshot name must not contain NUL characters")
        if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise InvalidArgumentError(f"Snapshot name is longer than {MAX_NAME_BYTES} bytes")
        if icount is not None and not 0 <= icount < ICOUNT_NONE:
            raise InvalidArgumentError("icount out of range")
        if not 0 <= vm_clock_nsec < (1 << 64):
            raise InvalidArgumentError("vm_clock_nsec out of range")
        vm = memoryview(vm_state).cast("B") if vm_state is not None else memoryview(b"")
        entries = self._snapshot_entries()
        if len(entries) >= MAX_SNAPSHOTS:
            raise SnapshotError(f"Too many snapshots: the limit is {MAX_SNAPSHOTS}")
        sid = next_snapshot_id(entries) if snapshot_id is None else snapshot_id
        if not isinstance(sid, str) or "\0" in sid or \
                len(sid.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise InvalidArgumentError("Invalid snapshot id")
        if any(e.id == sid for e in entries):
            raise SnapshotError(f"Snapshot id {sid} already exists")
        now = time.time_ns()
        ds = now // 1_000_000_000 if date_sec is None else date_sec
        dn = now % 1_000_000_000 if date_nsec is None else date_nsec
        if not 0 <= ds < (1 << 32) or not 0 <= dn < 1_000_000_000:
            raise InvalidArgumentError("Snapshot date out of range")

        geo = self.geo
        cs = geo.cluster_size
        disk = self.header.size
        vm_index = self._vm_state_index(disk)
        n_vm_data = div_round_up(len(vm), cs)
        n_vm_l2 = div_round_up(n_vm_data, geo.l2_entries)
        sn_l1_size = vm_index + n_vm_l2
        if sn_l1_size > _MAX_L1_ENTRIES:
            raise SnapshotError("VM state too large: the snapshot's L1 table would exceed its limit")
        new = SnapshotEntry(
            l1_table_offset=0, l1_size=sn_l1_size, id=sid, name=name, date_sec=ds,
            date_nsec=dn, vm_clock_nsec=vm_clock_nsec, vm_state_size=len(vm), disk_size=disk,
            icount=icount,
        )
        # size check before touching anything (the real offset does not change the size)
        pack_snapshot_table([*entries, new])

        self.flush()
        with self._bulk():
            return self._rc().snapshot_create(self, entries, new, vm, vm_index, sn_l1_size)

    def _create(self, entries: list[SnapshotEntry], new: SnapshotEntry, vm: memoryview,
                vm_index: int, sn_l1_size: int) -> SnapshotEntry:
        rc = self._rc()
        geo = self.geo
        cs = geo.cluster_size
        cbits = geo.cluster_bits
        cmap = self.clusters
        cmap.l2cache.drop_all()  # clean after the flush; we read tables behind it
        old_l1 = cmap.l1
        disk = old_l1[:vm_index]
        rc.begin_atomic()
        try:
            # An L2 table the active image has to itself (refcount 1) goes to the snapshot
            # as it is and the active image gets a copy whose entries lose COPIED: the
            # table on disk is never changed, so a crash leaves the old image intact. A
            # table already shared gains the snapshot's reference.
            # (Only a table with COPIED entries needs the copy: one without can be
            # shared as it is, as after the first snapshot.)
            l2 = (disk & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
            has = np.flatnonzero(l2)
            # (an overflow raises RefcountOverflowError; the abort undoes everything)
            copied = self._apply_tree(disk, +1, want_copied=True, count_l2=False)
            own = np.zeros(len(disk), dtype=bool)
            if len(has) and len(copied):
                dirty = np.sort(copied)
                pos = np.minimum(np.searchsorted(dirty, l2[has]), len(dirty) - 1)
                own[has] = (rc.get_many(l2[has] >> cbits) == rc.live_weight) & (dirty[pos] == l2[has])
            shared = has[~own[has]]
            rc.update(l2[shared] >> cbits, +1)  # the snapshot takes the others over
            new_l1 = old_l1 & _COPIED_MASK_CLEAR
            new_l1[vm_index:] = old_l1[vm_index:]  # past the disk: untouched
            sn_l1 = np.zeros(sn_l1_size, dtype=np.uint64)
            sn_l1[:vm_index] = disk & _COPIED_MASK_CLEAR
            if len(vm):
                sn_l1[vm_index:] = self._write_vm_state(vm)
            # two runs of new clusters: the live state's (table copies, new active L1)
            # and the snapshot's (its L1 table, the snapshot table, whose size does not
            # depend on the offsets written into it)
            xi = np.flatnonzero(own)
            rc.snapshot_takes_over(l2[xi] >> cbits)
            n_sn = div_round_up(sn_l1_size * 8, cs)
            n_l1 = div_round_up(len(new_l1) * 8, cs)
            n_tab = div_round_up(len(pack_snapshot_table([*entries, new])), cs)
            first = rc.tx_allocate(len(xi) + n_l1, live=True) if len(xi) + n_l1 else 0
            if len(xi):
                dests = np.int64(first) + np.arange(len(xi), dtype=np.int64) * cs
                self._copy_tables(l2[xi], dests, None)
                new_l1[xi] = dests.astype(np.uint64) | np.uint64(QCOW_OFLAG_COPIED)
            l1_off = first + len(xi) * cs if n_l1 else 0
            second = rc.tx_allocate(n_sn + n_tab, live=False)
            sn_off = second if n_sn else 0
            t_off = second + n_sn * cs
            if n_sn:
                self.storage.pwrite(encode_table(sn_l1), sn_off, "l1")
            if n_l1:
                self.storage.pwrite(encode_table(new_l1), l1_off, "l1")
            new = replace(new, l1_table_offset=sn_off)
            table = pack_snapshot_table([*entries, new])
            self.storage.pwrite(table, t_off, "snapshot_table")
            self._free_tables(cmap.l1_offset, len(old_l1) * 8, live=True)
            self._free_tables(self.header.snapshots_offset, self._table_size())
            n = len(entries) + 1
            rc.commit_atomic(lambda rt: self._update_header(
                **rt, l1_table_offset=l1_off, nb_snapshots=n, snapshots_offset=t_off))
        except BaseException:
            rc.abort_atomic()
            cmap.l2cache.drop_all()
            raise
        self._switch_l1(new_l1, l1_off)
        self._snap_cache = (t_off, n, [*entries, new], len(table))
        return new

    def apply_snapshot(self, name_or_id: str) -> None:
        """Make the active state equal to the snapshot (as `qemu-img snapshot -a`),
        including its disk size. The discarded active state's clusters are released."""
        self._check_writable()
        e = self.find_snapshot(str(name_or_id))
        disk = int(e.disk_size if e.disk_size is not None else self.header.size)
        self._check_disk_size(e)
        vm_index = self._vm_state_index(disk)
        sn_l1 = self._snapshot_l1(e)
        self.flush()
        from .dirtybitmaps import rewriting  # the whole disk changes for the bitmaps

        with rewriting(self._img, disk, whole=True), self._bulk():
            self._rc().snapshot_apply(self, e, disk, vm_index, sn_l1)

    def _apply(self, disk: int, vm_index: int, sn_l1: np.ndarray) -> None:
        rc = self._rc()
        cmap = self.clusters
        cmap.l2cache.drop_all()
        # The active image gets the snapshot's disk part; its VM state stays with it.
        new_l1 = np.zeros(vm_index, dtype=np.uint64)
        m = min(vm_index, len(sn_l1))
        new_l1[:m] = sn_l1[:m] & _COPIED_MASK_CLEAR
        rc.begin_atomic()
        try:
            # drop the current tree first, so that shared clusters cannot overflow
            self._apply_tree(cmap.l1, -1, live=True)
            self._free_tables(cmap.l1_offset, len(cmap.l1) * 8, live=True)
            copied = self._apply_tree(new_l1, +1, want_copied=True, live=True)
            # Everything the new active tree reaches is shared with the snapshot: no
            # COPIED flag anywhere. Tables with stale flags belong to snapshots only
            # (the active tree's flags were right), so clearing them in place is safe.
            cur = np.sort((cmap.l1 & np.uint64(L1E_OFFSET_MASK)).astype(np.int64))
            stale = _sorted_unique(copied)
            if len(cur) and len(stale):
                pos = np.minimum(np.searchsorted(cur, stale), len(cur) - 1)
                stale = stale[cur[pos] != stale]
            self._clear_copied(stale)
            l1_off = self._write_new_table(new_l1, "l1", live=True)
            rc.commit_atomic(lambda rt: self._update_header(
                **rt, size=disk, l1_table_offset=l1_off, l1_size=vm_index))
        except BaseException:
            rc.abort_atomic()
            cmap.l2cache.drop_all()
            raise
        self._switch_l1(new_l1, l1_off)
        self._snapshot_gen += 1
        if rc.needs_live_map:  # the whole live tree changed: count it again
            rc.set_live(self._live_counts())

    def delete_snapshot(self, name_or_id: str) -> None:
        """Delete a snapshot (as `qemu-img snapshot -d`): remove its entry, then release
        what its L1 table reached, then fix the COPIED flags of the active tree."""
        self._check_writable()
        entries = self._snapshot_entries()
        i = self._find_index(str(name_or_id))
        self._snapshot_l1(entries[i])  # validated before anything changes
        self.flush()
        with self._bulk():
            self._rc().snapshot_delete(self, entries, i)

    def _delete(self, entries: list[SnapshotEntry], i: int, sn_l1: np.ndarray) -> None:
        rc = self._rc()
        e = entries[i]
        cmap = self.clusters
        cmap.l2cache.drop_all()
        rest = entries[:i] + entries[i + 1 :]
        # The active tree's tables that the snapshot shares (all of them after a QEMU
        # snapshot) are kept from the release pass for the COPIED pass: read and decoded
        # once, not two or three times.
        cache = self._tree_cache(cmap.l1)
        rc.begin_atomic()
        try:
            self._apply_tree(sn_l1, -1, cache=cache)
            self._free_tables(e.l1_table_offset, e.l1_size * 8)
            self._free_tables(self.header.snapshots_offset, self._table_size())
            table = pack_snapshot_table(rest) if rest else b""
            t_off = self._write_new_bytes(table, "snapshot_table") if rest else 0
            # COPIED flags of the active tree as the new refcounts want them; tables whose
            # flags change are rewritten as copies (the old image keeps its tables).
            new_l1 = self._recompute_copied(cmap.l1, cache)
            l1_off = self._write_new_table(new_l1, "l1", live=True)
            self._free_tables(cmap.l1_offset, len(cmap.l1) * 8, live=True)
            rc.commit_atomic(lambda rt: self._update_header(
                **rt, l1_table_offset=l1_off, nb_snapshots=len(rest), snapshots_offset=t_off))
        except BaseException:
            rc.abort_atomic()
            cmap.l2cache.drop_all()
            raise
        self._switch_l1(new_l1, l1_off)
        self._snap_cache = (t_off, len(rest), rest, len(table))
        self._snapshot_gen += 1

    # ------------------------------------------------------------------ internals --
    def _rc(self) -> RefcountStrategy:
        rc = self.refcounts
        if rc is None:  # a snapshot operation on a read-only image
            raise ReadOnlyError("Image is opened read-only")
        return rc

    def _bulk(self) -> Any:
        """Keep the refcount metadata of the whole file cached during a tree pass."""
        return self._rc().bulk(div_round_up(self.storage.size(), self.geo.cluster_size))

    def _table_size(self) -> int:
        self._snapshot_entries()
        assert self._snap_cache is not None
        return self._snap_cache[3]

    def _write_new_bytes(self, data: bytes, kind: str, live: bool = False) -> int:
        """Write data to newly allocated clusters (inside a refcount transaction), for
        the live state (its L1 table) or not."""
        n = div_round_up(len(data), self.geo.cluster_size)
        if not n:
            return 0
        off = self._rc().tx_allocate(n, live)
        self.storage.pwrite(data, off, kind)
        return off

    def _write_new_table(self, table: np.ndarray, kind: str, live: bool = False) -> int:
        return self._write_new_bytes(encode_table(table), kind, live) if len(table) else 0

    def _free_tables(self, offset: int, nbytes: int, live: bool = False) -> None:
        """Drop the reference to the clusters of [offset, offset + nbytes) (the live
        state's, or another holder's)."""
        if not offset or not nbytes:
            return
        cs = self.geo.cluster_size
        first = offset // cs
        self._rc().tx_drop(np.arange(first, first + div_round_up(nbytes, cs), dtype=np.int64), live)

    def _write_vm_state(self, vm: memoryview) -> np.ndarray:
        """Write VM state into fresh clusters with their own L2 tables; returns the L1
        entries that map them (for the snapshot's L1 past the disk)."""
        geo = self.geo
        cs = geo.cluster_size
        rc = self._rc()
        n_data = div_round_up(len(vm), cs)
        n_l2 = div_round_up(n_data, geo.l2_entries)
        hosts = np.empty(n_data, dtype=np.uint64)
        done = 0
        # contiguous runs of at most 1 GiB keep each free-space search bounded
        run_max = max(1, (1 << 30) // cs)
        while done < n_data:
            n = min(run_max, n_data - done)
            off = rc.allocate_deferred(n)
            hosts[done : done + n] = off + np.arange(n, dtype=np.uint64) * np.uint64(cs)
            start = done * cs
            end = min(len(vm), (done + n) * cs)
            pos = start
            while pos < end:
                k = min(_IO_MAX, end - pos)
                if pos + k == len(vm) and k % cs:
                    # pad the last cluster: it may be a reused cluster with old contents
                    whole = k - k % cs
                    if whole:
                        self.storage.pwrite(vm[pos : pos + whole], off + pos - start, "data")
                    tail = bytearray(cs)
                    tail[: k - whole] = vm[pos + whole : pos + k]
                    self.storage.pwrite(tail, off + pos - start + whole, "data")
                else:
                    self.storage.pwrite(vm[pos : pos + k], off + pos - start, "data")
                pos += k
            done += n
        l2_off = rc.allocate_deferred(n_l2)
        words = cs // 8
        tables = np.zeros(n_l2 * words, dtype=np.uint64)
        flagged = hosts | np.uint64(QCOW_OFLAG_COPIED)  # only this snapshot refers to them
        if geo.extended_l2:
            tables[0 : 2 * n_data : 2] = flagged
            tables[1 : 2 * n_data : 2] = np.uint64(0xFFFFFFFF)  # all subclusters allocated
        else:
            tables[:n_data] = flagged
        self.storage.pwrite(encode_table(tables), l2_off, "l2")
        return np.uint64(l2_off) + np.arange(n_l2, dtype=np.uint64) * np.uint64(cs)

    def _table_chunks(self, offsets: np.ndarray) -> Iterator[tuple[np.ndarray, memoryview]]:
        """Read L2 tables (sorted distinct offsets) in chunks, one read per run of
        back-to-back tables. The buffer is reused: a consumer is done with a chunk (and
        has written it back if it changed it) before asking for the next one."""
        cs = self.geo.cluster_size
        per = max(1, _CHUNK_BYTES // cs)
        whole = memoryview(bytearray(min(len(offsets), per) * cs))
        for c0 in range(0, len(offsets), per):
            offs = offsets[c0 : c0 + per]
            mv = whole[: len(offs) * cs]
            self._read_tables(offs, mv)
            yield offs, mv

    def _l2_chunks(self, offsets: np.ndarray, file_clusters: int, cache: TreeCache | None,
                   fill: bool = False) -> Iterator[tuple[int, np.ndarray, Any, np.ndarray,
                                                         np.ndarray | None]]:
        """The tree walker's strict_chunks over the L2 tables at offsets (sorted,
        distinct): the first problem raises CorruptImageError."""
        for t, offs, buf, out, comp, problem in strict_chunks(
                self.storage, self.geo, offsets, file_clusters, cache, fill, _CHUNK_BYTES):
            if problem is not None:
                raise CorruptImageError(problem)
            yield t, offs, buf, out, comp

    def _read_tables(self, offs: np.ndarray, mv: memoryview) -> None:
        """Read these tables (sorted) into mv, one read per run of back-to-back ones."""
        read_into(self.storage, offs, mv, self.geo.cluster_size)

    def _write_tables(self, offs: np.ndarray, mv: memoryview, changed: np.ndarray) -> None:
        cs = self.geo.cluster_size
        sel = np.flatnonzero(changed)
        if not len(sel):
            return
        # runs of changed tables that are back to back both in the buffer and on disk
        brk = np.ones(len(sel), dtype=bool)
        brk[1:] = (np.diff(sel) != 1) | (np.diff(offs[sel]) != cs)
        starts = np.flatnonzero(brk)
        ends = np.r_[starts[1:], len(sel)]
        for s, e in zip(starts.tolist(), ends.tolist()):
            i0, i1 = int(sel[s]), int(sel[e - 1]) + 1
            self.storage.pwrite(mv[i0 * cs : i1 * cs], int(offs[i0]), "l2")

    def _entry_bytes(self, buf: memoryview, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(byte-0 view (k, entries) uint8, big-endian entry view (k, entries)) of a chunk."""
        return entry_bytes(self.geo, buf, k)

    def _apply_tree(self, l1: np.ndarray, sign: int, *, want_copied: bool = False,
                    count_l2: bool = True, cache: TreeCache | None = None,
                    live: bool = False,
                    sink: Callable[[np.ndarray, int], None] | None = None,
                    comp_sink: Callable[[np.ndarray, int], None] | None = None) -> np.ndarray:
        """Add sign x every reference the tree under this L1 table holds to the
        refcounts: data clusters, compressed clusters by byte range and (with count_l2)
        the L2 tables, one per L1 entry. Applied chunk by chunk (memory stays bounded;
        inside a refcount transaction, an error midway is undone by its abort). Returns
        the L2 tables that hold entries with the COPIED flag when asked. Tables that
        cache wants are stored in it as they pass. live: the tree is the live state's
        (the mode decides what its references count); sink: receives the references
        instead of the refcounts; comp_sink: receives the clusters compressed clusters
        touch (one per compressed cluster and cluster it touches: packed ones share a
        host cluster) apart from the others, which sink then gets without them."""
        geo = self.geo
        cs = geo.cluster_size
        cbits = geo.cluster_bits
        if sink is None:
            rc = self._rc()
            if live and not rc.live_weight and not want_copied:
                return np.zeros(0, dtype=np.int64)  # the mode stores no live references
            sink = rc.update_live if live else rc.update
        file_clusters = div_round_up(self.storage.size(), cs)
        l1e = L1Entries(l1[l1 != 0], cs)
        problem = l1e.strict_problem(file_clusters, cbits)
        if problem is not None:
            raise CorruptImageError(problem)
        l2 = l1e.offsets
        offsets, mult = np.unique(l2, return_counts=True)
        copied: list[np.ndarray] = []
        for t, offs, buf, out, comp in self._l2_chunks(offsets, file_clusters, cache, fill=True):
            k = len(offs)
            flat = out.reshape(-1)
            refs = [flat[flat != 0].view(np.int64)]
            if want_copied:
                b0, _ = self._entry_bytes(buf, k)
                has = (b0 >= B0_COPIED).any(axis=1)
                if has.any():
                    copied.append(offs[has])
            if comp is not None:
                cl, n = compressed_clusters(geo, comp[0])
                if len(cl) and int(cl.max()) >= file_clusters:
                    raise CorruptImageError(COMPRESSED_PAST_EOF)
                reps = np.repeat(mult[t : t + k][comp[1].astype(np.int64)], n)
                if comp_sink is not None:
                    comp_sink(np.repeat(cl, reps), sign)
                else:
                    refs.append(np.repeat(cl, reps))
            for r in np.flatnonzero(mult[t : t + k] > 1).tolist():
                # an L2 table that several L1 entries share (rare): count it again
                row = out[r][out[r] != 0].astype(np.int64)
                refs.append(np.tile(row, int(mult[t + r]) - 1))
            sink(refs[0] if len(refs) == 1 else np.concatenate(refs), sign)
        if count_l2 and len(l2):
            sink(l2 >> cbits, sign)
        return np.concatenate(copied) if copied else np.zeros(0, dtype=np.int64)

    def _references(self, l1: np.ndarray, l1_offset: int, l1_size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """The host clusters a tree references, from the walker above: (plain,
        compressed). Plain: the L1 table's clusters (l1_offset, l1_size; 0 for none), the
        L2 tables (once per L1 entry) and their data clusters (VM state included);
        compressed: the clusters each compressed cluster touches."""
        plain: list[np.ndarray] = []
        comp: list[np.ndarray] = []
        self._apply_tree(l1, +1, sink=lambda refs, _sign: plain.append(refs),
                         comp_sink=lambda refs, _sign: comp.append(refs))
        if l1_offset and l1_size:
            cs = self.geo.cluster_size
            first = l1_offset // cs
            plain.append(np.arange(first, first + div_round_up(l1_size * 8, cs), dtype=np.int64))
        empty = np.zeros(0, dtype=np.int64)
        return (np.concatenate(plain) if plain else empty,
                np.concatenate(comp) if comp else empty)

    def _live_counts(self) -> np.ndarray:
        """References the live state holds, per host cluster of the file: its L1 table,
        its L2 tables (one per L1 entry) and their data and compressed clusters."""
        cs = self.geo.cluster_size
        cmap = self.clusters
        counts = np.zeros(div_round_up(self.storage.size(), cs) + 1, dtype=np.int64)

        def add(refs: np.ndarray, _sign: int) -> None:
            np.add.at(counts, refs, 1)

        self._apply_tree(cmap.l1, +1, sink=add)
        if len(cmap.l1) and cmap.l1_offset:
            first = cmap.l1_offset // cs
            counts[first : first + div_round_up(len(cmap.l1) * 8, cs)] += 1
        return counts

    def _tree_cache(self, l1: np.ndarray) -> TreeCache | None:
        """A cache for the L2 tables of this L1 table, or None when they would take more
        memory than _CACHE_MAX_BYTES (the passes then read them again)."""
        geo = self.geo
        offs = _sorted_unique((l1 & np.uint64(L1E_OFFSET_MASK)).astype(np.int64))
        offs = offs[offs != 0]
        if not len(offs) or len(offs) * (geo.cluster_size + geo.l2_entries * 8) > _CACHE_MAX_BYTES:
            return None
        return TreeCache(offs, geo.cluster_size, geo.l2_entries)

    def _clear_copied(self, tables: np.ndarray) -> None:
        """Clear COPIED in every entry of these L2 tables, in place (only for tables
        that no checked tree of the old image uses)."""
        if not len(tables):
            return
        offs_all = _sorted_unique(tables)
        for offs, buf in self._table_chunks(offs_all):
            b0, _ = self._entry_bytes(buf, len(offs))
            changed = (b0 >= B0_COPIED).any(axis=1)
            np.bitwise_and(b0, 0x7F, out=b0)
            self._write_tables(offs, buf, changed)

    def _copy_tables(self, sources: np.ndarray, dests: np.ndarray,
                     transform: Any, cache: TreeCache | None = None) -> None:
        """Write L2 tables to new places (dests, back to back), their entries' COPIED
        flags cleared, or changed by transform(byte0_view, first_index) when given.
        Tables the cache holds are taken from it (and may be changed there: this is
        its last use)."""
        cs = self.geo.cluster_size
        per = max(1, _CHUNK_BYTES // cs)
        whole: memoryview | None = None
        for c0 in range(0, len(sources), per):
            src = sources[c0 : c0 + per]
            k = len(src)
            pos = cache.lookup(src) if cache is not None else None
            if pos is not None:
                assert cache is not None
                rows = cache.rows(cache.raw, pos)
                mv = memoryview(rows).cast("B")
            else:
                if whole is None:
                    whole = memoryview(bytearray(min(len(sources), per) * cs))
                mv = whole[: k * cs]
                for s0, e0 in runs(src, cs):
                    self.storage.preadv([mv[s0 * cs : e0 * cs]], int(src[s0]))
            b0, _ = self._entry_bytes(mv, k)
            if transform is None:
                np.bitwise_and(b0, 0x7F, out=b0)
            else:
                transform(b0, c0)
            for s0, e0 in runs(dests[c0 : c0 + per], cs):
                self.storage.pwrite(mv[s0 * cs : e0 * cs], int(dests[c0 + s0]), "l2")

    def _recompute_copied(self, l1: np.ndarray, cache: TreeCache | None = None) -> np.ndarray:
        """The active L1 table with COPIED flags as the (new) refcounts want them: an
        L2 table whose entries' flags must change is rewritten as a copy, which replaces
        it in the returned table (inside a refcount transaction, as QEMU's flag update
        after deleting a snapshot, but without touching tables the old image uses).
        Tables the cache holds are neither read nor decoded again."""
        geo = self.geo
        cs = geo.cluster_size
        cbits = geo.cluster_bits
        rc = self._rc()
        new_l1 = l1.copy()
        l2 = (l1 & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
        has = np.flatnonzero(l2)
        if not len(has):
            return new_l1
        offsets, mult = np.unique(l2[has], return_counts=True)
        file_clusters = div_round_up(self.storage.size(), cs)
        # every refcount of the file at once (1/8192 of its size with 64 KiB clusters),
        # when that is small: one copy instead of a range copy per chunk
        # (get_range is StandardRefcounts', not part of the strategy interface)
        get_range = getattr(rc, "get_range", None)
        counts = (get_range(0, file_clusters)
                  if get_range is not None and file_clusters * 8 <= _CACHE_MAX_BYTES else None)
        fix_offs: list[np.ndarray] = []  # tables whose entries' flags change
        fix_rows: list[np.ndarray] = []  # and which of their entries flip
        for t, offs, buf, out, _comp in self._l2_chunks(offsets, file_clusters, cache):
            k = len(offs)
            b0, _ = self._entry_bytes(buf, k)
            alloc = out != 0
            if counts is not None:
                # a gather (unallocated entries read cluster 0's count, masked below)
                one = (counts[out.view(np.int64)] == rc.live_weight) & alloc
            else:
                one = np.zeros(out.shape, dtype=bool)
                flat = out[alloc].view(np.int64)
                if len(flat):
                    one[alloc] = rc.get_many(flat) == rc.live_weight
            cur = b0 >= B0_COPIED
            fix = (one != cur) & (alloc | cur)  # compressed/unallocated: clear only
            rows = np.flatnonzero(fix.any(axis=1) & (mult[t : t + k] == 1))
            if len(rows):
                fix_offs.append(offs[rows])
                fix_rows.append(fix[rows])
        if fix_offs:
            # offsets come sorted chunk after chunk: src is sorted, its rows in order
            src = np.concatenate(fix_offs)
            flips = np.concatenate(fix_rows)
            del fix_rows
            first = rc.tx_allocate(len(src), live=True)
            dests = np.int64(first) + np.arange(len(src), dtype=np.int64) * cs

            def flip(b0: np.ndarray, c0: int) -> None:
                # True -> 0x80: the COPIED bit
                b0 ^= flips[c0 : c0 + b0.shape[0]].view(np.uint8) << 7

            self._copy_tables(src, dests, flip, cache)
            pos = np.searchsorted(src, l2[has])
            hit = (pos < len(src)) & (src[np.minimum(pos, len(src) - 1)] == l2[has])
            moved = has[hit]
            new_l1[moved] = (dests[pos[hit]].astype(np.uint64)
                             | (l1[moved] & ~np.uint64(L1E_OFFSET_MASK)))
            rc.tx_drop(l2[moved] >> cbits, live=True)  # the active image lets go of the originals
        # L1 flags: a table with only the live state's count is the active image's alone
        tbl = (new_l1[has] & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
        one = rc.get_many(tbl >> cbits) == rc.live_weight
        new_l1[has] = np.where(one, new_l1[has] | np.uint64(QCOW_OFLAG_COPIED),
                               new_l1[has] & _COPIED_MASK_CLEAR)
        return new_l1


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique without its one-time import of numpy.ma (tens of ms on first use)."""
    s = np.sort(np.asarray(a, dtype=np.int64))
    if len(s) < 2:
        return s
    return s[np.r_[True, s[1:] != s[:-1]]]


