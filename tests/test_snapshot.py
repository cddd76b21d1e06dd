"""Internal snapshots against the reference: qemu-img lists, reads, applies, deletes and
checks our snapshots, and we do the same with qemu-img's."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean, qemu_check, qemu_img, qemu_info, qemu_io, raw_bytes
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import qcow2
from qcow2.cli import main as cli_main
from qcow2.format import SnapshotEntry
from qcow2.snapshot import (
    format_snapshot_list,
    next_snapshot_id,
    pack_snapshot_table,
    size_to_str,
)
from qcow2.storage import FileBackend

# every test here runs once per refcount mode (conftest.py's `mode` fixture)
pytestmark = pytest.mark.usefixtures("mode")

MiB = 1 << 20


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _qemu_list(p: Path) -> str:
    return qemu_img("snapshot", "-l", str(p)).stdout


def _qemu_snapshots(p: Path) -> list[dict]:
    return qemu_info(p).get("snapshots", [])


def _active(p: Path) -> bytes:
    with qcow2.open(p) as img:
        return img.pread(img.size, 0)


def _fill(p: Path, size: int, **create_opts) -> bytearray:
    """An image with data, a compressed cluster and a zero cluster, written by qemu-io;
    returns the guest content."""
    qcow2.create(p, size, **create_opts)
    qemu_io(p, "write -P 0x11 0 192k", f"write -P 0x22 {size - 200 * 1024} 100k",
            "write -c -P 0x33 1M 64k", "write -z 256k 64k")
    return bytearray(raw_bytes(p, p.parent))


# ------------------------------------------------------------------ interop: ours -> qemu --
@pytest.mark.parametrize("opts", [
    {},
    {"cluster_size": 4096, "refcount_bits": 8},
    {"compat": "0.10"},
    {"extended_l2": True, "cluster_size": 65536},
    {"cluster_size": 512},
])
def test_our_snapshots_in_qemu(tmp, opts):
    p = tmp / "a.qcow2"
    size = 4 * MiB
    model = _fill(p, size, **opts)
    states: dict[str, bytes] = {}
    with qcow2.open(p, "r+") as img:
        for i, name in enumerate(["first", "second", "third"]):
            rec = img.create_snapshot(name)
            assert rec.name == name and rec.id == str(i + 1) and rec.disk_size == size
            states[name] = bytes(model)
            # overwrite shared data, part of the compressed cluster and a hole
            for off, n in [(4096 * i, 5000), (1 * MiB + 100, 300), (3 * MiB + 7, 70000)]:
                data = _pattern(i * 10 + off, n)
                img.pwrite(data, off)
                model[off : off + n] = data
            assert img.pread(size, 0) == bytes(model)
            for n2, content in states.items():
                assert img.snapshot(n2).pread(size, 0) == content
    assert_clean(p)
    assert raw_bytes(p, tmp) == bytes(model)
    info = _qemu_snapshots(p)
    assert [s["name"] for s in info] == list(states)
    assert [s["id"] for s in info] == ["1", "2", "3"]
    with qcow2.open(p) as img:
        assert format_snapshot_list(img.snapshots) == _qemu_list(p)
    for name, content in states.items():
        assert raw_bytes(p, tmp, snapshot=name) == content
    # qemu-img applies and deletes what we made
    qemu_img("snapshot", "-a", "second", str(p))
    assert_clean(p)
    assert raw_bytes(p, tmp) == states["second"]
    qemu_img("snapshot", "-d", "first", str(p))
    assert_clean(p)
    qemu_img("snapshot", "-d", "second", str(p))
    assert_clean(p)
    assert raw_bytes(p, tmp, snapshot="third") == states["third"]
    assert raw_bytes(p, tmp) == states["second"]
    qemu_img("snapshot", "-d", "third", str(p))
    assert_clean(p)
    assert raw_bytes(p, tmp) == states["second"]


def test_our_apply_and_delete(tmp):
    p = tmp / "a.qcow2"
    size = 2 * MiB
    model = _fill(p, size, cluster_size=4096)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("base")
        base = bytes(model)
        img.pwrite(b"\x55" * 10000, 5000)
        img.discard(1 * MiB, 64 * 1024)
        after = img.pread(size, 0)
        img.create_snapshot("after")
        img.pwrite(b"\x66" * 3000, 1000)
        img.apply_snapshot("base")
        assert img.pread(size, 0) == base
        img.pwrite(b"\x77" * 4096, 0)  # writes after apply must not touch the snapshot
        assert img.snapshot("base").pread(size, 0) == base
    assert_clean(p)
    expect = bytearray(base)
    expect[0:4096] = b"\x77" * 4096
    assert raw_bytes(p, tmp) == bytes(expect)
    assert raw_bytes(p, tmp, snapshot="base") == base
    assert raw_bytes(p, tmp, snapshot="after") == after
    with qcow2.open(p, "r+") as img:
        img.apply_snapshot("2")  # by id
        assert img.pread(size, 0) == after
        img.delete_snapshot("base")
    assert_clean(p)
    assert raw_bytes(p, tmp) == after
    with qcow2.open(p, "r+") as img:
        img.delete_snapshot("after")
        assert img.snapshots == []
        img.pwrite(b"\x88" * 4096, 0)  # COPIED restored: in-place writes are fine again
    assert_clean(p)
    assert qemu_check(p).get("image-end-offset") is not None


def test_delete_releases_everything(tmp):
    """After deleting every snapshot the image uses exactly the clusters it used before
    (qemu-img check would count leaks otherwise; here we also compare the totals)."""
    p = tmp / "a.qcow2"
    _fill(p, 4 * MiB)
    before = qemu_check(p)["allocated-clusters"]
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("a", vm_state=_pattern(1, 300_000))
        img.pwrite(b"x" * 200_000, 0)
        img.create_snapshot("b")
        img.apply_snapshot("a")
        img.delete_snapshot("a")
        img.delete_snapshot("b")
    rep = qemu_check(p)
    assert rep["returncode"] == 0 and rep.get("leaks", 0) == 0
    assert rep["allocated-clusters"] == before


# ------------------------------------------------------------------ interop: qemu -> ours --
def test_qemu_snapshots_in_ours(tmp):
    p = tmp / "q.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16384", str(p), "3M")
    states = {}
    for i, name in enumerate(["s1", "s2", "s3"]):
        qemu_io(p, f"write -P {i + 1} {i * 100}k 150k", f"write -c -P {i + 7} {2048 + 64 * i}k 16k")
        qemu_img("snapshot", "-c", name, str(p))
        states[name] = raw_bytes(p, tmp)
    qemu_io(p, "write -P 9 0 1M")
    active = raw_bytes(p, tmp)
    info = _qemu_snapshots(p)
    with qcow2.open(p) as img:
        recs = img.snapshots
        assert [(r.id, r.name, r.date_sec, r.date_nsec, r.vm_state_size, r.vm_clock_nsec)
                for r in recs] == [(s["id"], s["name"], s["date-sec"], s["date-nsec"],
                                    s["vm-state-size"], s["vm-clock-nsec"]) for s in info]
        assert all(r.icount == 0 and r.disk_size == 3 * MiB for r in recs)
        assert format_snapshot_list(recs) == _qemu_list(p)
        for name, content in states.items():
            view = img.snapshot(name)
            assert view.size == 3 * MiB
            assert view.pread(view.size, 0) == content
            f = view.file()
            f.seek(100)
            assert f.read(5000) == content[100:5100]
        assert img.pread(img.size, 0) == active
    with qcow2.open(p, "r+") as img:
        img.apply_snapshot("s2")
        assert img.pread(img.size, 0) == states["s2"]
    assert_clean(p)
    assert raw_bytes(p, tmp) == states["s2"]
    qemu_io(p, "write -P 10 512k 64k")  # qemu writes after our apply: COW must happen
    assert_clean(p)
    assert raw_bytes(p, tmp, snapshot="s2") == states["s2"]
    with qcow2.open(p, "r+") as img:
        img.delete_snapshot("s1")
        img.delete_snapshot("s2")
    assert_clean(p)
    assert raw_bytes(p, tmp, snapshot="s3") == states["s3"]
    with qcow2.open(p, "r+") as img:
        img.delete_snapshot("s3")
    assert_clean(p)
    assert qemu_info(p).get("snapshots") is None


def test_apply_different_disk_size(tmp):
    p = tmp / "r.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1M")
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "small", str(p))
    small = raw_bytes(p, tmp)
    qemu_img("resize", str(p), "3M")
    qemu_io(p, "write -P 2 1M 2M")
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("big")
        big = img.pread(img.size, 0)
        img.apply_snapshot("small")
        assert img.size == 1 * MiB
        assert img.pread(img.size, 0) == small
        assert img.snapshot("big").size == 3 * MiB
        assert img.snapshot("big").pread(3 * MiB, 0) == big
    assert_clean(p)
    assert qemu_info(p)["virtual-size"] == 1 * MiB
    assert raw_bytes(p, tmp) == small
    with qcow2.open(p, "r+") as img:
        img.apply_snapshot("big")
        assert img.size == 3 * MiB
    assert_clean(p)
    assert raw_bytes(p, tmp) == big
    q = tmp / "q.qcow2"  # qemu-img applies the larger one the same way
    shutil.copy(p, q)
    qemu_img("snapshot", "-a", "small", str(q))
    qemu_img("snapshot", "-a", "big", str(q))
    assert raw_bytes(q, tmp) == big


# ------------------------------------------------------------------ VM state --
@pytest.mark.parametrize("cluster_size,n", [(65536, 0), (65536, 1), (65536, 65537),
                                            (512, 100_000), (4096, 3 * MiB + 5)])
def test_vm_state(tmp, cluster_size, n):
    p = tmp / "v.qcow2"
    size = 1 * MiB + 512  # the VM state starts at the first L1 entry past the disk
    qcow2.create(p, size, cluster_size=cluster_size)
    qemu_io(p, "write -P 0x42 0 100k")
    vm = _pattern(n, n)
    with qcow2.open(p, "r+") as img:
        rec = img.create_snapshot("vm", vm_state=vm)
        assert rec.vm_state_size == n
        img.pwrite(b"\x01" * 512, 0)
        img.create_snapshot("novm")
        assert img.read_vm_state("vm") == vm
        assert img.read_vm_state("novm") == b""
        # the active L1 never maps the VM state
        assert len(img.clusters.l1) == -(-size // img.geo.l1_coverage)
    assert_clean(p)
    listing = _qemu_list(p)
    line = next(ln for ln in listing.splitlines() if re.match(r"1\s+vm\s", ln))
    assert size_to_str(n) in line
    assert _qemu_snapshots(p)[0]["vm-state-size"] == n
    assert raw_bytes(p, tmp, snapshot="vm")[:512] == b"\x42" * 512
    with qcow2.open(p, "r+") as img:
        img.apply_snapshot("vm")
        assert img.read_vm_state("vm") == vm
        assert img.size == size
    assert_clean(p)
    with qcow2.open(p, "r+") as img:
        img.delete_snapshot("vm")
    assert_clean(p)


def test_vm_state_at_qemu_offset(tmp):
    """Our VM state sits where QEMU looks for it: after `qemu-img snapshot -a`, QEMU's
    active image holds the snapshot's whole L1, so the state is readable through the
    guest offset qcow2_vm_state_offset() of the active image."""
    p = tmp / "v.qcow2"
    qcow2.create(p, 3 * MiB + 4096, cluster_size=4096)  # L1 entry covers 2 MiB
    vm = _pattern(7, 100_000)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("vm", vm_state=vm)
        start = -(-img.size // img.geo.l1_coverage) * img.geo.l1_coverage
    assert start == 4 * MiB
    qemu_img("snapshot", "-a", "vm", str(p))
    assert_clean(p)
    with qcow2.open(p) as img:
        # QEMU copied the full snapshot L1 into the active one
        assert len(img.clusters.l1) * img.geo.l1_coverage > start
        buf = bytearray(len(vm))
        img._read_into(memoryview(buf), start, backing=None)
        assert bytes(buf) == vm


def test_vm_state_size_large_semantics(tmp):
    """vm_state_size >= 4 GiB lives in the 64-bit extra field only (the 32-bit one is 0)."""
    big = (5 << 30) + 123
    e = SnapshotEntry(l1_table_offset=0x10000, l1_size=1, id="1", name="x", date_sec=1,
                      date_nsec=2, vm_clock_nsec=3, vm_state_size=big, disk_size=4096, icount=None)
    raw = e.pack()
    assert struct.unpack_from(">I", raw, 32)[0] == 0
    assert struct.unpack_from(">Q", raw, 40)[0] == big
    back, _ = SnapshotEntry.unpack_from(raw, 0)
    assert back.vm_state_size == big and back.icount == 0xFFFFFFFFFFFFFFFF
    # qemu-img shows the 64-bit size of a table we wrote
    p = tmp / "v.qcow2"
    qcow2.create(p, 1 * MiB)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("s")
        ent = replace(img.snapshots[0], vm_state_size=big)
        _rewrite_table(img, [ent])
    assert _qemu_snapshots(p)[0]["vm-state-size"] == big
    assert size_to_str(big) in _qemu_list(p)
    with qcow2.open(p) as img:
        assert img.snapshots[0].vm_state_size == big


def _rewrite_table(img, entries):
    """Write a snapshot table in place of the current one (test helper: same clusters,
    no refcount change, the table must fit)."""
    table = pack_snapshot_table(entries)
    img.storage.pwrite(table, img.header.snapshots_offset, "snapshot_table")
    img._update_header(nb_snapshots=len(entries))
    img._snapshots._snap_cache = None


# ------------------------------------------------------------------ table format --
def test_unknown_extra_data_preserved(tmp):
    p = tmp / "x.qcow2"
    qcow2.create(p, 1 * MiB)
    qemu_io(p, "write -P 1 0 64k")
    blob = bytes(range(40))
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("a")
        e = img.snapshots[0]
        ours = e.unknown_extra  # a mode's own record (owner mode's node), kept in front
        ext = replace(e, unknown_extra=ours + blob, extra_data_size=24 + len(ours + blob),
                      icount=None)
        # the table grows by 40 bytes: still inside its cluster
        _rewrite_table(img, [ext])
    assert_clean(p)
    with qcow2.open(p, "r+") as img:
        got = img.snapshots[0]
        assert got.unknown_extra[len(ours):] == blob and got.icount is None
        img.create_snapshot("b")  # rewrites the table
        img.delete_snapshot("b")
    assert_clean(p)
    with qcow2.open(p) as img:
        got = img.snapshots[0]
        assert got.unknown_extra[len(ours):] == blob
        assert got.extra_data_size == 64 + len(ours)
    # qemu-img rewrites it too (creating a snapshot), and keeps our extra data
    qemu_img("snapshot", "-c", "c", str(p))
    with qcow2.open(p) as img:
        assert img.snapshots[0].unknown_extra[len(ours):] == blob
    listing = _qemu_list(p)
    with qcow2.open(p) as img:
        assert format_snapshot_list(img.snapshots) == listing


def test_too_much_extra_data_is_an_error(tmp):
    p = tmp / "x.qcow2"
    qcow2.create(p, 1 * MiB)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("a")
        e = img.snapshots[0]
        _rewrite_table(img, [replace(e, unknown_extra=bytes(1001), extra_data_size=1025)])
    with qcow2.open(p) as img:
        with pytest.raises(qcow2.FormatError, match="extra"):
            img.snapshots  # noqa: B018
    assert cli_main(["snapshot", "-l", str(p)]) == 1


def test_ids_and_lookup():
    def ent(i, name="n"):
        return SnapshotEntry(0, 0, i, name, 0, 0, 0, 0, 0, 0)
    assert next_snapshot_id([]) == "1"
    assert next_snapshot_id([ent("1"), ent("10"), ent("abc"), ent("7x"), ent(" 3")]) == "11"
    assert next_snapshot_id([ent("99999999999999999999")]) == "0"  # strtoul saturates, wraps
    from qcow2.snapshot import find_snapshot

    entries = [ent("1", "2"), ent("2", "1"), ent("3", "x"), ent("4", "x")]
    assert find_snapshot(entries, "2") == 1  # id first
    assert find_snapshot(entries, "x") == 2  # then the first name
    assert find_snapshot(entries, "nope") == -1


def test_lookup_id_before_name(tmp):
    p = tmp / "l.qcow2"
    qcow2.create(p, 1 * MiB)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("2")  # id 1, name "2"
        img.pwrite(b"a" * 512, 0)
        img.create_snapshot("other")  # id 2
        assert img.snapshot("2").pread(512, 0) == b"a" * 512
        assert img.find_snapshot("2").name == "other"
        img.create_snapshot("other")  # duplicate names are allowed, as in qemu-img
        assert [s.id for s in img.snapshots] == ["1", "2", "3"]
        with pytest.raises(qcow2.SnapshotNotFoundError):
            img.snapshot("missing")
        with pytest.raises(qcow2.SnapshotNotFoundError):
            img.delete_snapshot("missing")
        with pytest.raises(qcow2.SnapshotNotFoundError):
            img.apply_snapshot("missing")
    assert_clean(p)


@pytest.mark.standard_only  # installs a hand-made snapshot table
def test_snapshot_limits(tmp):
    """65,536 snapshots and a 64 MiB table are QEMU's limits: clear errors, no change."""
    p = tmp / "z.qcow2"
    qcow2.create(p, 0)
    base = SnapshotEntry(0, 0, "1", "", 0, 0, 0, 0, 0, 0)
    _install_table(p, [replace(base, id=str(i + 1)) for i in range(65536)])
    before = p.read_bytes()
    with qcow2.open(p, "r+") as img:
        assert len(img.snapshots) == 65536
        with pytest.raises(qcow2.SnapshotError, match="65536"):
            img.create_snapshot("one too many")
    # (qemu-img needs ~15 s to check 65,536 snapshots: compare the file instead)
    assert p.read_bytes() == before
    # 64 MiB: entries with the longest names
    name = "n" * 65535
    near = [replace(base, id=str(i + 1), name=name) for i in range(1022)]
    assert len(pack_snapshot_table(near)) <= 64 * MiB
    _install_table(p, near)
    assert_clean(p)
    before = p.read_bytes()
    with qcow2.open(p, "r+") as img:
        with pytest.raises(qcow2.SnapshotError, match="64 MiB"):
            img.create_snapshot(name)
        with pytest.raises(qcow2.InvalidArgumentError):
            img.create_snapshot("n" * 65536)
        assert len(img.snapshots) == 1022
    assert p.read_bytes() == before
    # QEMU lists names through QEMUSnapshotInfo.name (255 bytes)
    assert [s["name"] for s in _qemu_snapshots(p)] == [name[:255]] * 1022


