"""`qcow2 measure` against `qemu-img measure`: the same numbers (required, fully-allocated,
bitmaps) and the same text, JSON and exit codes, for empty images of a matrix of sizes and
creation options and for real raw and qcow2 sources."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import qemu_img, qemu_io, run

import qcow2
from qcow2.cli import main
from qcow2.measure import measure

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def _both(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    theirs = run("qemu-img", "measure", *args, check=False)
    rc = main(["measure", *args])
    cap = capsys.readouterr()
    assert rc == theirs.returncode, (args, cap.err, theirs.stderr)
    if rc == 0:
        assert cap.out == theirs.stdout, args
    else:
        # one line that begins with qemu-img's (first) line, under our program name
        first = theirs.stderr.splitlines()[0].replace("qemu-img:", "qcow2:")
        assert cap.err.count("\n") == 1 and cap.err.startswith(first), (args, cap.err)
    return rc, cap.out, cap.err


SIZES = ["0", "1", "512", "65535", "1M", "1G", "100G", "3T", str(10 * GiB + 12345)]
OPTS = [
    "",
    "cluster_size=512",
    "cluster_size=4k,refcount_bits=1",
    "cluster_size=16k,extended_l2=on",
    "cluster_size=2M,refcount_bits=64",
    "refcount_bits=8,preallocation=metadata",
    "extended_l2=on,preallocation=falloc",
    "preallocation=full,cluster_size=128k",
    "compat=0.10",
    "backing_file=foo.qcow2",
]


@pytest.mark.parametrize("opts", OPTS)
def test_size_matrix(capsys: pytest.CaptureFixture[str], opts: str) -> None:
    for size in SIZES:
        for out in ("human", "json"):
            args = ["-O", "qcow2", "--output=" + out, "--size", size]
            _both(capsys, *args, *(["-o", opts] if opts else []))


def test_raw_target_and_errors(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    _both(capsys, "--size", "1G")
    _both(capsys, "--size", "1000", "--output=json")
    for bad in (["-O", "qcow2"], ["--size", "1x"], ["--size", "9E"], ["-O", "vmdk", "--size", "1G"],
                ["-O", "foo", "--size", "1G"], ["-O", "qcow2", "-o", "foo=1", "--size", "1G"],
                ["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"],
                ["-O", "qcow2", "-o", "compat=0.9", "--size", "1G"],
                ["-O", "qcow2", "-o", "preallocation=foo", "--size", "1G"],
                ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1G"],
                ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "--size", "1G"],
                ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
                ["-O", "qcow2", "-o", "cluster_size=512", "--size", "3T"],
                ["-O", "qcow2", "-o", "size=5G"], ["--output=xml", "--size", "1G"],
                ["-l", "s1", "--size", "1G"], ["-O", "qcow2", str(tmp / "missing")]):
        rc, _, _ = _both(capsys, *bad)
        assert rc == 1
    p = tmp / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "1M")
    rc, _, _ = _both(capsys, "--size", "1G", str(p))
    assert rc == 1


def test_options_per_target_format(capsys: pytest.CaptureFixture[str]) -> None:
    """-O raw takes raw's creation options only; qcow2 options that change no figure
    (a data file, the file system's settings) are accepted once their type checks."""
    for fmt, opts, want in (("raw", "cluster_size=4k", 1), ("raw", "foo=1", 1),
                            ("raw", "preallocation=full,extent_size_hint=1M,nocow=on", 0),
                            ("raw", "nocow=maybe", 1), ("raw", "data_file=x", 1),
                            ("qcow2", "data_file=x,data_file_raw=on,cluster_size=4k", 0),
                            ("qcow2", "nocow=on,extent_size_hint=1M,preallocation=full", 0),
                            ("qcow2", "data_file_raw=maybe", 1),
                            ("qcow2", "extent_size_hint=x", 1),
                            # a bare noNAME is NAME=off (QEMU's reading: nocow is cow=off)
                            ("qcow2", "noextended_l2,nolazy_refcounts", 0), ("qcow2", "nocow", 1),
                            ("raw", "nocow", 1)):
        assert _both(capsys, "-O", fmt, "-o", opts, "--size", "1G")[0] == want, (fmt, opts)


def _sources(tmp: Path) -> list[tuple[str, list[str]]]:
    """(path, extra measure args) of real images with data, zeros, holes and chains."""
    out: list[tuple[str, list[str]]] = []
    raw = tmp / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(20 * MiB + 4096 + 300)
        for off in (0, 3 * MiB + 4096, 7 * MiB + 100, 20 * MiB):
            f.seek(off)
            f.write(os.urandom(5000))
    out.append((str(raw), []))
    a = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(a), "33M")
    qemu_io(a, "write -P 1 0 1M", "write -z 2M 1M", "write -P 2 5000000 100",
            "write -c -P 3 8M 4k", "write -P 4 32M 4k")
    out.append((str(a), []))
    qemu_img("snapshot", "-c", "s1", str(a))
    qemu_io(a, "write -P 5 16M 3M", "discard 0 512k")
    out.append((str(a), []))
    out.append((str(a), ["-l", "s1"]))
    out.append((str(a), ["-l", "snapshot.name=s1"]))
    b = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(a), "-F", "qcow2", str(b))
    qemu_io(b, "write -P 6 24M 1M", "write -z 0 64k")
    out.append((str(b), []))
    e = tmp / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", str(e), "9M")
    qemu_io(e, "write -P 7 4k 4k", "write -P 7 1M 200k", "write -z 3M 64k")
    out.append((str(e), []))
    m = tmp / "meta.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(m), "64M")
    qemu_io(m, "write -P 8 1M 64k")
    out.append((str(m), []))
    v2 = tmp / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(v2), "5M")
    qemu_io(v2, "write -P 9 1M 64k")
    out.append((str(v2), []))
    return out


