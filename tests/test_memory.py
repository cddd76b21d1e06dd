"""Bounded metadata memory: the L2 and refcount caches never hold more tables than their
capacity, and opening a huge image reads O(1) clusters (no L2 table is loaded up front).

Counters only (cache sizes, storage read counts, tracemalloc bytes), no timings."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from conftest import assert_clean, qemu_img, qemu_io

import qcow2

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


def _pattern(k: int) -> int:
    return 1 + k % 251


def test_l2_cache_bounded_while_writing_and_reading(tmp: Path) -> None:
    """Writes touching 64 L2 tables through a 4-table cache: dirty tables are written
    back on eviction, QEMU reads every byte back, and the cache never exceeds 4 tables."""
    cs = 4 * KiB  # an L2 table covers 512 clusters = 2 MiB
    cover = cs * (cs // 8)
    tables = 64
    p = tmp / "a.qcow2"
    qcow2.create(p, tables * cover, cluster_size=cs)
    with qcow2.open(p, "r+", cache_size=4 * cs, refcount_cache_size=4 * cs) as img:
        l2c = img.clusters.l2cache
        assert l2c.capacity == 4
        for k in range(tables):
            img.pwrite(bytes([_pattern(k)]) * 512, k * cover + 3 * cs + 100)
            assert len(l2c) <= l2c.capacity
            rc_blocks = img.refcounts._blocks  # type: ignore[union-attr]
            assert len(rc_blocks) <= rc_blocks.capacity
        assert l2c.peak == l2c.capacity
        assert img.stats.l2_writes >= tables - l2c.capacity  # evicted dirty tables written
    assert_clean(p)
    cmds = [f"read -q -P {_pattern(k)} {k * cover + 3 * cs + 100} 512" for k in range(tables)]
    qemu_io(p, *cmds)

    with qcow2.open(p, cache_size=4 * cs) as img:
        l2c = img.clusters.l2cache
        opened = img.stats.reads
        for k in range(tables):
            assert img.pread(512, k * cover + 3 * cs + 100) == bytes([_pattern(k)]) * 512
            assert img.pread(1, k * cover) == b"\0"  # same table: a cache hit
            assert len(l2c) <= l2c.capacity
        # each table loaded exactly once, and each read is one data read or none (plus
        # O(1) one-time reads, e.g. the refcount table for the metadata overlap guard)
        assert l2c.misses == tables
        assert l2c.peak <= l2c.capacity
        assert 2 * tables <= img.stats.reads - opened <= 2 * tables + 2


def test_cache_size_option_sets_capacity(tmp: Path) -> None:
    p = tmp / "a.qcow2"
    qcow2.create(p, 1 * GiB)
    with qcow2.open(p, cache_size=1 * MiB) as img:
        assert img.clusters.l2cache.capacity == MiB // img.cluster_size
    with qcow2.open(p) as img:  # the default is bounded too: a few MiB
        assert img.clusters.l2cache.capacity * img.cluster_size <= 8 * MiB


@pytest.mark.parametrize("maker", ["ours", "qemu"])
def test_open_1tib_reads_constant_clusters(tmp: Path, maker: str) -> None:
    p = tmp / "big.qcow2"
    if maker == "ours":
        qcow2.create(p, 1 * TiB)
    else:
        qemu_img("create", "-q", "-f", "qcow2", str(p), str(1 * TiB))
    for mode in ("r", "r+"):
        with qcow2.open(p, mode) as img:
            # header, L1 table (16 KiB for 1 TiB), refcount table when writable
            assert img.stats.reads <= 6, img.stats
            assert img.stats.reads_bytes <= 256 * KiB, img.stats
            assert len(img.clusters.l2cache) == 0
            assert img.pread(4096, img.size - 4096) == bytes(4096)
            assert img.clusters.l2cache.misses == 0  # unallocated: no L2 table to read
    assert_clean(p)


def test_prealloc_metadata_tables_loaded_lazily(tmp: Path) -> None:
    """A preallocation=metadata image (every L2 table present): opening loads none of
    them; visiting all of them keeps at most the cache capacity in memory."""
    cs = 64 * KiB
    size = 64 * GiB  # 128 L2 tables = 8 MiB of tables
    p = tmp / "pre.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"preallocation=metadata,cluster_size={cs}",
             str(p), str(size))
    cover = cs * (cs // 8)
    tables = size // cover
    cache = 256 * KiB  # 4 tables
    tracemalloc.start()
    try:
        with qcow2.open(p, "r+", cache_size=cache) as img:
            assert img.stats.reads <= 6 and len(img.clusters.l2cache) == 0
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for k in range(tables):
                assert img.pread(4096, k * cover + 5 * cs) == bytes(4096)
            img.pwrite(b"\x07" * 4096, (tables - 1) * cover)
            l2c = img.clusters.l2cache
            assert l2c.misses == tables
            assert l2c.peak <= l2c.capacity == cache // cs
            peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # holding all tables would take 8 MiB (as uint64 arrays); the cache holds 256 KiB
    assert peak < tables * cs // 4, peak
    assert_clean(p)
    qemu_io(p, f"read -q -P 7 {(tables - 1) * cover} 4096")
