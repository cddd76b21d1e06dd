"""Hostile images, round 2 (issue 15): images made by qemu-img / qemu-io, a few bytes
patched, then used the way a program would. Each failure class of the issue is one test:
the library answers with a Qcow2Error (never another exception, a hang or an unbounded
allocation), never writes onto metadata, and `check -r all` leaves an image qemu-img
calls clean. What QEMU does with the same image is asserted alongside where it matters.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import qemu_check, qemu_img, qemu_io
from qcow2_edit import OFFSET_MASK, RawImage

import qcow2
from qcow2.checkcmd import check_file

K, M, G = 1 << 10, 1 << 20, 1 << 30
pytestmark = pytest.mark.standard_only  # (the damage edits standard refcounts by hand)


# ------------------------------------------------------------------ helpers --
def _address_space() -> int:
    """This process's virtual size (a forked child starts with all of it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def in_child(fn: Callable[..., Any], *args: Any, timeout: float = 60,
             mem: int = 1 << 30) -> tuple[str, Any]:
    """Run fn(*args) in a forked child with a time limit and mem bytes of address space
    beyond what it inherits. Returns ("ok", result) / ("qcow2", message) /
    ("other", "Type: message") / ("hang", None)."""
    limit = _address_space() + mem
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.alarm(int(timeout))
            try:
                out: tuple[str, Any] = ("ok", fn(*args))
            except qcow2.Qcow2Error as exc:
                out = ("qcow2", f"{type(exc).__name__}: {exc}")
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                out = ("other", f"{type(exc).__name__}: {exc}")
            data = pickle.dumps(out)
        except BaseException as exc:  # noqa: BLE001
            data = pickle.dumps(("other", repr(exc)))
        os.write(w, data)
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        return "hang", None
    if not chunks:
        return "other", f"child died with status {status}"
    return pickle.loads(b"".join(chunks))


def make(tmp: Path, name: str = "img.qcow2", size: str = "64M", opts: str | None = None,
         writes: tuple[str, ...] = ("write -q -P 0x11 0 128k",)) -> Path:
    p = tmp / name
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), str(p), size)
    if writes:
        qemu_io(p, *writes)
    return p


def qemu_clean(p: Path) -> bool:
    rep = qemu_check(p)
    return rep["returncode"] == 0 and not rep.get("corruptions") and not rep.get("leaks")


def corrupt_bit(p: Path) -> bool:
    return bool(RawImage(p).get("incompatible_features") & 2)


def repair_and_verify(p: Path) -> None:
    """`check -r all` repairs what the refused write left behind; qemu-img agrees."""
    res = check_file(p, "all")
    assert res.failure is None
    assert not res.corruptions and not res.check_errors, res.to_dict()
    assert qemu_clean(p), qemu_check(p)


def refused_write(p: Path, action: Callable[[qcow2.Image], None]) -> str:
    """Open read-write and run action: it must be refused with a Qcow2Error."""
    with pytest.raises(qcow2.Qcow2Error) as ei:  # noqa: PT012 - open and act
        with qcow2.open(p, "r+") as img:
            action(img)
    return str(ei.value)


# ------------------------------------------------ 1-3, 14: writes onto metadata --
def test_zeroed_refblock_snapshot_refused_and_repairable(tmp):
    """Class 1: every refcount 0, then create_snapshot. QEMU: "Preventing invalid write
    on metadata", corrupt bit, `check -r all` repairs. Before: the new L1 table went over
    the header."""
    p = make(tmp)
    r = RawImage(p)
    r.write(r.reftable(0) & OFFSET_MASK, bytes(r.cluster_size))
    before_header = r.read(0, 512)
    msg = refused_write(p, lambda img: img.create_snapshot("s1"))
    assert "metadata" in msg or "Refcount" in msg
    assert RawImage(p).read(0, 104)[:4] == b"QFI\xfb"
    assert RawImage(p).read(8, 64) == before_header[8:72]  # tables named by the header kept
    assert qemu_img("info", str(p)).returncode == 0
    repair_and_verify(p)
    with qcow2.open(p, "r+") as img:  # usable again, data intact
        img.create_snapshot("s1")
        assert img.pread(128 * K, 0) == b"\x11" * (128 * K)
    assert qemu_clean(p)


