"""The metadata overlap guard: no write of ours lands on metadata it does not belong to.

A corrupt or hostile image can make the allocator hand out a cluster that is in fact
metadata (refcounts that call it free, a table pointing past the end of the file where
the next allocation goes, two refcount-table entries naming one block). QEMU refuses such
writes in `qcow2_pre_write_overlap_check`, with a bitmask of metadata kinds; this module
is our counterpart.

Two sources of truth, so that the guard stays current without hooks on every change:

* the live structures the engine keeps in memory anyway (header cluster, active L1
  table, refcount table, refcount blocks): asked directly on every test;
* everything else (active L2 tables, the snapshot table, the L1 and L2 tables of every
  snapshot, the bitmap directory, bitmap tables and bitmap data clusters, the LUKS
  header) is collected once per open into a sorted cluster array (16 bytes per metadata
  cluster: O(metadata)). It is dropped and rebuilt lazily whenever the header changes
  (every switch of tables, snapshots or refcounts commits through a header write) and
  after a repair. An active L2 hit is confirmed against the live L1 table, as tables
  are allocated and freed between header writes.

VM state is not metadata: it is guest data of its snapshot (inside that snapshot's L2
tables), as in QEMU.

Tests happen where they cost nothing on the in-place hot path: for data written to
clusters the write path did not find owned (new allocations, copy-on-write), and for
every metadata write (at the storage layer, which knows each write's kind).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from .errors import CorruptImageError, Qcow2Error
from .format import L1E_OFFSET_MASK, MAX_L1_SIZE_BYTES, REFT_OFFSET_MASK, decode_table

MAX_HOST_OFFSET = 1 << 56
# No metadata region of any kind is larger than this (spec and QEMU limits: L1 32 MiB,
# snapshot table and bitmap directory 64 MiB, LUKS header a few MiB): a hostile length
# cannot make the map large.
_MAX_REGION = 64 << 20
_SET_MAX = 1 << 20  # map entries kept as a Python set too (for the per-write test)

HEADER, ACTIVE_L1, ACTIVE_L2, REFTABLE, REFBLOCK, SNAPSHOT_TABLE, INACTIVE_L1, \
    INACTIVE_L2, BITMAP_DIRECTORY, BITMAP_TABLE, BITMAP_DATA, CRYPTO_HEADER = range(12)
NAMES = {
    HEADER: "the image header", ACTIVE_L1: "the active L1 table", ACTIVE_L2: "an active L2 table",
    REFTABLE: "the refcount table", REFBLOCK: "a refcount block",
    SNAPSHOT_TABLE: "the snapshot table", INACTIVE_L1: "an inactive L1 table",
    INACTIVE_L2: "an inactive L2 table", BITMAP_DIRECTORY: "the bitmap directory",
    BITMAP_TABLE: "a bitmap table", BITMAP_DATA: "a bitmap data cluster",
    CRYPTO_HEADER: "the crypto header",
}
# What a metadata write of each storage kind may overwrite (its own kind, in place)
ALLOWED = {
    "header": {HEADER},
    "l1": {ACTIVE_L1},  # (snapshot L1 tables are only ever written to new clusters)
    "l2": {ACTIVE_L2, INACTIVE_L2},
    "refcount": {REFTABLE, REFBLOCK},
    "snapshot_table": {SNAPSHOT_TABLE},
}


class OverlapGuard:
    """The metadata map of one open image (see the module docstring)."""

    def __init__(self, img: Any) -> None:
        self.img = img
        self._clusters: np.ndarray | None = None  # sorted host cluster indexes
        self._kinds: np.ndarray | None = None
        self._set: set[int] | None = None

    def invalidate(self) -> None:
        self._clusters = self._kinds = None
        self._set = None

    # -- the map -------------------------------------------------------------------------
    def _build(self) -> None:
        img = self.img
        cs = img.geo.cluster_size
        cbits = img.geo.cluster_bits
        st = img.storage
        file_size = st.size()
        parts: list[np.ndarray] = []
        kinds: list[np.ndarray] = []

        def region(offset: int, length: int, kind: int) -> None:
            if length <= 0 or offset < 0 or offset >= MAX_HOST_OFFSET:
                return
            length = min(length, _MAX_REGION)
            first, last = offset >> cbits, (offset + length - 1) >> cbits
            parts.append(np.arange(first, last + 1, dtype=np.int64))
            kinds.append(np.full(last - first + 1, kind, dtype=np.uint8))

        def tables(offsets: np.ndarray, kind: int) -> None:
            offs = (offsets & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
            offs = offs[(offs != 0) & (offs < MAX_HOST_OFFSET)]
            if len(offs):
                parts.append(offs >> cbits)
                kinds.append(np.full(len(offs), kind, dtype=np.uint8))

        tables(img.clusters.l1, ACTIVE_L2)
        h = img.header
        try:
            from .snaptable import read_snapshot_table  # noqa: PLC0415

            entries, size = read_snapshot_table(st, h)
        except Qcow2Error:
            entries, size = [], h.nb_snapshots * 40 if h.nb_snapshots else 0
        if h.nb_snapshots:
            region(h.snapshots_offset, max(size, 40), SNAPSHOT_TABLE)
        for e in entries:
            n = min(e.l1_size, MAX_L1_SIZE_BYTES // 8)
            if not n or e.l1_table_offset % cs or not 0 < e.l1_table_offset < file_size:
                continue
            region(e.l1_table_offset, n * 8, INACTIVE_L1)
            tables(decode_table(st.pread(n * 8, e.l1_table_offset)), INACTIVE_L2)
        self._add_bitmaps(region, tables, file_size)
        crypto = img.layout.crypto_ext
        if h.crypt_method == 2 and crypto is not None and len(crypto) >= 16:
            off, length = struct.unpack_from(">QQ", crypto)
            region(off, length, CRYPTO_HEADER)
        if parts:
            allc = np.concatenate(parts)
            allk = np.concatenate(kinds)
            order = np.argsort(allc, kind="stable")
            self._clusters, self._kinds = allc[order], allk[order]
        else:
            self._clusters = np.zeros(0, dtype=np.int64)
            self._kinds = np.zeros(0, dtype=np.uint8)
        # ~70 bytes per entry as a set: only up to a bound (the arrays stay the truth)
        self._set = set(self._clusters.tolist()) if len(self._clusters) <= _SET_MAX else None

    def _add_bitmaps(self, region: Any, tables: Any, file_size: int) -> None:
        img = self.img
        from .bitmaps import read_directory, read_table, validate_entry  # noqa: PLC0415

        try:
            ext, entries = read_directory(img.storage, img.layout.bitmaps_ext,
                                          img.header.autoclear_features, file_size)
        except Qcow2Error:
            return
        if ext is None:
            return
        if ext.nb_bitmaps:
            region(ext.directory_offset, ext.directory_size, BITMAP_DIRECTORY)
        for ent in entries:
            try:
                validate_entry(ent, img.header.size, img.geo.cluster_size, file_size)
                table = read_table(img.storage, ent)
            except Qcow2Error:
                continue
            region(ent.table_offset, ent.table_size * 8, BITMAP_TABLE)
            data = (table & np.uint64(REFT_OFFSET_MASK)).astype(np.int64)
            data = data[(data != 0) & (data < MAX_HOST_OFFSET)]
            if len(data):
                # (a bitmap table entry has the L1 entry's offset mask too)
                tables(data.astype(np.uint64), BITMAP_DATA)

    # -- queries -------------------------------------------------------------------------
    def kinds_at(self, host: int, length: int) -> list[int]:
        """Every metadata kind [host, host + length) overlaps (live state included)."""
        img = self.img
        cs = img.geo.cluster_size
        cbits = img.geo.cluster_bits
        end = host + length
        c0, c1 = host >> cbits, (end - 1) >> cbits
        out: list[int] = []
        if host < cs:
            out.append(HEADER)
        cm = img.clusters
        if cm.l1_offset < end and host < cm.l1_offset + 8 * len(cm.l1):
            out.append(ACTIVE_L1)
        rc = img.refcounts
        if rc is not None:
            if rc.reftable_offset < end and host < rc.reftable_offset + rc.reftable_clusters * cs:
                out.append(REFTABLE)
            blocks = rc.refblock_clusters
            if c1 - c0 < 64:
                if any(c in blocks for c in range(c0, c1 + 1)):
                    out.append(REFBLOCK)
            elif any(c0 <= b <= c1 for b in blocks):
                out.append(REFBLOCK)
        for k in self._static_kinds(c0, c1):
            if k not in out:
                out.append(k)
        return out

    def _static_kinds(self, c0: int, c1: int) -> list[int]:
        """The kinds of the collected map in host clusters c0 .. c1."""
        if self._clusters is None:
            self._build()
        clusters, kinds = self._clusters, self._kinds
        assert clusters is not None and kinds is not None
        out: list[int] = []
        i = int(np.searchsorted(clusters, c0, "left"))
        if i < len(clusters) and clusters[i] <= c1:
            j = int(np.searchsorted(clusters, c1, "right"))
            for c, k in zip(clusters[i:j].tolist(), kinds[i:j].tolist()):
                if k == ACTIVE_L2 and not self._active_l2(c):
                    continue  # freed since the map was built
                if k not in out:
                    out.append(k)
        return out

    def static_hit(self, cluster: int) -> bool:
        """Whether one host cluster is in the collected map (the fast test for data,
        on every write that does not find its cluster owned: a set lookup while the map
        is of a usual size, a binary search beyond)."""
        if self._clusters is None:
            self._build()
        if self._set is not None:
            return cluster in self._set
        clusters = self._clusters
        assert clusters is not None
        i = int(clusters.searchsorted(cluster))
        return i < len(clusters) and int(clusters[i]) == cluster

    def _active_l2(self, cluster: int) -> bool:
        l1 = self.img.clusters.l1
        off = np.uint64(cluster << self.img.geo.cluster_bits)
        return bool(((l1 & np.uint64(L1E_OFFSET_MASK)) == off).any())

    # -- hooks ---------------------------------------------------------------------------
    def check_data(self, host: int, length: int) -> str:
        """The metadata of the collected map a data write would overwrite ("" if none;
        the live structures are the caller's test, Image._metadata_at)."""
        if length <= 0:
            return ""
        cbits = self.img.geo.cluster_bits
        hit = self._static_kinds(host >> cbits, (host + length - 1) >> cbits)
        return NAMES[hit[0]] if hit else ""

    def check_metadata_write(self, host: int, length: int, kind: str) -> None:
        """Storage hook: a metadata write of `kind` may overwrite only its own kind."""
        if self.img._corrupt and kind == "header":
            return  # (marking the image corrupt writes the header)
        allowed = ALLOWED.get(kind)
        if allowed is None:
            return
        bad = [k for k in self.kinds_at(host, length) if k not in allowed]
        if bad:
            self.img._mark_corrupt(
                f"Preventing invalid write on metadata (overlaps with {NAMES[bad[0]]}): "
                f"{kind} write at offset {host:#x}")

    def check_alloc(self, host: int, length: int, what: str) -> None:
        """Allocation hook: a cluster about to become `what` must not be metadata."""
        hit = self.kinds_at(host, length)
        if hit:
            self.img._mark_corrupt(
                f"Preventing invalid allocation of {what} on metadata "
                f"(overlaps with {NAMES[hit[0]]}) at offset {host:#x}")


def guard_allocator(rc: Any, check: Any) -> None:
    """Make every free-cluster search of a refcount strategy pass check(offset, length,
    what) before its run is handed out: the one place every allocation (pooled or not,
    tables, blocks, data) comes from. A run the refcounts call free but that is metadata
    means the refcounts lie: refused, the image marked corrupt (by check). One test per
    search, not per cluster: a pool reservation covers up to thousands of clusters."""
    find = getattr(rc, "_find_free_run", None)
    if find is None or getattr(find, "_guarded", False):
        return
    cbits = rc.geo.cluster_bits

    def guarded(n: int) -> int:
        start = find(n)
        check(start << cbits, n << cbits, "new clusters")
        return start

    guarded._guarded = True  # type: ignore[attr-defined]
    rc._find_free_run = guarded


def validate_reftable(img: Any, reftable: np.ndarray, live_weight: int = 1) -> None:
    """The refcount table before it is used for writing: refcount blocks cluster
    aligned, inside the host offset limit, each used once, none on the header, the active
    L1 table or the refcount table itself; and no counted metadata (header, refcount
    structures, the active L1 table where the mode counts it) in a range no block
    describes (its refcounts would read 0, and the allocator would hand it out).
    Anything else is corruption for `check -r all` to repair."""
    geo = img.geo
    cs = geo.cluster_size
    h = img.header
    offs = (reftable & np.uint64(REFT_OFFSET_MASK)).astype(np.int64)
    raw = reftable.astype(np.uint64)
    nz = offs != 0

    def fail(reason: str) -> None:
        raise CorruptImageError(f"Refcount structures are corrupt ({reason}); "
                                "run 'qcow2 check -r all'")

    if ((raw[nz] & np.uint64(cs - 1)).astype(bool)).any() or (offs[nz] >= MAX_HOST_OFFSET).any():
        fail("a refcount block offset is invalid")
    blocks = offs[nz]
    if len(np.unique(blocks)) != len(blocks):
        fail("two refcount table entries point at one refcount block")
    rt0, rt1 = h.refcount_table_offset, h.refcount_table_offset + h.refcount_table_clusters * cs
    l10, l11 = h.l1_table_offset, h.l1_table_offset + 8 * h.l1_size
    for b in blocks.tolist():
        if b < cs:
            fail("a refcount block overlaps the header")
        if rt0 < b + cs and b < rt1:
            fail("a refcount block overlaps the refcount table")
        if h.l1_size and l10 < b + cs and b < l11:
            fail("a refcount block overlaps the active L1 table")
    bits = geo.refblock_bits + geo.cluster_bits
    live = [0, rt0, rt1 - 1, *blocks.tolist()]
    if h.l1_size and live_weight:  # (a mode may leave the live tables uncounted)
        live += [l10, l11 - 1]
    for off in live:
        idx = off >> bits
        if idx >= len(offs) or not offs[idx]:
            fail(f"no refcount block describes host offset {off:#x}")
