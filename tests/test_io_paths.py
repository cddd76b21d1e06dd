"""The multi-cluster fast paths of pread/pwrite (one system call for host-contiguous
clusters, whole-cluster allocation runs) against QEMU, on the layouts where they must
step aside: mixed flags, zero clusters that keep their host cluster, compressed
clusters, clusters shared with a snapshot, partly allocated runs, L2 table boundaries,
backing files and v2 images."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import assert_clean, qemu_img, qemu_io, raw_bytes

import qcow2

# every test here runs once per refcount mode (conftest.py's `mode` fixture)
pytestmark = pytest.mark.usefixtures("mode")

KiB = 1024
MiB = 1024 * KiB


def _model_write(model: bytearray, off: int, data: bytes) -> None:
    model[off : off + len(data)] = data


def test_reads_across_mixed_clusters(tmp: Path) -> None:
    """Data, zero-flagged (with and without their host cluster), compressed and
    unallocated clusters interleaved: multi-cluster reads must match QEMU's view."""
    cs = 4 * KiB
    p = tmp / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(p), str(4 * MiB))
    qemu_io(p, f"write -P 0x11 0 {64 * cs}",
            f"write -z {5 * cs} {cs}",  # keeps its host cluster, zero flag set
            f"write -z -u {9 * cs} {2 * cs}",  # zero flag, no host cluster
            f"write -c -P 0x22 {64 * cs} {cs}",  # compressed, between two data runs
            f"write -P 0x12 {65 * cs} {32 * cs}",
            f"discard {20 * cs} {cs}",
            f"write -P 0x33 {3 * MiB} {cs}")
    expect = raw_bytes(p, tmp)
    rng = random.Random(7)
    with qcow2.open(p) as img:
        assert img.pread(img.size, 0) == expect
        for c in range(100):  # every run of up to 8 clusters starting in the mixed area
            for k in range(1, 9):
                off, n = c * cs + (c % 3) * 100, k * cs - (k % 2) * 300
                assert img.pread(n, off) == expect[off : off + n], (off, n)
        for _ in range(300):
            off = rng.randrange(img.size)
            n = rng.randrange(1, min(img.size - off, 24 * cs) + 1)
            assert img.pread(n, off) == expect[off : off + n], (off, n)
            buf = bytearray(n)
            img.readinto(buf, off)
            assert buf == expect[off : off + n]


