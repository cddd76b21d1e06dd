"""`qcow2 convert` against `qemu-img convert`: the same guest bytes out of QEMU-made
images of every cluster kind (and their snapshots, and concatenations), images QEMU
checks clean and finds identical (`qemu-img compare`), zero areas left unallocated,
and one clear line for bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    assert_clean,
    progress_values,
    qemu_check,
    qemu_img,
    qemu_info,
    qemu_io,
    raw_bytes,
)

from qcow2.cli import main

KiB = 1024
MiB = 1024 * KiB


def _qemu_mixed(tmp: Path) -> Path:
    """A QEMU image with data, zero, compressed, discarded and unallocated clusters over
    a raw backing file, and a snapshot taken midway."""
    base = tmp / "base.raw"
    base.write_bytes(random.Random(1).randbytes(3 * MiB))
    p = tmp / "mixed.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16384", "-b", str(base), "-F", "raw",
             str(p), str(6 * MiB))
    qemu_io(p, "write -P 0x11 0 256k", f"write -z {512 * KiB} 128k",
            f"write -c -P 0x22 {MiB} 64k", f"write -P 0x33 {4 * MiB} 1k")
    qemu_img("snapshot", "-c", "mid", str(p))
    qemu_io(p, f"write -P 0x44 {64 * KiB} 64k", f"discard {2 * MiB} 64k",
            f"write -P 0x55 {5 * MiB + 4096} 8k")
    return p


def test_qemu_image_to_raw_matches_qemu(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _qemu_mixed(tmp)
    out = tmp / "ours.raw"
    assert main(["convert", "-p", "-O", "raw", str(src), str(out)]) == 0
    progress_values(capsys.readouterr().out)  # qemu-img's progress lines, to 100%
    assert out.read_bytes() == raw_bytes(src, tmp)
    # zero areas are holes: the file holds less than the disk size
    assert os.stat(out).st_blocks * 512 < 6 * MiB


@pytest.mark.parametrize("opts", [[], ["-o", "preallocation=metadata"], ["-c"]],
                         ids=["fast", "full", "compressed"])
def test_progress_like_qemu(tmp: Path, capsys: pytest.CaptureFixture[str],
                            opts: list[str]) -> None:
    """convert -p prints qemu-img's lines on stdout (programs parse them), with steps no
    larger than qemu-img's (on an image all data, where both count the same bytes; but
    qemu-img counts a compressed convert a cluster at a time, we a 2 MiB batch)."""
    src = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "24M")
    qemu_io(src, "write -P 7 0 24M")
    capsys.readouterr()
    assert main(["convert", "-p", *opts, "-O", "qcow2", str(src), str(tmp / "a")]) == 0
    cap = capsys.readouterr()
    # the bytes as they are: text mode would turn the \r into \n
    theirs = subprocess.run(["qemu-img", "convert", "-p", *opts, "-O", "qcow2", str(src),
                             str(tmp / "b")], capture_output=True, check=True)
    assert cap.err == theirs.stderr.decode() == ""
    ours, ref = progress_values(cap.out), progress_values(theirs.stdout.decode())
    assert cap.out.endswith("(100.00/100%)\r\n") and theirs.stdout.endswith(b"(100.00/100%)\r\n")
    steps = [max(b - a for a, b in zip(v, v[1:])) for v in (ours, ref)]
    most = steps[1] if "-c" not in opts else 100 * 2 / 24  # (2 MiB of 24)
    assert len(ours) > 3 and steps[0] <= most + 0.01, (ours, ref)  # (printed rounded)


@pytest.mark.parametrize("param", ["snapshot.name=mid", "snapshot.id=1", "mid",
                                   "snapshot.id=1,snapshot.name=mid"])
def test_snapshot_to_raw_matches_qemu(tmp: Path, param: str) -> None:
    src = _qemu_mixed(tmp)
    out = tmp / "snap.raw"
    assert main(["convert", "-l", param, "-O", "raw", str(src), str(out)]) == 0
    assert out.read_bytes() == raw_bytes(src, tmp, snapshot="mid")
    out2 = tmp / "snap2.raw"
    assert main(["convert", "-s", "mid", str(src), str(out2)]) == 0  # -O raw is the default
    assert out2.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("opts", ["cluster_size=4096", "compat=0.10", "refcount_bits=1",
                                  "extended_l2=on,cluster_size=65536", "cluster_size=2M"])
def test_raw_to_qcow2_is_identical_and_sparse(tmp: Path, opts: str) -> None:
    size = 5 * MiB + 512
    data = bytearray(size)
    rng = random.Random(opts)
    for _ in range(20):
        off = rng.randrange(size - 9000)
        data[off : off + rng.randrange(1, 9000)] = rng.randbytes(1)[0:1] * 9000
    data[MiB : 2 * MiB] = bytes(MiB)  # a long zero stretch
    data[3 * MiB : 3 * MiB + 4096] = b"\x01" * 4096
    src = tmp / "in.raw"
    src.write_bytes(bytes(data))
    out = tmp / "out.qcow2"
    assert main(["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", opts, str(src), str(out)]) == 0
    assert_clean(out)
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(src), str(out)).returncode == 0
    extents = json.loads(qemu_img("map", "--output=json", str(out)).stdout)
    # nothing of the zero stretch that fills whole clusters is allocated
    cs = {"4096": 4096, "65536": 65536, "2M": 2 * MiB}.get(opts.split("cluster_size=")[-1].split(",")[0],
                                                            65536)
    lo, hi = -(-MiB // cs) * cs, (2 * MiB // cs) * cs
    for e in extents:
        if e["data"] and lo < hi:
            assert e["start"] + e["length"] <= lo or e["start"] >= hi, e


def test_concatenation_matches_qemu(tmp: Path) -> None:
    a = tmp / "a.raw"
    a.write_bytes(random.Random(2).randbytes(MiB + 512))
    b = _qemu_mixed(tmp)
    ours, theirs = tmp / "cat.qcow2", tmp / "cat-q.qcow2"
    assert main(["convert", "-O", "qcow2", str(a), str(b), str(ours)]) == 0
    qemu_img("convert", "-O", "qcow2", str(a), str(b), str(theirs))
    assert_clean(ours)
    assert qemu_img("compare", str(ours), str(theirs)).returncode == 0
    assert raw_bytes(ours, tmp) == raw_bytes(theirs, tmp)


@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_existing_target_gets_zeros_written(tmp: Path, out_fmt: str) -> None:
    """-n: the target is not assumed to be zeroed, so zero areas of the input replace
    whatever the target held there."""
    src = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), str(2 * MiB))
    qemu_io(src, "write -P 0x66 0 64k", f"write -z {MiB} 64k")
    dst = tmp / f"dst.{out_fmt}"
    qemu_img("create", "-q", "-f", out_fmt, str(dst), str(3 * MiB))
    qemu_io(dst, f"write -P 0x77 0 {3 * MiB}", fmt=out_fmt)
    assert main(["convert", "-n", "-O", out_fmt, str(src), str(dst)]) == 0
    got = raw_bytes(dst, tmp) if out_fmt == "qcow2" else dst.read_bytes()
    assert got[: 2 * MiB] == raw_bytes(src, tmp)
    assert got[2 * MiB :] == b"\x77" * MiB  # past the input: untouched
    if out_fmt == "qcow2":
        assert_clean(dst)


@pytest.mark.parametrize("argv, message", [
    (["convert", "-O", "raw", "{missing}", "{out}"], "Could not open"),
    (["convert", "-O", "vmdk", "{img}", "{out}"], "Unknown file format 'vmdk'"),
    (["convert", "-f", "vdi", "{img}", "{out}"], "Unknown file format 'vdi'"),
    (["convert", "-O", "qcow2", "-o", "cluster_size=1234", "{img}", "{out}"], "Cluster size"),
    (["convert", "-O", "qcow2", "-o", "backing_file=x", "{img}", "{out}"], "not supported by convert"),
    (["convert", "-O", "qcow2", "-o", "bogus=1", "{img}", "{out}"], "Invalid parameter 'bogus'"),
    (["convert", "-l", "snapshot.name=nope", "{img}", "{out}"], "Can't find snapshot"),
    (["convert", "-l", "snapshot.size=3", "{img}", "{out}"], "Invalid snapshot parameter"),
    (["convert", "-n", "{img}", "{out}"], "Could not open"),
    (["convert", "-c", "-O", "raw", "{img}", "{out}"], "Compression not supported for this file format"),
    (["convert", "{img}"], "Must specify image file name"),
    (["convert", "-l", "x", "{img}", "{img}", "{out}"], "concatenating multiple snapshot"),
    (["convert", "{img}", "{img}"], "is also an input"),
    (["convert", "{dir}", "{out}"], "Could not open image"),
    (["convert", "{img}", "{dir}"], "Is a directory"),
    # qemu-img's words for an output it cannot create
    (["convert", "-O", "qcow2", "{img}", "{nodir}"],
     "nope/out.img: error while converting qcow2: Could not create '"),
    (["convert", "{img}", "{nodir}"], "nope/out.img: error while converting raw: Could not create '"),
    (["convert", "-S", "100", "{img}", "{out}"], "Valid sizes are multiples of 512 up to 16777216"),
    (["convert", "-S", "32M", "{img}", "{out}"], "Invalid buffer size for sparse output"),
    (["convert", "-S", "x", "{img}", "{out}"], "You may use k, M, G, T, P or E suffixes"),
    (["convert", "-m", "0", "{img}", "{out}"], "Allowed number of coroutines is between 1 and 16"),
    (["convert", "-m", "17", "{img}", "{out}"], "Invalid number of coroutines"),
    (["convert", "--target-is-zero", "{img}", "{out}"], "--target-is-zero requires use of -n flag"),
    (["convert", "-n", "-o", "cluster_size=4k", "{img}", "{out}"],
     "-o has no effect when skipping image creation"),
    (["convert", "-c", "-O", "qcow2", "-o", "preallocation=metadata", "{img}", "{out}"],
     "Compression and preallocation not supported at the same time"),
])
def test_bad_input_is_one_line(tmp: Path, capsys: pytest.CaptureFixture[str],
                               argv: list[str], message: str) -> None:
    img = tmp / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(MiB))
    (tmp / "adir").mkdir()
    names = {"{img}": str(img), "{out}": str(tmp / "out.img"), "{missing}": str(tmp / "nope.qcow2"),
             "{dir}": str(tmp / "adir"), "{nodir}": str(tmp / "nope" / "out.img")}
    before = img.read_bytes()
    assert main([names.get(a, a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp / "out.img").exists()  # no half-made output is left behind
    assert img.read_bytes() == before


def test_failed_copy_removes_the_new_output(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An input that turns out corrupt midway: one error line, and the output file that
    convert created is gone."""
    src = tmp / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(src), str(4 * MiB))
    qemu_io(src, f"write -P 0x12 0 {4 * MiB}")
    # point the L2 entry of the last cluster far past the end of the file
    from qcow2_edit import RawImage

    RawImage(src).set_u64(RawImage(src).l2_entry_offset(4 * MiB // 4096 - 1), (1 << 63) | (1 << 40))
    out = tmp / "out.raw"
    assert main(["convert", str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qcow2: ") and "Traceback" not in err, err
    assert not out.exists()
    assert os.path.exists(src)
    # the image is written under a temporary name and renamed when complete: an
    # existing output stays as it was, and nothing else is left behind
    out.write_bytes(b"old output")
    before = sorted(os.listdir(tmp))
    assert main(["convert", "-O", "qcow2", str(src), str(out)]) == 1
    assert out.read_bytes() == b"old output"
    assert sorted(os.listdir(tmp)) == before
    good = tmp / "good.raw"
    good.write_bytes(b"\x01" * 4096)
    assert main(["convert", "-f", "raw", "-O", "qcow2", str(good), str(out)]) == 0
    assert sorted(os.listdir(tmp)) == sorted([*before, "good.raw"])  # no temporary left
    assert qemu_img("compare", "-f", "raw", str(good), str(out)).returncode == 0


# -- convert --snapshots ------------------------------------------------------------------

def _snapshotted(tmp: Path) -> Path:
    """An image (in the test's refcount mode) whose states share data: three snapshots
    made by us with VM state, clocks, icount and dates, one made by qemu-img, one
    deleted (ids are not 1..n), compressed and zero clusters, an older snapshot applied
    and written over."""
    import qcow2

    p = tmp / "snaps.qcow2"
    qcow2.create(str(p), 4 * MiB, cluster_size=65536)
    rng = random.Random(12)
    with qcow2.open(str(p), "r+") as img:
        img.pwrite(rng.randbytes(2 * MiB), 0)
        img.create_snapshot("first", rng.randbytes(100_000), vm_clock_nsec=123_456_789_012,
                            icount=77, date_sec=1_600_000_000, date_nsec=999)
        img.pwrite(b"\x22" * 65536, 256 * KiB)
        img.write_zeroes(MiB, 128 * KiB)
        img.create_snapshot("gone", b"x" * 10)
        img.pwrite(b"\x33" * 4096, 3 * MiB)
        img.create_snapshot("third", None, vm_clock_nsec=5, icount=None, date_sec=1_700_000_000,
                            date_nsec=1)
        img.delete_snapshot("gone")
    qemu_io(p, f"write -c -P 0x44 {2 * MiB} 64k", f"discard {512 * KiB} 64k")
    qemu_img("snapshot", "-c", "by-qemu", str(p))
    with qcow2.open(str(p), "r+") as img:
        img.apply_snapshot("first")  # back to the first state: shares it again
        img.pwrite(b"\x55" * 8192, 1536 * KiB)
    return p


def _snapshot_raw(path: Path, tmp: Path, sid: str) -> bytes:
    out = tmp / f"sn-{path.name}-{sid}.raw"
    qemu_img("convert", "-O", "raw", "-l", f"snapshot.id={sid}", str(path), str(out))
    return out.read_bytes()


def _metadata_bound(path: Path, cs: int, states: int, vm_state: int) -> int:
    """What an output may hold beyond the input's host clusters: per state an L1 table
    and every L2 table of the disk, the header, refcount table and blocks, the snapshot
    table, the VM states."""
    info = qemu_info(path)
    size = info["virtual-size"]
    l2 = -(-size // cs // (cs // 8))
    per_state = (1 + l2) * cs
    host = os.path.getsize(path) + 64 * KiB
    refblocks = -(-(host // 512) // (cs // 2)) + 1
    return states * per_state + (4 + refblocks) * cs + vm_state + states * cs


@pytest.mark.parametrize("opts", ["", "cluster_size=16384", "compat=0.10", "-c"])
def test_snapshots_are_kept_and_stay_shared(tmp: Path, mode: str, opts: str) -> None:
    src = _snapshotted(tmp)
    out = tmp / "out.qcow2"
    argv = ["convert", "--snapshots", "-O", "qcow2"]
    if opts == "-c":
        argv.append("-c")
    elif opts:
        argv += ["-o", opts]
    if opts != "compat=0.10":  # (v2 output is standard, whatever the input's mode)
        argv += ["-o", f"refcount_mode={mode}"]
    assert main([*argv, str(src), str(out)]) == 0
    assert_clean(out)
    # the same snapshot records: ids, names, dates, VM clocks, VM state sizes, icount
    want, got = qemu_info(src)["snapshots"], qemu_info(out)["snapshots"]
    assert got == want and len(got) == 3
    import qcow2

    with qcow2.open(str(src)) as a, qcow2.open(str(out)) as b:
        for e in a.snapshots:
            assert b.read_vm_state(e.id) == a.read_vm_state(e.id)
        assert [(e.vm_clock_nsec, e.icount) for e in b.snapshots] == \
            [(e.vm_clock_nsec, e.icount) for e in a.snapshots]
    for s in want:  # every snapshot's disk, as QEMU reads it
        assert _snapshot_raw(out, tmp, s["id"]) == _snapshot_raw(src, tmp, s["id"]), s
    assert qemu_img("compare", str(src), str(out)).returncode == 0  # the active state
    # shared data stays shared: no more than the input's clusters plus metadata
    cs = 16384 if "16384" in opts else 65536
    vm = sum(s["vm-state-size"] for s in want)
    bound = os.path.getsize(src) + _metadata_bound(src, cs, len(want) + 1, vm)
    end = qemu_check(out)["image-end-offset"]
    assert end <= bound, (end, bound)
    # ... which copies of every state would not meet (the bound is not vacuous)
    assert 2 * MiB * (len(want) + 1) > bound
    if opts == "-c":
        assert qemu_check(out)["compressed-clusters"] > 0
    if opts in ("", "compat=0.10"):  # same cluster size: the very same sharing
        assert _host_clusters(out) == _host_clusters(src) + _compressed_data(src)


def _shared_off_base(tmp: Path) -> Path:
    """A QEMU image whose last snapshot shares data with two earlier ones, each of them
    holding data the other does not: A = {X, Y}, B = {X', Y'}, D = {X, Y', Z} (made by
    applying a state E = {X, Y'} taken between them, then deleted). Whichever of A and
    B D is written on top of, one of X (A's) and Y' (B's) is not in it. Each piece is
    128 KiB: two input clusters, one cluster of a 128 KiB output."""
    p = tmp / "offbase.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(p), str(MiB))
    qemu_io(p, "write -P 0x11 0 128k", "write -P 0x22 128k 128k")
    qemu_img("snapshot", "-c", "A", str(p))
    qemu_io(p, "write -P 0x23 128k 128k")
    qemu_img("snapshot", "-c", "E", str(p))
    qemu_io(p, "write -P 0x12 0 128k")
    qemu_img("snapshot", "-c", "B", str(p))
    qemu_img("snapshot", "-a", "E", str(p))
    qemu_io(p, "write -P 0x33 256k 128k")
    qemu_img("snapshot", "-c", "D", str(p))
    qemu_img("snapshot", "-d", "E", str(p))
    return p


@pytest.mark.parametrize("cluster", [65536, 16384, 131072])
def test_snapshots_share_with_a_state_that_is_not_the_base(tmp: Path, mode: str,
                                                          cluster: int) -> None:
    src = _shared_off_base(tmp)
    out = tmp / "out.qcow2"
    assert main(["convert", "--snapshots", "-O", "qcow2", "-o",
                 f"cluster_size={cluster},refcount_mode={mode}", str(src), str(out)]) == 0
    assert_clean(out)
    want = qemu_info(src)["snapshots"]
    assert [s["name"] for s in qemu_info(out)["snapshots"]] == ["A", "B", "D"]
    for s in want:
        assert _snapshot_raw(out, tmp, s["id"]) == _snapshot_raw(src, tmp, s["id"]), s
    assert qemu_img("compare", str(src), str(out)).returncode == 0
    # the same data bytes: X, Y, X', Y', Z once each (owner mode keeps a copy: a node
    # may only share what every node up to the cluster's owner has too, and D's
    # parent, A or B, lacks one of X and Y')
    data = _host_clusters(out) * cluster
    assert data == _host_clusters(src) * 65536 + (128 * KiB if mode == "owner" else 0)


def _host_clusters(path: Path) -> int:
    """Distinct host clusters holding (uncompressed) data, over every state."""
    import qcow2

    with qcow2.open(str(path)) as img:
        cs = img.cluster_size
        views = [img.snapshot(e.id) for e in img.snapshots] + [img]
        hosts = {c for v in views for e in v.map() if e["data"] and "offset" in e
                 for c in range(e["offset"] // cs, (e["offset"] + e["length"]) // cs)}
    return len(hosts)


def _compressed_data(path: Path) -> int:
    """Distinct compressed clusters over every state (copied as plain data clusters)."""
    import qcow2
    from qcow2.cluster import COMPRESSED

    with qcow2.open(str(path)) as img:
        views = [img.snapshot(e.id) for e in img.snapshots] + [img]
        found = set()
        for v in views:
            for c in range(-(-img.size // img.cluster_size)):
                entry, _ = v.clusters.get(c)
                if v.clusters.classify(entry) == COMPRESSED:
                    found.add(entry)
    return len(found)


@pytest.mark.parametrize("argv, message", [
    (["--snapshots", "-O", "raw", "{img}", "{out}"], "needs qcow2 output"),
    (["--snapshots", "-O", "qcow2", "-l", "a", "{img}", "{out}"], "cannot be used with -l"),
    (["--snapshots", "-O", "qcow2", "{img}", "{img2}", "{out}"], "needs a single source"),
    (["--snapshots", "-O", "qcow2", "-f", "raw", "{img}", "{out}"], "needs a qcow2 input"),
    (["--snapshots", "-O", "qcow2", "{grown}", "{out}"], "snapshots of another size"),
])
def test_snapshots_refusals(tmp: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                            message: str) -> None:
    img = tmp / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(MiB))
    grown = tmp / "grown.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(grown), str(MiB))
    qemu_img("snapshot", "-c", "small", str(grown))
    qemu_img("resize", "-q", str(grown), str(2 * MiB))
    names = {"{img}": str(img), "{img2}": str(img), "{out}": str(tmp / "out.img"),
             "{grown}": str(grown)}
    assert main(["convert", *[names.get(a, a) for a in argv]]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp / "out.img").exists()


# -- convert to standard output -----------------------------------------------------------

def _through_pipe(argv: list[str], dest: Path) -> subprocess.CompletedProcess[bytes]:
    """Run `qcow2 convert ... -` with its stdout a real pipe, copied into dest."""
    with open(dest, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "qcow2", "convert", *argv, "-"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None
        for block in iter(lambda: p.stdout.read(1 << 16), b""):  # type: ignore[union-attr]
            f.write(block)
        err = p.stderr.read() if p.stderr is not None else b""
        p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, b"", err)


@pytest.mark.parametrize("flags, opts", [
    ([], ""), ([], "cluster_size=4096,refcount_bits=1"), ([], "compat=0.10"),
    ([], "cluster_size=2M,refcount_bits=64"), (["-c"], ""),
    (["-c"], "compression_type=zstd,refcount_bits=2,cluster_size=4096")])
def test_stream_qcow2_to_a_pipe(tmp: Path, flags: list[str], opts: str) -> None:
    """-c too: the compressed sizes are found in the first pass (and the clusters
    compressed again in the second), packed as QEMU packs them, within what a
    refcount can count."""
    odd = tmp / "odd.raw"  # a raw input whose size is not a multiple of a sector
    odd.write_bytes(random.Random(5).randbytes(70_000) + bytes(20_000) + b"\x01" * 1000
                    + b"text " * 30_000)
    src = _qemu_mixed(tmp)
    out = tmp / "streamed.qcow2"
    argv = ["-O", "qcow2", *flags, *(["-o", opts] if opts else []), str(src), str(odd)]
    r = _through_pipe(argv, out)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert_clean(out)
    # the same content as qemu-img's own convert of the same inputs
    ref = tmp / "ref.qcow2"
    qemu_img("convert", "-O", "qcow2", *argv[2:], str(ref))
    assert qemu_img("compare", str(ref), str(out)).returncode == 0
    # zero clusters are not stored: no more data than in qemu-img's output
    def data(p: Path) -> int:
        extents = json.loads(qemu_img("map", "--output=json", str(p)).stdout)
        return sum(e["length"] for e in extents if e["data"])

    assert data(out) <= data(ref)
    if flags:  # as many compressed clusters as qemu-img makes, and a file as small
        assert qemu_check(out)["compressed-clusters"] == qemu_check(ref)["compressed-clusters"]
        assert os.path.getsize(out) <= os.path.getsize(ref) * 1.05 + 65536


def test_stream_raw_and_refusals(tmp: Path) -> None:
    src = _qemu_mixed(tmp)
    out = tmp / "streamed.raw"
    r = _through_pipe([str(src)], out)  # -O raw is the default
    assert r.returncode == 0
    assert out.read_bytes() == raw_bytes(src, tmp)
    for argv, message in [(["-O", "qcow2", "-o", "extended_l2=on", str(src)],
                           b"not supported when writing to standard output"),
                          (["--snapshots", "-O", "qcow2", str(src)], b"standard output")]:
        r = _through_pipe(argv, tmp / "x")
        assert r.returncode == 1 and message in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
    import pty  # an image is not written to a terminal

    master, slave = pty.openpty()
    try:
        t = subprocess.run([sys.executable, "-m", "qcow2", "convert", str(src), "-"], stdout=slave,
                           stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert t.returncode == 1 and b"is a terminal" in t.stderr, t.stderr


def test_stream_into_a_closed_pipe_is_one_error(tmp: Path) -> None:
    src = tmp / "big.raw"
    src.write_bytes(b"\x07" * (8 * MiB))
    p = subprocess.Popen([sys.executable, "-m", "qcow2", "convert", "-f", "raw", "-O", "qcow2",
                          str(src), "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.read(4096)
    p.stdout.close()  # the reader goes away
    err = p.stderr.read()
    assert p.wait() == 1
    assert err.startswith(b"qcow2: ") and b"Broken pipe" in err and err.count(b"\n") == 1, err


# -- options: -c in a thread pool, -S, --target-is-zero, -W, -m ---------------------------

@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_pool_compression_packs_as_one_by_one(tmp: Path, ctype: str) -> None:
    """-c compresses in threads but writes in guest order: the file is byte for byte the
    one a single thread makes (-m 1), and QEMU reads the same data."""
    rng = random.Random(8)
    src = tmp / "in.raw"
    # clusters that compress to different sizes, zero gaps, one that does not compress
    src.write_bytes(b"".join(rng.randbytes(rng.randrange(1, 60) * KiB).ljust(64 * KiB, b"\x05")
                             + bytes(rng.choice([0, 64 * KiB])) for _ in range(40))
                    + rng.randbytes(64 * KiB))
    outs = []
    for m in ("1", "4"):
        out = tmp / f"m{m}.qcow2"
        assert main(["convert", "-c", "-m", m, "-W", "-f", "raw", "-O", "qcow2", "-o",
                     f"compression_type={ctype}", str(src), str(out)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    out = tmp / "m4.qcow2"
    assert_clean(out)
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(src), str(out)).returncode == 0
    assert qemu_check(out)["compressed-clusters"] >= 40


def _alloc(path: Path) -> list[tuple[int, int]]:
    return [(e["start"], e["length"]) for e in
            json.loads(qemu_img("map", "--output=json", str(path)).stdout) if e["data"]]


@pytest.mark.parametrize("sparse", ["0", "4k", "16k"])
def test_sparse_size_allocates_as_qemu(tmp: Path, sparse: str) -> None:
    """-S: zero runs shorter than the sparse size are written as data; -S 0 writes
    everything. The output's allocation equals qemu-img convert's with the same -S."""
    src = tmp / "in.raw"
    cluster = b"\x09" * 4096
    gap8, gap64 = bytes(8 * KiB), bytes(64 * KiB)
    src.write_bytes((cluster + gap8 + cluster + gap64) * 8 + cluster)
    ours, theirs = tmp / "ours.qcow2", tmp / "theirs.qcow2"
    args = ["-S", sparse, "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096"]
    assert main(["convert", *args, str(src), str(ours)]) == 0
    qemu_img("convert", *args, str(src), str(theirs))
    assert_clean(ours)
    assert qemu_img("compare", str(ours), str(theirs)).returncode == 0
    assert _alloc(ours) == _alloc(theirs)


def test_target_is_zero_leaves_zero_areas_alone(tmp: Path) -> None:
    """-n --target-is-zero trusts the user: the zero areas of the input are not written,
    so what the target held there stays (as with qemu-img), while -n alone zeroes them;
    -c is allowed with it (the target has no data where it writes)."""
    src = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), str(2 * MiB))
    qemu_io(src, "write -P 0x66 0 64k", f"write -P 0x67 {MiB} 64k")
    results = []
    for tool in ("ours", "qemu"):
        dst = tmp / f"dst-{tool}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(dst), str(2 * MiB))
        qemu_io(dst, f"write -P 0x77 {512 * KiB} 64k")
        args = ["-n", "--target-is-zero", "-O", "qcow2", str(src), str(dst)]
        if tool == "ours":
            assert main(["convert", *args]) == 0
        else:
            qemu_img("convert", *args)
        assert_clean(dst)
        results.append(raw_bytes(dst, tmp))
    assert results[0] == results[1]
    assert results[0][512 * KiB : 576 * KiB] == b"\x77" * (64 * KiB)
    fresh = tmp / "fresh.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(fresh), str(2 * MiB))
    assert main(["convert", "-c", "-n", "--target-is-zero", "-O", "qcow2", str(src),
                 str(fresh)]) == 0
    assert_clean(fresh)
    assert qemu_img("compare", str(src), str(fresh)).returncode == 0
    assert qemu_check(fresh)["compressed-clusters"] == 2


@pytest.mark.parametrize("fast", [False, True])
def test_killed_convert_leaves_no_partial_output(tmp: Path, fast: bool) -> None:
    """SIGKILL in the middle of a convert: OUTPUT does not exist (the image was being
    written under a temporary name), and the next convert makes a whole one. fast: a
    plain convert (fastconvert.py) of 32768 compressed 512-byte clusters, slow enough."""
    import fcntl
    import signal
    import time

    src = tmp / "in.raw"
    if fast:
        src.write_bytes(b"".join(bytes([1 + i % 250]) * 512 for i in range(16 * MiB // 512)))
        comp = tmp / "in.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512",
                 str(src), str(comp))
        args = ["-O", "qcow2", str(comp)]
    else:
        src.write_bytes(random.Random(4).randbytes(16 * MiB))  # -c on random data: slow enough
        args = ["-c", "-m", "1", "-f", "raw", "-O", "qcow2", str(src)]
    out = tmp / "out.qcow2"
    p = subprocess.Popen([sys.executable, "-m", "qcow2", "convert", *args, str(out)])
    deadline = time.monotonic() + 60
    while not [n for n in os.listdir(tmp) if n.startswith(".out.qcow2.convert-")]:
        assert p.poll() is None and time.monotonic() < deadline, "convert ended too soon"
        time.sleep(0.002)
    # while it writes, the convert holds its temporary file's lock (what tells a
    # cleaner that cannot see its PID that it is alive)
    with open(tmp / f".out.qcow2.convert-{p.pid}", "rb") as f:
        while True:
            assert p.poll() is None and time.monotonic() < deadline, "convert ended too soon"
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                break
            fcntl.flock(f, fcntl.LOCK_UN)  # created, not locked yet
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    inputs = ["in.raw", "in.qcow2"] if fast else ["in.raw"]
    assert sorted(os.listdir(tmp)) == sorted([*inputs, f".out.qcow2.convert-{p.pid}"])
    assert main(["convert", "-q", "-f", "raw", "-O", "qcow2", str(src), str(out)]) == 0
    assert_clean(out)
    assert qemu_img("compare", "-f", "raw", str(src), str(out)).returncode == 0
    # the killed convert's temporary file is gone with it
    assert sorted(os.listdir(tmp)) == sorted([*inputs, "out.qcow2"])


def test_convert_removes_only_stale_temporaries_of_its_output(tmp: Path) -> None:
    """The next convert to OUTPUT removes `.OUTPUT.convert-PID` files of processes that
    no longer exist, and nothing else: not a live process's, not one whose lock a live
    convert holds (a PID from another namespace or host), not a symlink, not another
    output's, not a name that only looks alike."""
    import fcntl

    src = tmp / "in.raw"
    src.write_bytes(b"\x5a" * 65536)
    dead = []
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        dead.append(child.pid)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = tmp / "keep.txt"
        other.write_bytes(b"precious")
        names = {
            f".out.qcow2.convert-{dead[0]}": True,  # a killed convert's: removed
            f".out.qcow2.convert-{live.pid}": False,  # a running process's
            f".out.qcow2.convert-{dead[1]}": False,  # locked below: a live convert elsewhere
            f".other.qcow2.convert-{dead[0]}": False,  # another output's
            f".out.qcow2.convert-0{dead[0]}": False,  # not how a PID is written
            f".out.qcow2.convert-{dead[0]}.bak": False,
            f"out.qcow2.convert-{dead[0]}": False,
        }
        for name in names:
            (tmp / name).write_bytes(b"partial")
        (tmp / f".out.qcow2.convert-{dead[2]}").symlink_to(other)  # never followed
        with open(tmp / f".out.qcow2.convert-{dead[1]}", "rb") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            assert main(["convert", "-q", "-f", "raw", "-O", "qcow2", str(src),
                         str(tmp / "out.qcow2")]) == 0
        assert qemu_img("compare", "-f", "raw", str(src), str(tmp / "out.qcow2")).returncode == 0
        for name, removed in names.items():
            assert (tmp / name).exists() != removed, name
        assert (tmp / f".out.qcow2.convert-{dead[2]}").is_symlink()
        assert other.read_bytes() == b"precious"
    finally:
        live.kill()
        live.wait()
