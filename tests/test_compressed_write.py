"""Writing compressed clusters (Image.write_compressed, `qcow2 convert -c`): QEMU reads
them back exactly, `qemu-img check` finds the packed host clusters counted right (a
host cluster shared by several compressed clusters, or one a compressed cluster runs
into, has one reference per cluster), and what QEMU refuses we refuse too."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import assert_clean, qemu_img, qemu_io, raw_bytes

import qcow2
from qcow2.cli import main

# every test here runs once per refcount mode (conftest.py's `mode` fixture)
pytestmark = pytest.mark.usefixtures("mode")

KiB = 1024
MiB = 1024 * KiB


def _compressible(rng: random.Random, n: int) -> bytes:
    noise = rng.randbytes(rng.randrange(n // 16, n // 2))
    return (noise + bytes([rng.randrange(256)]) * n)[:n]


def _compressed_count(path: Path) -> int:
    rep = json.loads(qemu_img("check", "--output=json", str(path), check=False).stdout)
    return int(rep.get("compressed-clusters", 0))


@pytest.mark.parametrize("opts", [
    dict(cluster_size=4096),
    dict(cluster_size=65536, compression_type="zstd"),
    dict(cluster_size=32768, extended_l2=True),
    dict(cluster_size=512, refcount_bits=2),
    dict(cluster_size=65536, compat="0.10"),
])
def test_compressed_clusters_read_back_in_qemu(tmp: Path, opts: dict) -> None:
    cs = opts["cluster_size"]
    size = 64 * cs + max(512, cs // 2)  # a partial last cluster (but whole sectors)
    p = tmp / "c.qcow2"
    qcow2.create(p, size, **opts)
    rng = random.Random(str(opts))
    model = bytearray(size)
    written = incompressible = 0
    with qcow2.open(p, "r+") as img:
        for c in rng.sample(range(65), 50):
            n = min(cs, size - c * cs)
            data = rng.randbytes(n) if c % 9 == 0 else _compressible(rng, n)
            img.write_compressed(c * cs, data)
            model[c * cs : c * cs + n] = data
            written += 1
            incompressible += c % 9 == 0
        assert img.pread(size, 0) == bytes(model)
    assert_clean(p)
    assert raw_bytes(p, tmp) == bytes(model)
    # at most the random clusters stay plain (tiny clusters may not compress at all)
    assert _compressed_count(p) >= (written - incompressible) * (0.5 if cs == 512 else 1)
    with qcow2.open(p) as img:
        assert img.pread(size, 0) == bytes(model)


def test_packing_saves_space_like_qemu(tmp: Path) -> None:
    """Clusters compressing to ~3/4 are packed back to back across host clusters: the
    file ends up about as large as QEMU's for the same data."""
    rng = random.Random(5)
    src = tmp / "in.raw"
    src.write_bytes(b"".join(rng.randbytes(48 * KiB) + bytes(16 * KiB) for _ in range(48)))
    ours, theirs = tmp / "ours.qcow2", tmp / "theirs.qcow2"
    assert main(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(src), str(ours)]) == 0
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(theirs))
    assert_clean(ours)
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(src), str(ours)).returncode == 0
    assert _compressed_count(ours) == 48
    assert ours.stat().st_size <= theirs.stat().st_size * 1.05 + 65536


def test_changes_after_compressed_writes_keep_refcounts_right(tmp: Path) -> None:
    """Overwrite part of a packed compressed cluster (copy-on-write), discard another,
    snapshot, write more compressed clusters, delete the snapshot: QEMU checks clean and
    reads the model at every step's end."""
    cs = 4096
    p = tmp / "m.qcow2"
    qcow2.create(p, MiB, cluster_size=cs)
    rng = random.Random(9)
    model = bytearray(MiB)

    def compressed(img: qcow2.Image, c: int) -> None:
        data = _compressible(rng, cs)
        img.write_compressed(c * cs, data)
        model[c * cs : (c + 1) * cs] = data

    with qcow2.open(p, "r+") as img:
        for c in range(0, 40):
            compressed(img, c)
        img.pwrite(b"\x99" * 100, 5 * cs + 7)
        model[5 * cs + 7 : 5 * cs + 107] = b"\x99" * 100
        img.discard(7 * cs, cs)
        model[7 * cs : 8 * cs] = bytes(cs)
        img.create_snapshot("s")
        snap = bytes(model)
        for c in range(100, 120):
            compressed(img, c)
        img.flush()
        img.discard(10 * cs, 20 * cs)
        model[10 * cs : 30 * cs] = bytes(20 * cs)
        compressed(img, 7)  # into a cluster discarded before the snapshot
    assert_clean(p)
    assert raw_bytes(p, tmp) == bytes(model)
    assert raw_bytes(p, tmp, snapshot="s") == snap
    with qcow2.open(p, "r+") as img:
        img.delete_snapshot("s")
    assert_clean(p)
    assert raw_bytes(p, tmp) == bytes(model)


