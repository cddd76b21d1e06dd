"""Owner mode (Method 2, "read-only parent"): O(1) snapshot creation, the snapshot tree
(apply makes a child, delete merges or hides), conversion in every direction, and the
owner check. QEMU sees every result through a standard conversion."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import qemu_check, qemu_img, qemu_io, raw_bytes
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
from qcow2.checkcmd import check_file
from qcow2.cli import main as cli_main
from qcow2.owner import node_of

MiB = 1 << 20
GiB = 1 << 30


def _owner_check_clean(img: qcow2.Image) -> None:
    res = img.check()
    assert res.clean, (res.to_dict(), res.messages[:10])


def _create_costs(size: int, mode: str, tmp: Path, n: int = 3) -> list[qcow2.Stats]:
    p = tmp / f"big-{mode}-{size}.qcow2"
    qcow2.create(p, size, preallocation="metadata", refcount_mode=mode)
    out = []
    with qcow2.open(p, "r+") as img:
        for k in range(n):
            before = img.stats.copy()
            img.create_snapshot(f"s{k}")
            out.append(img.stats - before)
    p.unlink()
    return out


_FIELDS = ("l1_writes", "l1_writes_bytes", "l2_writes", "refcount_writes",
           "refcount_writes_bytes", "header_writes", "snapshot_table_writes",
           "snapshot_table_writes_bytes", "syncs", "data_writes")


def test_snapshot_create_is_o1(tmp: Path) -> None:
    """The metadata a snapshot create writes does not depend on the image size: no L2
    table, one L1 cluster, the snapshot table, a header and the refcount blocks of those
    clusters, the same on 1 GiB and on 256 GiB metadata-preallocated images (standard
    mode rewrites every L2 table). The first create of the big image also moves its
    refcount table out of the image's tail, which frees a cluster in one more block."""
    small = _create_costs(1 * GiB, "owner", tmp)
    big = _create_costs(256 * GiB, "owner", tmp)
    for k, (a, b) in enumerate(zip(small, big)):
        assert a.l2_writes == b.l2_writes == 0
        for field in _FIELDS:
            if k == 0 and field.startswith("refcount_writes"):
                per = 1 if field == "refcount_writes" else 65536
                assert getattr(a, field) <= getattr(b, field) <= getattr(a, field) + per, field
                continue
            assert getattr(a, field) == getattr(b, field), (k, field)
    std = _create_costs(1 * GiB, "standard", tmp, n=1)[0]
    assert std.l2_writes > 0  # (the standard mode's cost grows with the tables)


