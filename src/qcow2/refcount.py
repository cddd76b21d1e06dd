"""Refcounts and cluster allocation.

`RefcountStrategy` is the interface the rest of the engine uses; `StandardRefcounts`
implements standard qcow2 refcounting with crash-safe batching:

* Clusters are handed out from a reserved pool. Reserving sets the refcounts of a
  whole batch to 1 and makes that durable with one sync, so any later metadata that
  points at a pooled cluster may reach the disk in any order.
* Reference drops are queued (`release`) and applied only after the metadata that
  dropped the reference is durable (`apply_releases`, called by the image's flush).
* Unused pooled clusters are returned on close, so a clean close leaks nothing; a
  crash leaks at most the pool and the queued releases.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from .cache import TableCache
from .errors import CorruptImageError, NoSpaceError, RefcountOverflowError
from .format import (
    MAX_REFTABLE_SIZE_BYTES,
    REFT_OFFSET_MASK,
    decode_refblock,
    decode_table,
    encode_refblock,
    encode_table,
)
from .geometry import Geometry, div_round_up
from .storage import Storage

MAX_HOST_OFFSET = 1 << 56
POOL_MIN = 64
POOL_MAX = 4096
# Each reservation is POOL_GROWTH times the previous one (up to POOL_MAX clusters): the
# first 4,672 allocations after open cost at most 3 reservations (3 syncs), and every
# POOL_MAX after that one more; a crash leaks at most one pool (unused reservations are
# returned on close).
POOL_GROWTH = 8


class RefcountStrategy(abc.ABC):
    """How an image counts references and finds free clusters: the refcount policy the
    write path, the snapshot operations and check ask (never a mode name).

    `live_weight` is what one reference from the live state (the active L1 table, its
    L2 tables and data) adds to a stored refcount: 1 in standard qcow2, 0 in lazy-count
    mode. A cluster only the live state references therefore has the stored count
    `live_weight`, and the COPIED flag (written in place) means exactly that.
    """

    mode: ClassVar[str] = "standard"
    live_weight: ClassVar[int] = 1
    # whether the allocator needs the live state's references as a map (see set_live)
    needs_live_map: ClassVar[bool] = False
    # the narrowest refcount entries the mode can store its values in
    min_refcount_bits: ClassVar[int] = 1

    @abc.abstractmethod
    def allocate(self, n: int = 1) -> int:
        """Return the host offset of n contiguous clusters, each now counted once.
        Their refcount is durable before any reachable metadata is written
        (see ensure_durable)."""

    @abc.abstractmethod
    def add_reference(self, cluster: int) -> None:
        """One more reference to an allocated host cluster (compressed data packed into
        it); durable before any reachable metadata is written, as allocate's are."""

    @abc.abstractmethod
    def release(self, host_offset: int, n: int = 1) -> None:
        """A reference to n clusters was dropped in (not yet durable) metadata."""

    def release_compressed(self, host_offset: int, n: int = 1) -> None:
        """release() for the host clusters of a compressed cluster (which other
        compressed clusters may share)."""
        self.release(host_offset, n)

    def note_compressed(self, host_offset: int, n: int) -> None:  # noqa: B027 - a hook
        """n fresh clusters now hold one compressed cluster."""

    @abc.abstractmethod
    def apply_releases(self) -> None:
        """The metadata that dropped references is durable: apply queued releases."""

    @abc.abstractmethod
    def ensure_durable(self) -> None:
        """Make every refcount increase handed out so far durable. Called before any
        reachable metadata (L2 or L1 table) is written."""

    @abc.abstractmethod
    def get(self, cluster: int) -> int:
        """Refcount of one host cluster."""

    @abc.abstractmethod
    def get_many(self, clusters: np.ndarray) -> np.ndarray:
        """Refcounts of many host clusters (vectorized)."""

    @abc.abstractmethod
    def update(self, clusters: np.ndarray, delta: int) -> None:
        """Add delta to the refcount of each cluster in the array (repeats add up).
        All-or-nothing: raises RefcountOverflowError before changing anything."""

    def update_dense(self, counts: np.ndarray, sign: int, start: int = 0) -> None:
        """Add sign * counts[i] to the refcount of cluster start + i, all-or-nothing.
        The dense form of update() for whole-image passes (snapshots)."""
        counts = np.asarray(counts, dtype=np.int64)
        nz = np.flatnonzero(counts)
        self.update(np.repeat(nz + start, counts[nz]), sign)

    def allocate_deferred(self, n: int = 1) -> int:
        """Like allocate(n) (n contiguous clusters), but the refcount increase may stay
        in memory: the caller must commit() before any durable metadata points at the
        clusters. Saves a sync in operations that commit anyway (snapshots)."""
        return self.allocate(n)

    @contextmanager
    def bulk(self, clusters: int) -> Iterator[None]:
        """Context for a whole-image pass touching up to `clusters` host clusters: an
        implementation may keep all their metadata cached meanwhile."""
        yield

    def begin_atomic(self) -> None:  # noqa: B027 - optional hook, default: not atomic
        """Start a refcount transaction: until commit_atomic(), the refcounts on disk
        stay as they are (changes are kept in memory or written to unused clusters) and
        clusters freed meanwhile are not handed out again, so the image on disk stays
        exactly the old one whatever is written to clusters allocated meanwhile."""

    def commit_atomic(self, switch: Callable[[dict[str, int]], None]) -> None:
        """End the transaction: make every change durable and current in one step.
        switch(header_changes) must write the header (adding the caller's own changes)
        in one sector and sync; it is the commit point. This default is not atomic."""
        self.commit()
        switch({})

    def abort_atomic(self) -> None:  # noqa: B027 - optional hook
        """Forget the transaction's changes (the refcounts on disk are still current)."""

    # -- policy (standard qcow2 here; other modes override) ---------------------------
    def may_pack(self, cluster: int) -> bool:
        """Whether one more compressed cluster may be packed into this host cluster
        (one more reference must not overflow its refcount)."""
        return self.get(cluster) < self.geo.refcount_max  # type: ignore[attr-defined]

    def may_share(self, img: Any, entry: Any, clusters: np.ndarray) -> bool:
        """Whether the live state may take one more reference to each of these host
        clusters (repeats add up), which the snapshot `entry` references: the data the
        live state then shares with it (Image.share_from_snapshot). Here: the counts
        stay within refcount_bits. A cluster the snapshot references but no count
        holds is a corruption."""
        clusters = np.asarray(clusters, dtype=np.int64)
        if not len(clusters):
            return True
        uniq, mult = _count_unique(clusters)
        counts = self.get_many(uniq).astype(np.int64)
        if (counts == 0).any():
            raise CorruptImageError(
                f"Snapshot '{entry.name}' references a cluster with refcount 0: run 'qcow2 check -r all'")
        return bool((counts + mult <= self.geo.refcount_max).all())  # type: ignore[attr-defined]

    def share(self, clusters: np.ndarray) -> None:
        """The live state took one more reference to each of these host clusters (after
        may_share said yes); durable before any reachable metadata is written, as
        allocate's are."""
        self.update(np.asarray(clusters, dtype=np.int64), 1)

    def tx_allocate(self, n: int, live: bool) -> int:
        """n contiguous clusters inside a transaction, for the live state (its L1 or L2
        tables) or for other metadata (snapshot tables, VM state)."""
        return self.allocate_deferred(n)

    def tx_drop(self, clusters: np.ndarray, live: bool) -> None:
        """Inside a transaction: the live state (or other metadata) lets go of these."""
        self.update(clusters, -1)

    def update_live(self, clusters: np.ndarray, sign: int) -> None:
        """References of the live tree gained (+1) or lost (-1) in a transaction."""
        self.update(clusters, sign)

    def snapshot_takes_over(self, clusters: np.ndarray) -> None:  # noqa: B027 - a hook
        """Inside a transaction: tables only the live state used now belong to a new
        snapshot instead (the live state gets copies)."""

    def set_live(self, counts: np.ndarray) -> None:  # noqa: B027 - optional hook
        """The live state's references per host cluster (for modes that need them)."""

    def in_use_many(self, clusters: np.ndarray) -> np.ndarray:
        """Whether each host cluster is in use (referenced by anything)."""
        return self.get_many(clusters) != 0

    # -- how the mode organizes snapshots (owner mode has its own tree operations) -------
    @staticmethod
    def visible(entry: Any) -> bool:
        """Whether a snapshot table entry is a snapshot users see (owner mode keeps
        deleted nodes that still have several children)."""
        return True

    def attach(self, img: Any) -> None:
        """The image opened for writing with these refcounts: load what the mode keeps
        in memory about the live tree."""
        if self.needs_live_map:
            with self.bulk(-(-img.storage.size() // self.geo.cluster_size)):  # type: ignore[attr-defined]
                self.set_live(img._snapshots._live_counts())

    def snapshot_create(self, img: Any, *args: Any) -> Any:
        return img._create(*args)

    def snapshot_apply(self, img: Any, entry: Any, disk: int, vm_index: int,
                       sn_l1: np.ndarray) -> None:
        img._apply(disk, vm_index, sn_l1)

    def snapshot_delete(self, img: Any, entries: list[Any], i: int) -> None:
        img._delete(entries, i, img._snapshot_l1(entries[i]))

    # conversion in and out of the mode, when counting refcounts cannot express it
    # (modes.set_refcount_mode): class methods taking the image, or None
    enter: ClassVar[Callable[[Any], None] | None] = None
    leave: ClassVar[Callable[[Any], None] | None] = None

    @staticmethod
    def parents(img: Any) -> dict[str, str] | None:
        """Snapshot id -> parent snapshot id, for modes that keep a snapshot tree."""
        return None

    @abc.abstractmethod
    def commit(self) -> None:
        """Write every in-memory refcount change and make it durable."""

    @abc.abstractmethod
    def write_back(self) -> None:
        """Write dirty refcount metadata without a sync."""

    @abc.abstractmethod
    def close(self) -> None:
        """Return unused reservations and write everything back."""


class StandardRefcounts(RefcountStrategy):
    """Standard qcow2 refcounts: every reference counts, the live state's included."""

    def __init__(
        self,
        storage: Storage,
        geometry: Geometry,
        reftable_offset: int,
        reftable_clusters: int,
        on_reftable_moved: Callable[[int, int], None],
        cache_tables: int = 64,
    ) -> None:
        self.storage = storage
        self.geo = geometry
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        self._on_moved = on_reftable_moved
        nbytes = reftable_clusters * geometry.cluster_size
        self.reftable = decode_table(storage.pread(nbytes, reftable_offset))
        # Clusters holding refcount blocks (for the overlap guard) and the guard itself:
        # write_guard(offset, length, what) raises instead of writing onto other metadata.
        blk = self.reftable & np.uint64(REFT_OFFSET_MASK)
        self.refblock_clusters: set[int] = set((blk[blk != 0] >> np.uint64(geometry.cluster_bits)).tolist())
        self.write_guard: Callable[[int, int, str], None] | None = None
        # alloc_guard(offset, length, what) raises before a new refcount block is placed
        # on a cluster that is metadata (a range no block described: overlap.py)
        self.alloc_guard: Callable[[int, int, str], None] | None = None
        self._reftable_dirty = False
        self._blocks = TableCache(cache_tables, self._load_block, self._write_block)
        self._free_hint = 0  # no free cluster below this index
        self._pool: list[int] = []  # reserved cluster indexes, ascending runs
        self._pool_batch = POOL_MIN
        self._durable_after: int | None = None  # stats.syncs when a reservation was written
        self._increments_pending = False  # add_reference updates not yet written
        self._releases: list[int] = []  # queued cluster indexes
        self._pending_frees: list[int] = []  # clusters to free after the reftable moved
        # Transaction state (begin_atomic .. commit_atomic): changed refcount blocks are
        # parked in memory instead of being written in place, and clusters freed during
        # the transaction are marked so that no allocation reuses them before the switch.
        self._atomic = False
        self._parked: dict[int, np.ndarray] = {}
        self._tx_freed: dict[int, np.ndarray] = {}  # block index -> freed-cluster mask
        self._tx_old: set[int] = set()  # refcount block offsets the old table points at
        self._tx_state: tuple[int, int, int, list[int]] = (0, 0, 0, [])
        self._tx_min_freed = 1 << 62

    # -- refcount blocks -------------------------------------------------------------
    def _load_block(self, offset: int) -> np.ndarray:
        if offset % self.geo.cluster_size or offset >= MAX_HOST_OFFSET:
            raise CorruptImageError(f"Refcount block offset {offset:#x} is invalid")
        data = self.storage.pread(self.geo.cluster_size, offset)
        return decode_refblock(data, self.geo.refcount_order)

    def _write_block(self, offset: int, values: np.ndarray) -> None:
        if self._atomic:  # an evicted block: keep it until commit_atomic() moves it
            self._parked[offset] = values
            return
        if self.write_guard is not None:
            self.write_guard(offset, self.geo.cluster_size, "a refcount block")
        self.storage.pwrite(encode_refblock(values, self.geo.refcount_order), offset, "refcount")

    def _block(self, index: int) -> np.ndarray | None:
        if index >= len(self.reftable):
            return None
        off = int(self.reftable[index]) & REFT_OFFSET_MASK
        if not off:
            return None
        if self._parked:
            parked = self._parked.pop(off, None)
            if parked is not None:
                self._blocks.put(off, parked, dirty=True)
                return parked
        return self._blocks.get(off)

    def _block_offset(self, index: int) -> int:
        return int(self.reftable[index]) & REFT_OFFSET_MASK if index < len(self.reftable) else 0

    # -- queries ---------------------------------------------------------------------
    def get(self, cluster: int) -> int:
        block = self._block(cluster >> self.geo.refblock_bits)
        return 0 if block is None else int(block[cluster & (self.geo.refblock_entries - 1)])

    def get_many(self, clusters: np.ndarray) -> np.ndarray:
        clusters = np.asarray(clusters, dtype=np.int64)
        out = np.zeros(len(clusters), dtype=np.uint64)
        if not len(clusters):
            return out
        bits = self.geo.refblock_bits
        mask = (1 << bits) - 1
        lo, hi = int(clusters.min()), int(clusters.max())
        if lo >= 0 and hi - lo <= 4 * len(clusters) + 65536:
            # dense (whole-image passes): one gather from the concatenated blocks
            return self.get_range(lo, hi - lo + 1)[clusters - lo]
        bidx = clusters >> bits
        # Group by refcount block without a per-block scan of the whole input (that was
        # O(blocks x clusters)): a stable sort of the block index, then one slice per block.
        order = np.argsort(bidx, kind="stable")
        sb = bidx[order]
        starts = np.flatnonzero(np.r_[True, sb[1:] != sb[:-1]])
        ends = np.r_[starts[1:], len(sb)]
        for s, e in zip(starts.tolist(), ends.tolist()):
            block = self._block(int(sb[s]))
            if block is None:
                continue
            sel = order[s:e]
            out[sel] = block[clusters[sel] & mask]
        return out

    def get_range(self, start: int, n: int) -> np.ndarray:
        """Refcounts of clusters start .. start + n - 1 (uint64 array)."""
        out = np.zeros(n, dtype=np.uint64)
        bits = self.geo.refblock_bits
        pos = start
        while pos < start + n:
            b = pos >> bits
            stop = min((b + 1) << bits, start + n)
            block = self._block(b)
            if block is not None:
                base = b << bits
                out[pos - start : stop - start] = block[pos - base : stop - base]
            pos = stop
        return out

    # -- updates ---------------------------------------------------------------------
    def update(self, clusters: np.ndarray, delta: int) -> None:
        clusters = np.asarray(clusters, dtype=np.int64)
        if not len(clusters) or delta == 0:
            return
        lo, hi = int(clusters.min()), int(clusters.max())
        if lo >= 0 and hi - lo <= 4 * len(clusters) + 65536 and len(clusters) > 4096:
            # dense: per-block slices instead of sorting (whole-image passes)
            counts = np.bincount(clusters - lo) if lo else np.bincount(clusters)
            self.update_dense(counts * abs(delta), 1 if delta > 0 else -1, lo)
            return
        uniq, counts = _count_unique(clusters)
        deltas = counts.astype(np.int64) * delta
        bits = self.geo.refblock_bits
        mask = (1 << bits) - 1
        bidx = uniq >> bits  # sorted, as uniq is
        starts = np.flatnonzero(np.r_[True, bidx[1:] != bidx[:-1]])
        ends = np.r_[starts[1:], len(uniq)]
        blocks = bidx[starts].tolist()
        # Make sure every block exists (a new refblock is itself allocated) before checking.
        for b in blocks:
            if self._block(b) is None:
                if delta < 0:
                    raise CorruptImageError("Refcount decrement of a cluster with refcount 0")
                self._create_block(b)
        # Check everything before changing anything (all-or-nothing). Only the new values
        # are kept: a block array may be evicted from the cache between the two passes.
        plan: list[tuple[int, np.ndarray, np.ndarray]] = []
        limit = self.geo.refcount_max
        for b, s, e in zip(blocks, starts.tolist(), ends.tolist()):
            block = self._block(b)
            assert block is not None
            idx = uniq[s:e] & mask
            new = block[idx].astype(np.int64) + deltas[s:e]
            if (new < 0).any():
                raise CorruptImageError("Refcount would drop below zero")
            if (new > limit).any():
                raise RefcountOverflowError(
                    f"Refcount overflow: a cluster would exceed {limit} references "
                    f"(refcount_bits={self.geo.refcount_bits})"
                )
            plan.append((b, idx, new.astype(np.uint64)))
        for b, idx, new in plan:
            # fetch again and mark dirty at once, so that the change cannot be lost to an
            # eviction of a clean table
            block = self._block(b)
            assert block is not None
            block[idx] = new
            self._blocks.mark_dirty(self._block_offset(b))
        if delta < 0:
            freed = uniq[np.concatenate([p[2] for p in plan]) == 0] if plan else uniq[:0]
            if len(freed):
                if self._atomic:  # not reusable before the switch: no need to look there
                    self._tx_min_freed = min(self._tx_min_freed, int(freed.min()))
                else:
                    self._free_hint = min(self._free_hint, int(freed.min()))
                if self._atomic:
                    for c in freed.tolist():
                        self._tx_mask(c >> bits)[c & mask] = True

    def update_dense(self, counts: np.ndarray, sign: int, start: int = 0) -> None:
        counts = np.asarray(counts)
        n = len(counts)
        if not n or sign == 0:
            return
        if counts.dtype.kind not in "iu":
            counts = counts.astype(np.int64)
        if counts.dtype.kind == "i" and int(counts.min()) < 0:
            raise ValueError("update_dense needs non-negative counts")
        bits = self.geo.refblock_bits
        # blocks with any change, as (block, first cluster, end cluster)
        touched: list[tuple[int, int, int]] = []
        for b in range(start >> bits, ((start + n - 1) >> bits) + 1):
            lo, hi = max(b << bits, start), min((b + 1) << bits, start + n)
            if counts[lo - start : hi - start].any():
                touched.append((b, lo, hi))
        for b, _lo, _hi in touched:
            if self._block(b) is None:
                if sign < 0:
                    raise CorruptImageError("Refcount decrement of a cluster with refcount 0")
                self._create_block(b)
        # check everything first (all-or-nothing); keep only the new values, as block
        # arrays may be evicted from the cache between the passes
        limit = np.uint64(self.geo.refcount_max)
        plan: list[tuple[int, int, np.ndarray]] = []
        for b, lo, hi in touched:
            block = self._block(b)
            assert block is not None
            base = b << bits
            cur = block[lo - base : hi - base]
            seg = counts[lo - start : hi - start]
            if seg.dtype != np.uint64:
                seg = seg.astype(np.uint64)
            if sign > 0:
                if (seg > limit - cur).any():
                    raise RefcountOverflowError(
                        f"Refcount overflow: a cluster would exceed {int(limit)} references "
                        f"(refcount_bits={self.geo.refcount_bits})"
                    )
                plan.append((b, lo - base, cur + seg))
            else:
                if (seg > cur).any():
                    raise CorruptImageError("Refcount would drop below zero")
                new = cur - seg
                plan.append((b, lo - base, new))
                freed = np.flatnonzero((new == 0) & (seg != 0))
                if len(freed):
                    if self._atomic:
                        self._tx_min_freed = min(self._tx_min_freed, lo + int(freed[0]))
                    else:
                        self._free_hint = min(self._free_hint, lo + int(freed[0]))
                    if self._atomic:
                        self._tx_mask(b)[lo - base + freed] = True
        for b, first, new in plan:
            block = self._block(b)
            assert block is not None
            block[first : first + len(new)] = new
            self._blocks.mark_dirty(self._block_offset(b))

    def _set_one(self, cluster: int, value: int) -> None:
        b = cluster >> self.geo.refblock_bits
        block = self._block(b)
        if block is None:
            block = self._create_block(b)
        block[cluster & (self.geo.refblock_entries - 1)] = value
        self._blocks.mark_dirty(self._block_offset(b))

    def _create_block(self, b: int) -> np.ndarray:
        """A refcount block for index b, placed on the first cluster it describes
        (that whole range is free, since no block described it)."""
        first = b << self.geo.refblock_bits
        if first * self.geo.cluster_size >= MAX_HOST_OFFSET:
            raise NoSpaceError("Image file would exceed the maximum host offset")
        if b >= len(self.reftable):
            self._grow_reftable(b + 1)
            # the new table may have taken clusters; block b may exist now
            existing = self._block(b)
            if existing is not None:
                return existing
        slot = self._block_slot(b)
        values = np.zeros(self.geo.refblock_entries, dtype=np.uint64)
        values[slot] = 1
        off = (first + slot) * self.geo.cluster_size
        if self.alloc_guard is not None:
            self.alloc_guard(off, self.geo.cluster_size, "a refcount block")
        self._blocks.put(off, values, dirty=True)
        self.reftable[b] = off
        self.refblock_clusters.add(off >> self.geo.cluster_bits)
        self._reftable_dirty = True
        return values

    def _block_slot(self, b: int) -> int:
        """Where in its own range a new refcount block for index b goes: the first
        cluster (free, since no block described the range and all use is counted)."""
        return 0

    def _grow_reftable(self, min_entries: int) -> None:
        """Move the refcount table to a larger home; written out by commit()."""
        geo = self.geo
        per_cluster = geo.cluster_size // 8
        want = max(min_entries, len(self.reftable) * 3 // 2, per_cluster)
        clusters = div_round_up(want, per_cluster)
        # A table too long to fit between self-describing refblocks goes to the tail
        # (_tail_run), whose new refblocks need entries in this same table.
        if clusters >= geo.refblock_entries:
            tail = self._top_block() + div_round_up(clusters, geo.refblock_entries - 1) + 1
            want = max(want, tail + div_round_up(tail, per_cluster * (geo.refblock_entries - 1)))
            clusters = div_round_up(want, per_cluster)
        if clusters * geo.cluster_size > MAX_REFTABLE_SIZE_BYTES:
            raise NoSpaceError("Refcount table would exceed its maximum size")
        new_table = np.zeros(clusters * per_cluster, dtype=np.uint64)
        new_table[: len(self.reftable)] = self.reftable
        old_offset, old_clusters = self.reftable_offset, self.reftable_clusters
        self.reftable = new_table
        start = self._find_free_run(clusters)
        self.reftable_offset = start * geo.cluster_size
        self.reftable_clusters = clusters
        for c in range(start, start + clusters):
            self._set_one(c, 1)
        self._reftable_dirty = True
        self._moved = True
        self._pending_frees.extend(range(old_offset // geo.cluster_size,
                                         old_offset // geo.cluster_size + old_clusters))

    _moved = False

    def _find_free_run(self, n: int) -> int:
        """Index of the first run of n free clusters at or after the free hint.
        Clusters not described by any refcount block count as free; the refcount
        block for such a range is created on its first cluster, so runs skip it."""
        geo = self.geo
        bits = geo.refblock_bits
        entries = geo.refblock_entries
        c = self._free_hint
        first_free = -1
        run_start, run_len = c, 0
        while True:
            b = c >> bits
            if (c << geo.cluster_bits) >= MAX_HOST_OFFSET:
                raise NoSpaceError("No free cluster below the maximum host offset")
            block = self._block(b)
            base = b << bits
            if block is None and n >= entries and b >= self._top_block() \
                    and self._nothing_used_from(base):
                # Nothing is described from here on, and a run this long cannot fit
                # between self-describing refblocks: place it after its own refblocks.
                return self._tail_run(b, n)
            used = self._used(b, block)
            i = c - base
            while i < entries:
                if used[i]:
                    run_len = 0
                    nxt = np.flatnonzero(~used[i:])
                    if not len(nxt):
                        i = entries
                        break
                    i += int(nxt[0])
                    run_start = base + i
                    continue
                if run_len == 0:
                    run_start = base + i
                if first_free < 0:
                    first_free = base + i
                    self._free_hint = first_free
                stop = np.flatnonzero(used[i:])
                span = int(stop[0]) if len(stop) else entries - i
                if run_len + span >= n:
                    return run_start
                run_len += span
                i += span
            c = base + entries

    def _used(self, b: int, block: np.ndarray | None) -> np.ndarray:
        """Which clusters of refcount block b's range are taken (not allocatable)."""
        if block is None:
            # block's first cluster will hold the block itself
            used = np.zeros(self.geo.refblock_entries, dtype=bool)
            used[0] = True
            return used
        used = block != 0
        if self._tx_freed and b in self._tx_freed:
            used |= self._tx_freed[b]  # still in use in the image on disk
        return used

    def _nothing_used_from(self, cluster: int) -> bool:
        """Whether no cluster at or after this one is in use where no refcount block
        describes it (here: none is; a mode whose live clusters need no count says)."""
        return True

    def _top_block(self) -> int:
        """1 + the index of the last refcount block in the table (none is described above)."""
        nz = np.flatnonzero(self.reftable & np.uint64(REFT_OFFSET_MASK))
        return int(nz[-1]) + 1 if len(nz) else 0

    def _tail_run(self, b: int, n: int) -> int:
        """A run of n free clusters from refblock index b on, where nothing is described:
        k new refblocks first (at clusters S .. S+k-1, each described by an earlier one
        or itself), then the run. Returns the run's first cluster."""
        geo = self.geo
        bits = geo.refblock_bits
        k = div_round_up(n, geo.refblock_entries - 1)  # k * entries >= k + n
        if b + k > len(self.reftable):
            self._grow_reftable(b + k)
            return self._find_free_run(n)  # the table may have moved into the tail
        start = b << bits
        for j in range(k):
            cluster = start + j
            off = cluster << geo.cluster_bits
            if self.alloc_guard is not None:
                self.alloc_guard(off, geo.cluster_size, "a refcount block")
            self._blocks.put(off, np.zeros(geo.refblock_entries, dtype=np.uint64), dirty=True)
            self.reftable[b + j] = off
            self.refblock_clusters.add(cluster)
            self._reftable_dirty = True
            owner = cluster >> bits  # b + (j >> bits): itself or created before it
            block = self._block(owner)
            assert block is not None
            block[cluster & (geo.refblock_entries - 1)] = 1
            self._blocks.mark_dirty(self._block_offset(owner))
        return start + k

    # -- allocation ------------------------------------------------------------------
    def allocate(self, n: int = 1) -> int:
        pool = self._pool
        if len(pool) >= n and pool[n - 1] - pool[0] == n - 1:
            start = pool[0]
            del pool[:n]
            return start << self.geo.cluster_bits
        if n > 1:
            # not contiguous in the pool: reserve exactly this run
            start = self._reserve(n, extra=0)
            return start << self.geo.cluster_bits
        batch = self._free_span(self._pool_batch)
        self._reserve(batch, extra=batch)
        self._pool_batch = min(self._pool_batch * POOL_GROWTH, POOL_MAX)
        return self.allocate(1)

    def _free_span(self, n: int) -> int:
        """How many clusters a pool refill of n takes: the first free span of at least
        POOL_MIN clusters (from the free hint), when it is shorter than n, else n. A
        shorter span is used rather than skipped: with small clusters a batch can be
        longer than a whole block's range, and every range would be left behind partly
        unused (a 4 KiB-cluster image grew by holes to 3x its data). In a range no
        block describes the span ends with the range: the refill then needs one new
        block, on the range's first cluster. A longer refill would make the blocks of
        every range it covers at once (_tail_run), and those of the part close hands
        back stay in the file (16 blocks a pool with 512 B clusters). Spans under
        POOL_MIN stay for exact-size allocations: a refill that small would cost a
        reservation per few clusters."""
        if n <= POOL_MIN:
            return n
        c = self._find_free_run(POOL_MIN)
        b = c >> self.geo.refblock_bits
        used = self._used(b, self._block(b))[c - (b << self.geo.refblock_bits):]
        stop = np.flatnonzero(used)
        span = int(stop[0]) if len(stop) else len(used)
        return span if POOL_MIN <= span < n else n

    def allocate_deferred(self, n: int = 1) -> int:
        start = self._find_free_run(n)
        for b in range(start >> self.geo.refblock_bits, ((start + n - 1) >> self.geo.refblock_bits) + 1):
            if self._block(b) is None:
                self._create_block(b)
        start = self._find_free_run(n)  # new blocks may sit inside the first run found
        self.update(np.arange(start, start + n, dtype=np.int64), 1)
        return start << self.geo.cluster_bits

    @contextmanager
    def bulk(self, clusters: int) -> Iterator[None]:
        # Whole-image passes visit every refcount block two or three times (check, apply,
        # free-space search): keep them all cached instead of re-reading them each time.
        cache = self._blocks
        old = cache.capacity
        # at most ~256 MiB of cached blocks (a block is held as uint64 values)
        cap = max(16, (256 << 20) // (self.geo.refblock_entries * 8))
        cache.capacity = max(old, min(cap, (clusters >> self.geo.refblock_bits) + 8))
        try:
            yield
        finally:
            cache.capacity = old  # the next insertion trims (and writes back) the excess

    def _reserve(self, n: int, extra: int) -> int:
        """Set refcount 1 on a free run of n clusters and commit. With extra, the run
        goes to the pool instead of being returned."""
        start = self._find_free_run(n)
        created = False
        for b in range(start >> self.geo.refblock_bits, ((start + n - 1) >> self.geo.refblock_bits) + 1):
            if self._block(b) is None:
                self._create_block(b)
                created = True
        if created and extra:
            # A grown refcount table may have gone into the span this refill was sized
            # for: size it again, or the refill would skip the rest of the span and
            # close would leave that part as a hole.
            n = self._free_span(n)
        # creating blocks may have used clusters inside the run: search again
        start = self._find_free_run(n)
        self.update(np.arange(start, start + n, dtype=np.int64), 1)
        # The sync that makes this reservation durable is deferred to the first write
        # of reachable metadata (ensure_durable): nothing can point at these clusters
        # on disk before then, and a sync here would also force out the guest data
        # written so far.
        self.commit(final_sync=False)
        self._durable_after = self.storage.stats.syncs
        if extra:
            self._pool.extend(range(start, start + n))
            self._pool.sort()
        return start

    def add_reference(self, cluster: int) -> None:
        # one cluster, once per packed compressed cluster (convert -c): a scalar
        # increment instead of the general numpy path, where update is this class's
        bits = self.geo.refblock_bits
        block = self._block(cluster >> bits) if cluster >= 0 else None
        if block is None or type(self).update is not StandardRefcounts.update:
            self.update(np.array([cluster], dtype=np.int64), 1)
        else:
            i = cluster & (self.geo.refblock_entries - 1)
            new = int(block[i]) + 1
            limit = self.geo.refcount_max
            if new > limit:
                raise RefcountOverflowError(
                    f"Refcount overflow: a cluster would exceed {limit} references "
                    f"(refcount_bits={self.geo.refcount_bits})")
            block[i] = new
            self._blocks.mark_dirty(self._block_offset(cluster >> bits))
        # written and synced by ensure_durable, before reachable metadata
        self._increments_pending = True

    def share(self, clusters: np.ndarray) -> None:
        self.update(np.asarray(clusters, dtype=np.int64), 1)
        # written and synced by ensure_durable, before the L2 entries that point there
        self._increments_pending = True

    def release(self, host_offset: int, n: int = 1) -> None:
        c = host_offset >> self.geo.cluster_bits
        self._releases.extend(range(c, c + n))

    def apply_releases(self) -> None:
        if self._releases:
            rel = np.array(self._releases, dtype=np.int64)
            self._releases = []
            self.update(rel, -1)

    # -- durability ------------------------------------------------------------------
    def write_back(self) -> None:
        self._flush_blocks()
        if self._reftable_dirty and not self._moved and not self._atomic:
            # In place: the blocks it points to must be durable first.
            self.storage.sync()
            self.storage.pwrite(encode_table(self.reftable), self.reftable_offset, "refcount")
            self._reftable_dirty = False

    def _flush_blocks(self) -> None:
        """Write the dirty refcount blocks; add_reference increments among them are
        durable after the next sync."""
        self._blocks.flush()
        if self._increments_pending:
            self._increments_pending = False
            self._durable_after = self.storage.stats.syncs

    def ensure_durable(self) -> None:
        if self._increments_pending:
            self._flush_blocks()
        mark = self._durable_after
        if mark is not None:
            if self.storage.stats.syncs <= mark:  # no sync since the reservation
                self.storage.sync()
            self._durable_after = None

    def commit(self, final_sync: bool = True) -> None:
        if self._atomic:
            raise RuntimeError("commit() inside a refcount transaction: use commit_atomic()")
        moved = self._moved
        self._flush_blocks()
        if moved:
            self.storage.pwrite(encode_table(self.reftable), self.reftable_offset, "refcount")
            self.storage.sync()
            self._on_moved(self.reftable_offset, self.reftable_clusters)
            self._moved = False
            self._reftable_dirty = False
            frees = self._pending_frees
            self._pending_frees = []
            self.storage.sync()
            self.update(np.array(frees, dtype=np.int64), -1)
            self._blocks.flush()
        elif self._reftable_dirty:
            self.storage.sync()
            self.storage.pwrite(encode_table(self.reftable), self.reftable_offset, "refcount")
            self._reftable_dirty = False
        if final_sync:
            self.storage.sync()
            self._durable_after = None

    # -- transactions ----------------------------------------------------------------
    def _tx_mask(self, b: int) -> np.ndarray:
        m = self._tx_freed.get(b)
        if m is None:
            m = self._tx_freed[b] = np.zeros(self.geo.refblock_entries, dtype=bool)
        return m

    def begin_atomic(self) -> None:
        if self._atomic:
            raise RuntimeError("nested refcount transaction")
        if self._moved or self._reftable_dirty or self._blocks.dirty_count:
            self.commit()  # start from a state that is entirely on disk
        self._atomic = True
        self._parked = {}
        self._tx_freed = {}
        offs = self.reftable & np.uint64(REFT_OFFSET_MASK)
        self._tx_old = set(offs[offs != 0].tolist())
        self._tx_min_freed = 1 << 62
        self._tx_state = (self.reftable_offset, self.reftable_clusters, self._free_hint,
                          list(self._pool))

    def abort_atomic(self) -> None:
        if not self._atomic:
            return
        rt_off, rt_clusters, hint, pool = self._tx_state
        self._atomic = False
        self._parked = {}
        self._tx_freed = {}
        self._blocks.drop_all()
        self.reftable_offset, self.reftable_clusters = rt_off, rt_clusters
        self.reftable = decode_table(self.storage.pread(rt_clusters * self.geo.cluster_size, rt_off))
        blk = self.reftable & np.uint64(REFT_OFFSET_MASK)
        self.refblock_clusters = set((blk[blk != 0] >> np.uint64(self.geo.cluster_bits)).tolist())
        self._moved = False
        self._reftable_dirty = False
        self._pending_frees = []
        self._free_hint = hint
        self._pool = pool

    def _tx_run(self, n: int) -> int:
        """n contiguous clusters, free in memory and on disk, counted once (in memory)."""
        start = self._find_free_run(n)
        for b in range(start >> self.geo.refblock_bits, ((start + n - 1) >> self.geo.refblock_bits) + 1):
            if self._block(b) is None:
                self._create_block(b)
        start = self._find_free_run(n)
        self.update(np.arange(start, start + n, dtype=np.int64), 1)
        return start

    def commit_atomic(self, switch: Callable[[dict[str, int]], None]) -> None:
        if not self._atomic:
            raise RuntimeError("commit_atomic() without begin_atomic()")
        geo = self.geo
        cbits = geo.cluster_bits
        old_rt, old_rt_clusters = self._tx_state[0], self._tx_state[1]
        # 1. The refcount table goes to new clusters (a table grown meanwhile already is).
        if not self._moved:
            n = self.reftable_clusters
            start = self._tx_run(n)
            if self._moved:  # describing the run grew (and so moved) the table already
                self.update(np.arange(start, start + n, dtype=np.int64), -1)
            else:
                self.reftable_offset = start << cbits
        frees = list(range(old_rt >> cbits, (old_rt >> cbits) + old_rt_clusters))
        frees += [c for c in self._pending_frees if not old_rt >> cbits <= c < (old_rt >> cbits) + old_rt_clusters]
        self._pending_frees = []
        self._moved = False
        self.update(np.array(frees, dtype=np.int64), -1)
        # 2. Every changed block that the old table points at moves to new clusters
        #    (moving blocks changes refcounts, which may change more blocks: repeat).
        while True:
            if self._moved:  # the table grew while blocks moved: it is in new clusters
                self._moved = False
                self.update(np.array(self._pending_frees, dtype=np.int64), -1)
                self._pending_frees = []
            dirty = set(self._parked) | set(self._blocks.dirty_offsets())
            offs = self.reftable & np.uint64(REFT_OFFSET_MASK)
            todo = [b for b in np.flatnonzero(offs).tolist()
                    if int(offs[b]) in dirty and int(offs[b]) in self._tx_old]
            if not todo:
                if not self._moved:
                    break
                continue
            start = self._find_free_run(len(todo))
            for b in range(start >> geo.refblock_bits, ((start + len(todo) - 1) >> geo.refblock_bits) + 1):
                if self._block(b) is None:
                    self._create_block(b)
            start = self._find_free_run(len(todo))
            old_homes = []
            for i, b in enumerate(todo):
                old = self._block_offset(b)
                table = self._parked.pop(old, None)
                if table is None:
                    table = self._blocks.cached(old)
                    assert table is not None
                self._blocks.discard(old)
                new = (start + i) << cbits
                self.reftable[b] = new
                self._blocks.put(new, table, dirty=True)
                self.refblock_clusters.discard(old >> cbits)
                self.refblock_clusters.add(start + i)
                old_homes.append(old >> cbits)
            self.update(np.arange(start, start + len(todo), dtype=np.int64), 1)
            self.update(np.array(old_homes, dtype=np.int64), -1)
        # 3. Write it all where the old image does not look, then switch.
        self._atomic = False
        try:
            for off, values in list(self._parked.items()):
                self._write_block(off, values)
            self._parked = {}
            self._blocks.flush()
            self.storage.pwrite(encode_table(self.reftable), self.reftable_offset, "refcount")
            self.storage.sync()
            # the header either switches durably or is left (put back) as it was
            switch({"refcount_table_offset": self.reftable_offset,
                    "refcount_table_clusters": self.reftable_clusters})
        except BaseException:
            # An I/O error before the switch: the file still holds the old refcounts, so
            # abort_atomic() must be able to go back to them.
            self._atomic = True
            raise
        self._reftable_dirty = False
        self._tx_freed = {}
        self._tx_old = set()
        self._free_hint = min(self._free_hint, self._tx_min_freed)

    def return_pool(self) -> None:
        if self._pool:
            pool = np.array(self._pool, dtype=np.int64)
            self._pool = []
            self.update(pool, -1)

    def close(self) -> None:
        self.return_pool()
        self.apply_releases()
        self._blocks.flush()
        if self._reftable_dirty:
            self.commit()


def _count_unique(clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and their multiplicities; a bincount (linear time) when the
    values are dense, as in whole-image passes, else a sort."""
    lo, hi = int(clusters.min()), int(clusters.max())
    if lo >= 0 and hi - lo <= 4 * len(clusters) + 1024:
        counts = np.bincount(clusters - lo)
        nz = np.flatnonzero(counts)
        return nz.astype(np.int64) + lo, counts[nz]
    return np.unique(clusters, return_counts=True)