def test_ours_next_to_qemus_compressed_clusters(tmp: Path) -> None:
    p = tmp / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=8192", str(p), str(MiB))
    qemu_io(p, "write -c -P 0x31 0 64k", "write -P 0x32 128k 8k")
    model = bytearray(raw_bytes(p, tmp))
    rng = random.Random(3)
    with qcow2.open(p, "r+") as img:
        for c in range(20, 40):
            data = _compressible(rng, 8192)
            img.write_compressed(c * 8192, data)
            model[c * 8192 : (c + 1) * 8192] = data
    assert_clean(p)
    assert raw_bytes(p, tmp) == bytes(model)
    qemu_io(p, "write -c -P 0x33 512k 64k")  # QEMU packs after ours
    model[512 * KiB : 576 * KiB] = b"\x33" * (64 * KiB)
    assert_clean(p)
    assert raw_bytes(p, tmp) == bytes(model)


def test_few_syncs_and_metadata_writes(tmp: Path) -> None:
    """Packing adds references, but they are written with the next metadata write and
    synced once, not per cluster."""
    p = tmp / "s.qcow2"
    qcow2.create(p, 4 * MiB, cluster_size=4096)
    rng = random.Random(4)
    with qcow2.open(p, "r+") as img:
        for c in range(500):
            img.write_compressed(c * 4096, _compressible(rng, 4096))
        assert img.stats.syncs <= 1  # at most the first reservation before anything else
        before = img.stats.copy()
        img.flush()
        delta = img.stats - before
        assert delta.syncs <= 3 and delta.refcount_writes <= 4, delta
    assert_clean(p)


@pytest.mark.parametrize("case", ["allocated", "unaligned", "short", "too_long", "read_only"])
def test_refusals(tmp: Path, case: str) -> None:
    p = tmp / "r.qcow2"
    qcow2.create(p, 100 * KiB, cluster_size=65536)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"x" * 10, 0)
    before = p.read_bytes()
    mode = "r" if case == "read_only" else "r+"
    with qcow2.open(p, mode) as img:
        err: type[Exception] = qcow2.ReadOnlyError if case == "read_only" else qcow2.InvalidArgumentError
        with pytest.raises(err):
            if case == "allocated":
                img.write_compressed(0, bytes(65536))
            elif case == "unaligned":
                img.write_compressed(512, bytes(65536))
            elif case == "short":
                img.write_compressed(0, bytes(4096))  # not the last cluster
            elif case == "too_long":
                img.write_compressed(65536, bytes(65536))  # past the end of the disk
            else:
                img.write_compressed(65536, bytes(36 * KiB))
    assert p.read_bytes() == before
    # the partial last cluster itself is fine
    with qcow2.open(p, "r+") as img:
        img.write_compressed(65536, b"\x42" * (36 * KiB))
        assert img.pread(36 * KiB, 65536) == b"\x42" * (36 * KiB)
    assert_clean(p)


def test_convert_compress_options(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), str(2 * MiB))
    qemu_io(src, "write -P 0x41 0 300k", f"write -P 0x42 {MiB} 64k")
    out = tmp / "z.qcow2"
    assert main(["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=16k",
                 str(src), str(out)]) == 0
    assert_clean(out)
    assert qemu_img("compare", str(src), str(out)).returncode == 0
    assert "zstd" in qemu_img("info", str(out)).stdout
    assert _compressed_count(out) > 0
    assert main(["convert", "-c", "-O", "raw", str(src), str(tmp / "x.raw")]) == 1
    assert main(["convert", "-c", "-n", "-O", "qcow2", str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert "Compression not supported for this file format" in err and "-n" in err
