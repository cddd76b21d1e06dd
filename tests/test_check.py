"""`qcow2 check` / Image.check against `qemu-img check`: same counts, exit codes and
messages on clean, leaky and corrupt images; repairs that leave both tools satisfied and
the guest data unchanged."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import assert_clean, qemu_check, qemu_img, qemu_io
from qcow2_edit import COPIED, OFFSET_MASK, ZERO, RawImage

import qcow2
from qcow2.check import MAX_MESSAGES, CheckResult
from qcow2.checkcmd import check_file
from qcow2.cli import main as cli_main

MB = 1 << 20


# ------------------------------------------------------------------ helpers --
def ours(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def qemu(*argv: str) -> tuple[int, str, str]:
    p = subprocess.run(["qemu-img", *argv], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def _lines(err: str) -> list[str]:
    """Diagnostic lines, sorted and tool-neutral (program-name prefixes and the final
    "Check failed" line dropped, advice naming the tool unified)."""
    out = []
    for ln in err.splitlines():
        ln = ln.removeprefix("qemu-img: ").removeprefix("qcow2: ")
        if ln and not ln.startswith("Check failed"):
            out.append(ln.replace("qemu-img check", "qcow2 check"))
    return sorted(out)


def assert_same_check(path: Path, *extra: str) -> dict:
    """Our JSON report, exit code and diagnostic lines equal qemu-img's."""
    rc_q, out_q, err_q = qemu("check", "--output=json", *extra, str(path))
    rc_o, out_o, err_o = ours("check", "--output=json", *extra, str(path))
    assert rc_o == rc_q, (out_o, err_o, out_q, err_q)
    assert out_o == out_q, (out_o, out_q, err_o, err_q)
    assert _lines(err_o) == _lines(err_q), (err_o, err_q)
    return json.loads(out_q) if out_q.strip() else {}


def raw_or_none(path: Path, tmp: Path) -> bytes | None:
    out = tmp / f"raw-{path.name}.img"
    p = subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(out)],
                       capture_output=True, text=True)
    return out.read_bytes() if p.returncode == 0 else None


def base_image(tmp: Path, name: str = "base.qcow2", opts: tuple[str, ...] = (),
               snapshot: bool = False, compressed: bool = False, size: str = "16M") -> Path:
    p = tmp / name
    qemu_img("create", "-f", "qcow2", *opts, str(p), size)
    qemu_io(p, "write -P 0x11 0 192k", "write -P 0x22 1M 64k", "write -P 0x33 5M 100k")
    if snapshot:
        qemu_img("snapshot", "-c", "s1", str(p))
        qemu_io(p, "write -P 0x44 64k 64k")
    if compressed:
        qemu_io(p, "write -c -P 0x55 8M 64k", "write -c -P 0x66 9M 64k")
    return p


def copy(p: Path, name: str) -> Path:
    q = p.parent / name
    shutil.copyfile(p, q)
    return q


# ------------------------------------------------------------------ clean images --
CLEAN = {
    "default": dict(),
    "snapshot": dict(snapshot=True),
    "compressed": dict(compressed=True),
    "v2": dict(opts=("-o", "compat=0.10")),
    "extl2": dict(opts=("-o", "extended_l2=on")),
    "rc1": dict(opts=("-o", "refcount_bits=1"), compressed=True),
    "rc64": dict(opts=("-o", "refcount_bits=64"), snapshot=True),
    "c512": dict(opts=("-o", "cluster_size=512")),
    "c2M": dict(opts=("-o", "cluster_size=2M"), size="64M"),
    "zstd": dict(opts=("-o", "compression_type=zstd"), compressed=True),
    "prealloc": dict(opts=("-o", "preallocation=metadata")),
    "lazy": dict(opts=("-o", "lazy_refcounts=on")),
}


@pytest.mark.parametrize("kind", sorted(CLEAN))
def test_clean_image_same_report(tmp, kind):
    p = base_image(tmp, **CLEAN[kind])
    rep = assert_same_check(p)
    assert rep["check-errors"] == 0 and "corruptions" not in rep and "leaks" not in rep
    rc, out, err = ours("check", str(p))
    assert rc == 0 and out == qemu("check", str(p))[1]
    assert out.startswith("No errors were found on the image.\n")