def _install_table(p: Path, entries) -> None:
    """Give an image a snapshot table in new clusters (with refcounts), as a setup step."""
    with qcow2.open(p, "r+") as img:
        table = pack_snapshot_table(entries)
        cs = img.cluster_size
        n = -(-len(table) // cs)
        off = img.refcounts.allocate(n)
        img.storage.pwrite(table, off, "snapshot_table")
        img.storage.sync()
        old_off, old_size = img.header.snapshots_offset, img._snapshots._table_size()
        img._update_header(nb_snapshots=len(entries), snapshots_offset=off)
        img._snapshots._free_tables(old_off, old_size)
        img._snapshots._snap_cache = None


def test_header_limit_on_open(tmp):
    p = tmp / "z.qcow2"
    qcow2.create(p, 1 * MiB)
    with open(p, "r+b") as f:
        f.seek(60)
        f.write(struct.pack(">IQ", 65537, 65536))
    with pytest.raises(qcow2.FormatError):
        with qcow2.open(p) as img:
            img.snapshots  # noqa: B018


# ------------------------------------------------------------------ refcount overflow --
@pytest.mark.standard_only  # counts standard refcounts
def test_refcount_overflow_bits1(tmp):
    p = tmp / "r1.qcow2"
    qcow2.create(p, 1 * MiB, refcount_bits=1)
    qemu_io(p, "write -P 3 0 256k")
    before = raw_bytes(p, tmp)
    size_before = p.stat().st_size
    with qcow2.open(p, "r+") as img:
        with pytest.raises(qcow2.RefcountOverflowError):
            img.create_snapshot("s")
        assert img.snapshots == []
        img.pwrite(b"z" * 4096, 0)  # still usable, in place
    assert_clean(p)  # QEMU leaks a cluster here; we leak nothing
    after = bytearray(before)
    after[:4096] = b"z" * 4096
    assert raw_bytes(p, tmp) == bytes(after)
    assert p.stat().st_size <= size_before + 65536 * 2


@pytest.mark.standard_only  # counts standard refcounts
def test_refcount_overflow_bits2(tmp):
    p = tmp / "r2.qcow2"
    qcow2.create(p, 1 * MiB, refcount_bits=2)
    qemu_io(p, "write -P 3 0 256k")
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("a")
        img.create_snapshot("b")
        with pytest.raises(qcow2.RefcountOverflowError):
            img.create_snapshot("c")
        assert [s.name for s in img.snapshots] == ["a", "b"]
        img.pwrite(b"q" * 4096, 0)  # COW still works (refcount of the new cluster is 1)
        img.delete_snapshot("a")
        img.create_snapshot("c")
    assert_clean(p)
    assert [s["name"] for s in _qemu_snapshots(p)] == ["b", "c"]


# In lazy-count mode the live state counts 0: only snapshot counts can overflow, one
# snapshot later than in standard mode. (Owner mode stores owners, not counts.)
def test_refcount_overflow_bits1_lazy_count(tmp):
    p = tmp / "r1.qcow2"
    qcow2.create(p, 1 * MiB, refcount_bits=1, refcount_mode="lazy-count")
    qemu_io(p, "write -P 3 0 256k")
    before = raw_bytes(p, tmp)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("s")  # every count becomes 1: fits in one bit
        head = p.read_bytes()[:65536]
        for _ in range(2):  # a second snapshot would count 2
            with pytest.raises(qcow2.RefcountOverflowError):
                img.create_snapshot("t", vm_state=b"v" * 70000)
        assert p.read_bytes()[:65536] == head  # header and tables as they were
        assert [s.name for s in img.snapshots] == ["s"]
        s0 = img.stats.copy()
        img.pwrite(b"z" * 4096, 0)  # copied away from the snapshot's cluster
        assert (img.stats - s0).refcount_writes == 0
        assert img.check().clean
        img.delete_snapshot("s")  # standard now fits again (every count 1)
    assert_clean(p)
    after = bytearray(before)
    after[:4096] = b"z" * 4096
    assert raw_bytes(p, tmp) == bytes(after)


def test_refcount_overflow_bits2_lazy_count(tmp):
    p = tmp / "r2.qcow2"
    qcow2.create(p, 1 * MiB, refcount_bits=2, refcount_mode="lazy-count")
    qemu_io(p, "write -P 3 0 256k")
    with qcow2.open(p, "r+") as img:
        for name in "abc":  # three snapshots fit (standard: two, the live state counts)
            img.create_snapshot(name)
        with pytest.raises(qcow2.RefcountOverflowError):
            img.create_snapshot("d")
        assert [s.name for s in img.snapshots] == ["a", "b", "c"]
        img.pwrite(b"q" * 4096, 0)  # COW still works (the copy counts 0)
        img.delete_snapshot("a")
        img.create_snapshot("d")
        assert img.check().clean
        img.delete_snapshot("b")  # live state + c + d: 3, what standard can count
    assert_clean(p)
    assert [s["name"] for s in _qemu_snapshots(p)] == ["c", "d"]


# ------------------------------------------------------------------ counters --
def test_second_snapshot_writes_no_l2_tables(tmp, mode):
    p = tmp / "c.qcow2"
    qcow2.create(p, 8 * MiB, preallocation="metadata", cluster_size=4096)
    with qcow2.open(p, "r+") as img:
        s0 = img.stats.copy()
        img.create_snapshot("a")
        d1 = img.stats - s0
        s1 = img.stats.copy()
        img.create_snapshot("b")
        d2 = img.stats - s1
    tables = -(-8 * MiB // (4096 * 512))
    # COPIED cleared once in every table (owner mode: in the new live L1 table only)
    assert d1.l2_writes_bytes == (0 if mode == "owner" else tables * 4096)
    assert d2.l2_writes == 0
    assert d1.header_writes == d2.header_writes == 1
    assert d2.snapshot_table_writes == 1
    assert_clean(p)


# ------------------------------------------------------------------ read-only view --
def test_view_map_and_file(tmp):
    p = tmp / "m.qcow2"
    model = _fill(p, 2 * MiB)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("s")
        img.pwrite(b"\x99" * 65536, 0)
        view = img.snapshot("s")
        ext = view.map()
        assert sum(e["length"] for e in ext) == view.size
        for e in ext:
            data = view.pread(e["length"], e["start"])
            if e["zero"] and not e["data"]:
                assert data == bytes(e["length"])
        assert any(e.get("compressed") or (e["data"] and "offset" not in e) for e in ext)
        f = view.file()
        assert f.read() == bytes(model)
        assert not f.writable()
        with pytest.raises(qcow2.InvalidArgumentError):
            view.pread(10, view.size - 5)
        img.delete_snapshot("s")
        with pytest.raises(qcow2.SnapshotNotFoundError):
            view.pread(1, 0)
    with qcow2.open(p) as img:
        with pytest.raises(qcow2.ReadOnlyError):
            img.create_snapshot("x")


def test_view_reads_backing(tmp):
    base = tmp / "base.qcow2"
    qcow2.create(base, 1 * MiB)
    qemu_io(base, "write -P 7 0 1M")
    top = tmp / "top.qcow2"
    qcow2.create(top, backing_file=str(base), backing_format="qcow2")
    with qcow2.open(top, "r+") as img:
        img.pwrite(b"t" * 4096, 4096)
        img.create_snapshot("s")
        img.pwrite(b"u" * 4096, 8192)
        assert img.snapshot("s").pread(3 * 4096, 0) == b"\x07" * 4096 + b"t" * 4096 + b"\x07" * 4096
    assert_clean(top)
    assert raw_bytes(top, tmp, snapshot="s") == _snapshot_bytes(top, "s")


def _snapshot_bytes(p, name):
    with qcow2.open(p) as img:
        v = img.snapshot(name)
        return v.pread(v.size, 0)


# ------------------------------------------------------------------ CLI --
def test_cli(tmp, capsys):
    p = tmp / "c.qcow2"
    qcow2.create(p, 1 * MiB)
    assert cli_main(["snapshot", "-l", str(p)]) == 0
    assert capsys.readouterr().out == ""  # qemu-img prints nothing without snapshots
    assert cli_main(["snapshot", "-c", "one", str(p)]) == 0
    assert cli_main(["snapshot", "-q", "-c", "two", str(p)]) == 0
    assert cli_main(["snapshot", "-c", "x" * 300, str(p)]) == 0  # kept to 255 bytes
    capsys.readouterr()
    assert cli_main(["snapshot", "-l", str(p)]) == 0
    out = capsys.readouterr().out
    assert out == _qemu_list(p)
    assert out.startswith("Snapshot list:\nID        TAG               VM SIZE")
    assert cli_main(["snapshot", str(p)]) == 0  # listing is the default
    assert capsys.readouterr().out == out
    assert "x" * 255 + " " in out and "x" * 256 not in out
    assert cli_main(["snapshot", "-a", "one", str(p)]) == 0
    assert cli_main(["snapshot", "-d", "two", str(p)]) == 0
    assert_clean(p)
    # qemu-img's errors and exit codes
    assert cli_main(["snapshot", "-d", "nope", str(p)]) == 1
    err = capsys.readouterr().err
    q = qemu_img("snapshot", "-d", "nope", str(p), check=False)
    assert q.returncode == 1
    assert err.replace("qcow2:", "qemu-img:") == q.stderr
    assert cli_main(["snapshot", "-d", "1", str(p)]) == 1  # -d looks up names only, as 7.2
    capsys.readouterr()
    assert qemu_img("snapshot", "-d", "1", str(p), check=False).returncode == 1
    assert cli_main(["snapshot", "-a", "nope", str(p)]) == 1
    err = capsys.readouterr().err
    q = qemu_img("snapshot", "-a", "nope", str(p), check=False)
    assert err.replace("qcow2:", "qemu-img:") == q.stderr
    assert cli_main(["snapshot", "-l", "-c", "x", str(p)]) == 1
    assert "Cannot mix" in capsys.readouterr().err
    assert cli_main(["snapshot", "-l", str(tmp / "missing.qcow2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.qcow2" in err
    assert_clean(p)


# ------------------------------------------------------------------ crash safety --
class RecordingBackend(FileBackend):
    """Writes go to the file and to a log of (offset, data) / "sync" records."""

    def __init__(self, path, writable, log):
        super().__init__(path, writable)
        self.log = log

    def pwrite(self, data, offset):
        self.log.append((offset, bytes(data)))
        return super().pwrite(data, offset)

    def pwritev(self, buffers, offset):
        self.log.append((offset, b"".join(bytes(b) for b in buffers)))
        return super().pwritev(buffers, offset)

    def sync(self):
        self.log.append("sync")
        super().sync()

    def truncate(self, length):
        self.log.append(("truncate", length))
        super().truncate(length)


def _replay(initial: bytes, log, n: int, out: Path, seed: int | None = None) -> None:
    """The file after a crash following the first n records; with a seed, the writes
    since the last sync before n persisted or not at random (a device may reorder
    them), else all of them."""
    buf = bytearray(initial)
    last_sync = max([i for i, r in enumerate(log[:n]) if r == "sync"], default=-1)
    rng = random.Random(seed)
    for i, rec in enumerate(log[:n]):
        if rec == "sync":
            continue
        if seed is not None and i > last_sync and rng.random() < 0.5:
            continue
        if rec[0] == "truncate":
            del buf[rec[1]:]
            buf.extend(bytes(max(0, rec[1] - len(buf))))
            continue
        off, data = rec
        if off > len(buf):
            buf.extend(bytes(off - len(buf)))
        buf[off : off + len(data)] = data
    out.write_bytes(bytes(buf))


@pytest.mark.parametrize("op", ["create", "create_vm", "delete", "apply"])
def test_crash_at_every_write(tmp, op):
    p = tmp / "c.qcow2"
    qcow2.create(p, 2 * MiB, cluster_size=4096)
    qemu_io(p, "write -P 1 0 1M", "write -c -P 2 1M 4k")
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("old")
        img.pwrite(b"\x05" * 8192, 4096)
    old_state = raw_bytes(p, tmp, snapshot="old")
    active_before = raw_bytes(p, tmp)
    initial = p.read_bytes()
    log: list = []
    img = qcow2.Image._open(p, True, backend=RecordingBackend(p, True, log))
    try:
        if op == "create":
            img.create_snapshot("new")
        elif op == "create_vm":
            img.create_snapshot("new", vm_state=_pattern(3, 20000))
        elif op == "delete":
            img.delete_snapshot("old")
        else:
            img.apply_snapshot("old")
    finally:
        img.close()
    names_before = ["old"]
    names_after = {"create": ["old", "new"], "create_vm": ["old", "new"], "delete": [],
                   "apply": ["old"]}[op]
    active_after = old_state if op == "apply" else active_before
    # every write boundary (the logs are short: a few dozen records), and at each sync
    # a few random subsets of the writes issued since the previous one
    states = [(n, None) for n in range(len(log) + 1)]
    states += [(i, seed) for i, r in enumerate(log) if r == "sync" for seed in range(3)]
    c = tmp / "crash.qcow2"
    for n, seed in states:
        _replay(initial, log, n, c, seed)
        # The header write is the commit point: before it the old image is intact,
        # after it the new one is complete. Either way qemu-img finds nothing at all
        # (no COPIED flag or refcount half changed, not even a leak).
        assert_clean(c)
        names = [s["name"] for s in _qemu_snapshots(c)]
        assert names in (names_before, names_after), (op, n, names)
        active = raw_bytes(c, tmp)
        new = names == names_after if op != "apply" else active == active_after
        assert active == (active_after if new else active_before), (op, n)
        if "old" in names:
            assert raw_bytes(c, tmp, snapshot="old") == old_state


# ------------------------------------------------------------------ state machine --
SIZE = 256 * 1024
CS = 4096


class SnapshotMachine(RuleBasedStateMachine):
    """Writes, snapshot create/apply/delete against a model: one bytearray per snapshot."""

    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="snapsm-"))
        self.path = self.dir / "m.qcow2"
        qcow2.create(self.path, SIZE, cluster_size=CS)
        self.img = qcow2.open(self.path, "r+")
        self.model = bytearray(SIZE)
        self.snaps: dict[str, bytes] = {}
        self.counter = 0

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * CS), seed=st.integers(0, 255))
    def write(self, off, n, seed):
        n = min(n, SIZE - off)
        data = bytes([seed]) * n
        self.img.pwrite(data, off)
        self.model[off : off + n] = data

    @rule(off=st.integers(0, SIZE // CS - 1), n=st.integers(1, 4))
    def zero(self, off, n):
        off *= CS
        n = min(n * CS, SIZE - off)
        self.img.write_zeroes(off, n)
        self.model[off : off + n] = bytes(n)

    @precondition(lambda self: len(self.snaps) < 6)
    @rule(vm=st.booleans())
    def create(self, vm):
        self.counter += 1
        name = f"s{self.counter}"
        state = _pattern(self.counter, 5000) if vm else None
        self.img.create_snapshot(name, vm_state=state)
        self.snaps[name] = bytes(self.model)
        if vm:
            assert self.img.read_vm_state(name) == state

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def apply(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.apply_snapshot(name)
        self.model = bytearray(self.snaps[name])

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.delete_snapshot(name)
        del self.snaps[name]

    @rule()
    def reopen(self):
        self.img.close()
        self.img = qcow2.open(self.path, "r+")

    @invariant()
    def contents(self):
        assert self.img.pread(SIZE, 0) == bytes(self.model)
        for name, content in self.snaps.items():
            assert self.img.snapshot(name).pread(SIZE, 0) == content

    def teardown(self):
        try:
            self.img.close()
            rep = qemu_check(self.path)
            assert rep["returncode"] == 0 and rep.get("corruptions", 0) == 0 \
                and rep.get("leaks", 0) == 0, json.dumps(rep)
            assert [s["name"] for s in _qemu_snapshots(self.path)] == list(self.snaps)
            for name, content in self.snaps.items():
                assert raw_bytes(self.path, self.dir, snapshot=name) == content
            assert raw_bytes(self.path, self.dir) == bytes(self.model)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def test_snapshot_state_machine(mode: str) -> None:
    run_state_machine_as_test(SnapshotMachine, settings=settings(
        max_examples=int(os.environ.get("QCOW2_SNAPSHOT_EXAMPLES", "15")), stateful_step_count=12,
        deadline=None, suppress_health_check=[HealthCheck.too_slow]))


@pytest.mark.standard_only  # counts standard refcounts
def test_refs_are_counted_per_l1(tmp):
    """Reference counts follow QEMU's rule (one per L1 table reaching a cluster): with two
    snapshots and a COW'd active table, every data cluster of the original table has 3."""
    p = tmp / "n.qcow2"
    qcow2.create(p, 1 * MiB, cluster_size=4096)
    qemu_io(p, "write -P 1 0 64k")
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("a")
        img.create_snapshot("b")
        img.pwrite(b"x", 0)  # COW of the L2 table and of one data cluster
        l2 = [int(x) & 0x00FFFFFFFFFFFE00 for x in img.clusters.l1 if int(x)]
        table = img.clusters.l2cache.get(l2[0])
        hosts = np.array([int(x) & 0x00FFFFFFFFFFFE00 for x in table[1:16]]) // 4096
        assert (img.refcounts.get_many(hosts) == 3).all()
    assert_clean(p)


# ------------------------------------------------------------------ bad input --
def _l1_and_l2(p):
    with qcow2.open(p) as img:
        l1_off = img.header.l1_table_offset
        l2_off = int(img.clusters.l1[0]) & 0x00FFFFFFFFFFFE00
    return l1_off, l2_off


@pytest.mark.standard_only  # edits standard metadata by hand
def test_misaligned_l2_entry_is_refused(tmp):
    p = tmp / "bad.qcow2"
    qcow2.create(p, 1 * MiB)
    qemu_io(p, "write -P 1 0 128k")
    _l1, l2_off = _l1_and_l2(p)
    with open(p, "r+b") as f:  # second entry: data offset 0x...200 (not cluster aligned)
        f.seek(l2_off + 8)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2_off + 8)
        f.write(struct.pack(">Q", entry | 0x200))
    before = p.read_bytes()
    with qcow2.open(p, "r+") as img:
        with pytest.raises(qcow2.CorruptImageError, match="aligned"):
            img.create_snapshot("s")
        assert img.snapshots == []
    assert p.read_bytes()[:4096] == before[:4096]  # header unchanged


@pytest.mark.standard_only  # edits standard metadata by hand
def test_l2_entry_past_eof_is_refused(tmp):
    p = tmp / "bad.qcow2"
    qcow2.create(p, 1 * MiB)
    qemu_io(p, "write -P 1 0 128k")
    _l1, l2_off = _l1_and_l2(p)
    with open(p, "r+b") as f:
        f.seek(l2_off)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 50)))  # 1 PiB: far past the file
    with qcow2.open(p, "r+") as img:
        with pytest.raises(qcow2.CorruptImageError, match="past the end"):
            img.create_snapshot("s")


