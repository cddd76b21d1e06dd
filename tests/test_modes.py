"""Refcount modes: lazy-count writes no refcount block, converts both ways in place, and
QEMU accepts the result (qemu-img check, qemu-img compare of the active state and of
every snapshot)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import QEMU_IMG, image_mode, qemu_img, qemu_io

import qcow2
from qcow2.cli import main as cli_main


def _snapshot_raw(p: Path, tmp: Path, snap: str | None) -> bytes:
    out = tmp / f"raw-{snap}"
    args = ["convert", "-O", "raw"] + (["-l", f"snapshot.name={snap}"] if snap else [])
    qemu_img(*args, str(p), str(out))
    return out.read_bytes()


def test_amend_round_trip_keeps_every_snapshot(tmp: Path) -> None:
    p = tmp / "q.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k", str(p), "8M")
    qemu_io(p, "write -P 1 0 3M", "write -P 2 5M 64k")
    qemu_img("snapshot", "-c", "a", str(p))
    qemu_io(p, "write -P 3 1M 100k")
    qemu_img("snapshot", "-c", "b", str(p))
    want = {s: _snapshot_raw(p, tmp, s) for s in ("a", "b", None)}
    assert cli_main(["amend", "-o", "refcount_mode=lazy-count", str(p)]) == 0
    assert image_mode(p) == "lazy-count"
    info = json.loads(qemu_img("info", "--output=json", str(p)).stdout)  # (a standard copy)
    assert info["snapshots"][1]["name"] == "b"
    with qcow2.open(p) as img:
        assert img.info()["format-specific"]["data"]["refcount-mode"] == "lazy-count"
        assert img.check().clean
    assert cli_main(["amend", "-o", "refcount_mode=standard", str(p)]) == 0
    assert image_mode(p) == "standard"
    assert qemu_img("check", str(p)).returncode == 0
    for s, data in want.items():
        assert _snapshot_raw(p, tmp, s) == data, s


def test_qemu_refuses_lazy_count_and_names_it(tmp: Path) -> None:
    p = tmp / "l.qcow2"
    qcow2.create(p, 1 << 20, refcount_mode="lazy-count")
    r = subprocess.run([QEMU_IMG, "info", str(p)], capture_output=True, text=True)
    assert r.returncode != 0 and "lazy-count refcounts" in r.stderr


@pytest.mark.parametrize("extended_l2", [False, True])
def test_lazy_count_guest_writes_touch_no_refcount_block(tmp: Path, extended_l2: bool) -> None:
    p = tmp / "w.qcow2"
    cs = 65536
    qcow2.create(p, 32 << 20, cluster_size=cs, extended_l2=extended_l2, refcount_mode="lazy-count")
    model = bytearray(32 << 20)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"\1" * (4 * cs), 0)  # allocating
        model[: 4 * cs] = b"\1" * (4 * cs)
        img.create_snapshot("s")
        snap = bytes(model)
        before = img.stats.copy()
        img.pwrite(b"\2" * 4096, 4096)  # copy-on-write of a shared cluster, L2 table COW
        model[4096:8192] = b"\2" * 4096
        img.pwrite(b"\3" * 100, cs + 7)  # partial cluster
        model[cs + 7 : cs + 107] = b"\3" * 100
        img.write_zeroes(2 * cs, cs)  # zero
        model[2 * cs : 3 * cs] = bytes(cs)
        img.discard(3 * cs, cs)  # discard
        model[3 * cs : 4 * cs] = bytes(cs)
        img.write_compressed(8 * cs, b"z" * cs)  # compressed
        model[8 * cs : 9 * cs] = b"z" * cs
        img.write_compressed(9 * cs, b"y" * cs)  # packed into the same host cluster
        model[9 * cs : 10 * cs] = b"y" * cs
        img.pwrite(b"\4" * (3 * cs), 20 * cs)  # fresh run
        model[20 * cs : 23 * cs] = b"\4" * (3 * cs)
        img.flush()
        assert (img.stats - before).refcount_writes == 0
        assert img.pread(len(model), 0) == bytes(model)
        assert img.snapshot("s").pread(len(snap), 0) == snap
        assert img.check().clean
    with qcow2.open(p) as img:  # reopened: the live map is rebuilt from the tables
        assert img.pread(len(model), 0) == bytes(model)
    assert _snapshot_raw(p, tmp, None) == bytes(model)  # QEMU, through a standard copy
    assert _snapshot_raw(p, tmp, "s") == snap