def test_every_cluster_written_after_create_keeps_the_snapshot(tmp: Path) -> None:
    """The trap of an O(1) create: the live L2 tables keep COPIED flags that now speak
    for the snapshot. Writing to every cluster must copy, never write in place."""
    cs = 4096
    size = 2 * MiB
    p = tmp / "t.qcow2"
    qcow2.create(p, size, cluster_size=cs, refcount_mode="owner")
    first = bytes((i * 7) & 0xFF for i in range(size))
    with qcow2.open(p, "r+") as img:
        img.pwrite(first, 0)
        img.create_snapshot("a")
        for c in range(size // cs):
            img.pwrite(b"\xee" * 100, c * cs + 17)  # partial: copy-on-write of each
        second = bytearray(first)
        for c in range(size // cs):
            second[c * cs + 17 : c * cs + 117] = b"\xee" * 100
        assert img.snapshot("a").pread(size, 0) == first
        assert img.pread(size, 0) == bytes(second)
        img.create_snapshot("b")
        img.write_zeroes(0, size)
        assert img.snapshot("b").pread(size, 0) == bytes(second)
        assert img.snapshot("a").pread(size, 0) == first
        _owner_check_clean(img)
    assert qemu_check(p)["returncode"] == 0
    assert raw_bytes(p, tmp, snapshot="a") == first
    assert raw_bytes(p, tmp, snapshot="b") == bytes(second)


def test_delete_with_zero_one_and_several_children(tmp: Path) -> None:
    p = tmp / "d.qcow2"
    qcow2.create(p, 4 * MiB, refcount_mode="owner")
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"1" * MiB, 0)
        img.create_snapshot("a")  # a <- live
        img.pwrite(b"2" * MiB, MiB)
        img.create_snapshot("b")  # a <- b <- live
        img.apply_snapshot("a")  # a <- b, a <- live
        img.pwrite(b"3" * 4096, 0)
        img.delete_snapshot("a")  # two children: hidden, not listed
        assert [s.name for s in img.snapshots] == ["b"]
        hidden = [e for e in img._snapshots._snapshot_entries() if node_of(e).hidden]
        assert [e.name for e in hidden] == ["a"]
        with pytest.raises(qcow2.SnapshotNotFoundError):
            img.apply_snapshot("a")
        assert img.snapshot("b").pread(2 * MiB, 0) == b"1" * MiB + b"2" * MiB
        _owner_check_clean(img)
        img.delete_snapshot("b")  # no child: freed; "a" has one child left: merged
        assert img._snapshots._snapshot_entries() == []
        assert img.pread(MiB, 0) == b"3" * 4096 + b"1" * (MiB - 4096)
        assert img.pread(MiB, MiB) == bytes(MiB)
        _owner_check_clean(img)
        img.create_snapshot("c")
        img.pwrite(b"4" * 8192, 0)
        img.delete_snapshot("c")  # one child (the live state): what it uses is handed over
        _owner_check_clean(img)
        assert img.pread(8192, 0) == b"4" * 8192
    rep = qemu_check(p)
    assert rep["returncode"] == 0 and not rep.get("leaks"), rep


def test_vm_state_belongs_to_its_snapshot(tmp: Path) -> None:
    p = tmp / "v.qcow2"
    qcow2.create(p, 8 * MiB, refcount_mode="owner")
    state = os.urandom(300_000)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"x" * 70000, 0)
        img.create_snapshot("vm", vm_state=state)
        img.pwrite(b"y" * 100, 0)
        img.create_snapshot("plain")
        assert img.read_vm_state("vm") == state
        _owner_check_clean(img)
        img.apply_snapshot("vm")
        assert img.pread(70000, 0) == b"x" * 70000
        img.delete_snapshot("plain")
        img.delete_snapshot("vm")
        _owner_check_clean(img)
        assert img.pread(70000, 0) == b"x" * 70000
    assert qemu_check(p)["returncode"] == 0


def _owner_of(p: Path, cluster: int) -> int:
    with qcow2.open(p) as img:
        rt = img.header.refcount_table_offset
        with open(p, "rb") as f:
            f.seek(rt)
            block = struct.unpack(">Q", f.read(8))[0]
            f.seek(block + 2 * cluster)
            return struct.unpack(">H", f.read(2))[0]


def _set_owner(p: Path, cluster: int, owner: int) -> None:
    with qcow2.open(p) as img:
        rt = img.header.refcount_table_offset
    with open(p, "r+b") as f:
        f.seek(rt)
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * cluster)
        f.write(struct.pack(">H", owner))


def test_check_finds_and_repairs_owner_errors(tmp: Path) -> None:
    p = tmp / "c.qcow2"
    cs = 65536
    qcow2.create(p, 8 * MiB, refcount_mode="owner")
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"a" * cs, 0)
        img.create_snapshot("s")
        img.pwrite(b"b" * cs, 0)
        snap_data = img.snapshot("s").map()[0]["offset"] // cs
        live_data = img.map()[0]["offset"] // cs
        live_id = img.refcounts.live_id
        snap_id = node_of(img.snapshots[0]).node_id
    assert _owner_of(p, snap_data) == snap_id and _owner_of(p, live_data) == live_id
    # the snapshot's data claimed by the live state: a write in place would destroy it
    _set_owner(p, snap_data, live_id)
    res = check_file(p)
    assert res.corruptions >= 1 and res.exit_code == 2
    res = check_file(p, repair="all")
    assert res.clean and res.corruptions_fixed >= 1, res.messages
    assert _owner_of(p, snap_data) == snap_id
    # a leak: an owner without references
    free = os.path.getsize(p) // cs + 3
    with open(p, "r+b") as f:
        f.truncate((free + 1) * cs)
    _set_owner(p, free, live_id)
    res = check_file(p)
    assert res.leaks == 1 and res.exit_code == 3
    res = check_file(p, repair="leaks")
    assert res.clean and res.leaks_fixed == 1
    with qcow2.open(p) as img:
        assert img.pread(cs, 0) == b"b" * cs
        assert img.snapshot("s").pread(cs, 0) == b"a" * cs