def test_bad_snapshot_l1_is_refused(tmp):
    p = tmp / "bad.qcow2"
    qcow2.create(p, 1 * MiB)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("s", vm_state=b"state")
        e = img.snapshots[0]
        _rewrite_table(img, [replace(e, l1_table_offset=e.l1_table_offset + 512)])
    with qcow2.open(p, "r+") as img:
        for op in (img.apply_snapshot, img.delete_snapshot, img.snapshot, img.read_vm_state):
            with pytest.raises(qcow2.CorruptImageError, match="L1"):
                op("s")
    assert cli_main(["snapshot", "-a", "s", str(p)]) == 1


def test_truncated_snapshot_table(tmp):
    p = tmp / "t.qcow2"
    qcow2.create(p, 1 * MiB)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("s")
        table = pack_snapshot_table(img.snapshots)
    # the table again, in a last cluster of its own, cut in the middle of its entry
    size = p.stat().st_size
    end = -(-size // 65536) * 65536
    with open(p, "r+b") as f:
        f.seek(end)
        f.write(table[:50])  # past the 40-byte fixed part, short of the id and name
        f.seek(64)
        f.write(struct.pack(">Q", end))
    with qcow2.open(p) as img:
        with pytest.raises(qcow2.FormatError, match="truncated"):
            img.snapshots  # noqa: B018
    assert cli_main(["snapshot", "-l", str(p)]) == 1


@pytest.mark.standard_only  # compares standard refcount blocks
def test_abort_restores_everything(tmp):
    """An error inside the transaction (here: the refcount overflow of a second
    snapshot with refcount_bits=1 after a first failed one) leaves memory and file as
    they were, and the image stays usable."""
    p = tmp / "a.qcow2"
    qcow2.create(p, 1 * MiB, refcount_bits=1)
    qemu_io(p, "write -P 2 0 64k")
    before = p.read_bytes()
    with qcow2.open(p, "r+") as img:
        for _ in range(2):
            with pytest.raises(qcow2.RefcountOverflowError):
                img.create_snapshot("s", vm_state=b"v" * 70000)
        img.pwrite(b"w" * 512, 70000)
        assert img.pread(512, 70000) == b"w" * 512
    assert_clean(p)
    assert p.read_bytes()[:4096] == before[:4096]


def test_list_pads_names_by_bytes_as_qemu(tmp):
    """A non-ASCII tag: qemu-img pads by bytes (printf), so its column is one space
    narrower per extra byte; `qcow2 snapshot -l` must print the same."""
    p = tmp / "u.qcow2"
    qcow2.create(p, 1 << 20)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("é1")
        img.create_snapshot("plain")
    with qcow2.open(p) as img:
        assert format_snapshot_list(img.snapshots) == _qemu_list(p)


# ------------------------------------------------------------------ share_from_snapshot --
@pytest.mark.parametrize("opts", [{}, {"extended_l2": True}])
def test_share_from_snapshot(tmp, mode, opts):
    """A range of the active state reverted to a snapshot by referencing its clusters:
    QEMU reads the snapshot's data there, checks the image clean, and a write after it
    copies the cluster (the snapshot keeps its data). Owner mode shares only with the
    live state's parent and otherwise changes nothing."""
    from qcow2.errors import InvalidArgumentError, ReadOnlyError, SnapshotNotFoundError

    p = tmp / "s.qcow2"
    cs = 65536
    qcow2.create(p, MiB, cluster_size=cs, **opts)
    with qcow2.open(p, "r+") as img:
        img.pwrite(_pattern(1, 8 * cs), 0)
        img.write_compressed(8 * cs, _pattern(2, 1000) * 65 + bytes(cs - 65000))
        img.create_snapshot("a")
        img.pwrite(_pattern(3, 9 * cs), 0)
        img.create_snapshot("b")
        img.pwrite(_pattern(4, 2 * cs), 0)
        want = bytearray(img.pread(MiB, 0))
        a, b = img.snapshot("a").pread(MiB, 0), img.snapshot("b").pread(MiB, 0)
        host_a = img.snapshot("a").clusters.get(0)[0] & ~(1 << 63)
        with pytest.raises(InvalidArgumentError):
            img.share_from_snapshot("a", 100, cs)
        with pytest.raises(InvalidArgumentError):
            img.share_from_snapshot("a", 0, 2 * MiB)
        with pytest.raises(SnapshotNotFoundError):
            img.share_from_snapshot("nope", 0, cs)
        # "a" is the live state's grandparent: not in owner mode
        got = img.share_from_snapshot("a", 0, 3 * cs)
        assert got == (mode != "owner")
        if got:
            want[: 3 * cs] = a[: 3 * cs]
            assert img.clusters.get(0)[0] == host_a  # that very cluster, not a copy
        assert img.share_from_snapshot("b", cs, cs)  # the parent: in every mode
        assert img.clusters.get(1)[0] == img.snapshot("b").clusters.get(1)[0] & ~(1 << 63)
        want[cs : 2 * cs] = b[cs : 2 * cs]
        assert img.share_from_snapshot("b", 4 * cs, 2 * cs)  # shared already: no change
        if mode != "owner":
            assert img.share_from_snapshot("a", 8 * cs, cs)  # a compressed cluster
            want[8 * cs : 9 * cs] = a[8 * cs : 9 * cs]
        assert img.pread(MiB, 0) == want
        img.pwrite(b"\x77" * 100, 50)  # copy-on-write: "a" keeps its data
        want[50:150] = b"\x77" * 100
    assert_clean(p)
    with qcow2.open(p) as img:  # (ours also verifies the mode's own rules)
        res = img.check()
        assert res.clean, (res.to_dict(), res.messages[:10])
    assert raw_bytes(p, tmp) == want
    assert raw_bytes(p, tmp, "a") == a and raw_bytes(p, tmp, "b") == b
    with qcow2.open(p) as img, pytest.raises(ReadOnlyError):
        img.share_from_snapshot("a", 0, cs)
    with qcow2.open(p, "r+") as img:
        img.delete_snapshot("a")
        img.delete_snapshot("b")
        img.pwrite(b"\x55" * 10, 8 * cs + 5)  # in place or not: whatever the flags say
        want[8 * cs + 5 : 8 * cs + 15] = b"\x55" * 10
    assert_clean(p)
    assert raw_bytes(p, tmp) == want