def test_our_own_images_same_report(tmp):
    p = tmp / "o.qcow2"
    qcow2.create(p, 64 * MB, preallocation="metadata")
    assert_same_check(p)
    q = tmp / "w.qcow2"
    qcow2.create(q, 64 * MB, extended_l2=True, cluster_size=32768)
    with qcow2.open(q, "r+") as img:
        img.pwrite(b"x" * 100000, 12345)
        img.write_zeroes(2 * MB, MB)
    assert_same_check(q)


def test_preallocated_image_with_copied_flag_damage(tmp):
    """Preallocated images take the fast paths (one run of data clusters); damage in
    them is still found: a missing COPIED flag, a leak, two references."""
    p = tmp / "pre.qcow2"
    qcow2.create(p, 64 * MB, preallocation="metadata")
    r = RawImage(p)
    r.set_l2(100, r.l2(100) & ~COPIED)
    assert assert_same_check(p)["corruptions"] == 1
    assert check_file(p, "all").clean
    r.set_l2(200, r.l2(201))
    rep = assert_same_check(p)
    assert rep["corruptions"] and rep["leaks"]
    assert check_file(p, "all").clean
    assert_clean(p)


def test_api_result_fields(tmp):
    p = base_image(tmp, compressed=True)
    with qcow2.open(p) as img:
        res = img.check()
    q = json.loads(qemu("check", "--output=json", str(p))[1])
    assert isinstance(res, CheckResult) and res.exit_code == 0 and res.clean
    assert res.total_clusters == q["total-clusters"]
    assert res.allocated_clusters == q["allocated-clusters"]
    assert res.compressed_clusters == q["compressed-clusters"]
    assert res.fragmented_clusters == q["fragmented-clusters"]
    assert res.image_end_offset == q["image-end-offset"]


# ------------------------------------------------------------------ damage --
def leak_extra_cluster(r: RawImage) -> None:
    c = r.append_cluster(b"\xaa")
    r.set_refcount(c, 1)


def leak_refcount_two(r: RawImage) -> None:
    c = r.host_cluster(16)  # data at 1M
    r.set_refcount(c, 2)


def two_refs_one_cluster(r: RawImage) -> None:
    r.set_l2(2, r.l2(0))  # guest 128k now shares the host cluster of guest 0


def referenced_refcount_zero(r: RawImage) -> None:
    r.set_refcount(r.host_cluster(16), 0)


def reftable_entry_zero(r: RawImage) -> None:
    r.set_reftable(0, 0)