def test_repair_creates_a_missing_refcount_block(tmp: Path) -> None:
    """-r all when referenced clusters lie in a range without a refcount block: the
    owners go into a new refcount structure (as the standard repair's rebuild), the
    content of every node stays, and the image converted to standard passes qemu-img."""
    from qcow2_edit import RawImage

    p = tmp / "m.qcow2"
    cs = 4096  # 2048 owners per 16-bit refcount block: one block per 8 MiB of file
    qcow2.create(p, 24 * MiB, cluster_size=cs, refcount_mode="owner")
    rng = np.random.default_rng(7)
    first = rng.integers(0, 256, 20 * MiB, dtype=np.uint8).tobytes()
    with qcow2.open(p, "r+") as img:
        img.pwrite(first, 0)
        img.create_snapshot("s")
        img.pwrite(b"\x55" * (3 * MiB), 9 * MiB)  # copies owned by the live state
        img.create_snapshot("t")
        img.pwrite(b"\x66" * MiB, 11 * MiB)
        live = img.pread(24 * MiB, 0)
        snaps = {name: img.snapshot(name).pread(24 * MiB, 0) for name in ("s", "t")}
    r = RawImage(p)
    assert os.path.getsize(p) > 2 * 8 * MiB and r.reftable(1)
    r.set_reftable(1, 0)  # the owners of file clusters 2048..4095 are gone
    res = check_file(p)
    assert res.corruptions > 2000 and res.exit_code == 2, res.to_dict()
    res = check_file(p, repair="all")
    assert res.corruptions == 0 and res.corruptions_fixed > 2000, (res.to_dict(), res.messages[:5])
    assert "Rebuilding refcount structure" in res.messages
    with qcow2.open(p) as img:
        _owner_check_clean(img)
        assert img.pread(24 * MiB, 0) == live
        for name, data in snaps.items():
            assert img.snapshot(name).pread(24 * MiB, 0) == data
    assert cli_main(["amend", "-o", "refcount_mode=standard", str(p)]) == 0
    rep = json.loads(qemu_img("check", "--output=json", str(p)).stdout)
    assert not rep.get("corruptions") and not rep.get("leaks"), rep
    assert raw_bytes(p, tmp) == live
    for name, data in snaps.items():
        assert raw_bytes(p, tmp, snapshot=name) == data