def test_l1_entry_past_eof_is_not_allocated_to_data(tmp):
    """Class 2: an active L1 entry pointing at the cluster just past the end of the file;
    a data write allocating that cluster would become that range's L2 table."""
    p = make(tmp, size="2G")
    r = RawImage(p)
    cs = r.cluster_size
    end = -(-r.file_size // cs) * cs
    r.set_l1(1, end | (1 << 63))
    msg = refused_write(p, lambda img: img.pwrite(b"\x77" * (64 * K), 4 * M))
    assert "overlaps with an active L2 table" in msg
    assert corrupt_bit(p)
    assert RawImage(p).file_size <= end or RawImage(p).read(end, 64 * K) != b"\x77" * (64 * K)
    with pytest.raises(qcow2.CorruptImageError):
        qcow2.open(p, "r+")


def test_free_snapshot_table_is_not_overwritten(tmp):
    """Class 3: the snapshot table's refcount set to 0, then a 64 KiB write: it landed on
    the snapshot table and destroyed the snapshot list."""
    p = make(tmp)
    qemu_img("snapshot", "-c", "s1", str(p))
    r = RawImage(p)
    r.set_refcount(r.get("snapshots_offset") // r.cluster_size, 0)
    msg = refused_write(p, lambda img: img.pwrite(b"\x55" * (64 * K), 8 * M))
    assert "snapshot table" in msg
    assert corrupt_bit(p)
    out = qemu_img("snapshot", "-l", str(p)).stdout
    assert "s1" in out
    repair_and_verify(p)
    with qcow2.open(p) as img:
        assert [s.name for s in img.snapshots] == ["s1"]


def test_every_metadata_kind_is_guarded(tmp):
    """The guard knows every kind: for each, make its cluster free in the refcounts and
    check that a write allocating it is refused."""
    p = make(tmp, writes=("write -q -P 0x11 0 128k",))
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -q -P 0x22 0 64k")  # the active L2 table and the snapshot's differ
    base = RawImage(p)
    cs = base.cluster_size
    sn_l1, _ = base.snapshot_l1(0)
    kinds = {
        "an inactive L1 table": sn_l1 // cs,
        "an inactive L2 table": (base.u64(sn_l1) & OFFSET_MASK) // cs,
    }  # (the snapshot table: test_free_snapshot_table_is_not_overwritten)
    for name, cluster in kinds.items():
        q = tmp / f"k{cluster}.qcow2"
        q.write_bytes(p.read_bytes())
        RawImage(q).set_refcount(cluster, 0)
        # (a snapshot allocates single clusters: the first free one is the victim)
        msg = refused_write(q, lambda img: img.create_snapshot("s2"))
        assert name in msg, (name, msg)
        assert corrupt_bit(q)
        assert qemu_img("snapshot", "-l", str(q)).stdout.count("s1") == 1


def test_shared_refcount_block_is_corruption_not_assertion(tmp):
    """Class 14: two refcount-table entries naming one block, then create_snapshot."""
    p = make(tmp, size="8G", writes=("write -q -P 1 0 64k", "write -q -P 2 4G 64k"))
    r = RawImage(p)
    r.set_reftable(1, r.reftable(0))
    msg = refused_write(p, lambda img: img.create_snapshot("s1"))
    assert "refcount" in msg.lower()
    res = check_file(p)
    assert res.corruptions and res.exit_code == 2
    assert qemu_check(p)["returncode"] == 2
    repair_and_verify(p)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("s1")
        assert img.pread(64 * K, 4 * G) == b"\x02" * (64 * K)
    assert qemu_clean(p)


@pytest.mark.parametrize("target", ["l1_table_offset", "refcount_table_offset"])
def test_misplaced_refcount_block_is_corruption(tmp, target):
    """A refcount-table entry naming the L1 table or the refcount table as a block."""
    p = make(tmp)
    r = RawImage(p)
    r.set_reftable(1, r.get(target))
    msg = refused_write(p, lambda img: img.pwrite(b"x" * (64 * K), 0))
    assert "refcount block overlaps" in msg
    assert check_file(p).exit_code == 2 == qemu_check(p)["returncode"]
    repair_and_verify(p)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"y" * (64 * K), 0)
    assert qemu_clean(p)


def test_reftable_hole_under_metadata(tmp):
    """Class 8: reftable[0] = 0, then pwrite: an AssertionError in the refcount update."""
    p = make(tmp)
    RawImage(p).set_reftable(0, 0)
    msg = refused_write(p, lambda img: img.pwrite(b"x" * (64 * K), 8 * M))
    assert "check -r all" in msg
    repair_and_verify(p)


# ------------------------------------------------------------------ 4-9: bounds --
def _check_dict(path: str) -> dict[str, Any]:
    res = check_file(path)
    return {"failure": res.failure, "exit": res.exit_code}


def test_check_of_huge_sparse_file_is_bounded(tmp):
    """Class 4: 512-byte clusters, a 1 TiB sparse tail: 16 GiB of counts before."""
    p = make(tmp, opts="cluster_size=512", writes=("write -q -P 1 0 4k",))
    os.truncate(p, 1 << 40)
    q = subprocess.run(["qemu-img", "check", str(p)], capture_output=True, text=True)
    assert q.returncode == 1 and "File too large" in q.stderr
    kind, out = in_child(_check_dict, str(p), mem=1 << 30)
    assert kind == "ok" and out["failure"] == "File too large", (kind, out)
    cli = subprocess.run([sys.executable, "-m", "qcow2", "check", str(p)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1 and "Check failed: File too large" in cli.stderr


def _snapshot_entry(p: Path) -> tuple[RawImage, int]:
    r = RawImage(p)
    return r, r.snapshot_entry_offsets()[0]


def _vm_state(path: str) -> int:
    with qcow2.open(path) as img:
        return len(img.read_vm_state("s1"))


def test_vm_state_size_is_bounded(tmp):
    """Class 5: vm_state_size 2^63: MemoryError / OverflowError before."""
    p = make(tmp)
    qemu_img("snapshot", "-c", "s1", str(p))
    r, pos = _snapshot_entry(p)
    r.write(pos + 40, struct.pack(">Q", 1 << 63))  # vm_state_size_large (extra data)
    kind, out = in_child(_vm_state, str(p))
    assert kind == "qcow2" and "VM state" in out, (kind, out)


def test_snapshot_l1_offset_beyond_reads_fails_check_as_qemu(tmp):
    """Class 6: a snapshot l1_table_offset of 2^63: OverflowError in check before."""
    p = make(tmp)
    qemu_img("snapshot", "-c", "s1", str(p))
    r, pos = _snapshot_entry(p)
    r.write(pos, struct.pack(">Q", 1 << 63))
    q = subprocess.run(["qemu-img", "check", str(p)], capture_output=True, text=True)
    kind, out = in_child(_check_dict, str(p))
    assert kind == "ok", out
    assert q.returncode == 1 and out["exit"] == 1 and out["failure"] == "Input/output error"


def _apply(path: str) -> None:
    with qcow2.open(path, "r+") as img:
        img.apply_snapshot("s1")


def _snap_map(path: str) -> int:
    with qcow2.open(path) as img:
        return len(img.snapshot("s1").map())


@pytest.mark.parametrize("disk_size", [(1 << 64) - 1, 1 << 60])
def test_snapshot_disk_size_is_bounded(tmp, disk_size):
    """Class 7: disk_size 2^64-1: apply_snapshot MemoryError; 2^60: map ran forever."""
    p = make(tmp)
    qemu_img("snapshot", "-c", "s1", str(p))
    r, pos = _snapshot_entry(p)
    r.write(pos + 48, struct.pack(">Q", disk_size))
    for fn in (_snap_map, _apply):
        kind, out = in_child(fn, str(p), timeout=30)
        assert kind == "qcow2" and "disk size" in out, (fn.__name__, kind, out)
    with qcow2.open(p, "r+") as img:  # a damaged snapshot can still be deleted
        img.delete_snapshot("s1")
    assert qemu_clean(p)


def test_repair_with_sparse_tail_and_lost_refblock(tmp):
    """Class 9: check -r all, sparse tail + lost refcount block: ValueError before."""
    p = make(tmp)
    os.truncate(p, 16 * G)
    RawImage(p).set_reftable(0, 0)
    res = check_file(p, "all")
    assert res.failure is None and not res.corruptions, res.to_dict()
    assert qemu_clean(p)
    with qcow2.open(p) as img:
        assert img.pread(128 * K, 0) == b"\x11" * (128 * K)


# ------------------------------------------------------------ 10-11: special files --
def _open_close(path: str) -> str:
    with qcow2.open(path) as img:
        return img.backing_file or ""


@pytest.mark.parametrize("fmt", ["raw", "qcow2", None])
@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_backing_file_must_be_regular(tmp, fmt, kind):
    """Classes 10 and 11: a directory (IsADirectoryError) or a FIFO (blocked forever)
    as the backing file, with a raw, qcow2 or probed format."""
    target = tmp / kind
    if kind == "dir":
        target.mkdir()
    else:
        os.mkfifo(target)
    p = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "1M")
    # point the header at it by hand (qemu-img create would open it)
    if fmt is not None:
        qemu_img("rebase", "-u", "-b", str(target), "-F", fmt, str(p))
    else:
        qemu_img("rebase", "-u", "-b", str(target), "-F", "raw", str(p))
        r = RawImage(p)
        r.set("header_length", r.get("header_length"))  # no-op: keep the layout
        pos = r.get("header_length")
        etype = struct.unpack(">I", r.read(pos, 4))[0]
        assert etype == 0xE2792ACA  # backing format extension first: drop it
        r.write(pos, struct.pack(">I", 0x12345678))  # an unknown (ignored) extension
    kind_, out = in_child(_open_close, str(p), timeout=20)
    assert kind_ == "qcow2" and "BackingFileError" in out, (kind_, out)
    # the image itself as a FIFO / directory
    kind_, out = in_child(_open_close, str(target), timeout=20)
    assert kind_ == "qcow2", (kind_, out)


# ------------------------------------------------------------------ 12-13: names --
def _latin1_snapshot(tmp: Path) -> Path:
    p = make(tmp)
    qemu_img("snapshot", "-c", "snapX", str(p))
    r, pos = _snapshot_entry(p)
    id_len, name_len = struct.unpack(">HH", r.read(pos + 12, 4))
    extra = struct.unpack(">I", r.read(pos + 36, 4))[0]
    r.write(pos + 40 + extra + id_len + name_len - 1, b"\xe9")  # "snap\xe9"
    return p


def test_repair_keeps_snapshot_name_bytes(tmp):
    """Class 12: a repair that rewrites the snapshot table (extra data too short for
    v3) keeps a non-UTF-8 name byte for byte."""
    p = _latin1_snapshot(tmp)
    RawImage(p).rewrite_snapshot_extra(0, struct.pack(">Q", 0))  # 8 bytes: too short
    res = check_file(p, "all")
    assert res.failure is None and not res.corruptions, res.to_dict()
    r, pos = _snapshot_entry(p)
    id_len, name_len = struct.unpack(">HH", r.read(pos + 12, 4))
    extra = struct.unpack(">I", r.read(pos + 36, 4))[0]
    assert extra >= 16
    assert r.read(pos + 40 + extra + id_len, name_len) == b"snap\xe9"
    assert qemu_clean(p)
    with qcow2.open(p) as img:
        assert img.snapshots[0].name.encode("utf-8", "surrogateescape") == b"snap\xe9"


@pytest.mark.parametrize("cmd", [["info"], ["snapshot", "-l"], ["info", "--output=json"]])
def test_non_utf8_names_print_as_qemu_img(tmp, cmd):
    """Class 13: UnicodeEncodeError on a strict UTF-8 stdout; qemu-img prints raw bytes."""
    p = _latin1_snapshot(tmp)
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict", LC_ALL="C.UTF-8")
    ours = subprocess.run([sys.executable, "-m", "qcow2", *cmd, str(p)], capture_output=True,
                          env=env, timeout=60)
    assert ours.returncode == 0, ours.stderr
    assert b"Traceback" not in ours.stderr
    theirs = subprocess.run(["qemu-img", *cmd, str(p)], capture_output=True, timeout=60)
    if "--output=json" in cmd:  # JSON is UTF-8: both show U+FFFD
        got = json.loads(ours.stdout.decode("utf-8", "surrogateescape"))
        assert got["snapshots"][0]["name"] == json.loads(theirs.stdout)["snapshots"][0]["name"]
    else:
        assert b"snap\xe9" in ours.stdout and b"snap\xe9" in theirs.stdout


# ------------------------------------------------- compare / convert skip holes --
def test_compare_and_convert_skip_raw_holes(tmp, monkeypatch):
    """A sparse raw file's holes are known zeros (SEEK_DATA), as qcow2 block status is:
    an empty 4 GiB image against a 4 GiB hole reads nothing; data in the middle is
    still found where qemu-img compare finds it."""
    from qcow2 import backing, convertfull
    from qcow2.compare import compare

    q = tmp / "e.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q), "4G")
    raw = tmp / "e.raw"
    raw.touch()
    os.truncate(raw, 4 * G)
    reads: list[int] = []
    real = backing.RawFile.readinto

    def counting(self: Any, buf: memoryview, offset: int) -> int:
        reads.append(len(buf))
        return real(self, buf, offset)

    monkeypatch.setattr(backing.RawFile, "readinto", counting)
    lines: list[str] = []
    a, b = convertfull.Source(str(q), None, None), convertfull.Source(str(raw), "raw", None)
    try:
        assert compare(a, b, lines.append) == 0
    finally:
        a.close()
        b.close()
    assert lines == ["Images are identical."] and sum(reads) == 0
    # a qcow2 overlay on the sparse raw file: its block status goes down the chain
    real_pread = backing.RawFile.pread

    def counting_pread(self: Any, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(self, n, offset)

    monkeypatch.setattr(backing.RawFile, "pread", counting_pread)
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(top))
    a, b = convertfull.Source(str(top), None, None), convertfull.Source(str(q), None, None)
    try:
        assert compare(a, b, lines.append) == 0
    finally:
        a.close()
        b.close()
    assert sum(reads) == 0
    with open(raw, "r+b") as f:
        f.seek(3 * G + 12345)
        f.write(b"abc")
    a, b = convertfull.Source(str(q), None, None), convertfull.Source(str(raw), "raw", None)
    try:
        assert compare(a, b, lines.append) == 1
    finally:
        a.close()
        b.close()
    theirs = subprocess.run(["qemu-img", "compare", str(q), str(raw)], capture_output=True,
                            text=True)
    assert lines[-1] == theirs.stdout.strip()
    assert 0 < sum(reads) <= 4 * M  # only the chunk holding data was read
    out = tmp / "c.qcow2"
    assert subprocess.run([sys.executable, "-m", "qcow2", "convert", "-O", "qcow2", str(raw),
                           str(out)], timeout=120).returncode == 0
    assert qemu_img("compare", str(out), str(raw)).returncode == 0


def _snap_map_end(path: str) -> int:
    with qcow2.open(path) as img:
        m = img.snapshot("s1").map()
        return m[-1]["start"] + m[-1]["length"]


def test_snapshot_map_of_large_valid_disk_size(tmp):
    """A disk size an L1 table can map (1 PiB) but the snapshot's L1 does not cover:
    the map is one step past the table, not one per missing L2 table (class 7)."""
    p = make(tmp)
    qemu_img("snapshot", "-c", "s1", str(p))
    r, pos = _snapshot_entry(p)
    r.write(pos + 48, struct.pack(">Q", 1 << 50))
    kind, out = in_child(_snap_map_end, str(p), timeout=20)
    assert (kind, out) == ("ok", 1 << 50)