def refblock_refcount_zero(r: RawImage) -> None:
    r.set_refcount(r.reftable(0) // r.cluster_size, 0)


def reftable_entry_unaligned(r: RawImage) -> None:
    r.set_reftable(0, r.reftable(0) + 512)


def reftable_entry_reserved(r: RawImage) -> None:
    r.set_reftable(0, r.reftable(0) | 1)


def refblock_outside_image(r: RawImage) -> None:
    r.set_reftable(1, 64 * r.cluster_size * 1024)


def l1_copied_cleared(r: RawImage) -> None:
    r.set_l1(0, r.l1(0) & ~COPIED)


def l2_copied_cleared(r: RawImage) -> None:
    r.set_l2(16, r.l2(16) & ~COPIED)


def l1_reserved_bits(r: RawImage) -> None:
    r.set_l1(0, r.l1(0) | 1 << 56)


def l2_reserved_bits(r: RawImage) -> None:
    r.set_l2(16, r.l2(16) | 2)


def data_unaligned(r: RawImage) -> None:
    r.set_l2(16, r.l2(16) + 512)


def prealloc_zero_unaligned(r: RawImage) -> None:
    r.set_l2(16, (r.l2(16) + 512) | ZERO)


def l2_table_unaligned(r: RawImage) -> None:
    r.set_l1(0, r.l1(0) + 512)


def data_past_eof(r: RawImage) -> None:
    r.set_l2(16, ((r.file_size // r.cluster_size + 3) * r.cluster_size) | COPIED)


def compressed_copied(r: RawImage) -> None:
    r.set_l2(128, r.l2(128) | COPIED)  # guest 8M is compressed


def l2_points_at_l1(r: RawImage) -> None:
    r.set_l2(2, r.get("l1_table_offset") | COPIED)


def l2_points_at_refblock(r: RawImage) -> None:
    r.set_l2(2, r.reftable(0) | COPIED)


def l1_points_at_header(r: RawImage) -> None:
    r.set_l1(0, r.get("refcount_table_offset") | COPIED)


def snapshot_l1_unaligned(r: RawImage) -> None:
    off, _ = r.snapshot_l1(0)
    r.set_snapshot_l1(0, offset=off + 512)


def snapshot_l1_too_large(r: RawImage) -> None:
    r.set_snapshot_l1(0, size=(32 << 20) // 8 + 1)


def snapshot_only_leak(r: RawImage) -> None:
    # the snapshot's copy of guest 64k lost its refcount reference: refcount says 2
    off, _ = r.snapshot_l1(0)
    c = (r.l2(1, l1_offset=off) & OFFSET_MASK) // r.cluster_size
    r.set_refcount(c, r.refcount(c) + 1)


def dirty_with_leak(r: RawImage) -> None:
    leak_extra_cluster(r)
    r.set("incompatible_features", r.get("incompatible_features") | 1)


DAMAGE: dict[str, tuple[Callable[[RawImage], None], dict]] = {
    "leak_extra_cluster": (leak_extra_cluster, {}),
    "leak_refcount_two": (leak_refcount_two, {}),
    "two_refs_one_cluster": (two_refs_one_cluster, {}),
    "referenced_refcount_zero": (referenced_refcount_zero, {}),
    "reftable_entry_zero": (reftable_entry_zero, {}),
    "refblock_refcount_zero": (refblock_refcount_zero, {}),
    "reftable_entry_unaligned": (reftable_entry_unaligned, {}),
    "reftable_entry_reserved": (reftable_entry_reserved, {}),
    "refblock_outside_image": (refblock_outside_image, dict(opts=("-o", "cluster_size=4096"))),
    "l1_copied_cleared": (l1_copied_cleared, {}),
    "l2_copied_cleared": (l2_copied_cleared, {}),
    "l1_reserved_bits": (l1_reserved_bits, {}),
    "l2_reserved_bits": (l2_reserved_bits, {}),
    "data_unaligned": (data_unaligned, {}),
    "prealloc_zero_unaligned": (prealloc_zero_unaligned, {}),
    "l2_table_unaligned": (l2_table_unaligned, {}),
    "data_past_eof": (data_past_eof, {}),
    "compressed_copied": (compressed_copied, dict(compressed=True)),
    "l2_points_at_l1": (l2_points_at_l1, {}),
    "l2_points_at_refblock": (l2_points_at_refblock, {}),
    "l1_points_at_reftable": (l1_points_at_header, {}),
    "snapshot_l1_unaligned": (snapshot_l1_unaligned, dict(snapshot=True)),
    "snapshot_l1_too_large": (snapshot_l1_too_large, dict(snapshot=True)),
    "snapshot_only_leak": (snapshot_only_leak, dict(snapshot=True)),
    "dirty_with_leak": (dirty_with_leak, dict(opts=("-o", "lazy_refcounts=on"))),
    "leak_v2": (leak_extra_cluster, dict(opts=("-o", "compat=0.10"))),
    "leak_rc1": (leak_extra_cluster, dict(opts=("-o", "refcount_bits=1"))),
    "corrupt_rc64": (two_refs_one_cluster, dict(opts=("-o", "refcount_bits=64"))),
    "rebuild_extl2": (referenced_refcount_zero, dict(opts=("-o", "extended_l2=on"))),
}


def damaged(tmp: Path, name: str) -> Path:
    fn, kw = DAMAGE[name]
    p = base_image(tmp, **kw)
    fn(RawImage(p))
    return p


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damage_same_report(tmp, name):
    p = damaged(tmp, name)
    before = p.read_bytes()
    rep = assert_same_check(p)
    assert rep.get("corruptions", 0) or rep.get("leaks", 0) or rep.get("check-errors", 0)
    # also the human form, line by line
    rc_q, out_q, _ = qemu("check", str(p))
    rc_o, out_o, _ = ours("check", str(p))
    assert (rc_o, out_o) == (rc_q, out_q)
    assert p.read_bytes() == before, "a check without -r must not write"


# cases where qemu-img's repair and ours report identical figures; the rest need a
# refcount rebuild, where the figures depend on where the new structure goes
SAME_REPAIR_FIGURES = {
    "leak_extra_cluster", "leak_refcount_two", "two_refs_one_cluster", "l1_copied_cleared",
    "l2_copied_cleared", "l1_reserved_bits", "l2_reserved_bits", "data_unaligned",
    "prealloc_zero_unaligned", "compressed_copied", "l2_points_at_l1", "snapshot_only_leak",
    "dirty_with_leak", "leak_v2", "leak_rc1", "corrupt_rc64",
}


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_repair(tmp, name, mode):
    p = damaged(tmp, name)
    data_before = raw_or_none(p, tmp)
    a, b = copy(p, "ours.qcow2"), copy(p, "theirs.qcow2")
    rc_o, out_o, err_o = ours("check", "-r", mode, "--output=json", str(a))
    rc_q, out_q, err_q = qemu("check", "-r", mode, "--output=json", str(b))
    if name in SAME_REPAIR_FIGURES:
        assert rc_o == rc_q, (out_o, err_o, out_q, err_q)
        assert out_o.replace("ours.qcow2", "X") == out_q.replace("theirs.qcow2", "X"), (
            out_o, err_o, out_q, err_q)
    # afterwards both tools agree on the state of our repaired image
    after_q = qemu_check(a)
    assert_same_check(a)
    if mode == "all" and rc_q == 0:
        assert rc_o == 0 and after_q["returncode"] == 0, (out_o, err_o, after_q)
    if mode == "leaks":
        kept = "not freeing leaked clusters" in err_o  # damaged snapshot entries
        assert after_q.get("leaks", 0) == 0 or rc_o == 1 or kept, (out_o, err_o, after_q)
    # guest data as QEMU reads it is unchanged
    if data_before is not None:
        assert raw_or_none(a, tmp) == data_before


@pytest.mark.parametrize("name", ["snapshot_l1_too_large", "snapshot_l1_unaligned"])
def test_repair_keeps_clusters_of_damaged_snapshots(tmp, name):
    """A snapshot whose table entry is damaged may still use its clusters: repairs do not
    free them, so fixing the entry makes the snapshot whole again."""
    p = damaged(tmp, name)
    r = RawImage(p)
    for mode in ("leaks", "all"):
        res = check_file(p, mode)
        assert res.leaks and any("not freeing" in m for m in res.messages)
    # undo the damage to the entry: the snapshot is intact and the image clean
    q = base_image(tmp, "pristine.qcow2", snapshot=True)
    good = RawImage(q).snapshot_l1(0)
    r.set_snapshot_l1(0, offset=good[0], size=good[1])
    rc, out, err = qemu("check", "-r", "all", str(p))  # COPIED flags may need a fix
    assert rc == 0, (out, err)
    assert raw_or_none(p, tmp) == raw_or_none(q, tmp)
    snap = tmp / "snap.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", str(p), str(snap))
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", str(q), str(tmp / "snap2.raw"))
    assert snap.read_bytes() == (tmp / "snap2.raw").read_bytes()


@pytest.mark.parametrize("extra", [8, 2048], ids=["incomplete", "too-large"])
def test_repair_snapshot_table_entries(tmp, extra):
    """A v3 snapshot entry with too little extra data (corruption) or too much (the
    check cannot complete): -r all rewrites the snapshot table, as qemu-img does, and
    both tools then find the image clean with the snapshot intact."""
    p = base_image(tmp, snapshot=True)
    snap_before = tmp / "before.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", str(p), str(snap_before))
    r = RawImage(p)
    vm = r.read(r.snapshot_entry_offsets()[0] + 40, 8)  # vm_state_size_large
    r.rewrite_snapshot_extra(0, vm if extra == 8 else vm + bytes(16) + b"\xee" * (extra - 24))
    q = copy(p, "theirs.qcow2")
    rep = assert_same_check(p)
    assert rep.get("corruptions") == 1 if extra == 8 else rep == {}  # {}: check failed
    rc_o, out_o, err_o = ours("check", "-r", "all", "--output=json", str(p))
    rc_q, out_q, err_q = qemu("check", "-r", "all", "--output=json", str(q))
    assert rc_o == rc_q == 0, (err_o, err_q)
    assert json.loads(out_o)["corruptions-fixed"] == json.loads(out_q)["corruptions-fixed"]
    assert_same_check(p)
    assert_clean(p)
    after = tmp / "after.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", str(p), str(after))
    assert after.read_bytes() == snap_before.read_bytes()
    with qcow2.open(p) as img:
        assert [s.name for s in img.snapshots] == ["s1"]


def test_repair_rebuild_gives_fresh_reftable(tmp):
    p = damaged(tmp, "reftable_entry_zero")
    data = raw_or_none(p, tmp)
    old = RawImage(p).get("refcount_table_offset")
    res = check_file(p, "all")
    assert res.repaired and res.clean and res.corruptions_fixed > 0
    assert any(m == "Rebuilding refcount structure" for m in res.messages)
    assert RawImage(p).get("refcount_table_offset") != old
    assert_clean(p)
    assert raw_or_none(p, tmp) == data
    with qcow2.open(p, "r+") as img:  # usable for writing afterwards
        img.pwrite(b"\x77" * 70000, 3 * MB)
    assert_clean(p)


def test_repair_keeps_leaked_data_clusters_untouched_until_freed(tmp):
    """A rebuild places new refcount blocks only on unreferenced clusters."""
    p = damaged(tmp, "referenced_refcount_zero")
    r = RawImage(p)
    referenced = {r.host_cluster(g) for g in (0, 1, 2, 16, 80, 81)}
    snap = {c: r.read(c * r.cluster_size, r.cluster_size) for c in referenced}
    assert check_file(p, "all").clean
    for c, content in snap.items():
        assert r.read(c * r.cluster_size, r.cluster_size) == content


# ------------------------------------------------------------------ dirty / corrupt --
def test_dirty_image_repaired_on_rw_open_only(tmp):
    p = damaged(tmp, "dirty_with_leak")
    before = p.read_bytes()
    with qcow2.open(p) as img:  # read-only: no repair, no write
        assert img.pread(4, 0) == b"\x11" * 4
    assert p.read_bytes() == before
    assert qemu_check(p)["leaks"] == 1
    with qcow2.open(p, "r+") as img:
        assert img.pread(4, MB) == b"\x22" * 4
        img.pwrite(b"z" * 5000, 7 * MB)
    assert RawImage(p).get("incompatible_features") & 1 == 0
    assert_clean(p)


def test_dirty_image_that_cannot_be_repaired_refuses_rw_open(tmp):
    p = base_image(tmp, opts=("-o", "lazy_refcounts=on"))
    r = RawImage(p)
    data_unaligned(r)  # a corruption no repair can fix (the entry holds data)
    r.set("incompatible_features", r.get("incompatible_features") | 1)
    with pytest.raises(qcow2.CorruptImageError, match="Could not repair dirty image"):
        qcow2.open(p, "r+")
    assert r.get("incompatible_features") & 1  # still dirty
    with qcow2.open(p) as img:  # read-only use as QEMU allows
        assert img.pread(4, 0) == b"\x11" * 4


def test_corrupt_bit_refuses_rw_and_check_repair_clears_it(tmp):
    p = base_image(tmp)
    r = RawImage(p)
    r.set("incompatible_features", r.get("incompatible_features") | 2)
    with pytest.raises(qcow2.CorruptImageError, match="corrupt"):
        qcow2.open(p, "r+")
    with qcow2.open(p) as img:  # read-only opens work
        assert img.pread(3, 0) == b"\x11" * 3
    rc, out, _ = ours("check", str(p))
    assert rc == 0
    rc, out, _ = ours("check", "-r", "all", str(p))
    assert rc == 0
    assert r.get("incompatible_features") & 2 == 0
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"ok", 0)
    assert_clean(p)


def test_image_check_on_open_writable_image(tmp):
    p = tmp / "w.qcow2"
    qcow2.create(p, 32 * MB)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"a" * 300000, 1000)
        res = img.check()  # pending tables and the allocation pool are settled first
        assert res.clean, res.messages
        img.pwrite(b"b" * 1000, 5 * MB)
        assert img.check("all").clean
        img.pwrite(b"c" * 1000, 9 * MB)
    assert_clean(p)
    with qcow2.open(p) as img:
        assert img.pread(3, 5 * MB) == b"bbb" and img.pread(3, 9 * MB) == b"ccc"
        with pytest.raises(qcow2.ReadOnlyError):
            img.check("leaks")
        with pytest.raises(qcow2.InvalidArgumentError):
            img.check("everything")