def test_missing_refcount_block_repair_is_crash_safe(tmp: Path) -> None:
    """A power cut anywhere in that repair leaves the damaged image as it was (same
    findings) or the repaired one, every node's content intact, and repairable."""
    from crashsim import Expect, Run, crash_states, initial_model, plan_states
    from qcow2_edit import RawImage

    from qcow2.check import check_image
    from qcow2.faults import MemoryBackend, Recording, RecordingBackend
    from qcow2.image import Image

    p = tmp / "c.qcow2"
    qcow2.create(p, 12 * MiB, cluster_size=4096, refcount_mode="owner")
    rng = np.random.default_rng(8)
    with qcow2.open(p, "r+") as img:
        img.pwrite(rng.integers(0, 256, 10 * MiB, dtype=np.uint8).tobytes(), 0)
        img.create_snapshot("s")
        img.pwrite(b"\x44" * MiB, 8 * MiB)
    model = initial_model(p)
    RawImage(p).set_reftable(1, 0)
    before = check_file(p)
    assert before.corruptions > 0
    # the repair's I/O, recorded (a repair open: a normal one refuses the damage)
    base = p.read_bytes()
    rec = Recording()
    expect = Expect(model[0], (), frozenset({len(model[0])}), model[1])
    rec.mark(expect)
    img = Image._open(p, writable=True, backing=False, _check_open=True,
                      backend=RecordingBackend(MemoryBackend(base, path=str(p)), rec))
    try:
        assert check_image(img, "all").corruptions == 0
    finally:
        img.close()
    run = Run("owner-block-rebuild", p, base, rec.ops, expect, {})
    states = repaired = 0
    for state in crash_states(run, plan_states(run, 24, seed=3)):
        with qcow2.open(p, "r", backend=MemoryBackend(state.data, path=str(p))) as img:
            assert img.pread(img.size, 0) == model[0], state.label
            assert img.snapshot("s").pread(img.size, 0) == model[1]["s"].content, state.label
            res = img.check()
        assert not res.check_errors and res.corruptions in (0, before.corruptions), \
            (state.label, res.to_dict())
        q = tmp / "state.qcow2"
        q.write_bytes(state.data)
        assert check_file(q, repair="all").corruptions == 0, state.label
        assert check_file(q).clean, state.label
        states += 1
        repaired += not res.corruptions
    assert states > 10 and 0 < repaired < states  # crashes before and after the switch


def test_lost_owner_of_the_active_l1_table_is_repaired(tmp: Path) -> None:
    """The refcount block that holds the active L1 table's owner (the live node's id) is
    gone: check reports the lost owners instead of giving up on the tree, -r all writes
    them back with the live id the L2 tables name, and the result is what QEMU reads."""
    from qcow2_edit import RawImage

    p = tmp / "l.qcow2"
    qcow2.create(p, 64 * MiB, cluster_size=4096, refcount_mode="owner")
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"\x11" * (10 * MiB), 0)
        img.create_snapshot("s")
        img.pwrite(b"\x22" * MiB, 0)
        l1 = img.header.l1_table_offset
        per_block = 4096 * 8 // img.header.refcount_bits
        live = img.pread(img.size, 0)
    raw = RawImage(p)
    assert raw.reftable(l1 // 4096 // per_block)
    raw.set_reftable(l1 // 4096 // per_block, 0)
    before = check_file(p)
    assert before.corruptions > 0 and not before.check_errors
    assert check_file(p, repair="all").corruptions == 0
    assert check_file(p).clean
    with qcow2.open(p, "r+") as img:  # the repaired live node still writes (COW from s)
        assert img.pread(img.size, 0) == live
        img.pwrite(b"\x33" * 4096, 5 * MiB)
    assert check_file(p).clean
    assert qemu_check(p)["returncode"] == 0  # (of a standard copy: conftest.qemu_img)
    expect = bytearray(live)
    expect[5 * MiB:5 * MiB + 4096] = b"\x33" * 4096
    assert raw_bytes(p, tmp) == bytes(expect)
    assert raw_bytes(p, tmp, "s") == b"\x11" * (10 * MiB) + bytes(54 * MiB)


def test_check_rejects_a_copied_flag_on_a_shared_cluster(tmp: Path) -> None:
    p = tmp / "f.qcow2"
    qcow2.create(p, 4 * MiB, refcount_mode="owner")
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"a" * 65536, 0)
        img.create_snapshot("s")
        l1_off = img.header.l1_table_offset
    with open(p, "r+b") as f:  # the live L1 entry claims the snapshot's L2 table
        f.seek(l1_off)
        e = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_off)
        f.write(struct.pack(">Q", e | (1 << 63)))
    res = check_file(p)
    assert res.corruptions == 1 and any("OFLAG_COPIED" in m for m in res.messages)
    assert check_file(p, repair="all").clean


