"""Bounded write-back cache of metadata tables (L2 tables, refcount blocks).

Tables are numpy uint64 arrays in native byte order. A dirty table is written back on
eviction or on flush. Ordering constraints between kinds are kept by the callers, not
here: before a reachable L2 or L1 table is written, the cluster map asks the refcount
policy to make the refcounts of what it hands out durable (`ensure_durable`: standard
mode syncs its batched reservations lazily, at that point; lazy-count has nothing to
sync), and tables no on-disk L1 entry reaches yet may go out at any time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np

Loader = Callable[[int], np.ndarray]
Writer = Callable[[int, np.ndarray], None]


class TableCache:
    def __init__(self, capacity: int, load: Loader, write: Writer,
                 on_change: Callable[[], None] | None = None) -> None:
        self.capacity = max(2, capacity)
        self._load = load
        self._write = write
        # called when a table is installed, forgotten or dropped (not on plain hits)
        self._on_change = on_change
        self._tables: OrderedDict[int, np.ndarray] = OrderedDict()
        self._dirty: set[int] = set()
        self.hits = 0
        self.misses = 0
        self.peak = 0

    def get(self, offset: int) -> np.ndarray:
        tables = self._tables
        table = tables.get(offset)
        if table is not None:
            tables.move_to_end(offset)
            self.hits += 1
            return table
        self.misses += 1
        table = self._load(offset)
        self._insert(offset, table)
        return table

    def put(self, offset: int, table: np.ndarray, dirty: bool = True) -> None:
        """Install a table built in memory (a new or copied L2 table)."""
        if self._on_change is not None:
            self._on_change()
        self._insert(offset, table)
        if dirty:
            self._dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self._dirty.add(offset)

    def cached(self, offset: int) -> np.ndarray | None:
        return self._tables.get(offset)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed (without writing it)."""
        if self._on_change is not None:
            self._on_change()
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    def flush(self, only: Callable[[int], bool] | None = None) -> int:
        """Write back every dirty table (those `only` accepts), in offset order; returns
        how many. A table leaves the dirty set only once its write succeeded."""
        n = 0
        for offset in sorted(self._dirty):
            if only is not None and not only(offset):
                continue
            self._write(offset, self._tables[offset])
            self._dirty.discard(offset)
            n += 1
        return n

    def drop_all(self) -> None:
        """Forget everything without writing (after a failed operation)."""
        if self._on_change is not None:
            self._on_change()
        self._tables.clear()
        self._dirty.clear()

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def dirty_offsets(self) -> list[int]:
        return list(self._dirty)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._tables))

    def __len__(self) -> int:
        return len(self._tables)

    def _insert(self, offset: int, table: np.ndarray) -> None:
        tables = self._tables
        tables[offset] = table
        tables.move_to_end(offset)
        while len(tables) > self.capacity:
            victim, vtable = next(iter(tables.items()))
            if victim in self._dirty:
                self._write(victim, vtable)
                self._dirty.discard(victim)
            del tables[victim]
        if len(tables) > self.peak:
            self.peak = len(tables)  # most tables ever held after an insertion