def test_open_writable_repairs_with_api(tmp):
    p = damaged(tmp, "two_refs_one_cluster")
    with qcow2.open(p, "r+") as img:
        res = img.check("all")
        assert res.repaired and res.clean and res.corruptions_fixed >= 1
        assert img.pread(10, 128 * 1024) == img.pread(10, 0) == b"\x11" * 10
        # the shared cluster is copied on write now, the other guest cluster keeps its data
        img.pwrite(b"\x99" * 10, 128 * 1024)
        assert img.pread(10, 0) == b"\x11" * 10
        assert img.pread(10, 128 * 1024) == b"\x99" * 10
        # the remaining user of the once shared cluster lacks COPIED (QEMU does the same)
        assert img.check("all").clean
    assert_clean(p)


def test_write_guard_has_no_false_positive_on_freed_tables(tmp):
    """The overlap guard refuses data writes onto L2 tables; an L2 table the active L1
    stopped using (copied on write, then freed with its snapshot) is free space, and
    new data may go there: no corruption may be flagged."""
    p = tmp / "g.qcow2"
    qcow2.create(p, 64 * MB)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"\x01" * (2 * MB), 0)
        img.create_snapshot("s")
        img.pwrite(b"\x02" * 4096, 0)  # copies the L2 table and the data cluster
        img.delete_snapshot("s")  # frees the old table and data: reusable now
        for i in range(64):
            img.pwrite(bytes([i]) * 65536, 8 * MB + i * 65536)
        assert not img._corrupt
        assert img.pread(4096, 0) == b"\x02" * 4096
    assert_clean(p)