def _qemu_history(p: Path) -> dict[str, bytes]:
    """Snapshots made by QEMU, including data it shares in ways a chain cannot express."""
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k", str(p), "4M")
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "a", str(p))
    qemu_io(p, "write -P 2 0 256k")
    qemu_img("snapshot", "-c", "b", str(p))
    qemu_img("snapshot", "-a", "a", str(p))  # live shares with a, not with b
    qemu_io(p, "write -P 3 512k 64k", "write -c -P 4 2M 64k", "write -c -P 5 2112k 16k")
    return {}


@pytest.mark.parametrize("start", ["standard", "lazy-count"])
def test_conversion_in_every_direction(tmp: Path, start: str) -> None:
    p = tmp / "c.qcow2"
    _qemu_history(p)
    want = {s: raw_bytes(p, tmp, snapshot=s) for s in ("a", "b")}
    want[""] = raw_bytes(p, tmp)
    if start != "standard":
        assert cli_main(["amend", "-o", f"refcount_mode={start}", str(p)]) == 0
    assert cli_main(["amend", "-o", "refcount_mode=owner", str(p)]) == 0
    with qcow2.open(p) as img:
        assert img.refcount_mode == "owner"
        assert [s.name for s in img.snapshots] == ["a", "b"]
        for s in ("a", "b"):
            assert img.snapshot(s).pread(4 * MiB, 0) == want[s]
        assert img.pread(4 * MiB, 0) == want[""]
        _owner_check_clean(img)
    for back in ("lazy-count", "standard"):
        assert cli_main(["amend", "-o", f"refcount_mode={back}", str(p)]) == 0
        assert cli_main(["amend", "-o", "refcount_mode=owner", str(p)]) == 0
    assert cli_main(["amend", "-o", "refcount_mode=standard", str(p)]) == 0
    rep = json.loads(qemu_img("check", "--output=json", str(p)).stdout)
    assert not rep.get("corruptions") and not rep.get("leaks"), rep
    for s in ("a", "b"):
        assert raw_bytes(p, tmp, snapshot=s) == want[s]
    assert raw_bytes(p, tmp) == want[""]


def test_owner_ids_need_wide_refcounts(tmp: Path) -> None:
    with pytest.raises(qcow2.InvalidArgumentError):
        qcow2.create(tmp / "n.qcow2", MiB, refcount_bits=4, refcount_mode="owner")


