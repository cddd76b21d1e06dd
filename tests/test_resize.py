"""`qcow2 resize` against `qemu-img resize`: the same refusals, messages and exit codes,
and resized images that qemu-img checks clean, with the virtual size and guest content
qemu-img reads (compared with qemu-img's own resize of a copy, or with the model where
QEMU keeps stale bytes). L1 growth (ClusterMap.grow_l1), shrinking, snapshots, backing
files longer than the old size, preallocation and raw files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import assert_clean, qemu_img, qemu_info, qemu_io, raw_bytes, run

import qcow2
from qcow2.cli import main
from qcow2.format import L2E_OFFSET_MASK
from qcow2.resize import resize, resize_image

KiB = 1024
MiB = 1024 * KiB


def _img(tmp: Path, name: str, size: str, opts: str = "", *cmds: str) -> Path:
    p = tmp / name
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), str(p), size)
    if cmds:
        qemu_io(p, *cmds)
    return p


def _both(capsys: pytest.CaptureFixture[str], path: Path, *args: str) -> int:
    """Run qemu-img resize on a copy and ours on the file; same exit code and message."""
    ref = path.with_name("ref-" + path.name)
    shutil.copyfile(path, ref)
    theirs = run("qemu-img", "resize", *[str(ref) if a == str(path) else a for a in args],
                 check=False)
    rc = main(["resize", *args])
    cap = capsys.readouterr()
    assert rc == theirs.returncode, (args, cap.err, theirs.stderr)
    if rc == 0:
        assert cap.out == theirs.stdout
    else:
        lines = [ln for ln in theirs.stderr.splitlines() if not ln.startswith("WARNING")
                 and not ln.startswith(" ")]
        first = lines[0].replace("qemu-img:", "qcow2:").replace(str(ref), str(path))
        assert cap.err.count("\n") == 1 and cap.err.startswith(first), (args, cap.err)
    return rc


def test_refusals(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    p = _img(tmp, "a.qcow2", "10M", "", "write -P 1 0 1M")
    for args in (["-5M"], ["--", "-5M"], ["1000"], ["+1000"], ["0"], ["--shrink", "0"],
                 ["1x"], ["9E"], ["+9E"], ["20E"], ["-20M"], ["--preallocation=foo", "30M"],
                 ["--shrink", "--preallocation=full", "5M"], ["--preallocation=metadata", "5M"],
                 ["-f", "foo", "20M"]):
        before = p.read_bytes()
        assert _both(capsys, p, *args[:-1], str(p), args[-1]) == 1, args
        assert p.read_bytes() == before
    assert _both(capsys, p) == 1  # not enough arguments
    assert _both(capsys, p, str(tmp / "missing"), "1G") == 1
    v2 = _img(tmp, "v2.qcow2", "10M", "compat=0.10")
    qemu_img("snapshot", "-c", "s", str(v2))
    assert _both(capsys, v2, str(v2), "20M") == 1
    assert _both(capsys, v2, "--shrink", str(v2), "5M") == 1


def test_preallocation_usage_errors_like_qemu(capsys: pytest.CaptureFixture[str],
                                             tmp: Path) -> None:
    """qemu-img takes the last argument as the size before parsing the options: a
    --preallocation without its value takes the file name as the mode."""
    p = _img(tmp, "a.qcow2", "10M")
    before = p.read_bytes()
    for args in (["--preallocation", str(p), "20M"], ["--preallocation=bogus", str(p), "20M"],
                 ["--preallocation=", str(p), "20M"], ["--preallocation", str(p)],
                 ["--preallocation"], ["--preallocation=bogus"], ["-q", "20M"]):
        assert _both(capsys, p, *args) == 1, args
        assert p.read_bytes() == before


OPTS = ["", "cluster_size=512", "cluster_size=4k,refcount_bits=1", "compat=0.10",
        "cluster_size=32k,extended_l2=on", "cluster_size=2M"]


@pytest.mark.parametrize("opts", OPTS)
def test_grow_and_shrink_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path,
                                   opts: str) -> None:
    comp = "write -P 0x33 1M 64k" if "2M" in opts else "write -c -P 0x33 1M 64k"
    p = _img(tmp, "g.qcow2", "3M", opts, "write -P 0x11 0 1M", "write -P 0x22 2M 1M",
             "write -z 1536k 64k", comp)
    ref = tmp / "ref-g.qcow2"
    for args in (["+5M"], ["64M"], ["--shrink", "2M"], ["--shrink", "-512k"], ["+0"],
                 ["130M"], ["--shrink", "1M"], ["4M"]):
        assert _both(capsys, p, *args[:-1], str(p), args[-1]) == 0
        shutil.copyfile(ref, tmp / "qemu.qcow2")
        assert_clean(p)
        assert qemu_info(p)["virtual-size"] == qemu_info(tmp / "qemu.qcow2")["virtual-size"]
        assert qemu_img("compare", str(p), str(tmp / "qemu.qcow2"), check=False).returncode == 0
        shutil.copyfile(p, ref)  # both continue from our image
    # the data below the smallest size survived; the rest reads zeros
    data = raw_bytes(p, tmp)
    assert data[:MiB] == b"\x11" * MiB and data[MiB:] == bytes(3 * MiB)


def test_l1_growth_moves_the_table(tmp: Path) -> None:
    """512-byte clusters: 64 L1 entries per cluster, each covering 32 KiB."""
    p = _img(tmp, "l1.qcow2", "2M", "cluster_size=512", "write -P 5 0 2M")
    before = qemu_info(p)
    with qcow2.open(p, "r+") as img:
        old_off, old_len = img.header.l1_table_offset, img.header.l1_size
        resize_image(img, 100 * MiB - 16 * KiB)
        assert img.header.l1_size == 3200 > old_len
        assert img.header.l1_table_offset != old_off
        img.pwrite(b"\x66" * 4096, 99 * MiB)
    assert_clean(p)  # the old table was freed, the new one counted
    assert qemu_info(p)["virtual-size"] == 100 * MiB - 16 * KiB != before["virtual-size"]
    out = qemu_io(p, "read -P 5 0 2M", "read -P 0 2M 97M", "read -P 0x66 99M 4k")
    assert "Pattern verification failed" not in out
    # growing again within the same number of L1 entries moves nothing
    with qcow2.open(p, "r+") as img:
        off = img.header.l1_table_offset
        resize_image(img, 100 * MiB)
        assert img.header.l1_table_offset == off
    assert_clean(p)


def test_shrink_unaligned_then_grow_reads_zeros(tmp: Path) -> None:
    for opts in ("", "cluster_size=32k,extended_l2=on", "compat=0.10"):
        p = _img(tmp, "u.qcow2", "4M", opts, "write -P 7 0 4M")
        resize(p, 1 * MiB + 1536, shrink=True)
        assert_clean(p)
        resize(p, 4 * MiB)
        assert_clean(p)
        data = raw_bytes(p, tmp)
        assert data == b"\x07" * (MiB + 1536) + bytes(3 * MiB - 1536), opts


def test_snapshots_keep_their_size(tmp: Path) -> None:
    p = _img(tmp, "s.qcow2", "4M", "cluster_size=4k", "write -P 1 0 4M")
    qemu_img("snapshot", "-c", "before", str(p))
    resize(p, 1 * MiB, shrink=True)
    assert_clean(p)
    resize(p, 8 * MiB)
    assert_clean(p)
    assert raw_bytes(p, tmp) == b"\x01" * MiB + bytes(7 * MiB)
    with qcow2.open(p) as img:
        view = img.snapshot("before")
        assert view.pread(view.size, 0) == b"\x01" * 4 * MiB
    # (qemu-img convert -l reads a snapshot at the active size: apply it instead)
    qemu_img("snapshot", "-a", "before", str(p))
    assert qemu_info(p)["virtual-size"] == 4 * MiB
    assert raw_bytes(p, tmp) == b"\x01" * 4 * MiB
    assert_clean(p)


def test_backing_longer_than_old_size(tmp: Path) -> None:
    base = _img(tmp, "base.qcow2", "4M", "", "write -P 9 0 4M")
    for opts in ("", "cluster_size=32k,extended_l2=on", "compat=0.10"):
        top = tmp / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                 *(["-o", opts] if opts else []), str(top), "1000k")
        qemu_io(top, "write -P 3 0 4k")
        ref = tmp / "qemu-top.qcow2"
        shutil.copyfile(top, ref)
        theirs = qemu_img("resize", str(ref), "3M", check=False)
        resize(top, 3 * MiB)
        assert_clean(top)
        want = b"\x03" * 4096 + b"\x09" * (1000 * KiB - 4096) + bytes(3 * MiB - 1000 * KiB)
        assert raw_bytes(top, tmp) == want, opts
        if opts == "compat=0.10":
            # v2 has no zero flag: qemu-img gives up ("Failed to zero out new clusters");
            # we write zeros instead
            assert theirs.returncode == 1 and "zero out" in theirs.stderr
        else:
            assert theirs.returncode == 0
            assert qemu_img("compare", str(top), str(ref), check=False).returncode == 0


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("opts", ["", "cluster_size=32k,extended_l2=on"])
def test_preallocation(tmp: Path, mode: str, opts: str) -> None:
    p = _img(tmp, "p.qcow2", "1000k", opts, "write -P 1 0 1000")
    alloc_before = os.stat(p).st_blocks * 512
    assert main(["resize", f"--preallocation={mode}", str(p), "9M"]) == 0
    assert_clean(p)
    assert raw_bytes(p, tmp) == b"\x01" * 1000 + bytes(9 * MiB - 1000)
    with qcow2.open(p) as img:
        # every cluster of the new range has a host cluster (with extended L2 its
        # subclusters stay unallocated, as QEMU preallocates them)
        cs = img.cluster_size
        hosts = [img.clusters.get(c)[0] & L2E_OFFSET_MASK for c in range(MiB // cs, 9 * MiB // cs)]
        assert all(hosts) and len(set(hosts)) == len(hosts)
    assert os.path.getsize(p) >= 8 * MiB  # the new range is inside the file
    grown = os.stat(p).st_blocks * 512 - alloc_before
    if mode == "metadata":
        assert grown < MiB  # tables only
    else:
        assert grown >= 8 * MiB


def test_raw_files(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    p = tmp / "d.raw"
    p.write_bytes(b"\x42" * (3 * MiB))
    for args in (["-f", "raw", "+1000"], ["-f", "raw", "5M"], ["-f", "raw", "-1M"],
                 ["-f", "raw", "--shrink", "-1M"], ["-f", "raw", "--preallocation=falloc", "8M"],
                 ["-f", "raw", "--preallocation=full", "9M"],
                 ["-f", "raw", "--preallocation=metadata", "10M"],
                 ["-f", "raw", "--shrink", "2M"], ["-f", "qcow2", "3M"]):
        _both(capsys, p, *args[:-1], str(p), args[-1])
        assert p.stat().st_size == (tmp / "ref-d.raw").stat().st_size
        assert p.read_bytes() == (tmp / "ref-d.raw").read_bytes()
    assert p.read_bytes() == b"\x42" * (2 * MiB)
    assert main(["resize", str(p), "+1M"]) == 0  # probed as raw
    assert p.read_bytes() == b"\x42" * (2 * MiB) + bytes(MiB)