TARGETS = ["", "cluster_size=512", "cluster_size=2M", "cluster_size=16k,extended_l2=on",
           "refcount_bits=1", "compat=0.10", "preallocation=full", "backing_file=x"]


def test_real_sources(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    for path, extra in _sources(tmp):
        _both(capsys, *extra, path)  # -O raw, the default
        for opts in TARGETS:
            _both(capsys, "-O", "qcow2", "--output=json", *(["-o", opts] if opts else []),
                  *extra, path)


def test_bitmaps(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    p = tmp / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "300M")
    qemu_io(p, "write -P 1 0 2M")
    qemu_img("bitmap", "--add", str(p), "b0")
    qemu_img("bitmap", "--add", "-g", "512", str(p), "a-much-longer-bitmap-name")
    qemu_img("bitmap", "--add", "-g", "2M", str(p), "c")
    for opts in ("", "cluster_size=512", "cluster_size=2M", "compat=0.10"):
        _, out, _ = _both(capsys, "-O", "qcow2", "--output=json",
                          *(["-o", opts] if opts else []), str(p))
        got = json.loads(out)
        assert ("bitmaps" in got) == (opts != "compat=0.10")
        if opts == "":
            assert got["bitmaps"] > 0


def test_library() -> None:
    m = measure(size=GiB, options={})
    assert m.fully_allocated > GiB > m.required > 0 and m.bitmaps is None
    assert measure(size=1000, fmt="raw").to_dict() == {"required": 1024, "fully-allocated": 1024}


def test_library_source(tmp: Path) -> None:
    p = tmp / "d.qcow2"
    qcow2.create(p, 8 * MiB, cluster_size=4096)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"x" * 10000, 3 * MiB)
    ref = json.loads(qemu_img("measure", "-O", "qcow2", "--output=json", str(p)).stdout)
    with qcow2.open(p) as img:
        assert measure(img).to_dict() == ref