# ------------------------------------------------------------------ CLI --
def test_cli_human_output_and_exit_codes(tmp):
    p = damaged(tmp, "leak_extra_cluster")
    rc, out, err = ours("check", str(p))
    assert rc == 3
    assert "1 leaked clusters were found on the image.\n" \
           "This means waste of disk space, but no harm to data.\n" in out
    assert err.startswith("Leaked cluster ")
    rc, out, _ = ours("check", "-r", "leaks", str(p))
    assert rc == 0
    assert out.startswith("The following inconsistencies were found and repaired:\n\n"
                          "    1 leaked clusters\n    0 corruptions\n\n"
                          "Double checking the fixed image now...\nNo errors were found")
    rc, out, _ = ours("check", "-q", str(p))
    assert rc == 0 and out == ""


def test_cli_refuses_other_formats_and_bad_files(tmp):
    """qemu-img's exit codes and first lines: 63 for a raw file (no checks for that
    format), 1 for bad options, a missing file, or a missing backing file (the chain is
    opened)."""
    p = base_image(tmp)
    raw = tmp / "r.raw"
    raw.write_bytes(bytes(65536))
    top = tmp / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F",
                    "qcow2", str(top), "1M"], check=True)
    for args in (["-f", "raw", str(p)], [str(raw)], ["-f", "qcow2", str(raw)], ["-f", "foo", str(p)],
                 [str(tmp / "missing.qcow2")], ["-r", "bogus", str(p)], ["--output=xml", str(p)],
                 [str(top)], ["-r", "all", str(top)]):
        rc, out, err = ours("check", *args)
        qrc, qout, qerr = qemu("check", *args)
        assert rc == qrc != 0 and out == qout == "", (args, qerr)
        first = qerr.splitlines()[0].replace("qemu-img:", "qcow2:")
        assert err == first + "\n", (args, qerr, err)