def test_overwrites_do_not_touch_snapshot_data(tmp: Path) -> None:
    """Clusters shared with a snapshot lack COPIED: a multi-cluster overwrite must copy
    them, not write in place."""
    cs = 64 * KiB
    p = tmp / "s.qcow2"
    qcow2.create(p, 8 * MiB)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"\x01" * (2 * MiB), 0)
        img.create_snapshot("snap")
        img.pwrite(b"\x02" * cs, 5 * cs)  # one cluster of the run is ours again
        img.pwrite(b"\x03" * (MiB + 100), 200)  # spans shared and owned clusters
    assert_clean(p)
    snap = raw_bytes(p, tmp, snapshot="snap")
    assert snap[: 2 * MiB] == b"\x01" * (2 * MiB) and snap[2 * MiB :] == bytes(6 * MiB)
    cur = raw_bytes(p, tmp)
    model = bytearray(8 * MiB)
    _model_write(model, 0, b"\x01" * (2 * MiB))
    _model_write(model, 5 * cs, b"\x02" * cs)
    _model_write(model, 200, b"\x03" * (MiB + 100))
    assert cur == model


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_fresh_runs_allocate_contiguously(tmp: Path, compat: str) -> None:
    """Big aligned writes into unallocated space take the whole-cluster run path,
    across L2 table boundaries and around clusters that are already allocated."""
    cs = 4 * KiB  # an L2 table covers 2 MiB
    size = 8 * MiB
    p = tmp / "f.qcow2"
    qcow2.create(p, size, cluster_size=cs, compat=compat)
    model = bytearray(size)
    with qcow2.open(p, "r+") as img:
        for off, data in [
            (10 * cs, b"\x05" * 100),  # an allocated cluster inside the next run
            (0, bytes(range(256)) * (3 * MiB // 256)),  # crosses an L2 boundary
            (4 * MiB + 3 * cs, b"\x06" * (MiB + cs // 2)),  # aligned start, partial end
            (6 * MiB - 2 * cs, b"\x07" * (4 * cs)),  # table boundary inside
        ]:
            img.pwrite(data, off)
            _model_write(model, off, data)
        assert img.pread(size, 0) == model
    assert_clean(p)
    assert raw_bytes(p, tmp) == model
    # the 3 MiB write landed on adjacent host clusters (the L2 table it needed aside)
    ext = [e for e in qemu_img_map(p) if e["data"] and e["start"] < 3 * MiB]
    assert len(ext) <= 4, ext


def qemu_img_map(p: Path) -> list[dict]:
    import json

    return json.loads(qemu_img("map", "--output=json", str(p)).stdout)


def test_full_cluster_writes_over_backing(tmp: Path) -> None:
    """A whole-cluster write over unallocated clusters needs nothing from the backing
    file; partial ones still copy the backing data around them."""
    cs = 64 * KiB
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(4 * MiB))
    qemu_io(base, f"write -P 0x44 0 {4 * MiB}")
    top = tmp / "top.qcow2"
    qcow2.create(top, backing_file=str(base), backing_format="qcow2")
    with qcow2.open(top, "r+") as img:
        img.pwrite(b"\x55" * (8 * cs), cs)
        img.pwrite(b"\x66" * (3 * cs), 12 * cs + 1000)
    assert_clean(top)
    model = bytearray(b"\x44" * (4 * MiB))
    _model_write(model, cs, b"\x55" * (8 * cs))
    _model_write(model, 12 * cs + 1000, b"\x66" * (3 * cs))
    assert raw_bytes(top, tmp) == model


def test_preallocated_metadata_written_in_place(tmp: Path) -> None:
    """preallocation=metadata clusters (owned, contiguous) are overwritten in place with
    one write per request and no metadata change."""
    p = tmp / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(p), str(8 * MiB))
    with qcow2.open(p, "r+") as img:
        s0 = img.stats.copy()
        img.pwrite(b"\x77" * (2 * MiB), 1 * MiB)
        d = img.stats - s0
        assert d.l1_writes == d.l2_writes == d.refcount_writes == 0
        assert d.data_writes == 1
    assert_clean(p)
    qemu_io(p, f"read -q -P 0x77 {MiB} {2 * MiB}", f"read -q -P 0 0 {MiB}")


def test_large_data_writes_start_writeback_early(tmp: Path) -> None:
    """Combined data of at least WRITEBACK_MIN bytes has its write-back started right
    after the write (a hint through the storage layer), over the ranges written; small
    scattered writes get no hint. The data then reads back in QEMU."""
    from qcow2.storage import WRITEBACK_MIN, FileBackend

    hints: list[tuple[int, int]] = []

    class Hinted(FileBackend):
        def start_writeback(self, offset: int, length: int) -> None:
            hints.append((offset, length))
            super().start_writeback(offset, length)

    p = tmp / "w.qcow2"
    qcow2.create(p, 16 * MiB)
    with qcow2.open(p, "r+", backend=Hinted(p, writable=True)) as img:
        for off in range(0, 4 * MiB, 4 * KiB):
            img.pwrite(b"\x5a" * (4 * KiB), off)
        img.flush()
        assert hints and all(n >= WRITEBACK_MIN for _, n in hints)
        before = len(hints)
        for i in range(64):  # scattered small overwrites in place
            img.pwrite(b"\x77" * 512, (i * 37 % 64) * 64 * KiB + 4 * KiB)
        assert len(hints) == before
    # every hinted byte lies in the file's data clusters that were written
    covered = sum(n for _, n in hints)
    assert 3 * MiB <= covered <= 4 * MiB + 64 * KiB
    qemu_img("check", str(p))
    model = bytearray(16 * MiB)
    model[: 4 * MiB] = b"\x5a" * (4 * MiB)
    for i in range(64):
        off = (i * 37 % 64) * 64 * KiB + 4 * KiB
        model[off : off + 512] = b"\x77" * 512
    assert raw_bytes(p, tmp) == bytes(model)


@pytest.mark.parametrize("op", ["snapshot", "apply", "discard", "zeroes", "delete_then_apply"])
def test_remembered_in_place_clusters_are_forgotten(tmp: Path, op: str) -> None:
    """A cluster that small writes overwrote in place is remembered as writable in
    place (ClusterMap.owned). After an operation that shares, frees or remaps it, the
    next small write must take the full path again (copy, allocate), not write in
    place: the snapshot keeps its data, the freed cluster is not written, and QEMU
    reads what the model says."""
    cs = 64 * KiB
    p = tmp / "o.qcow2"
    qcow2.create(p, 4 * MiB)
    model = bytearray(4 * MiB)
    snap = None
    with qcow2.open(p, "r+") as img:
        for off, b in ((cs + 512, 0x11), (cs + 4096, 0x12)):  # the second is in place
            img.pwrite(bytes([b]) * 512, off)
            model[off : off + 512] = bytes([b]) * 512
        assert img.clusters.owned  # the in-place path remembered the cluster
        if op == "snapshot":
            img.create_snapshot("s")
            snap = bytes(model)
        elif op == "apply":
            img.create_snapshot("s")
            snap = bytes(model)
            img.pwrite(b"\x13" * 512, cs + 512)  # copy, then remembered again
            img.pwrite(b"\x14" * 512, cs + 1024)
            img.apply_snapshot("s")
        elif op == "delete_then_apply":
            img.create_snapshot("s")
            img.create_snapshot("t")
            snap = bytes(model)
            img.pwrite(b"\x13" * 512, cs + 512)
            img.pwrite(b"\x14" * 512, cs + 1024)
            img.delete_snapshot("s")
            img.apply_snapshot("t")
        elif op == "discard":
            img.discard(cs, cs)
            model[cs : 2 * cs] = bytes(cs)
        elif op == "zeroes":
            img.write_zeroes(cs, cs)
            model[cs : 2 * cs] = bytes(cs)
        img.pwrite(b"\x99" * 512, cs + 8192)
        model[cs + 8192 : cs + 8704] = b"\x99" * 512
        assert img.pread(cs, cs) == model[cs : 2 * cs]
    assert_clean(p)
    assert raw_bytes(p, tmp) == bytes(model)
    if snap is not None:
        name = "t" if op == "delete_then_apply" else "s"
        assert raw_bytes(p, tmp, snapshot=name) == snap


def test_map_of_metadata_preallocation_in_every_mode(tmp: Path, mode: str) -> None:
    """qemu-img map reports the unwritten clusters of a metadata-preallocated image as
    zero (QEMU's test: more clusters in use than the file allocates). In use is the
    mode's notion (lazy-count: the live state counts 0 but its clusters are in use):
    our map, read-only and read-write, equals qemu-img's of the standard copy."""
    p = tmp / "pre.qcow2"
    qcow2.create(p, 16 * MiB, preallocation="metadata")
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"\x5a" * 200000, MiB)
    # the standard copy keeps the holes (the test is about them)
    std = tmp / "std.qcow2"
    subprocess.run(["cp", "--sparse=always", str(p), str(std)], check=True)
    with qcow2.open(std, "r+") as img:
        img.set_refcount_mode("standard")
    want = json.loads(qemu_img("map", "--output=json", str(std)).stdout)
    assert any(e["data"] and e["zero"] for e in want)  # QEMU did detect preallocation
    for how in ("r", "r+"):
        with qcow2.open(p, how) as img:
            assert img.map() == want, how


@pytest.mark.parametrize("cluster_size", [512, 4096, 16384])
def test_small_clusters_leave_no_holes(tmp: Path, mode: str, cluster_size: int) -> None:
    """With small clusters a pool batch is longer than a refcount block's range: the
    allocator takes the shorter free spans instead of skipping them, so the file ends
    where QEMU's does for the same writes (it grew to 3x its data before). A refill
    that reaches a range no block describes takes that range only (its block on its
    first cluster, as QEMU places it), so no refcount block is made ahead for a pool
    that close hands back (with 512 B clusters the file was 8% longer than QEMU's).
    8 MiB: with 4 KiB clusters several pools (it was 2x QEMU's there), with 512 B more
    than 64 refcount blocks, so the refcount table grows into a refill's span."""
    ours, ref = tmp / "ours.qcow2", tmp / "ref.qcow2"
    qcow2.create(ours, 64 << 20, cluster_size=cluster_size)
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", str(ref), "64M")
    with qcow2.open(ours, "r+") as img:
        for off in range(0, 8 << 20, 65536):
            img.pwrite(bytes([off >> 16 & 0xFF or 1]) * 65536, off)
    qemu_io(ref, *[f"write -P {off >> 16 & 0xFF or 1} {off} 64k"
                   for off in range(0, 8 << 20, 65536)])
    assert_clean(ours)
    assert raw_bytes(ours, tmp) == raw_bytes(ref, tmp)
    ref_end = json.loads(qemu_img("check", "--output=json", str(ref)).stdout)["image-end-offset"]
    # measured on our file itself (qemu-img checks a standard copy of a mode image,
    # whose conversion adds refcount structures at the end)
    with qcow2.open(ours) as img:
        our_end = img.check().image_end_offset
    # Standard: where QEMU ends. The other modes are made by a crash-atomic switch at
    # creation, which leaves the first refcount table and block (2 clusters) free: a
    # span too short for a pool refill, kept for exact-size allocations.
    slack = (0 if mode == "standard" else 2) * cluster_size
    assert our_end <= ref_end + slack, (our_end, ref_end)
    assert os.path.getsize(ours) <= ref_end + slack  # nothing written past it either
