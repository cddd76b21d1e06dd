"""The L1 -> L2 tree walker (tree.py) that snapshots, the modes and check share: its
decoding against qemu-img check's counts, and its strict (first problem) and
reporting (every problem) views of the same entries against each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import qemu_check, qemu_img, qemu_io

import qcow2
from qcow2.format import QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO
from qcow2.geometry import Geometry
from qcow2.tree import L1Entries, L2Entries, compressed_clusters, decode_chunk, table_chunks


@pytest.mark.parametrize("extended", [False, True])
def test_walker_counts_what_qemu_img_check_counts(tmp: Path, extended: bool) -> None:
    """Data, compressed, zero (preallocated and plain) and discarded clusters, with a
    snapshot in between: the walker's decoded active tree gives qemu-img check's
    allocated and compressed cluster counts."""
    p = tmp / "t.qcow2"
    opts = "cluster_size=65536" + (",extended_l2=on" if extended else "")
    qemu_img("create", "-f", "qcow2", "-o", opts, str(p), "64M")
    qemu_io(p, "write -P 1 0 256k", "write -c -P 2 1M 64k", "write -c -P 3 1088k 64k",
            "write -P 4 40M 64k", "write -z 2M 128k")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -P 5 64k 64k", "write -z 40M 64k", "discard 128k 64k", "write -P 6 60M 4k")
    ref = qemu_check(p)
    assert ref["returncode"] == 0, ref
    with qcow2.open(p) as img:
        geo, cs = img.geo, img.geo.cluster_size
        l1e = L1Entries(img.clusters.l1[img.clusters.l1 != 0], cs)
        assert not l1e.reserved().any() and not l1e.misaligned().any()
        offs = np.unique(l1e.offsets)
        size = img.storage.size()
        allocated = compressed = 0
        for _s, _o, tables in table_chunks(img.storage, offs, cs, size, 2 * cs):
            d = L2Entries(geo, tables)
            for bad in (d.reserved(), d.compressed_copied(), d.misaligned()):
                assert not bad.any()
            if extended:
                for bad in (d.compressed_bitmap(), d.unallocated_bitmap(), d.allocated_bitmap()):
                    assert not bad.any()
            allocated += int(d.normal.sum() + d.comp.sum())
            compressed += int(d.comp.sum())
            if d.any_comp:
                clusters, n = compressed_clusters(geo, d.ent[d.comp])
                assert len(clusters) == int(n.sum()) and int(clusters.max()) * cs < size
    assert (allocated, compressed) == (ref["allocated-clusters"], ref.get("compressed-clusters", 0))


def test_strict_and_reporting_views_agree() -> None:
    """decode_chunk (the strict walkers' byte-level pass) finds a problem exactly when
    the reporting masks do, and decodes the same host clusters."""
    rng = np.random.default_rng(9)
    for extended in (False, True):
        geo = Geometry(16, 4, extended)
        cs, cb = geo.cluster_size, geo.cluster_bits
        words = cs // 8
        file_clusters = 1000
        for trial in range(24):
            k = 3
            tables = np.zeros((k, words), dtype=np.uint64)
            ent = tables[:, 0::2] if extended else tables
            n = ent.shape[1]
            hosts = rng.integers(1, file_clusters, size=(k, n)).astype(np.uint64) << np.uint64(cb)
            kind = rng.integers(0, 4, size=(k, n))
            ent[kind == 1] = hosts[kind == 1]
            ent[kind == 2] = hosts[kind == 2] | np.uint64(QCOW_OFLAG_ZERO)
            if trial % 3 == 1:  # some compressed entries (host offset + sector count)
                c = kind == 3
                ent[c] = np.uint64(QCOW_OFLAG_COMPRESSED) | (hosts[c] & np.uint64(geo.coffset_mask))
            if trial % 4 == 2:  # one misaligned standard entry
                r, col = np.argwhere((kind == 1) | (kind == 2))[0]
                ent[r, col] |= np.uint64(1 << (9 + trial % (cb - 9)))
            if trial % 5 == 3:  # one entry past the end of the file
                ent[0, 0] = np.uint64(file_clusters + 5) << np.uint64(cb)
            raw = tables.astype(">u8").tobytes()
            out = np.empty((k, n), dtype=np.uint64)
            comp, problem = decode_chunk(geo, memoryview(raw), k, out, file_clusters)
            d = L2Entries(geo, tables.copy())
            misaligned = bool(d.misaligned().any())
            past = bool(((d.hoff[d.normal] >> np.uint64(cb)) >= np.uint64(file_clusters)).any())
            if misaligned:
                assert problem is not None and "not cluster aligned" in problem
                continue
            assert (problem is not None) == past, (trial, problem)
            expect = np.where(d.normal, d.hoff >> np.uint64(cb), 0)
            assert np.array_equal(out, expect)
            assert (comp is None) == (not d.any_comp)
            if comp is not None:
                assert np.array_equal(comp[0], d.ent[d.comp])