def test_cli_create_and_info(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp / "o.qcow2"
    assert cli_main(["create", "-f", "qcow2", "-o", "refcount_mode=owner", str(p), "1M"]) == 0
    capsys.readouterr()
    assert cli_main(["info", "--output=json", str(p)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format-specific"]["data"]["refcount-mode"] == "owner"


# ---------------------------------------------------------------- the tree machine --
SIZE = 512 * 1024
CS = 4096


class TreeMachine(RuleBasedStateMachine):
    """Create, apply, write, delete in any order in owner mode (deletes with 0, 1 and
    several children), every node against its model, and the owner check after each
    step; QEMU checks and reads the standard conversion at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="treesm-"))
        self.path = self.dir / "t.qcow2"
        qcow2.create(self.path, SIZE, cluster_size=CS, refcount_mode="owner")
        self.img = qcow2.open(self.path, "r+")
        self.model = bytearray(SIZE)
        self.snaps: dict[str, bytes] = {}
        self.counter = 0
        self.kids_seen: set[int] = set()

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * CS), seed=st.integers(1, 255))
    def write(self, off: int, n: int, seed: int) -> None:
        n = min(n, SIZE - off)
        self.img.pwrite(bytes([seed]) * n, off)
        self.model[off : off + n] = bytes([seed]) * n

    @rule(off=st.integers(0, SIZE // CS - 1), n=st.integers(1, 8), discard=st.booleans())
    def zero(self, off: int, n: int, discard: bool) -> None:
        off *= CS
        n = min(n * CS, SIZE - off)
        if discard:
            self.img.discard(off, n)
        else:
            self.img.write_zeroes(off, n)
        self.model[off : off + n] = bytes(n)

    @rule(c=st.integers(0, SIZE // CS - 1), seed=st.integers(1, 255))
    def compressed(self, c: int, seed: int) -> None:
        data = bytes([seed, 0]) * (CS // 2)
        try:
            self.img.write_compressed(c * CS, data)
        except qcow2.InvalidArgumentError:
            return  # compressed writes go only where there is no data
        self.model[c * CS : (c + 1) * CS] = data

    @precondition(lambda self: len(self.snaps) < 6)
    @rule(vm=st.booleans())
    def create(self, vm: bool) -> None:
        self.counter += 1
        name = f"s{self.counter}"
        self.img.create_snapshot(name, vm_state=bytes([self.counter]) * 3000 if vm else None)
        self.snaps[name] = bytes(self.model)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def apply(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.apply_snapshot(name)
        self.model = bytearray(self.snaps[name])

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        from qcow2.owner import Tree

        name = data.draw(st.sampled_from(sorted(self.snaps)))
        entries = self.img._snapshots._snapshot_entries()
        tree = Tree.of(entries, self.img.refcounts.live_id)
        node = node_of(self.img.find_snapshot(name)).node_id
        self.kids_seen.add(min(len(tree.children(node)), 2))
        self.img.delete_snapshot(name)
        del self.snaps[name]

    @rule()
    def reopen(self) -> None:
        self.img.close()
        self.img = qcow2.open(self.path, "r+")

    @invariant()
    def contents(self) -> None:
        assert self.img.pread(SIZE, 0) == bytes(self.model)
        for name, content in self.snaps.items():
            assert self.img.snapshot(name).pread(SIZE, 0) == content
        _owner_check_clean(self.img)

    def teardown(self) -> None:
        try:
            self.img.close()
            rep = qemu_check(self.path)  # of the standard conversion
            assert rep["returncode"] == 0 and not rep.get("leaks"), rep
            for name, content in self.snaps.items():
                assert raw_bytes(self.path, self.dir, snapshot=name) == content
            assert raw_bytes(self.path, self.dir) == bytes(self.model)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def test_tree_state_machine() -> None:
    run_state_machine_as_test(TreeMachine, settings=settings(
        max_examples=int(os.environ.get("QCOW2_TREE_EXAMPLES", "25")), stateful_step_count=14,
        deadline=None, suppress_health_check=[HealthCheck.too_slow]))


class ConvertMachine(RuleBasedStateMachine):
    """Any history in standard mode (qemu-img's own snapshots too), then owner mode:
    every snapshot keeps its content, the owner check is clean, and the way back is an
    image qemu-img check and compare accept."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="convsm-"))
        self.path = self.dir / "c.qcow2"
        qcow2.create(self.path, SIZE, cluster_size=CS)
        self.model = bytearray(SIZE)
        self.snaps: dict[str, bytes] = {}
        self.counter = 0

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * CS), seed=st.integers(1, 255),
          qemu=st.booleans())
    def write(self, off: int, n: int, seed: int, qemu: bool) -> None:
        n = min(n, SIZE - off)
        if qemu:
            qemu_io(self.path, f"write -P {seed} {off} {n}")
        else:
            with qcow2.open(self.path, "r+") as img:
                img.pwrite(bytes([seed]) * n, off)
        self.model[off : off + n] = bytes([seed]) * n

    @precondition(lambda self: len(self.snaps) < 5)
    @rule(qemu=st.booleans())
    def create(self, qemu: bool) -> None:
        self.counter += 1
        name = f"s{self.counter}"
        if qemu:
            qemu_img("snapshot", "-c", name, str(self.path))
        else:
            with qcow2.open(self.path, "r+") as img:
                img.create_snapshot(name, date_sec=self.counter)
        self.snaps[name] = bytes(self.model)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def apply(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        qemu_img("snapshot", "-a", name, str(self.path))
        self.model = bytearray(self.snaps[name])

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        qemu_img("snapshot", "-d", name, str(self.path))
        del self.snaps[name]

    def teardown(self) -> None:
        try:
            with qcow2.open(self.path, "r+") as img:
                img.set_refcount_mode("owner")
                _owner_check_clean(img)
                assert img.pread(SIZE, 0) == bytes(self.model)
                for name, content in self.snaps.items():
                    assert img.snapshot(name).pread(SIZE, 0) == content
                # and it works as an owner image
                img.pwrite(b"\x99" * CS, 0)
                self.model[:CS] = b"\x99" * CS
                img.set_refcount_mode("standard")
            rep = json.loads(qemu_img("check", "--output=json", str(self.path)).stdout)
            assert not rep.get("corruptions") and not rep.get("leaks"), rep
            for name, content in self.snaps.items():
                assert raw_bytes(self.path, self.dir, snapshot=name) == content
            assert raw_bytes(self.path, self.dir) == bytes(self.model)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def test_conversion_state_machine() -> None:
    run_state_machine_as_test(ConvertMachine, settings=settings(
        max_examples=int(os.environ.get("QCOW2_CONVERT_EXAMPLES", "15")), stateful_step_count=10,
        deadline=None, suppress_health_check=[HealthCheck.too_slow]))


def test_owner_values_are_node_ids(tmp: Path) -> None:
    """What a cluster stores is the id of its owner: the live node's for what it wrote
    after the snapshot, the snapshot's for what it froze."""
    p = tmp / "i.qcow2"
    qcow2.create(p, 4 * MiB, refcount_mode="owner")
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"a" * 65536, 0)
        img.create_snapshot("s")
        img.pwrite(b"b" * 65536, 65536)
        rc = img.refcounts
        owners = rc.owners()
        snap = node_of(img.snapshots[0]).node_id
        a = img.snapshot("s").map()[0]["offset"] // 65536
        b = [m for m in img.map() if m["start"] == 65536][0]["offset"] // 65536
        assert int(owners[a]) == snap and int(owners[b]) == rc.live_id != snap
        assert set(np.unique(owners).tolist()) <= {0, 1, snap, rc.live_id}


def test_tree_view_and_parents(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp / "tree.qcow2"
    qcow2.create(p, 4 * MiB, refcount_mode="owner")
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("base")
        img.create_snapshot("left")
        img.apply_snapshot("base")
        img.create_snapshot("right")
    capsys.readouterr()
    assert cli_main(["snapshot", "-l", "--tree", str(p)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "`-- 1 base", "    |-- 2 left", "    `-- 3 right", "        `-- (current state)"]
    assert cli_main(["info", "--output=json", str(p)]) == 0
    snaps = json.loads(capsys.readouterr().out)["snapshots"]
    assert {s["name"]: s.get("parent") for s in snaps} == {"base": None, "left": "1", "right": "1"}
    assert cli_main(["snapshot", "-d", "base", str(p)]) == 0  # two children: hidden
    capsys.readouterr()
    assert cli_main(["snapshot", "-l", "--tree", str(p)]) == 0
    assert "1 base (deleted" in capsys.readouterr().out
    assert cli_main(["snapshot", "-l", str(p)]) == 0
    assert "base" not in capsys.readouterr().out
    std = tmp / "std.qcow2"
    qcow2.create(std, MiB)
    assert cli_main(["snapshot", "-l", "--tree", str(std)]) == 1


def test_node_ids_run_out_cleanly_and_are_reused(tmp: Path) -> None:
    """8-bit entries hold ids 2..255: one for the live state, 253 for snapshots. The
    next create fails and changes nothing; a deleted snapshot's id is free again."""
    p = tmp / "ids.qcow2"
    qcow2.create(p, MiB, cluster_size=4096, refcount_bits=8, refcount_mode="owner")
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"z" * 4096, 0)
        made = 0
        with pytest.raises(qcow2.SnapshotError, match="node id"):
            while True:
                img.create_snapshot(f"s{made}")
                made += 1
        assert made == 253 and len(img.snapshots) == 253
        _owner_check_clean(img)
        img.delete_snapshot("s100")
        img.create_snapshot("again")
        assert len(img.snapshots) == 253
        _owner_check_clean(img)
        assert img.snapshot("again").pread(4096, 0) == b"z" * 4096
