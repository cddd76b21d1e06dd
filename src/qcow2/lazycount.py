"""Method 1 of the 2011 thread, "lazy count": the live state counts 0 in the refcounts.

Stored refcounts count only what is not the live tree: snapshot references (their L1
tables' L2 tables and data), snapshot L1 tables, VM state, the snapshot table, the
header cluster and the refcount structures themselves. The active L1 table, its L2
tables and its data clusters add nothing. So a guest write never touches a refcount
block: a cluster with stored count 0 is the live state's alone (its COPIED flag is set,
and it is written in place), one with a stored count is shared with a snapshot and is
copied first, and neither allocation nor copy changes a stored count.

Allocation without live counts (Kevin Wolf's question in the thread): a host cluster is
free iff its stored count is 0 and the live tables do not reach it. The live state's
references are kept in memory, one uint16 per host cluster, built on open by one
vectorized pass over the live L1/L2 tree and kept current by the write path: an
allocation adds one, a dropped reference removes one only once the metadata that
dropped it is durable (the same queue standard mode uses for its decrements). Nothing
of this map is on disk, so there is nothing to sync for it and nothing to go stale: a
crash loses only the in-memory map, which the next open rebuilds from the tables.

Not to be confused with QEMU's `lazy_refcounts` (a compatible feature: refcounts may be
stale while the dirty bit is set, and are rebuilt after a crash). Here the stored
refcounts are always exact, for a different definition of what they count.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .errors import CorruptImageError
from .refcount import StandardRefcounts

LIVE_MAX = int(np.iinfo(np.uint16).max)


class LazyCountRefcounts(StandardRefcounts):
    """Stored refcounts without the live state's references, plus an in-memory map
    of those references for the allocator."""

    mode: ClassVar[str] = "lazy-count"
    live_weight: ClassVar[int] = 0
    needs_live_map: ClassVar[bool] = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.live = np.zeros(0, dtype=np.uint16)
        self._tx_live: list[tuple[int, int]] = []  # live runs allocated in a transaction
        self._tx_drops: list[np.ndarray] = []  # live references dropped in a transaction

    # -- the live map --------------------------------------------------------------------
    def set_live(self, counts: np.ndarray) -> None:
        counts = np.asarray(counts)
        if len(counts) and int(counts.max()) > LIVE_MAX:
            raise CorruptImageError(
                f"A host cluster is referenced more than {LIVE_MAX} times by the active tables")
        self.live = counts.astype(np.uint16)
        if self._pool:  # reserved for the live state, not yet reachable: still taken
            self._grow_live(self._pool[-1] + 1)
            self.live[np.array(self._pool, dtype=np.int64)] += 1
        self._free_hint = 0

    def live_count(self, cluster: int) -> int:
        return int(self.live[cluster]) if 0 <= cluster < len(self.live) else 0

    def _grow_live(self, end: int) -> None:
        if end > len(self.live):
            grown = np.zeros(max(end, 2 * len(self.live), 1024), dtype=np.uint16)
            grown[: len(self.live)] = self.live
            self.live = grown

    def _live_add(self, start: int, n: int) -> None:
        self._grow_live(start + n)
        seg = self.live[start : start + n]
        if (seg >= LIVE_MAX).any():
            raise CorruptImageError("Too many references to one host cluster")
        seg += 1

    def _live_sub(self, clusters: np.ndarray) -> None:
        clusters = np.asarray(clusters, dtype=np.int64)
        if not len(clusters):
            return
        uniq, counts = np.unique(clusters, return_counts=True)
        if uniq[0] < 0 or int(uniq[-1]) >= len(self.live) or \
                (self.live[uniq] < counts).any():
            raise CorruptImageError("Release of a cluster the live state does not reference")
        self.live[uniq] -= counts.astype(np.uint16)
        self._free_hint = min(self._free_hint, int(uniq[0]))

    def _used(self, b: int, block: np.ndarray | None) -> np.ndarray:
        used = super()._used(b, block)
        base = b << self.geo.refblock_bits
        if base < len(self.live):
            seg = self.live[base : base + len(used)]
            used[: len(seg)] |= seg != 0
        return used

    def _nothing_used_from(self, cluster: int) -> bool:
        # live clusters need no count, so a range no block describes may hold them: the
        # allocator's shortcut past the described ranges must not hand them out
        return not self.live[cluster:].any()

    def _block_slot(self, b: int) -> int:
        # A range no block describes may still hold live clusters (they need no count),
        # e.g. after a conversion from standard dropped their counts to 0 and the block
        # was not kept, or after a crash: the block goes to the first cluster of its
        # range that is neither live nor reserved, and describes itself there.
        base = b << self.geo.refblock_bits
        if not self.live_count(base):
            return 0
        used = self._used(b, None)
        free = np.flatnonzero(~used)
        if not len(free):
            raise CorruptImageError(
                f"No free cluster for the refcount block of clusters {base}..: all are live")
        return int(free[0])

    # -- allocation for the live state: no refcount change, nothing to sync ---------------
    def _reserve(self, n: int, extra: int) -> int:
        start = self._find_free_run(n)
        self._live_add(start, n)
        if extra:
            self._pool.extend(range(start, start + n))
            self._pool.sort()
        return start

    def write_back(self) -> None:
        # Standard mode commits a grown refcount table with its next reservation; here
        # reservations write nothing, so the flush does it (before the L2 tables that
        # point into the clusters the new blocks describe).
        if self._moved and not self._atomic:
            self.commit(final_sync=False)
            return
        super().write_back()

    def return_pool(self) -> None:
        if self._pool:
            pool = np.array(self._pool, dtype=np.int64)
            self._pool = []
            self._live_sub(pool)

    def add_reference(self, cluster: int) -> None:
        self._live_add(cluster, 1)

    def may_pack(self, cluster: int) -> bool:
        # a later snapshot adds one stored reference per live one: keep that possible
        live = self.live_count(cluster)
        return live < LIVE_MAX and self.get(cluster) + live < self.geo.refcount_max

    def may_share(self, img: Any, entry: Any, clusters: np.ndarray) -> bool:
        # The snapshot's reference is a stored one (so the live entry gets no COPIED
        # flag); the live state's new one only goes into the live map. A later snapshot
        # adds a stored reference per live one: keep that possible, as may_pack does.
        clusters = np.asarray(clusters, dtype=np.int64)
        if not len(clusters):
            return True
        uniq, mult = np.unique(clusters, return_counts=True)
        stored = self.get_many(uniq).astype(np.int64)
        if (stored == 0).any():
            raise CorruptImageError(
                f"Snapshot '{entry.name}' references a cluster with refcount 0: run 'qcow2 check -r all'")
        live = np.zeros(len(uniq), dtype=np.int64)
        inside = uniq < len(self.live)
        live[inside] = self.live[uniq[inside]]
        return bool((live + mult <= LIVE_MAX).all() and
                    (stored + live + mult <= self.geo.refcount_max).all())

    def share(self, clusters: np.ndarray) -> None:
        clusters = np.asarray(clusters, dtype=np.int64)
        if len(clusters):
            self._grow_live(int(clusters.max()) + 1)
            np.add.at(self.live, clusters, 1)

    def apply_releases(self) -> None:
        if self._releases:
            rel = np.array(self._releases, dtype=np.int64)
            self._releases = []
            self._live_sub(rel)

    def in_use_many(self, clusters: np.ndarray) -> np.ndarray:
        clusters = np.asarray(clusters, dtype=np.int64)
        live = np.zeros(len(clusters), dtype=bool)
        inside = clusters < len(self.live)
        live[inside] = self.live[clusters[inside]] != 0
        return (self.get_many(clusters) != 0) | live

    # -- transactions ------------------------------------------------------------------------
    def tx_allocate(self, n: int, live: bool) -> int:
        if not live:
            return self.allocate_deferred(n)
        start = self._find_free_run(n)
        self._live_add(start, n)
        self._tx_live.append((start, n))
        return start << self.geo.cluster_bits

    def tx_drop(self, clusters: np.ndarray, live: bool) -> None:
        if not live:
            self.update(clusters, -1)
        elif len(clusters):
            # the image on disk still uses them until the switch: drop after it
            self._tx_drops.append(np.array(clusters, dtype=np.int64))

    def update_live(self, clusters: np.ndarray, sign: int) -> None:
        """The live tree's references are not stored: nothing to change."""

    def snapshot_takes_over(self, clusters: np.ndarray) -> None:
        self.update(clusters, +1)
        self.tx_drop(clusters, live=True)

    def begin_atomic(self) -> None:
        super().begin_atomic()
        self._tx_live = []
        self._tx_drops = []

    def abort_atomic(self) -> None:
        if self._atomic:
            for start, n in self._tx_live:
                self.live[start : start + n] -= 1
        self._tx_live = []
        self._tx_drops = []
        super().abort_atomic()

    def commit_atomic(self, switch: object) -> None:
        super().commit_atomic(switch)  # type: ignore[arg-type]
        drops, self._tx_drops = self._tx_drops, []
        self._tx_live = []
        for arr in drops:
            self._live_sub(arr)
