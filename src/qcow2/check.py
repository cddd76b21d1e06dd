"""Consistency check and repair of qcow2 images (`qcow2 check`, `Image.check`).

The check recounts every reference to every host cluster (header, active and snapshot
L1/L2 tables, data and compressed clusters, snapshot table, refcount table and blocks,
bitmap directory/tables/data) and compares the result with the stored refcounts.
Categories, counts, messages, JSON fields and exit codes follow `qemu-img check`, so a
report from either tool means the same thing.

Everything is vectorized: tables are read in bulk (physically contiguous tables with one
read) and processed as numpy arrays, references become cluster indexes counted with
np.add.at (or one slice for a run of clusters), and stored refcounts are decoded a whole
block range at a time. Memory is bounded by the size of the image file: like QEMU, a
reference to a region ending a cluster or more past the end of the file is a corruption
and is not counted, so the computed refcounts cover the file's clusters plus one; L2
tables are processed in batches.

Repairs follow qemu-img check -r: refcounts that are too high (leaks) or too low but not
zero are set in place; anything worse (a referenced cluster with refcount 0, a broken
refcount table or block) rebuilds the refcount structure from the computed counts; wrong
COPIED flags are fixed; preallocated zero clusters at misaligned offsets become plain
zero clusters. Repair never overwrites a referenced cluster: a rebuilt structure goes
to clusters nothing references, and the header switches to it only after it is durable,
so a crash during repair leaves the old structure in place. Clusters that damaged
snapshot table entries may still use are never freed.

The dirty bit: Image opens a dirty image read-write by calling check_image(repair="all")
first (as QEMU does) and clearing the bit; read-only opens use the image as it is.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .bitmaps import read_directory, validate_entry
from .errors import CorruptImageError, InvalidArgumentError, Qcow2Error, ReadOnlyError
from .format import (
    AUTOCLEAR_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_L1_SIZE_BYTES,
    MAX_SNAPSHOT_EXTRA_DATA,
    MAX_SNAPSHOT_TABLE_BYTES,
    MAX_SNAPSHOTS,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    SNAPSHOT_EXTRA_V3_SIZE,
    SNAPSHOT_HEADER,
    SnapshotEntry,
    decode_refblock,
    encode_refblock,
    encode_table,
)
from .geometry import div_round_up
from .snaptable import pack_snapshot_table
from .tree import (
    L1Entries,
    L2Entries,
    plain_clean,
    read_regions,
    table_chunks,
    to_native,
)

if TYPE_CHECKING:
    from .cluster import ClusterMap
    from .format import Header, ImageLayout
    from .geometry import Geometry
    from .refcount import RefcountStrategy
    from .snapshot import SnapshotOps
    from .storage import Storage

REPAIR_MODES = (None, "leaks", "all")
MAX_MESSAGES = 10000  # detailed lines kept per check; the rest are only counted
BATCH_BYTES = 64 << 20  # L2 tables read and processed at a time
REFT_RESERVED_MASK = 0x1FF
_U64 = np.uint64

# qemu-img prints the JSON members in the order of its dictionary's hash buckets;
# mirror it so the two outputs can be compared textually.
_JSON_ORDER = (
    "image-end-offset", "compressed-clusters", "total-clusters", "corruptions",
    "corruptions-fixed", "check-errors", "leaks", "leaks-fixed", "allocated-clusters",
    "filename", "format", "fragmented-clusters",
)
_ALWAYS = ("check-errors", "filename", "format")


@dataclass
class CheckResult:
    """Outcome of a check, with qemu-img's fields (see `to_dict`)."""

    filename: str = ""
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    # Diagnostic lines (qemu-img prints them on stderr), capped at MAX_MESSAGES.
    messages: list[str] = field(default_factory=list)
    # Set when the check could not complete (qemu-img: "Check failed: <reason>").
    failure: str | None = None
    # Whether a repair changed the image (then the counts are from the re-check).
    repaired: bool = False
    _dropped: int = 0

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit code: 0 clean, 1 not completed, 2 corrupt, 3 leaks only."""
        if self.failure is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    @property
    def clean(self) -> bool:
        return self.exit_code == 0

    def msg(self, line: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(line)
        else:
            self._dropped += 1

    def msg_many(self, fn: Any, cols: list[np.ndarray], weights: np.ndarray | None = None) -> None:
        """One line per row of cols (repeated weights[i] times, as QEMU reports a
        shared table once per visit), within the cap."""
        n = len(cols[0]) if cols else 0
        if not n:
            return
        total = n if weights is None else int(weights.sum())
        room = MAX_MESSAGES - len(self.messages)
        added = 0
        if room > 0:
            k = min(n, room if weights is None else int(np.searchsorted(np.cumsum(weights), room)) + 1)
            reps = [1] * k if weights is None else weights[:k].tolist()
            for row, r in zip(zip(*[c[:k].tolist() for c in cols]), reps):
                line = fn(*row)
                for _ in range(min(r, room - added)):
                    self.messages.append(line)
                    added += 1
        self._dropped += total - added

    def all_messages(self) -> list[str]:
        if self._dropped:
            return self.messages + [f"({self._dropped} more messages not shown)"]
        return list(self.messages)

    def to_dict(self) -> dict[str, Any]:
        """The members `qemu-img check --output=json` prints (zero counts are omitted)."""
        values = {
            "filename": self.filename, "format": self.format, "check-errors": self.check_errors,
            "image-end-offset": self.image_end_offset, "corruptions": self.corruptions,
            "leaks": self.leaks, "corruptions-fixed": self.corruptions_fixed,
            "leaks-fixed": self.leaks_fixed, "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
        }
        return {k: values[k] for k in _JSON_ORDER if k in _ALWAYS or values[k]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=4)

    def human(self) -> str:
        """The report `qemu-img check` prints (without the repair preamble)."""
        out: list[str] = []
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.")
        else:
            if self.corruptions:
                out += ["", f"{self.corruptions} errors were found on the image.",
                        "Data may be corrupted, or further writes to the image may corrupt it."]
            if self.leaks:
                out += ["", f"{self.leaks} leaked clusters were found on the image.",
                        "This means waste of disk space, but no harm to data."]
            if self.check_errors:
                out += ["", f"{self.check_errors} internal errors have occurred during the check."]
        if self.total_clusters and self.allocated_clusters:
            a = self.allocated_clusters
            out.append(
                f"{a}/{self.total_clusters} = {a * 100.0 / self.total_clusters:0.2f}% allocated, "
                f"{self.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / a:0.2f}% compressed clusters"
            )
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(out) + "\n"

    def repair_preamble(self) -> str:
        return (
            "The following inconsistencies were found and repaired:\n\n"
            f"    {self.leaks_fixed} leaked clusters\n"
            f"    {self.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n"
        )


class _Abort(Exception):
    """The check cannot go on (qemu-img: the check returns an error)."""


def _repaired(e: SnapshotEntry, disk_size: int) -> SnapshotEntry:
    """The entry as a repaired table holds it: at least the 24 bytes of extra data
    version 3 defines (QEMU's rewrite does the same; an old entry gets the current
    disk size and no icount), at most the extra data a reader accepts."""
    if e.extra_data_size < SNAPSHOT_EXTRA_V3_SIZE:
        return replace(e, disk_size=disk_size if e.disk_size is None else e.disk_size,
                       icount=None, extra_data_size=SNAPSHOT_EXTRA_V3_SIZE)
    if e.extra_data_size > MAX_SNAPSHOT_EXTRA_DATA:
        return replace(e, extra_data_size=MAX_SNAPSHOT_EXTRA_DATA)
    return e


# ---------------------------------------------------------------------------- I/O --
_read_raw = read_regions  # the tree walker's readers (kept under check's names)
_to_u64 = to_native


def _read_u64(storage: Any, offset: int, count: int, file_size: int) -> np.ndarray:
    return _to_u64(_read_raw(storage, np.array([offset]), count * 8, file_size))[0]


# ---------------------------------------------------------------------- references --
class _Refs:
    """Computed reference counts, one per cluster of the file plus one: like QEMU, a
    reference to a region ending a cluster or more past the end of the file is a
    corruption and is not counted, so nothing past that needs tracking."""

    def __init__(self, file_size: int, cluster_bits: int, res: CheckResult) -> None:
        self.fs = file_size
        self.cb = cluster_bits
        self.cs = 1 << cluster_bits
        self.nb_file = div_round_up(file_size, self.cs)
        self.dense = np.zeros(self.nb_file + 1, dtype=np.int64)
        self.res = res

    @property
    def nb(self) -> int:
        """QEMU's cluster count: the file's, plus one if a reference reached past it."""
        return self.nb_file + (1 if self.dense[self.nb_file] else 0)

    def get(self, cluster: int) -> int:
        return int(self.dense[cluster]) if 0 <= cluster < len(self.dense) else 0

    def _add(self, clusters: np.ndarray, weights: np.ndarray | None) -> None:
        # np.add.at allocates nothing (np.bincount would build a second file-sized array)
        if len(clusters):
            np.add.at(self.dense, clusters, 1 if weights is None else weights)

    def _exceeding(self, offsets: np.ndarray, sizes: np.ndarray | int, over: np.ndarray,
                   weights: np.ndarray | None) -> None:
        sz = np.broadcast_to(np.asarray(sizes, dtype=np.int64), offsets.shape)
        w = None if weights is None else weights[over]
        self.res.msg_many(
            lambda o, n: "ERROR: counting reference for region exceeding the end of the file "
                         f"by one cluster or more: offset 0x{o:x} size 0x{n:x}",
            [offsets[over], sz[over]], w)
        self.res.corruptions += int(over.sum()) if w is None else int(w.sum())

    def add_clusters(self, offsets: np.ndarray, weights: np.ndarray | None = None,
                     aligned: bool = False, own: bool = False) -> None:
        """Count cluster-sized regions at offsets (a misaligned one touches two clusters;
        aligned=True: the caller knows none is; own=True: offsets may be overwritten)."""
        if not len(offsets):
            return
        if int(offsets.max()) >= self.fs:
            over = offsets >= self.fs
            self._exceeding(offsets, self.cs, over, weights)
            keep = ~over
            offsets = offsets[keep]
            weights = None if weights is None else weights[keep]
        if aligned:
            self._add(np.right_shift(offsets, self.cb, out=offsets if own else None), weights)
            return
        first = offsets >> self.cb
        self._add(first, weights)
        unal = (offsets & (self.cs - 1)) != 0
        if unal.any():
            self._add(first[unal] + 1, None if weights is None else weights[unal])

    def add_regions(self, offsets: np.ndarray, sizes: np.ndarray,
                    weights: np.ndarray | None = None) -> None:
        """Count the clusters of regions [offset, offset + size)."""
        keep = sizes > 0
        if not keep.all():
            offsets, sizes = offsets[keep], sizes[keep]
            weights = None if weights is None else weights[keep]
        if not len(offsets):
            return
        end = offsets + sizes
        over = (end > self.fs) & (end - self.fs >= self.cs)
        if over.any():
            self._exceeding(offsets, sizes, over, weights)
            keep = ~over
            offsets, end = offsets[keep], end[keep]
            weights = None if weights is None else weights[keep]
        first = offsets >> self.cb
        span = ((end - 1) >> self.cb) - first + 1
        if (span == 1).all():
            self._add(first, weights)
        else:
            self._add(np.repeat(first, span) + _ramp(span),
                      None if weights is None else np.repeat(weights, span))

    def add_region(self, offset: int, size: int, weight: int = 1) -> None:
        if size > 0 and weight and offset + size >= 1 << 62:
            # from a hostile field (beyond any file; int64 arithmetic would overflow)
            self.res.msg("ERROR: counting reference for region exceeding the end of the file "
                         f"by one cluster or more: offset 0x{offset:x} size 0x{size:x}")
            self.res.corruptions += weight
            return
        if size > 0 and weight:
            self.add_regions(np.array([offset], dtype=np.int64), np.array([size], dtype=np.int64),
                             None if weight == 1 else np.array([weight], dtype=np.int64))


# Largest file (in clusters) check accepts: QEMU's, INT_MAX
_MAX_CHECK_CLUSTERS = (1 << 31) - 1
# A read ending past this fails (QEMU: BDRV_MAX_LENGTH, INT64_MAX aligned down to 1 MiB)
_MAX_READ_OFFSET = ((1 << 63) - 1) & ~((1 << 20) - 1)


# ------------------------------------------------------------------------- checker --
class CheckHost(Protocol):
    """What check needs from the image it checks (Image is one): its metadata as read
    at open, its storage, the live tree's references (from its snapshot operations),
    a refcount strategy for repairs, and the header writes and metadata reload a
    repair does."""

    path: str
    header: Header
    layout: ImageLayout
    storage: Storage
    geo: Geometry
    clusters: ClusterMap
    refcounts: RefcountStrategy | None
    writable: bool
    closed: bool
    _snapshots: SnapshotOps

    @property
    def cluster_size(self) -> int: ...
    @property
    def live_weight(self) -> int: ...
    @property
    def checker_class(self) -> type[_Checker]: ...
    def flush(self) -> None: ...
    def _update_header(self, **changes: Any) -> None: ...
    def _make_refcounts(self) -> Any: ...
    def _reload_metadata(self) -> None: ...


class _Checker:
    """One pass of qemu-img's qcow2 check (with the repairs asked for)."""

    def __init__(self, img: CheckHost, fix: str | None, res: CheckResult) -> None:
        self.img = img
        self.storage = img.storage
        self.h = img.header
        self.geo = img.geo
        self.fix_leaks = fix in ("leaks", "all")
        self.fix_errors = fix == "all"
        self.res = res
        self.cs = self.geo.cluster_size
        self.cb = self.geo.cluster_bits
        self.file_size = self.storage.size()
        self.nb_file = div_round_up(self.file_size, self.cs)
        self.rebuild = False
        self.changed = False
        # what one live reference adds to a stored refcount in the image's mode
        self.live_weight = img.live_weight
        self.live: np.ndarray | None = None

    # -- entry point -------------------------------------------------------------------
    def run(self) -> None:
        res = self.res
        h = self.h
        res.total_clusters = div_round_up(h.size, self.cs)
        try:
            if self.nb_file > _MAX_CHECK_CLUSTERS:
                # QEMU's limit too (an int count of clusters); the counts would need
                # 8 bytes per host cluster of a file that is mostly a sparse tail
                raise _Abort("File too large")
            snapshots, snap_size = self._read_snapshots()
            self._calculate(snapshots, snap_size)
            self._compare(fix=False)
            if self.rebuild and self.fix_errors:
                self._rebuild_and_recheck(snapshots, snap_size)
            elif self.fix_leaks:
                if self.rebuild:
                    res.msg("ERROR need to rebuild refcount structures")
                    res.check_errors += 1
                    raise _Abort("Input/output error")
                if res.leaks or res.corruptions:
                    self._fix_in_place()
            self._check_copied()
            res.image_end_offset = (self.highest + 1) * self.cs
            if self.fix_errors and getattr(self, "snap_fixes", 0):
                self._rewrite_snapshot_table(snapshots, snap_size)
        except _Abort as exc:
            res.failure = str(exc)
            return
        if self.fix_leaks and not res.check_errors and not res.corruptions:
            bits = self.img.header.incompatible_features
            if bits & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
                self.storage.sync()
                self.img._update_header(incompatible_features=bits & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT))
                self.changed = True

    # -- snapshot table ------------------------------------------------------------------
    def _read_snapshots(self) -> tuple[list[SnapshotEntry], int]:
        """Parse the snapshot table leniently: what qemu-img check reports as corruption
        is reported, what stops its check stops ours."""
        h, res = self.h, self.res
        n = h.nb_snapshots
        if not n:
            return [], 0
        if n > MAX_SNAPSHOTS:
            res.check_errors += 1
            res.msg("ERROR Snapshot table too large")
            raise _Abort("File too large")
        if h.snapshots_offset % self.cs:
            res.check_errors += 1
            res.msg("ERROR Snapshot table offset invalid")
            raise _Abort("Invalid argument")
        buf = bytearray()
        hdr = SNAPSHOT_HEADER
        pos = 0
        out: list[SnapshotEntry] = []

        def need(k: int) -> None:
            nonlocal buf
            while len(buf) < k:
                if len(buf) >= MAX_SNAPSHOT_TABLE_BYTES + 2 * 65536 + MAX_SNAPSHOT_EXTRA_DATA:
                    return
                want = max(k - len(buf), 65536, len(buf))
                buf += self.storage.pread(want, h.snapshots_offset + len(buf))

        self.snap_fixes = 0
        for i in range(n):
            pos = (pos + 7) & ~7
            need(pos + hdr.size)
            _l1, _n, id_len, name_len, _ds, _dn, _clk, _vm, extra = hdr.unpack_from(buf, pos)
            if extra > MAX_SNAPSHOT_EXTRA_DATA:
                if not self.fix_errors:
                    res.check_errors += 1
                    res.msg(f"ERROR failed to read the snapshot table: Too much extra metadata "
                            f"in snapshot table entry {i}")
                    res.msg("You can force-remove this extra metadata with qcow2 check -r all")
                    raise _Abort("File too large")
                res.msg(f"Discarding too much extra metadata in snapshot table entry {i} "
                        f"({extra} > {MAX_SNAPSHOT_EXTRA_DATA})")
                res.corruptions += 1
                self.snap_fixes += 1
            end = pos + hdr.size + extra + id_len + name_len
            if end > MAX_SNAPSHOT_TABLE_BYTES:
                res.check_errors += 1
                res.msg("ERROR failed to read the snapshot table: Snapshot table is too big")
                raise _Abort("File too large")
            need(end)
            # (names are bytes on disk: kept byte for byte through a rewrite)
            out.append(SnapshotEntry.unpack_from(buf, pos, lenient=True)[0])
            pos = end
        if h.version >= 3:
            word = "Repairing" if self.fix_errors else "ERROR"
            for i, sn in enumerate(out):
                if sn.extra_data_size < 16:
                    res.corruptions += 1
                    res.msg(f"{word} snapshot table entry {i} is incomplete")
                    self.snap_fixes += 1
        return out, pos

    # -- reference counting --------------------------------------------------------------
    def _calculate(self, snapshots: list[SnapshotEntry], snap_size: int) -> None:
        h, res = self.h, self.res
        refs = self.refs = _Refs(self.file_size, self.cb, res)
        self.active_tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = []
        # kept batch -> first cluster when its entries are all data clusters back to back
        self._runs: dict[int, int] = {}
        self.irregular = False  # seen compressed, reserved or misaligned L2 entries
        refs.add_region(0, self.cs)  # header
        self._load_reftable()
        # L1 tables: the active one, then every snapshot's
        refs.add_region(h.l1_table_offset, h.l1_size * 8)
        act = self._scan_l1(h.l1_table_offset, h.l1_size)
        tables: list[tuple[int, int]] = []
        self.bad_snapshots = 0
        for sn in snapshots:
            if sn.l1_table_offset % self.cs or sn.l1_size > MAX_L1_SIZE_BYTES // 8 or \
                    sn.l1_table_offset + 8 * sn.l1_size > self.file_size:
                self.bad_snapshots += 1
            if sn.l1_table_offset % self.cs:
                res.corruptions += 1
                res.msg(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={_cx(sn.l1_table_offset)}: "
                        "L1 table is not cluster aligned; snapshot table entry corrupted")
                continue
            if sn.l1_size > MAX_L1_SIZE_BYTES // 8:
                res.corruptions += 1
                res.msg(f"ERROR snapshot {sn.id} ({sn.name}) l1_size={_cx(sn.l1_size)}: "
                        "L1 table is too large; snapshot table entry corrupted")
                continue
            if sn.l1_size:
                refs.add_region(sn.l1_table_offset, sn.l1_size * 8)
                if sn.l1_table_offset + sn.l1_size * 8 > _MAX_READ_OFFSET:
                    # beyond what a read can address: QEMU's read fails and so its check
                    res.check_errors += 1
                    res.msg("ERROR: I/O error in check_refcounts_l1")
                    raise _Abort("Input/output error")
                tables.append((sn.l1_table_offset, sn.l1_size))
        snap_offs, snap_w = self._scan_snapshot_l1s(tables)
        self._scan_l2_tables(np.concatenate([act, snap_offs]),
                             np.concatenate([np.ones(len(act), dtype=np.int64), snap_w]), act)

        refs.add_region(h.snapshots_offset, snap_size)
        refs.add_region(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        crypto = self.img.layout.crypto_ext
        if h.crypt_method == 2 and crypto is not None and len(crypto) >= 16:
            # the LUKS header and key slots (checkable without the key)
            off, length = struct.unpack_from(">QQ", crypto)
            refs.add_region(off, length)
        self._count_bitmaps()
        self._check_refblocks()
        if self.live_weight != 1:
            self._expect_without_live(act)

    def _expect_without_live(self, act: np.ndarray) -> None:
        """A mode whose stored counts leave out the live tree's references: count those
        (the active L1 table, its L2 tables and their data) apart and take them off the
        expected refcounts. What the scan already reported is not reported again."""
        h = self.h
        live = _Refs(self.file_size, self.cb, CheckResult())
        live.add_region(h.l1_table_offset, h.l1_size * 8)
        live.add_clusters(act.copy())
        for _offs, tables, w in self._active_batches(act):
            d = L2Entries(self.geo, tables)
            live.add_clusters(d.hoff[d.normal].astype(np.int64), np.repeat(w, d.normal.sum(axis=1)))
            if d.any_comp:
                host, length = d.compressed_regions(d.comp)
                live.add_regions(host, length, np.repeat(w, d.comp.sum(axis=1)))
        dense = live.dense[: len(self.refs.dense)]
        self.refs.dense[: len(dense)] -= dense * (1 - self.live_weight)
        np.maximum(self.refs.dense, 0, out=self.refs.dense)
        self.live = dense

    def _scan_l1(self, offset: int, size: int) -> np.ndarray:
        """Check the active L1 table; count its L2 tables. Returns their offsets (exact,
        so a misaligned one is read where it points, as QEMU does)."""
        if not size:
            return np.zeros(0, dtype=np.int64)
        l1 = _read_u64(self.storage, offset, size, self.file_size)
        return self._scan_l1_entries(l1[l1 != 0], None)[0]

    def _scan_l1_entries(self, ent: np.ndarray, w: np.ndarray | None
                         ) -> tuple[np.ndarray, np.ndarray | None]:
        """Check nonzero L1 entries (each standing for w[i] L1 tables); count the L2
        tables. Returns (L2 table offsets, their weights)."""
        res = self.res
        if not len(ent):
            return np.zeros(0, dtype=np.int64), w
        l1e = L1Entries(ent, self.cs)
        bad = l1e.reserved()
        if bad.any():
            res.msg_many(lambda e: f"ERROR found L1 entry with reserved bits set: {e:x}",
                         [ent[bad]], None if w is None else w[bad])
            res.corruptions += int(bad.sum()) if w is None else int(w[bad].sum())
        offs = l1e.offsets
        w = None if w is None else w[l1e.keep]
        unal = l1e.misaligned()  # before counting: add_clusters may shift offs in place
        self.refs.add_clusters(offs, w)
        if unal.any():
            res.msg_many(lambda o: f"ERROR l2_offset={o:x}: Table is not cluster aligned; "
                         "L1 entry corrupted", [offs[unal]], None if w is None else w[unal])
            res.corruptions += int(unal.sum()) if w is None else int(w[unal].sum())
        return offs, w

    def _scan_snapshot_l1s(self, tables: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Check the snapshots' L1 tables, reading each 8-byte entry of the file once
        however many tables cover it: an entry counts for every table covering it
        (a coverage count from a difference array). The work is bounded by the file
        size, not by the number of snapshots times their L1 sizes (hostile tables may
        overlap arbitrarily)."""
        fs = self.file_size
        iv = np.array([(off // 8, min(off + 8 * size, fs) // 8) for off, size in tables
                       if off < fs], dtype=np.int64).reshape(-1, 2)
        iv = iv[iv[:, 1] > iv[:, 0]]
        offs_out: list[np.ndarray] = []
        w_out: list[np.ndarray] = []
        if not len(iv):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        iv = iv[np.argsort(iv[:, 0], kind="stable")]
        # merged, disjoint spans of entries that some table covers
        reach = np.maximum.accumulate(iv[:, 1])
        new = np.concatenate(([True], iv[1:, 0] >= reach[:-1]))
        starts = iv[new, 0]
        ends = np.append(reach[np.flatnonzero(new)[1:] - 1], reach[-1])
        chunk = BATCH_BYTES // 8
        for m0, m1 in zip(starts.tolist(), ends.tolist()):
            for c0 in range(m0, m1, chunk):
                c1 = min(m1, c0 + chunk)
                ent = _read_u64(self.storage, c0 * 8, c1 - c0, fs)
                sel = (iv[:, 0] < c1) & (iv[:, 1] > c0)
                diff = np.zeros(c1 - c0 + 1, dtype=np.int64)
                np.add.at(diff, np.clip(iv[sel, 0], c0, c1) - c0, 1)
                np.add.at(diff, np.clip(iv[sel, 1], c0, c1) - c0, -1)
                cover = np.cumsum(diff[:-1])
                nz = (ent != 0) & (cover > 0)
                o, w = self._scan_l1_entries(ent[nz], cover[nz])
                offs_out.append(o)
                w_out.append(w if w is not None else np.ones(len(o), dtype=np.int64))
        return np.concatenate(offs_out), np.concatenate(w_out)

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        """A reusable uint64 work array (fresh big arrays cost page faults each time)."""
        size = int(np.prod(shape))
        buf = self.__dict__.get("_scratch_buf")
        if buf is None or len(buf) < size:
            buf = self._scratch_buf = np.empty(size, dtype=np.uint64)
        return buf[:size].reshape(shape)

    def _scan_l2_tables(self, offsets: np.ndarray, weights: np.ndarray, active: np.ndarray) -> None:
        """Count every reference in the L2 tables at offsets (weights: how many L1 entries
        point at each); fragmentation statistics come from the active ones."""
        if not len(offsets):
            return
        uniq, inv = np.unique(offsets, return_inverse=True)
        w_all = np.bincount(inv, weights=weights).astype(np.int64)
        w_act = np.zeros(len(uniq), dtype=np.int64)
        if len(active):
            np.add.at(w_act, np.searchsorted(uniq, active), 1)
        kept = 0
        for s, _offs, tables in table_chunks(self.storage, uniq, self.cs, self.file_size, BATCH_BYTES):
            e = s + len(tables)
            self._batch_run = -1
            self._scan_l2_batch(uniq[s:e], tables, w_all[s:e], w_act[s:e])
            # keep the active tables for the COPIED pass when they fit (saves a re-read)
            act = w_act[s:e] > 0
            if self.active_tables is not None and act.any():
                kept += int(act.sum()) * self.cs
                if kept > 4 * BATCH_BYTES:
                    self.active_tables = None
                elif act.all():
                    self.active_tables.append((uniq[s:e], tables, w_act[s:e]))
                    self._runs[len(self.active_tables) - 1] = self._batch_run
                else:
                    self.active_tables.append((uniq[s:e][act], tables[act], w_act[s:e][act]))

    def _scan_l2_batch(self, offs: np.ndarray, tables: np.ndarray, w_all: np.ndarray,
                       w_act: np.ndarray) -> None:
        res, geo, cs = self.res, self.geo, self.cs
        ext = geo.extended_l2
        ent = tables[:, 0::2] if ext else tables
        n = len(offs)
        uniform = bool((w_all == 1).all())
        # Fast path: nothing compressed, no reserved bit, no misaligned offset (one pass
        # tells); then only the offsets matter.
        scratch = self._scratch(ent.shape)
        if not ext and plain_clean(ent, cs, scratch):
            hoff = np.bitwise_and(ent, _U64(L2E_OFFSET_MASK), out=scratch)
            normal = hoff != 0
            cnt = np.count_nonzero(normal, axis=1)
            if int(cnt.sum()) == normal.size:
                data = hoff.reshape(-1).view(np.int64)
            else:
                data = hoff[normal].view(np.int64)
            jump, increasing = self._steps(data)
            contiguous = not jump.any()
            self._frag_stats(n, cnt, data, None, w_act, jump)
            refs = self.refs
            if len(data) and uniform and int(data[-1 if increasing else 0]) < self.file_size and \
                    (contiguous or increasing):
                # one run of clusters (preallocated images) or distinct ones: no
                # duplicate index, so plain (vectorized) indexing adds them up
                first = int(data[0]) >> self.cb
                if contiguous:
                    refs.dense[first : first + len(data)] += 1
                    if len(data) == ent.size:  # every entry, back to back: COPIED pass shortcut
                        self._batch_run = first
                else:
                    refs.dense[np.right_shift(data, self.cb, out=data)] += 1
            else:
                refs.add_clusters(data, None if uniform else np.repeat(w_all, cnt),
                                  aligned=True, own=True)
            return
        self.irregular = True
        d = L2Entries(geo, tables)
        comp, hoff, normal, any_comp = d.comp, d.hoff, d.normal, d.any_comp

        def per_entry(mask: np.ndarray) -> np.ndarray | None:
            """Weights of the entries selected by mask, in row-major order."""
            return None if uniform else np.repeat(w_all, mask.sum(axis=1))

        def report(mask: np.ndarray, fn: Any, *cols: np.ndarray) -> None:
            w = per_entry(mask)
            res.msg_many(fn, [c[mask] for c in cols], w)
            res.corruptions += int(mask.sum()) if w is None else int(w.sum())

        # reserved bits of standard descriptors
        resv = d.reserved()
        if resv.any():
            report(resv, lambda e: f"ERROR found l2 entry with reserved bits set: {e:x}", ent)
        # compressed clusters
        comp_ok = comp
        if any_comp:
            copied = d.compressed_copied()
            if copied.any():
                report(copied, lambda e: f"ERROR: coffset=0x{e & geo.coffset_mask:x}: copied "
                       "flag must never be set for compressed clusters", ent)
            if ext:
                badmap = d.compressed_bitmap()
                if badmap.any():
                    col = np.broadcast_to(np.arange(ent.shape[1]), ent.shape)
                    report(badmap, lambda c, e: f"ERROR compressed cluster {c} with non-zero "
                           f"subcluster allocation bitmap, entry=0x{e & ~QCOW_OFLAG_COPIED:x}",
                           col, ent)
                    comp_ok = comp & ~badmap
        if ext:
            unalloc_bad = d.unallocated_bitmap()
            if unalloc_bad.any():
                report(unalloc_bad, lambda e: "ERROR: Unallocated cluster has non-zero "
                       "subcluster allocation map", ent)
            both = d.allocated_bitmap()
            if both.any():
                report(both, lambda o: f"ERROR offset={o:x}: Allocated cluster has corrupted "
                       "subcluster allocation bitmap", hoff)
        # data clusters must be cluster aligned
        unal = d.misaligned()
        if unal.any():
            has_data = d.has_data()
            data_unal = unal & has_data
            if data_unal.any():
                report(data_unal, lambda o: f"ERROR offset={o:x}: Data cluster is not properly "
                       "aligned; L2 entry corrupted.", hoff)
            prealloc = unal & ~has_data
            if prealloc.any():
                word = "Repairing" if self.fix_errors else "ERROR"
                report(prealloc, lambda o: f"{word} offset={o:x}: Preallocated cluster is not "
                       "properly aligned; L2 entry corrupted.", hoff)
                if self.fix_errors:
                    # zeroed on disk: QEMU sees it fixed on its first visit only
                    self._zero_entries(offs, tables, prealloc)
                    fixed = int(prealloc.sum())
                    res.corruptions -= fixed
                    res.corruptions_fixed += fixed
                    normal = normal & ~prealloc
        # count references
        cnt = normal.sum(axis=1)
        data = hoff[normal].view(np.int64)
        self.refs.add_clusters(data, None if uniform else np.repeat(w_all, cnt))
        ccnt = None
        if any_comp and comp_ok.any():
            host, length = d.compressed_regions(comp_ok)
            self.refs.add_regions(host, length, per_entry(comp_ok))
            ccnt = comp_ok.sum(axis=1)
        self._frag_stats(n, cnt, data, ccnt, w_act)

    def _steps(self, data: np.ndarray) -> tuple[np.ndarray, bool]:
        """(where data does not advance by one cluster, whether it strictly increases),
        computed in chunks: small temporaries are reused by the allocator instead of
        faulting in a file-sized array."""
        m = max(0, len(data) - 1)
        jump = np.empty(m, dtype=bool)
        increasing = True
        for i in range(0, m, 1 << 18):
            j = min(m, i + (1 << 18))
            d = data[i + 1 : j + 1] - data[i:j]
            np.not_equal(d, self.cs, out=jump[i:j])
            if increasing and jump[i:j].any():
                increasing = bool((d > 0).all())
        return jump, increasing

    def _frag_stats(self, n: int, cnt: np.ndarray, data: np.ndarray, ccnt: np.ndarray | None,
                    w_act: np.ndarray, jump: np.ndarray | None = None) -> None:
        """Allocation/fragmentation statistics of the active tables: a standard cluster is
        fragmented when it does not follow the previous one of its table; compressed
        clusters always are (QEMU's definitions)."""
        if not w_act.any():
            return
        res = self.res
        if ccnt is None:
            ccnt = np.zeros(n, dtype=np.int64)
        res.allocated_clusters += int((cnt + ccnt) @ w_act)
        res.compressed_clusters += int(ccnt @ w_act)
        frag = ccnt.copy()
        if len(data) > 1:
            jump = self._steps(data)[0] if jump is None else jump
            ends = np.cumsum(cnt)
            jump[ends[(cnt > 0) & (ends < len(data))] - 1] = False  # across tables
            if jump.any():
                cj = np.concatenate(([0], np.cumsum(jump)))
                starts = ends - cnt
                has = cnt > 1
                frag[has] += cj[ends[has] - 1] - cj[starts[has]]
        res.fragmented_clusters += int(frag @ w_act)

    def _zero_entries(self, offs: np.ndarray, tables: np.ndarray, mask: np.ndarray) -> None:
        """Turn preallocated, misaligned entries into zero clusters (they hold no data)."""
        ext = self.geo.extended_l2
        for r in np.flatnonzero(mask.any(axis=1)).tolist():
            cols = np.flatnonzero(mask[r])
            row = tables[r].copy()
            if ext:
                bm = row[2 * cols + 1]
                row[2 * cols + 1] = ((bm | (bm << _U64(32))) & _U64(0xFFFFFFFF00000000))
                row[2 * cols] = 0
            else:
                row[cols] = _U64(QCOW_OFLAG_ZERO)
            off = int(offs[r])
            if not self._may_write_table(off):
                self.res.check_errors += 1
                self.res.msg("ERROR: Overlap check failed")
                raise _Abort("Input/output error")
            self.storage.pwrite(encode_table(row), off, "l2")
            tables[r] = row
        self.storage.sync()
        self.changed = True

    def _count_bitmaps(self) -> None:
        """Persistent bitmaps (only while their auto-clear bit says they are valid)."""
        ext = self.img.layout.bitmaps_ext
        if ext is None or not self.h.autoclear_features & AUTOCLEAR_BITMAPS or len(ext) < 24:
            return
        res, refs, cs = self.res, self.refs, self.cs
        nb_bitmaps, _r, dir_size, dir_off = struct.unpack_from(">IIQQ", ext)
        if not nb_bitmaps:
            return
        refs.add_region(dir_off, dir_size)
        if dir_off % cs or dir_size > 64 * 1024 * 1024 or dir_off + dir_size > self.file_size:
            res.corruptions += 1
            res.msg("ERROR bitmap directory is invalid")
            return
        try:
            _ext, entries = read_directory(self.storage, ext, self.h.autoclear_features,
                                           self.file_size)
        except Qcow2Error as e:
            res.corruptions += 1
            res.msg(f"ERROR bitmap directory: {e}")
            return
        for bm in entries:
            t_off, t_size = bm.table_offset, bm.table_size
            refs.add_region(t_off, t_size * 8)
            if t_off % cs or t_size * 8 > 64 * 1024 * 1024 or t_off + t_size * 8 > self.file_size:
                res.corruptions += 1
                res.msg(f"ERROR bitmap table at {t_off:#x} is invalid")
                continue
            try:
                validate_entry(bm, self.h.size, cs, self.file_size)
            except Qcow2Error as e:
                res.corruptions += 1
                res.msg(f"ERROR {e}")
            table = _read_u64(self.storage, t_off, t_size, self.file_size)
            bad = ((table & _U64(0xFF000000000001FE)) != 0) | (
                ((table & _U64(L2E_OFFSET_MASK)) & _U64(cs - 1)) != 0)
            res.corruptions += int(bad.sum())
            good = (table[~bad] & _U64(L2E_OFFSET_MASK)).astype(np.int64)
            refs.add_clusters(good[good != 0])

    def _load_reftable(self) -> None:
        rt = _read_u64(self.storage, self.h.refcount_table_offset,
                       self.h.refcount_table_clusters * self.cs // 8, self.file_size)
        self.reftable = rt
        offs = _reft_offsets(rt)
        offs = offs[(offs != 0) & ((offs & (self.cs - 1)) == 0)]
        self._block_set = set((offs >> self.cb).tolist())

    def _check_refblocks(self) -> None:
        res, refs = self.res, self.refs
        rt = self.reftable
        self._block_refs = np.zeros(0, dtype=np.int64)
        nz = np.flatnonzero(rt)
        if not len(nz):
            return
        nb = refs.nb
        ent = rt[nz]
        offs = _reft_offsets(ent)
        resv = (ent & _U64(REFT_RESERVED_MASK)) != 0
        unal = ~resv & ((offs & (self.cs - 1)) != 0)
        clus = offs >> self.cb
        outside = ~resv & ~unal & (clus >= nb)
        res.msg_many(lambda i: f"ERROR refcount table entry {i} has reserved bits set", [nz[resv]])
        res.msg_many(lambda i: f"ERROR refcount block {i} is not cluster aligned; refcount table "
                     "entry corrupted", [nz[unal]])
        res.msg_many(lambda i: f"ERROR refcount block {i} is outside image", [nz[outside]])
        bad = int(resv.sum() + unal.sum() + outside.sum())
        res.corruptions += bad
        if bad:
            self.rebuild = True
        ok = ~(resv | unal | outside) & (offs != 0)
        blocks = clus[ok]
        idx = nz[ok]
        if not len(blocks):
            return
        exceed = offs[ok] >= self.file_size  # the extra cluster QEMU counts past the end
        if exceed.any():
            refs._exceeding(offs[ok], self.cs, exceed, None)
            self.rebuild = True
            blocks, idx = blocks[~exceed], idx[~exceed]
        self._block_refs = blocks
        # each block must be referenced exactly once, counting everything before it
        order = np.argsort(blocks, kind="stable")
        sb = blocks[order]
        first = np.concatenate(([0], np.flatnonzero(sb[1:] != sb[:-1]) + 1))
        rank_sorted = np.arange(len(sb)) - np.repeat(first, np.diff(np.append(first, len(sb))))
        rank = np.empty(len(sb), dtype=np.int64)
        rank[order] = rank_sorted
        seen = refs.dense[blocks] + rank + 1
        wrong = seen != 1
        if wrong.any():
            res.msg_many(lambda i, v: f"ERROR refcount block {i} refcount={v}",
                         [idx[wrong], seen[wrong]])
            res.corruptions += int(wrong.sum())
            self.rebuild = True
        refs._add(blocks, None)

    # -- stored refcounts ----------------------------------------------------------------
    def _decode_blocks(self, offsets: np.ndarray) -> np.ndarray:
        """Refcount blocks at offsets -> (n, entries) array in the narrowest native
        unsigned type that holds the refcount width (a quarter of the memory of uint64
        for the usual 16-bit refcounts)."""
        raw = _read_raw(self.storage, offsets, self.cs, self.file_size).reshape(-1)
        geo = self.geo
        order = geo.refcount_order
        if order >= 3:
            width = 1 << (order - 3)
            vals = raw.view(f">u{width}").astype(f"u{width}")
        else:
            vals = decode_refblock(raw, order).astype(np.uint8)
        return vals.reshape(len(offsets), geo.refblock_entries)

    def _load_stored(self) -> None:
        """Decode the stored refcounts of the clusters the comparison covers."""
        E = self.geo.refblock_entries
        D = self.refs.nb
        nblk = div_round_up(D, E)
        rt = self.reftable
        ent = np.zeros(nblk, dtype=np.uint64)
        k = min(nblk, len(rt))
        ent[:k] = rt[:k]
        offs = _reft_offsets(ent)
        unreadable = (offs & (self.cs - 1)) != 0
        valid = (offs != 0) & ~unreadable
        if valid.all() and (np.diff(offs) > 0).all():
            stored = self._decode_blocks(offs)  # the usual layout: distinct, ascending
        else:
            width = max(8, self.geo.refcount_bits)
            stored = np.zeros((nblk, E), dtype=f"u{width // 8}")
            if valid.any():
                uo, inv = np.unique(offs[valid], return_inverse=True)
                stored[valid] = self._decode_blocks(uo)[inv]
        self.stored = stored.reshape(-1)[:D]
        self.unreadable_blocks = unreadable

    def _stored_many(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stored refcounts, readable mask) of arbitrary clusters (those past the
        compared range are looked up block by block, a bounded number at a time)."""
        clusters = clusters.astype(np.int64)
        vals = np.zeros(len(clusters), dtype=np.uint64)
        ok = np.ones(len(clusters), dtype=bool)
        D = len(self.stored)
        bits = self.geo.refblock_bits
        inside = clusters < D
        if inside.any():
            ci = clusters[inside]
            vals[inside] = self.stored[ci]
            if self.unreadable_blocks.any():
                ok[inside] = ~self.unreadable_blocks[ci >> bits]
        if inside.all():
            return vals, ok
        rt = self.reftable
        where = np.flatnonzero(~inside)
        b = clusters[where] >> bits
        known = b < len(rt)
        where, b = where[known], b[known]
        off = _reft_offsets(rt[b])
        bad = (off & (self.cs - 1)) != 0
        ok[where[bad]] = False
        sel = ~bad & (off != 0) & (off < self.file_size)  # blocks past the end read as zero
        where, off = where[sel], off[sel]
        uo, inv = np.unique(off, return_inverse=True)
        per = max(1, BATCH_BYTES // (self.geo.refblock_entries * 8))
        for s in range(0, len(uo), per):
            blocks = self._decode_blocks(uo[s : s + per])
            m = (inv >= s) & (inv < s + per)
            w = where[m]
            vals[w] = blocks[inv[m] - s, clusters[w] & (self.geo.refblock_entries - 1)]
        return vals, ok

    # -- comparison ----------------------------------------------------------------------
    def _compare(self, fix: bool) -> None:
        """Compare computed and stored refcounts (qemu-img's counting: one leak or one
        corruption per mismatching cluster; a referenced cluster with refcount 0 needs
        a rebuilt refcount structure)."""
        res, refs = self.res, self.refs
        maxv = self.geo.refcount_max
        if self.geo.refcount_bits < 64:
            over = np.flatnonzero(refs.dense > maxv)
            if len(over):
                res.msg_many(lambda c: f"ERROR: overflow cluster offset=0x{c << self.cb:x}\n"
                             "Use qemu-img amend to increase the refcount entry width or "
                             "qemu-img convert to create a clean copy if the image cannot be "
                             "opened for writing", [over], refs.dense[over] - maxv)
                res.corruptions += int((refs.dense[over] - maxv).sum())
                refs.dense[over] = maxv
        self._load_stored()
        stored = self.stored
        D = len(stored)
        ref = refs.dense[:D].view(np.uint64)
        unr = None
        if self.unreadable_blocks.any():
            unr = np.repeat(self.unreadable_blocks, self.geo.refblock_entries)[:D]
            bad = np.flatnonzero(unr)
            res.check_errors += len(bad)
            b0 = int(np.flatnonzero(self.unreadable_blocks)[0])
            res.msg(f"Image is corrupt: Refblock offset {_cx(int(self.reftable[b0]) & REFT_OFFSET_MASK)} "
                    f"unaligned (reftable index: {_cx(b0)}); further non-fatal corruption events "
                    "will be suppressed")
            res.msg_many(lambda c: f"Can't get refcount for cluster {c}: Input/output error", [bad])
        diff = stored != ref
        if unr is not None:
            diff &= ~unr
            self.highest = _last_nonzero(((stored != 0) | (ref != 0)) & ~unr)
        else:
            self.highest = max(_last_nonzero(stored), _last_nonzero(ref))
        if self.live is not None:
            self.highest = max(self.highest, _last_nonzero(self.live))
        mism = np.flatnonzero(diff)
        s_vals = stored[mism]
        r_vals = ref[mism]
        self.mismatch = (mism, s_vals, r_vals)
        if not len(mism):
            return
        if (s_vals == 0).any():
            self.rebuild = True
        leak = s_vals > r_vals
        if fix:
            return
        res.msg_many(lambda c, s, r: f"{'Leaked' if s > r else 'ERROR'} cluster {c} "
                     f"refcount={s} reference={r}", [mism, s_vals, r_vals])
        res.leaks += int(leak.sum())
        res.corruptions += int((~leak).sum())

    def _fix_in_place(self) -> None:
        """Set mismatching refcounts to the computed ones, in their existing blocks."""
        res = self.res
        mism, s_vals, r_vals = self.mismatch
        leak = s_vals > r_vals
        want = (leak & self.fix_leaks) | (~leak & self.fix_errors & (s_vals != 0))
        if self.bad_snapshots and (want & leak).any():
            # QEMU frees them; but a snapshot whose table entry is damaged may still
            # use them, and freeing would hand its data out for reuse
            res.msg("ERROR not freeing leaked clusters: damaged snapshot table entries may "
                    "still use them (delete or fix those snapshots first)")
            want &= ~leak
        fixed = self._write_in_blocks(mism, r_vals, want)
        # qemu-img reports every mismatch again, saying which were repaired
        res.msg_many(lambda c, s, r, f: f"{'Repairing' if f else 'Leaked' if s > r else 'ERROR'} "
                     f"cluster {c} refcount={s} reference={r}", [mism, s_vals, r_vals, fixed])
        res.leaks -= int((fixed & leak).sum())
        res.corruptions -= int((fixed & ~leak).sum())
        res.leaks_fixed += int((fixed & leak).sum())
        res.corruptions_fixed += int((fixed & ~leak).sum())
        self.mismatch = (mism[~fixed], s_vals[~fixed], r_vals[~fixed])

    def _write_in_blocks(self, clusters: np.ndarray, values: np.ndarray,
                         want: np.ndarray) -> np.ndarray:
        """Store values[i] for the wanted clusters in their existing refcount blocks
        (sound ones only) and sync; returns which were written."""
        geo = self.geo
        blocks = clusters >> geo.refblock_bits
        fixed = np.zeros(len(clusters), dtype=bool)
        for b in np.unique(blocks[want]).tolist():
            off = int(self.reftable[b]) & REFT_OFFSET_MASK if b < len(self.reftable) else 0
            if not off or off % self.cs or off + self.cs > self.file_size or \
                    self.refs.get(off >> self.cb) != 1:
                continue  # not a sound refcount block: leave it to a rebuild
            sel = want & (blocks == b)
            vals = self._decode_blocks(np.array([off]))[0]
            vals[clusters[sel] & (geo.refblock_entries - 1)] = values[sel]
            self.storage.pwrite(encode_refblock(vals, geo.refcount_order), off, "refcount")
            fixed |= sel
            self.stored[clusters[sel]] = values[sel]
        if fixed.any():
            self.storage.sync()
            self.changed = True
        return fixed

    # -- rebuild -------------------------------------------------------------------------
    def _rebuild_and_recheck(self, snapshots: list[SnapshotEntry], snap_size: int) -> None:
        res = self.res
        old_corruptions, old_leaks = res.corruptions, res.leaks
        res.msg("Rebuilding refcount structure")
        self._rebuild()
        # everything is counted again against the new structure
        res.corruptions = 0
        res.leaks = 0
        self.h = self.img.header
        self.rebuild = False
        self.file_size = self.storage.size()
        self.nb_file = div_round_up(self.file_size, self.cs)
        quiet = CheckResult()
        self.res = quiet
        try:
            self._calculate(snapshots, snap_size)
            self._compare(fix=False)
            if quiet.leaks and not self.rebuild:
                self._fix_in_place()
        finally:
            self.res = res
        if self.rebuild:
            res.msg("ERROR rebuilt refcount structure is still broken")
        res.corruptions += quiet.corruptions
        res.leaks += quiet.leaks
        res.check_errors += quiet.check_errors
        if res.corruptions < old_corruptions:
            res.corruptions_fixed += old_corruptions - res.corruptions
        if res.leaks < old_leaks:
            res.leaks_fixed += old_leaks - res.leaks

    def _rebuild_values(self) -> np.ndarray:
        """What the rebuilt structure stores per cluster, the old table and blocks still
        included (they are taken off) and the new ones not (each adds 1)."""
        return self.refs.dense[: self.refs.nb].astype(np.int64)

    def _rebuild(self) -> None:
        """Write a new refcount table and blocks holding the computed refcounts, in
        clusters nothing references, then point the header at them."""
        refs, geo, cs, h = self.refs, self.geo, self.cs, self.h
        D = refs.nb
        # the old table and blocks are unreferenced once the header points elsewhere
        first = h.refcount_table_offset >> self.cb
        old = np.concatenate([np.arange(first, first + h.refcount_table_clusters, dtype=np.int64),
                              self._block_refs])
        marks = self._rebuild_values()
        old = old[old < D]
        np.subtract.at(marks, old, 1)
        np.maximum(marks, 0, out=marks)
        if self.bad_snapshots:
            # keep what damaged snapshot entries may still use (see _fix_in_place)
            keep = self.stored[:D].astype(np.int64)
            keep[np.repeat(self.unreadable_blocks, geo.refblock_entries)[:D]] = 0
            np.maximum(marks, keep, out=marks)
        # Nothing goes where anything is referenced (old structures too), nor where the
        # old refcounts say something is (a leaked cluster may hold data whose reference
        # a corruption lost), nor where those refcounts cannot be read.
        used = (refs.dense[:D] > 0) | (self.stored[:D] != 0)
        if self.live is not None:  # clusters only the live state uses count 0
            n = min(D, len(self.live))
            used[:n] |= self.live[:n] > 0
        if self.unreadable_blocks.any():
            used |= np.repeat(self.unreadable_blocks, geo.refblock_entries)[:D]
        E = geo.refblock_entries
        blocks: dict[int, int] = {}  # block index -> cluster
        table_at, table_clusters = -1, 0

        def take_run(k: int) -> int:
            nonlocal used, marks
            padded = np.concatenate(([False], ~used, [False]))
            d = np.diff(padded.astype(np.int8))
            starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
            fit = np.flatnonzero(ends - starts >= k)
            if len(fit):
                start = int(starts[fit[0]])
            elif len(starts) and ends[-1] == len(used):
                start = int(starts[-1])  # the free tail, extended
            else:
                start = len(used)
            if start + k > len(used):
                grow = start + k - len(used)
                used = np.concatenate([used, np.zeros(grow, dtype=bool)])
                marks = np.concatenate([marks, np.zeros(grow, dtype=np.int64)])
            used[start : start + k] = True
            marks[start : start + k] += 1
            return start

        while True:
            needed = np.unique(np.flatnonzero(marks) // E).tolist()
            missing = [b for b in needed if b not in blocks]
            if missing:
                for b in missing:
                    blocks[b] = take_run(1)
                continue
            want = max(1, div_round_up((max(blocks) + 1) * 8, cs))
            if table_clusters < want:
                if table_at >= 0:  # give the smaller run back
                    used[table_at : table_at + table_clusters] = False
                    marks[table_at : table_at + table_clusters] -= 1
                table_clusters = want
                table_at = take_run(want)
                continue
            break
        if geo.refcount_bits < 64:
            np.minimum(marks, geo.refcount_max, out=marks)
        # blocks, then the table, durable before the header points at them
        vals = np.zeros((max(blocks) + 1) * E, dtype=np.uint64)
        # (marks runs to the end of the file; past the last block it is all zeros, as
        # every nonzero mark has its block: a sparse tail makes it longer than vals)
        n = min(len(marks), len(vals))
        vals[:n] = marks[:n].astype(np.uint64)
        for b, c in sorted(blocks.items(), key=lambda kv: kv[1]):
            self.storage.pwrite(encode_refblock(vals[b * E : (b + 1) * E], geo.refcount_order),
                                c * cs, "refcount")
        table = np.zeros(table_clusters * cs // 8, dtype=np.uint64)
        for b, c in blocks.items():
            table[b] = c * cs
        self.storage.pwrite(encode_table(table), table_at * cs, "refcount")
        self.storage.sync()
        self.img._update_header(refcount_table_offset=table_at * cs,
                                refcount_table_clusters=table_clusters)
        self.changed = True

    def _rewrite_snapshot_table(self, snapshots: list[SnapshotEntry], old_size: int) -> None:
        """Write the snapshot table anew (complete entries, bounded extra data) into
        newly allocated clusters, point the header at it, free the old one. Only with
        refcounts that are now sound: allocating with wrong ones could hit data."""
        res = self.res
        if res.check_errors or (self.mismatch[1] < self.mismatch[2]).any() or self.rebuild:
            res.msg("ERROR snapshot table not rewritten: refcounts are not sound")
            return
        blob = pack_snapshot_table([_repaired(e, self.h.size) for e in snapshots])
        img = self.img
        h = img.header
        rc = img._make_refcounts()
        if rc.needs_live_map:
            rc.set_live(img._snapshots._live_counts())
        try:
            new = rc.allocate_deferred(div_round_up(len(blob), self.cs)) if blob else 0
            rc.commit()  # counted and durable before the header points at it
            if blob:
                self.storage.pwrite(blob, new, "snapshot_table")
                self.storage.sync()
            img._update_header(nb_snapshots=len(snapshots), snapshots_offset=new)
            if old_size:
                first = h.snapshots_offset >> self.cb
                last = (h.snapshots_offset + old_size - 1) >> self.cb
                rc.update(np.arange(first, last + 1, dtype=np.int64), -1)
        finally:
            rc.close()
        self.storage.sync()
        self.changed = True
        res.corruptions -= self.snap_fixes
        res.corruptions_fixed += self.snap_fixes

    # -- COPIED flags --------------------------------------------------------------------
    def _check_copied(self) -> None:
        """The COPIED flag of active L1/L2 entries must say whether the refcount is 1."""
        res, h, cb = self.res, self.img.header, self.cb
        if self.fix_errors:
            repair = True
        elif self.fix_leaks:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        if not h.l1_size:
            return
        l1 = _read_u64(self.storage, h.l1_table_offset, h.l1_size, self.file_size)
        l2off = (l1 & _U64(L1E_OFFSET_MASK)).astype(np.int64)
        idx = np.flatnonzero(l2off)
        if not len(idx):
            return
        rc, ok = self._stored_many(l2off[idx] >> cb)
        copied = (l1[idx] & _U64(QCOW_OFLAG_COPIED)) != 0
        excl = self.live_weight  # the stored count of a cluster the live state has alone
        bad = ok & ((rc == excl) != copied)
        if bad.any():
            n = int(bad.sum())
            for i, e, r in zip(idx[bad][:MAX_MESSAGES].tolist(), l1[idx][bad][:MAX_MESSAGES].tolist(),
                               rc[bad][:MAX_MESSAGES].tolist()):
                res.msg(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={r}")
            if repair:
                fix_at = idx[bad]
                l1[fix_at] = np.where(rc[bad] == excl, l1[fix_at] | _U64(QCOW_OFLAG_COPIED),
                                      l1[fix_at] & ~_U64(QCOW_OFLAG_COPIED))
                self.storage.pwrite(encode_table(l1), h.l1_table_offset, "l1")
                self.storage.sync()
                self.changed = True
                res.corruptions_fixed += n
            else:
                res.corruptions += n
        # the L2 tables, each once, weighted by how many active L1 entries use it
        ext = self.geo.extended_l2
        dirty = False
        D = len(self.stored)
        is1 = self.stored == excl
        quick_ok = D > 0 and not self.unreadable_blocks.any()
        for k, (offs, tables, w) in enumerate(self._active_batches(l2off[idx])):
            run = self._runs.get(k, -1) if self.active_tables is not None else -1
            if quick_ok and run >= 0 and run + tables.size <= D and \
                    np.array_equal(is1[run : run + tables.size],
                                   tables.reshape(-1) >= _U64(QCOW_OFLAG_COPIED)):
                continue  # one run of clusters (preallocated images): a slice, no gather
            ent = tables[:, 0::2] if ext else tables
            sc = self._scratch(ent.shape)
            normal = np.bitwise_and(ent, _U64(L2E_OFFSET_MASK), out=sc) != 0
            if self.irregular:
                normal &= (ent & _U64(QCOW_OFLAG_COMPRESSED)) == 0
            clus = np.right_shift(sc, _U64(cb), out=sc).view(np.int64)
            # whole-table pass first: most images have nothing to report
            if quick_ok and int(clus.max()) < D:
                quick = is1[clus]
                quick ^= ent >= _U64(QCOW_OFLAG_COPIED)
                quick &= normal
                if not quick.any():
                    continue
            rows, cols = np.nonzero(normal)
            rc, ok = self._stored_many(clus[rows, cols])
            e = ent[rows, cols]
            bad = ok & ((rc == excl) != ((e & _U64(QCOW_OFLAG_COPIED)) != 0))
            if not bad.any():
                continue
            weight = w[rows[bad]]
            res.msg_many(lambda ev, r: f"{word} OFLAG_COPIED data cluster: l2_entry={ev:x} "
                         f"refcount={r}", [e[bad], rc[bad]], None if repair else weight)
            if not repair:
                res.corruptions += int(weight.sum())
                continue
            fixed_val = np.where(rc[bad] == excl, e[bad] | _U64(QCOW_OFLAG_COPIED),
                                 e[bad] & ~_U64(QCOW_OFLAG_COPIED))
            ent[rows[bad], cols[bad]] = fixed_val
            for r in np.unique(rows[bad]).tolist():
                off = int(offs[r])
                n = int((rows[bad] == r).sum())
                if not self._may_write_table(off):
                    res.msg("ERROR: Could not write L2 table; metadata overlap check failed: "
                            "Input/output error")
                    res.check_errors += 1
                    raise _Abort("Input/output error")
                self.storage.pwrite(encode_table(tables[r]), off, "l2")
                dirty = True
                res.corruptions_fixed += n
        if dirty:
            self.storage.sync()
            self.changed = True

    def _active_batches(self, l2_offsets: np.ndarray) -> Any:
        """(offsets, tables, weights) of the active L2 tables: kept from the scan, or
        read again in batches when they were too many to keep."""
        if self.active_tables is not None:
            yield from self.active_tables
            return
        uniq, w = np.unique(l2_offsets, return_counts=True)
        for s, offs, tables in table_chunks(self.storage, uniq, self.cs, self.file_size, BATCH_BYTES):
            yield offs, tables, w[s : s + len(offs)]

    def _may_write_table(self, off: int) -> bool:
        """Whether a table may be written at off without touching the header, the L1
        table, the refcount table or a refcount block (or being misplaced)."""
        cs = self.cs
        if off % cs or off < cs or off + cs > self.file_size:
            return False
        h = self.img.header
        if h.l1_table_offset <= off < h.l1_table_offset + max(h.l1_size * 8, 1):
            return False
        rt = h.refcount_table_offset
        if rt <= off < rt + h.refcount_table_clusters * cs:
            return False
        return off >> self.cb not in self._block_set


def _cx(v: int) -> str:
    """C's %#x: 0x-prefixed hex, but plain 0 for zero (QEMU's messages use it)."""
    return f"{v:#x}" if v else "0"


def _reft_offsets(entries: np.ndarray) -> np.ndarray:
    """Refcount table entries -> block offsets as int64. Offsets past 2^62 (possible
    only in a damaged table) are clamped there, keeping their low bits so that
    misalignment is still seen; they are past any file either way."""
    v = entries & _U64(REFT_OFFSET_MASK)
    limit = _U64(1 << 62)
    return np.where(v >= limit, limit | (v & _U64((1 << 21) - 1)), v).astype(np.int64)


def _last_nonzero(a: np.ndarray) -> int:
    """Index of the last nonzero element (0 if none), looking at the tail first."""
    n = len(a)
    step = 1 << 16
    while True:
        lo = max(0, n - step)
        nz = np.flatnonzero(a[lo:n])
        if len(nz):
            return lo + int(nz[-1])
        if lo == 0:
            return 0
        n = lo
        step *= 4


def _ramp(span: np.ndarray) -> np.ndarray:
    """0..span[i]-1 for each i, concatenated."""
    total = int(span.sum())
    starts = np.repeat(np.cumsum(span) - span, span)
    return np.arange(total, dtype=np.int64) - starts


# ---------------------------------------------------------------------------- API --
def _quiesce(img: CheckHost) -> None:
    """Bring the on-disk state up to date before looking at it (writable images keep
    unwritten tables and a pool of reserved clusters in memory)."""
    if img.writable and img.refcounts is not None:
        img.flush()
        img.refcounts.close()
        img.clusters.flush_l2()
        img.storage.sync()


def _one_pass(img: CheckHost, fix: str | None) -> tuple[CheckResult, bool]:
    res = CheckResult(filename=img.path)
    checker = img.checker_class(img, fix, res)
    try:
        checker.run()
    except Qcow2Error as exc:  # I/O errors while checking
        res.check_errors += 1
        res.failure = str(exc)
    except MemoryError:  # counts for a file this large do not fit: fail as QEMU's ENOMEM
        res.check_errors += 1
        res.failure = "Cannot allocate memory"
    return res, checker.changed


def check_image(img: CheckHost, repair: str | None = None, from_dirty_open: bool = False) -> CheckResult:
    """Check img; with repair ("leaks" or "all") fix what can be fixed, then check again
    and report the second check with the repair counts (as qemu-img does).

    from_dirty_open: called while opening a dirty image read-write (QEMU repairs such
    images automatically); raises CorruptImageError if the image cannot be made clean.
    """
    if repair not in REPAIR_MODES:
        raise InvalidArgumentError(f"Invalid repair mode {repair!r}: use 'leaks' or 'all'")
    if repair and not img.writable:
        raise ReadOnlyError("Repairing needs the image opened read-write")
    if img.closed:
        raise Qcow2Error("I/O operation on a closed image")
    _quiesce(img)
    first, changed = _one_pass(img, repair)
    result = first
    if changed:
        img._reload_metadata()  # forget what the repair changed on disk
    if repair and (first.corruptions_fixed or first.leaks_fixed):
        second, _ = _one_pass(img, None)
        second.corruptions_fixed = first.corruptions_fixed
        second.leaks_fixed = first.leaks_fixed
        second.messages = first.messages + second.messages
        second.repaired = True
        result = second
    if from_dirty_open:
        if result.failure is not None or result.check_errors or result.corruptions:
            reason = result.failure or (
                f"{result.corruptions} corruptions and {result.check_errors} errors remain")
            raise CorruptImageError(f"Could not repair dirty image: {reason}")
        if img.header.incompatible_features & INCOMPAT_DIRTY:
            img.storage.sync()
            img._update_header(incompatible_features=img.header.incompatible_features & ~INCOMPAT_DIRTY)
    return result


