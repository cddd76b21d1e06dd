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
from collections.abc import Callable

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
POOL_MIN = 16
POOL_MAX = 4096


class RefcountStrategy(abc.ABC):
    """How an image counts references and finds free clusters."""

    name: str = "abstract"

    @abc.abstractmethod
    def allocate(self, n: int = 1) -> int:
        """Return the host offset of n contiguous clusters, each now counted once.
        Their refcount is durable on return."""

    @abc.abstractmethod
    def release(self, host_offset: int, n: int = 1) -> None:
        """A reference to n clusters was dropped in (not yet durable) metadata."""

    @abc.abstractmethod
    def apply_releases(self) -> None:
        """The metadata that dropped references is durable: apply queued releases."""

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
    name = "standard"

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
        self._reftable_dirty = False
        self._blocks = TableCache(cache_tables, self._load_block, self._write_block)
        self._free_hint = 0  # no free cluster below this index
        self._pool: list[int] = []  # reserved cluster indexes, ascending runs
        self._pool_batch = POOL_MIN
        self._releases: list[int] = []  # queued cluster indexes
        self._pending_frees: list[int] = []  # clusters to free after the reftable moved

    # -- refcount blocks -------------------------------------------------------------
    def _load_block(self, offset: int) -> np.ndarray:
        if offset % self.geo.cluster_size or offset >= MAX_HOST_OFFSET:
            raise CorruptImageError(f"Refcount block offset {offset:#x} is invalid")
        data = self.storage.pread(self.geo.cluster_size, offset)
        return decode_refblock(data, self.geo.refcount_order)

    def _write_block(self, offset: int, values: np.ndarray) -> None:
        self.storage.pwrite(encode_refblock(values, self.geo.refcount_order), offset, "refcount")

    def _block(self, index: int) -> np.ndarray | None:
        if index >= len(self.reftable):
            return None
        off = int(self.reftable[index]) & REFT_OFFSET_MASK
        if not off:
            return None
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
        bidx = clusters >> bits
        for b in np.unique(bidx):
            block = self._block(int(b))
            if block is None:
                continue
            sel = bidx == b
            out[sel] = block[clusters[sel] & ((1 << bits) - 1)]
        return out

    def covered_clusters(self) -> int:
        return len(self.reftable) << self.geo.refblock_bits

    # -- updates ---------------------------------------------------------------------
    def update(self, clusters: np.ndarray, delta: int) -> None:
        clusters = np.asarray(clusters, dtype=np.int64)
        if not len(clusters) or delta == 0:
            return
        uniq, counts = np.unique(clusters, return_counts=True)
        deltas = counts.astype(np.int64) * delta
        bits = self.geo.refblock_bits
        mask = (1 << bits) - 1
        bidx = uniq >> bits
        # Make sure every block exists (a new refblock is itself allocated) before checking.
        for b in np.unique(bidx):
            if self._block(int(b)) is None:
                if delta < 0:
                    raise CorruptImageError("Refcount decrement of a cluster with refcount 0")
                self._create_block(int(b))
        plan: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        limit = self.geo.refcount_max
        for b in np.unique(bidx):
            sel = bidx == b
            block = self._block(int(b))
            assert block is not None
            idx = uniq[sel] & mask
            new = block[idx].astype(np.int64) + deltas[sel]
            if (new < 0).any():
                raise CorruptImageError("Refcount would drop below zero")
            if (new > limit).any():
                raise RefcountOverflowError(
                    f"Refcount overflow: a cluster would exceed {limit} references "
                    f"(refcount_bits={self.geo.refcount_bits})"
                )
            plan.append((block, idx, new.astype(np.uint64)))
        for (block, idx, new), b in zip(plan, np.unique(bidx)):
            block[idx] = new
            self._blocks.mark_dirty(self._block_offset(int(b)))
        if delta < 0:
            freed = uniq[np.concatenate([p[2] for p in plan]) == 0] if plan else uniq[:0]
            if len(freed):
                self._free_hint = min(self._free_hint, int(freed.min()))

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
        values = np.zeros(self.geo.refblock_entries, dtype=np.uint64)
        values[0] = 1
        off = first * self.geo.cluster_size
        self._blocks.put(off, values, dirty=True)
        self.reftable[b] = off
        self._reftable_dirty = True
        return values

    def _grow_reftable(self, min_entries: int) -> None:
        """Move the refcount table to a larger home; written out by commit()."""
        geo = self.geo
        per_cluster = geo.cluster_size // 8
        want = max(min_entries, len(self.reftable) * 3 // 2, per_cluster)
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
            if block is None:
                # block's first cluster will hold the block itself
                used = np.zeros(entries, dtype=bool)
                used[0] = True
            else:
                used = block != 0
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
        self._reserve(self._pool_batch, extra=self._pool_batch)
        self._pool_batch = min(self._pool_batch * 2, POOL_MAX)
        return self.allocate(1)

    def _reserve(self, n: int, extra: int) -> int:
        """Set refcount 1 on a free run of n clusters and commit. With extra, the run
        goes to the pool instead of being returned."""
        start = self._find_free_run(n)
        for b in range(start >> self.geo.refblock_bits, ((start + n - 1) >> self.geo.refblock_bits) + 1):
            if self._block(b) is None:
                self._create_block(b)
        # creating blocks may have used clusters inside the run: search again
        start = self._find_free_run(n)
        self.update(np.arange(start, start + n, dtype=np.int64), 1)
        self.commit()
        if extra:
            self._pool.extend(range(start, start + n))
            self._pool.sort()
        return start

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
        self._blocks.flush()
        if self._reftable_dirty and not self._moved:
            # In place: the blocks it points to must be durable first.
            self.storage.sync()
            self.storage.pwrite(encode_table(self.reftable), self.reftable_offset, "refcount")
            self._reftable_dirty = False

    def commit(self) -> None:
        moved = self._moved
        self._blocks.flush()
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
        self.storage.sync()

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

    def drop_caches(self) -> None:
        self._blocks.drop_all()