def test_cli_check_failed_exit_1(tmp):
    p = damaged(tmp, "reftable_entry_unaligned")
    rc, out, err = ours("check", str(p))
    assert rc == 1 == qemu("check", str(p))[0]
    assert "Check failed" in err


def test_many_leaks_messages_bounded(tmp):
    p = base_image(tmp)
    r = RawImage(p)
    first = r.append_cluster()
    n = 20000  # more than MAX_MESSAGES leaked clusters, all in the first refcount block
    with open(p, "r+b") as f:
        f.truncate((first + n) * r.cluster_size)
    block = r.reftable(0)
    r.write(block + 2 * first, b"\x00\x01" * n)
    q = qemu_check(p)
    res = check_file(p)
    assert (res.leaks, res.exit_code) == (q["leaks"], q["returncode"]) == (n, 3)
    assert len(res.all_messages()) <= MAX_MESSAGES + 1
    assert res.all_messages()[-1].endswith("more messages not shown)")
    assert check_file(p, "leaks").clean
    assert_clean(p)


def test_compressed_and_snapshot_checks_match_after_engine_writes(tmp):
    """Images our engine wrote on top of qemu's (snapshots, compressed clusters) check
    the same in both tools."""
    p = base_image(tmp, snapshot=True, compressed=True)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"\x01" * 200000, 8 * MB - 1000)  # over a compressed cluster
        img.pwrite(b"\x02" * 5000, 64 * 1024)  # a cluster shared with the snapshot
    assert_same_check(p)
    assert_clean(p)


def test_leak_fix_when_pool_crash_leaked(tmp):
    """A crash between reserving clusters and using them leaks; -r leaks frees them."""
    p = tmp / "c.qcow2"
    qcow2.create(p, 32 * MB)
    img = qcow2.open(p, "r+")
    img.pwrite(b"q" * 70000, 0)
    img.flush()
    img._abandon()  # simulate a crash: the allocation pool is never returned
    with open(p, "r+b") as f:  # the file grew later, so the pool is inside it now
        f.truncate(64 * 65536)
    q = qemu_check(p)
    res = check_file(p)
    assert res.leaks == q.get("leaks", 0) > 0 and res.exit_code == 3
    assert check_file(p, "leaks").clean
    assert_clean(p)
    with qcow2.open(p) as img:
        assert img.pread(70000, 0) == b"q" * 70000


def test_refcount_overflow_counts(tmp):
    p = tmp / "o.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=1", str(p), "8M")
    qemu_io(p, "write -P 1 0 64k")
    r = RawImage(p)
    r.set_l2(1, r.l2(0))
    r.set_l2(2, r.l2(0))
    assert_same_check(p)


def test_encrypted_images_are_checked_without_the_key(tmp):
    """Metadata is never encrypted: LUKS images are checked (and repaired) without the
    key, counting the LUKS header area; qemu-img needs the key to open them."""
    p = tmp / "luks.qcow2"
    secret = ["--object", "secret,id=sec0,data=123456"]
    opts = f"driver=qcow2,file.filename={p},encrypt.key-secret=sec0"
    qemu_img("create", "-q", "-f", "qcow2", *secret, "-o",
             "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", str(p), "16M")
    subprocess.run(["qemu-io", *secret, "--image-opts", opts, "-c", "write -P 0x11 0 192k",
                    "-c", "write -P 0x22 5M 64k"], check=True, capture_output=True)
    leak_extra_cluster(RawImage(p))

    def theirs(*extra: str) -> dict:
        q = qemu("check", "--output=json", *extra, *secret, "--image-opts", opts)
        rep = json.loads(q[1])
        rep.pop("filename")
        return {**rep, "rc": q[0]}

    rc, out, _ = ours("check", "--output=json", str(p))
    mine = json.loads(out)
    mine.pop("filename")
    assert {**mine, "rc": rc} == theirs() and mine["leaks"] == 1
    assert check_file(p, "leaks").clean
    assert theirs()["rc"] == 0
    with pytest.raises(qcow2.UnsupportedFeatureError, match="encrypt"):
        qcow2.open(p)  # reading or writing data needs the key, which we do not handle


def test_bitmaps_are_counted(tmp):
    p = base_image(tmp)
    qemu_img("bitmap", "--add", str(p), "b0")
    qemu_io(p, "write -P 9 2M 64k")  # qemu-io does not update bitmaps; the image stays valid
    assert_same_check(p)
    rep = qemu_check(p)
    assert rep["returncode"] == 0
    res = check_file(p)
    assert res.clean


def test_nothing_unbounded_on_huge_virtual_size(tmp):
    p = tmp / "h.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "64T")
    qemu_io(p, "write -P 3 63T 64k")
    assert_same_check(p)


def test_zero_fields_omitted_in_json(tmp):
    p = tmp / "e.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1M")
    rep = assert_same_check(p)
    assert set(rep) == {"image-end-offset", "total-clusters", "check-errors", "filename", "format"}


def test_check_result_exit_code_ordering():
    assert CheckResult(leaks=2).exit_code == 3
    assert CheckResult(leaks=2, corruptions=1).exit_code == 2
    assert CheckResult(leaks=2, corruptions=1, check_errors=1).exit_code == 1
    assert CheckResult(failure="x").exit_code == 1
    assert CheckResult().exit_code == 0
