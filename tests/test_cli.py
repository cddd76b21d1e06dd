"""The `qcow2` command (create, info, map) against qemu-img on the same files.

Outputs are compared as text: qemu-img's JSON key order, number formats and human
tables must come out byte for byte.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_clean, qemu_img, qemu_info, qemu_io

import qcow2
from qcow2.cli import main
from qcow2.commands import parse_size
from qcow2.info import size_to_str


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def ref(*args: str) -> tuple[int, str, str]:
    p = qemu_img(*args, check=False)
    return p.returncode, p.stdout, p.stderr


def same_as_qemu(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run a sub-command with both tools; stdout and exit code must be identical."""
    rc, out, err = cli(capsys, *args)
    qrc, qout, qerr = ref(*args)
    assert (rc, out) == (qrc, qout), f"{args}\nqemu-img ({qrc}):\n{qout}{qerr}\nours ({rc}):\n{out}{err}"
    return out


# ------------------------------------------------------------------ helpers --
def set_header_bits(path: Path, incompat: int = 0, size: int | None = None) -> None:
    with open(path, "r+b") as f:
        if incompat:
            f.seek(72)
            (v,) = struct.unpack(">Q", f.read(8))
            f.seek(72)
            f.write(struct.pack(">Q", v | incompat))
        if size is not None:
            f.seek(24)
            f.write(struct.pack(">Q", size))


# ------------------------------------------------------------------ sizes --
@pytest.mark.parametrize("value", [
    0, 1, 511, 512, 1000, 1023, 1024, 1536, 396_000, 1 << 20, 1_000_000, 1_048_575,
    1_073_741_824, 1_610_612_736, 1_023_999_999, 10 ** 12, 1 << 50, (1 << 63) - 1,
])
def test_size_to_str_matches_qemu_img(tmp: Path, capsys: pytest.CaptureFixture[str],
                                      value: int) -> None:
    """qemu-img prints a snapshot's VM state size with its human size function."""
    p = tmp / "v.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "1M")
    qemu_img("snapshot", "-c", "s", str(p))
    _patch_snapshot(p, vm_state_size=value)
    out = same_as_qemu(capsys, "info", str(p))
    assert f" {size_to_str(value)} " in out


def _patch_snapshot(path: Path, *, vm_state_size: int | None = None, vm_clock: int | None = None,
                    date_sec: int | None = None, icount: int | None = None) -> None:
    """Edit fields of the first snapshot table entry in place."""
    with open(path, "r+b") as f:
        f.seek(64)
        (table,) = struct.unpack(">Q", f.read(8))
        if date_sec is not None:
            f.seek(table + 16)
            f.write(struct.pack(">I", date_sec))
        if vm_clock is not None:
            f.seek(table + 24)
            f.write(struct.pack(">Q", vm_clock))
        f.seek(table + 36)
        (extra,) = struct.unpack(">I", f.read(4))
        if vm_state_size is not None:
            f.seek(table + 32)
            f.write(struct.pack(">I", vm_state_size if vm_state_size < 1 << 32 else 0))
            if extra >= 8:
                f.seek(table + 40)
                f.write(struct.pack(">Q", vm_state_size))
        if icount is not None and extra >= 24:
            f.seek(table + 56)
            f.write(struct.pack(">Q", icount & 0xFFFFFFFFFFFFFFFF))


SIZES = ["1G", "1.5G", "12345", "1b", "1B", "0", "00", "010", "0x1000", "0X1000", "1k", "1K",
         "1m", "1t", "1p", "5.M", "1.5k", "1.0001k", "0.5e", "7E", "7.99E", " 1M", "+1M",
         "1e3", "1M ", "1MiB", "1 M", ".5M", "1kb", "1.5b", "1.5", "1,5M", "0x1.5k", "abc", "",
         "20E", "8E", "99999999999999999999", "-", "1.5B", "0.5"]


def test_create_size_argument_like_qemu_img(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, s in enumerate(SIZES):
        ours, theirs = tmp / f"o{i}.qcow2", tmp / f"q{i}.qcow2"
        rc, out, err = cli(capsys, "create", "-f", "qcow2", str(ours), s)
        qrc, qout, qerr = ref("create", "-f", "qcow2", str(theirs), s)
        assert rc == qrc, (s, out, err, qout, qerr)
        assert out.replace(str(ours), "F") == qout.replace(str(theirs), "F"), s
        if rc:
            assert len(err.splitlines()) == 1, (s, err)
            assert out or "Invalid image size" in err, (s, err)
        else:
            assert qemu_info(ours)["virtual-size"] == qemu_info(theirs)["virtual-size"], s


def test_parse_size_rejects_what_qemu_rejects() -> None:
    assert parse_size("64k") == 65536
    assert parse_size("1.5G") == 3 << 29
    for bad in ("1.5", "k", "-1", "1e3", "0x1.0"):
        with pytest.raises(ValueError):
            parse_size(bad)


# ------------------------------------------------------------------ create --
CREATE_CASES = [
    [],
    ["-o", "cluster_size=512"],
    ["-o", "cluster_size=4k,refcount_bits=8,lazy_refcounts=on,compression_type=zstd"],
    ["-o", "cluster_size=16k,extended_l2=on"],
    ["-o", "cluster_size=2M,refcount_bits=64"],
    ["-o", "refcount_bits=1"],
    ["-o", "compat=0.10"],
    ["-o", "compat=v2"],
    ["-o", "compat=v3,lazy_refcounts=true,extended_l2=no"],
    ["-o", "cluster_size=0x1000,refcount_bits=0x10"],
    ["-o", "refcount_bits=010"],
    ["-o", "cluster_size=4k", "-o", "refcount_bits=32"],
    ["-o", "cluster_size=4k,cluster_size=8k"],
    ["-o", "preallocation=metadata"],
    ["-o", "preallocation=falloc"],
    ["-o", "preallocation=full,cluster_size=4k"],
    ["-o", "preallocation=metadata,extended_l2=on"],
    ["-o", "preallocation=off"],
]


@pytest.mark.parametrize("opts", CREATE_CASES, ids=lambda o: " ".join(o) or "defaults")
def test_create_like_qemu_img(tmp: Path, capsys: pytest.CaptureFixture[str], opts: list[str]) -> None:
    ours, theirs = tmp / "ours.qcow2", tmp / "theirs.qcow2"
    rc, out, err = cli(capsys, "create", "-f", "qcow2", *opts, str(ours), "5000k")
    qrc, qout, qerr = ref("create", "-f", "qcow2", *opts, str(theirs), "5000k")
    assert (rc, err) == (qrc, "") == (0, qerr)
    assert out.replace(str(ours), "F") == qout.replace(str(theirs), "F")
    assert_clean(ours)
    a, b = qemu_info(ours), qemu_info(theirs)
    for d in (a, b):
        d.pop("filename")
        d.pop("actual-size")
    assert a == b
    # same allocation map (host offsets may differ with the layout; compare the rest)
    strip = [{k: v for k, v in e.items() if k != "offset"} | {"has_offset": "offset" in e}
             for e in json.loads(qemu_img("map", "--output=json", str(ours)).stdout)]
    strip_q = [{k: v for k, v in e.items() if k != "offset"} | {"has_offset": "offset" in e}
               for e in json.loads(qemu_img("map", "--output=json", str(theirs)).stdout)]
    assert strip == strip_q


def test_create_quiet_and_backing(tmp: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp)
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "3M")
    qemu_io("base.qcow2", "write -P 7 0 1M")
    os.mkdir("sub")
    qemu_img("create", "-q", "-f", "qcow2", "sub/base.qcow2", "2M")
    cases = [
        ["-b", "base.qcow2", "-F", "qcow2", "{}"],
        ["-b", "base.qcow2", "-F", "qcow2", "{}", "8M"],
        ["-b", "base.qcow2", "-F", "raw", "{}"],
        ["-o", "backing_file=base.qcow2,backing_fmt=qcow2", "{}"],
        ["-u", "-b", "missing.qcow2", "-F", "qcow2", "{}", "1M"],
        ["-o", "extended_l2=on,preallocation=metadata", "-b", "base.qcow2", "-F", "qcow2", "{}"],
    ]
    for i, case in enumerate(cases):
        o, q = f"o{i}.qcow2", f"q{i}.qcow2"
        rc, out, err = cli(capsys, "create", "-f", "qcow2", *[a.format(o) for a in case])
        qrc, qout, qerr = ref("create", "-f", "qcow2", *[a.format(q) for a in case])
        assert (rc, err) == (qrc, qerr) == (0, ""), case
        assert out.replace(o, "F") == qout.replace(q, "F"), case
        if "missing.qcow2" not in case:
            assert same_as_qemu(capsys, "map", "--output=json", o) == \
                qemu_img("map", "--output=json", q).stdout, case
        a, b = qemu_info(o), qemu_info(q)
        for d in (a, b):
            for k in ("filename", "actual-size"):
                d.pop(k)
        assert a == b, case
    # a relative backing name inside a folder resolves against the image's folder
    rc, out, _ = cli(capsys, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                     "sub/top.qcow2")
    assert rc == 0 and out == ""
    assert qemu_info("sub/top.qcow2")["virtual-size"] == 2 << 20
    assert_clean("sub/top.qcow2")
    # -q prints nothing
    rc, out, err = cli(capsys, "create", "-q", "-f", "qcow2", "quiet.qcow2", "1M")
    assert (rc, out, err) == (0, "", "")


@pytest.mark.parametrize("args", [
    ["-o", "foo=bar", "{}", "1M"],
    ["-o", "cluster_size=abc", "{}", "1M"],
    ["-o", "cluster_size", "{}", "1M"],
    ["-o", "cluster_size=1000", "{}", "1M"],
    ["-o", "cluster_size=4k,extended_l2=on", "{}", "1M"],
    ["-o", "refcount_bits=3", "{}", "1M"],
    ["-o", "refcount_bits=abc", "{}", "1M"],
    ["-o", "lazy_refcounts=maybe", "{}", "1M"],
    ["-o", "lazy_refcounts=ON", "{}", "1M"],
    ["-o", "compat=0.10,lazy_refcounts=on", "{}", "1M"],
    ["-o", "compat=0.10,refcount_bits=8", "{}", "1M"],
    ["-o", "compat=0.10,compression_type=zstd", "{}", "1M"],
    ["-o", "compat=1.2", "{}", "1M"],
    ["-o", "compression_type=lz4", "{}", "1M"],
    ["-o", "preallocation=bogus", "{}", "1M"],
    ["-o", "size=2M", "{}", "1M"],
    ["-o", "", "{}", "1M"],
    ["-o", ",cluster_size=4k", "{}", "1M"],
    ["-o", "cluster_size=4k,", "{}", "1M"],
    ["-o", "cluster_size=512", "{}", "1T"],
    ["{}"],
    ["-F", "qcow2", "{}", "1M"],
    ["-b", "missing.qcow2", "-F", "qcow2", "{}"],
    ["-b", "base.qcow2", "{}"],
    ["-u", "-b", "base.qcow2", "-F", "qcow2", "{}"],
    ["-b", "base.qcow2", "-F", "qcow2", "-o", "preallocation=metadata", "{}"],
    ["-b", "{}", "-F", "qcow2", "{}", "1M"],
    ["{}", "1M", "extra"],
])
def test_create_errors_like_qemu_img(tmp: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.chdir(tmp)
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    rc, out, err = cli(capsys, "create", "-f", "qcow2", *[a.format("o.qcow2") for a in args])
    qrc, qout, _ = ref("create", "-f", "qcow2", *[a.format("q.qcow2") for a in args])
    assert rc == qrc == 1
    assert out.replace("o.qcow2", "F") == qout.replace("q.qcow2", "F")
    assert len(err.splitlines()) == 1 and err.startswith("qcow2"), err
    assert "Traceback" not in err
    assert not os.path.exists("o.qcow2") or "Formatting" in out


def test_create_option_help(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    rc, out, _ = cli(capsys, "create", "-f", "qcow2", "-o", "help", str(tmp / "x.qcow2"), "1M")
    assert rc == 0 and not (tmp / "x.qcow2").exists()
    qlines = set(qemu_img("create", "-f", "qcow2", "-o", "help").stdout.splitlines())
    lines = out.splitlines()
    assert lines[0] == "Supported qcow2 options:"
    # every option we list is listed by qemu-img the same way, but for our own one
    ours = [ln for ln in lines if ln.strip().startswith("refcount_mode=")]
    assert len(ours) == 1 and "not qemu-img's" in ours[0]
    assert len(lines) == 12 and set(lines) - set(ours) <= qlines
    rc, out2, _ = cli(capsys, "create", "-o", "cluster_size=4k,?")
    assert rc == 0 and out2 == out


# ------------------------------------------------------------------ info --
INFO_CASES = [
    "compat=0.10",
    "compat=0.10,cluster_size=512",
    "compat=1.1",
    "cluster_size=512,refcount_bits=1",
    "cluster_size=4k,refcount_bits=2",
    "cluster_size=4k,refcount_bits=4",
    "refcount_bits=8,lazy_refcounts=on",
    "refcount_bits=32,compression_type=zstd",
    "cluster_size=2M,refcount_bits=64",
    "cluster_size=16k,extended_l2=on",
    "extended_l2=on,compression_type=zstd,lazy_refcounts=on",
    "preallocation=metadata",
    "preallocation=falloc,cluster_size=4k",
    "preallocation=full",
]


def _outputs_equal(capsys: pytest.CaptureFixture[str], path: str) -> None:
    for extra in ([], ["--backing-chain"]):
        for fmt in ("human", "json"):
            same_as_qemu(capsys, "info", f"--output={fmt}", *extra, path)
    same_as_qemu(capsys, "info", path)
    for fmt in ("human", "json"):
        same_as_qemu(capsys, "map", f"--output={fmt}", path)
    same_as_qemu(capsys, "map", path)


@pytest.mark.parametrize("opts", INFO_CASES)
def test_info_and_map_like_qemu_img(tmp: Path, capsys: pytest.CaptureFixture[str], opts: str) -> None:
    p = str(tmp / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p, "3M")
    _outputs_equal(capsys, p)
    qemu_io(p, "write -P 1 0 100k", "write -z 1M 64k", "write -P 2 2M 4k", "discard 2M 4k",
            "write -z -u 2560k 64k")
    _outputs_equal(capsys, p)
    with qcow2.open(p) as img:
        assert img.info() == qemu_info(p)
        assert img.map() == json.loads(qemu_img("map", "--output=json", p).stdout)


def test_info_map_backing_chain(tmp: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Three layers of different sizes, a relative backing name in a folder, raw bottom."""
    monkeypatch.chdir(tmp)
    os.mkdir("d")
    qemu_img("create", "-q", "-f", "raw", "d/base.raw", "1M")
    qemu_io("d/base.raw", "write -P 9 0 256k", "write -P 8 768k 4k", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "d/mid.qcow2", "2M")
    qemu_io("d/mid.qcow2", "write -P 1 128k 64k", "write -z 512k 64k", "write -P 3 1536k 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2",
             "d/top.qcow2", "3M")
    qemu_io("d/top.qcow2", "write -P 2 4k 8k", "write -z 1600k 8k", "write -P 4 2600k 4k")
    for name in ("d/top.qcow2", "d/mid.qcow2", "./d/top.qcow2", str(tmp / "d/top.qcow2")):
        _outputs_equal(capsys, name)
    monkeypatch.chdir(tmp / "d")
    _outputs_equal(capsys, "top.qcow2")
    _outputs_equal(capsys, "../d/top.qcow2")
    for fmt in ("human", "json"):
        same_as_qemu(capsys, "map", f"--output={fmt}", "-s", "64k", "-l", "1600k", "top.qcow2")
        same_as_qemu(capsys, "map", f"--output={fmt}", "-s", "8M", "top.qcow2")


def test_info_missing_backing_file(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = str(tmp / "o.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", p, "1M")
    for fmt in ("human", "json"):
        same_as_qemu(capsys, "info", f"--output={fmt}", p)  # the chain is not opened
        rc, out, err = cli(capsys, "info", "--backing-chain", f"--output={fmt}", p)
        assert (rc, out) == (1, "") and len(err.splitlines()) == 1 and "gone.qcow2" in err
    rc, out, err = cli(capsys, "map", p)
    assert (rc, out) == (1, "") and len(err.splitlines()) == 1


def test_missing_backing_file_message_like_qemu(tmp: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command that opens the chain says what qemu-img says, the backing name
    combined with the image name as given: "Could not open 'd/o.qcow2': Could not open
    backing file: Could not open 'd/gone.qcow2': No such file or directory"."""
    monkeypatch.chdir(tmp)
    (tmp / "d").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
             "d/o.qcow2", "1M")
    for args in (["map", "d/o.qcow2"], ["commit", "d/o.qcow2"], ["snapshot", "-l", "d/o.qcow2"],
                 ["measure", "-O", "qcow2", "d/o.qcow2"], ["resize", "d/o.qcow2", "2M"],
                 ["dd", "if=d/o.qcow2", "of=x.raw"]):
        same_error_as_qemu(capsys, *args)


def test_missing_backing_file_deep_in_the_chain_like_qemu(
        tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two or more levels down, the missing file is named as QEMU combines the names from
    the image name as given (relative stays relative), or as stored when absolute."""
    (tmp / "d" / "sub").mkdir(parents=True)
    (tmp / "run").mkdir()
    monkeypatch.chdir(tmp / "d")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
             "sub/mid.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "mid.qcow2", "-F", "qcow2",
             "sub/top.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "sub/top.qcow2", "-F", "qcow2",
             "rel.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(tmp / "d/sub/top.qcow2"), "-F",
             "qcow2", "abs.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "new.qcow2", "1M")
    monkeypatch.chdir(tmp / "run")
    for img in ("../d/sub/top.qcow2", "../d/rel.qcow2", "../d/abs.qcow2"):
        for args in (["check", img], ["map", img], ["compare", img, "../d/new.qcow2"],
                     ["convert", "-O", "raw", img, "x.raw"], ["measure", "-O", "qcow2", img],
                     ["info", "--backing-chain", img]):
            same_error_as_qemu(capsys, *args)
    same_error_as_qemu(capsys, "rebase", "-b", "sub/top.qcow2", "-F", "qcow2", "../d/new.qcow2")


def _drop_backing_format(path: str) -> None:
    """Hide the backing format extension (written first) as an unknown one, which QEMU
    ignores: an image with a backing file and no backing format, as older tools made."""
    with open(path, "r+b") as f:
        f.seek(100)
        (pos,) = struct.unpack(">I", f.read(4))
        f.seek(pos)
        assert struct.unpack(">I", f.read(4))[0] == 0xE2792ACA
        f.seek(pos)
        f.write(struct.pack(">I", 0x12345678))


def same_error_as_qemu(capsys: pytest.CaptureFixture[str], *args: str) -> None:
    """Both tools fail with the same exit code and the same one-line message."""
    rc, out, err = cli(capsys, *args)
    qrc, qout, qerr = ref(*args)
    assert qrc != 0 and (rc, out) == (qrc, qout), (args, qerr, err)
    assert err.replace("qcow2: ", "qemu-img: ", 1) == qerr, (args, qerr, err)


def test_info_backing_chain_matrix(tmp: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """qcow2 over qcow2 over qcow2 over raw, relative names through a folder, backing
    format present and absent, snapshots, bitmaps, v2, extended L2, zstd, lazy refcounts,
    corrupt and dirty flags; raw files and -f; missing members and loops."""
    monkeypatch.chdir(tmp)
    os.mkdir("sub")
    qemu_img("create", "-q", "-f", "raw", "sub/base.raw", "1000000")  # partial last sector
    qemu_io("sub/base.raw", "write -P 9 0 256k", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw",
             "sub/v2.qcow2", "4M")
    qemu_io("sub/v2.qcow2", "write -P 1 64k 64k")
    qemu_img("snapshot", "-c", "s1", "sub/v2.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd,"
             "lazy_refcounts=on,cluster_size=128k", "-b", "v2.qcow2", "-F", "qcow2",
             "sub/ext.qcow2", "4M")
    qemu_io("sub/ext.qcow2", "write -P 2 1M 64k")
    qemu_img("bitmap", "--add", "-g", "64k", "sub/ext.qcow2", "bm0")
    qemu_img("bitmap", "--add", "--disable", "sub/ext.qcow2", "bm1")
    qemu_img("snapshot", "-c", "snapA", "sub/ext.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "sub/ext.qcow2", "-F", "qcow2", "top.qcow2")
    _drop_backing_format("top.qcow2")  # probed: qcow2
    qemu_img("create", "-q", "-f", "qcow2", "-b", "sub/base.raw", "-F", "raw", "nofmt.qcow2")
    _drop_backing_format("nofmt.qcow2")  # probed: raw
    qemu_img("create", "-q", "-f", "qcow2", "-b", "nofmt.qcow2", "-F", "qcow2", "over.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "flags.qcow2", "1M")
    set_header_bits(tmp / "flags.qcow2", incompat=3)  # dirty and corrupt
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "flags.qcow2", "-F", "qcow2",
             "top_c.qcow2", "1M")
    for name in ("top.qcow2", "./top.qcow2", str(tmp / "top.qcow2"), "over.qcow2",
                 "top_c.qcow2", "sub/base.raw"):
        for fmt in ("human", "json"):
            same_as_qemu(capsys, "info", "-U", "--backing-chain", f"--output={fmt}", name)
            same_as_qemu(capsys, "info", "--force-share", f"--output={fmt}", name)
    same_as_qemu(capsys, "info", "-f", "raw", "top.qcow2")
    same_as_qemu(capsys, "info", "-f", "qcow2", "--backing-chain", "over.qcow2")
    # errors: the same exit code and line
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "mid.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "mid.qcow2", "-F", "qcow2", "hole.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "lb.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "lb.qcow2", "-F", "qcow2", "la.qcow2")
    qemu_img("rebase", "-q", "-u", "-b", "la.qcow2", "-F", "qcow2", "lb.qcow2")
    for args in (["--backing-chain", "hole.qcow2"], ["--backing-chain", "./la.qcow2"],
                 ["nonexistent.qcow2"], ["-f", "qcow2", "sub/base.raw"], ["sub"],
                 ["-f", "nosuchfmt", "top.qcow2"]):
        same_error_as_qemu(capsys, "info", *args)


def test_info_escapes_names_like_qemu(tmp: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp)
    base = 'bäse "1"\\ \t€😀.qcow2'
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "top,1.qcow2")
    _outputs_equal(capsys, "top,1.qcow2")
    rc, out, _ = cli(capsys, "create", "-f", "qcow2", "-b", base, "-F", "qcow2", "t2,x.qcow2")
    assert rc == 0 and out == qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2",
                                       "t2,x.qcow2").stdout


def test_info_flags_and_odd_size(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp / "f.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "1M")
    set_header_bits(p, incompat=1)  # dirty
    _outputs_equal(capsys, str(p))
    set_header_bits(p, incompat=2)  # and corrupt
    _outputs_equal(capsys, str(p))
    q = tmp / "odd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q), "1M")
    set_header_bits(q, size=1000)  # QEMU drops the partial last sector
    _outputs_equal(capsys, str(q))
    r = tmp / "odd.raw"
    r.write_bytes(os.urandom(1000))
    top = tmp / "over-odd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(r), "-F", "raw", str(top))
    _outputs_equal(capsys, str(top))
    e = tmp / "empty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(e), "0")
    _outputs_equal(capsys, str(e))


def test_info_snapshots(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = str(tmp / "s.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", p, "2M")
    qemu_io(p, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "first", p)
    _outputs_equal(capsys, p)
    # fields qemu-img cannot set: a VM clock, VM state size, no icount, a fixed date
    _patch_snapshot(Path(p), vm_state_size=5 << 29, vm_clock=(100 * 3600 + 62) * 10**9 + 345_678_912,
                    date_sec=1_500_000_000, icount=-1)
    qemu_img("snapshot", "-c", "a much longer snapshot name ü", p)
    qemu_img("snapshot", "-c", "ü2", p)
    qemu_io(p, "write -P 2 0 64k")
    _outputs_equal(capsys, p)
    with qcow2.open(p) as img:
        assert img.info() == qemu_info(p)


def test_info_bitmaps(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = str(tmp / "b.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", p, "10M")
    qemu_img("bitmap", "--add", p, "b0")
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", p, "bit 1")
    _outputs_equal(capsys, p)


def test_map_compressed(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp / "r.raw"
    qemu_img("create", "-q", "-f", "raw", str(raw), "4M")
    qemu_io(raw, "write -P 3 0 1M", "write -P 4 3M 64k", fmt="raw")
    for ctype in ("zlib", "zstd"):
        p = str(tmp / f"c-{ctype}.qcow2")
        qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", str(raw), p)
        same_as_qemu(capsys, "map", "--output=json", p)
        # the human form cannot show compressed clusters: header, then one error line
        rc, out, err = cli(capsys, "map", p)
        qrc, qout, qerr = ref("map", p)
        assert (rc, out) == (qrc, qout) and rc == 1
        assert err.splitlines() == ["qcow2: " + qerr.strip().removeprefix("qemu-img: ")]


def test_map_zero_and_subclusters(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = str(tmp / "z.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    qemu_io(p, "write -P 1 0 256k", "write -z 0 128k", "write -z -u 128k 64k", "discard 320k 64k")
    _outputs_equal(capsys, p)
    e = str(tmp / "e.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", e, "1M")
    qemu_io(e, "write -P 1 0 256k", "write -z 0 4k", "write -z -u 64k 8k", "write -P 2 300k 4k",
            "discard 132k 8k")
    _outputs_equal(capsys, e)
    b = str(tmp / "eb.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,preallocation=metadata",
             "-b", e, "-F", "qcow2", b, "2M")
    qemu_io(b, "write -P 5 8k 4k")
    _outputs_equal(capsys, b)


# ------------------------------------------------------------------ errors --
@pytest.mark.parametrize("args", [
    ["info", "{missing}"],
    ["map", "{missing}"],
    ["info", "-f", "qcow2", "{raw}"],  # (without -f, info shows a raw file as qemu-img does)
    ["map", "{raw}"],
    ["info", "--output=xml", "{img}"],
    ["map", "--output=yaml", "{img}"],
    ["info", "-f", "vmdk", "{img}"],
    ["create", "-f", "vmdk", "{new}", "1M"],
    ["create", "-f", "qcow2", "{nodir}", "1M"],
    ["create", "-f", "qcow2", "-o", "data_file=x.raw", "{new}", "1M"],
    ["create", "-f", "qcow2", "-o", "encryption=on", "{new}", "1M"],
    ["info"],
    ["create"],
    ["create", "-f", "qcow2"],
    ["map", "{img}", "{img}"],
    ["frobnicate", "{img}"],
    [],
    ["info", "--bogus", "{img}"],
    ["map", "-s", "abc", "{img}"],
])
def test_errors_are_one_line(tmp: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    img = tmp / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    (tmp / "r.raw").write_bytes(bytes(8192))
    names = {"missing": str(tmp / "missing.qcow2"), "raw": str(tmp / "r.raw"), "img": str(img),
             "new": str(tmp / "new.qcow2"), "nodir": str(tmp / "no" / "dir.qcow2")}
    rc, out, err = cli(capsys, *[a.format(**names) for a in args])
    assert rc == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qcow2") and "Traceback" not in err
    assert not (tmp / "new.qcow2").exists()


def test_usage_errors_in_qemus_words(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file name too many or missing, an unknown option, an option without its value:
    qemu-img's first line (its "Try 'qemu-img --help'" line is our one-line suffix)."""
    img = str(tmp / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    for args in (["info", img, img], ["info"], ["info", "-Z", img], ["info", "--output"],
                 ["check", img, img], ["map", "--nope", img], ["resize", img, "1G", "2G"],
                 ["commit", "-Z", img], ["measure", img, img], ["bench", "-c"],
                 ["amend", "-o", "compat=1.1", img, img], ["compare", img]):
        rc, out, err = cli(capsys, *args)
        qrc, qout, qerr = ref(*args)
        assert rc == qrc == 1 and out == qout == "", (args, qerr)
        first = qerr.splitlines()[0].replace("qemu-img:", "qcow2:")
        assert err in (first + "\n", first + " (try 'qcow2 --help')\n"), (args, qerr, err)


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--help"], ["create", "--help"], ["info", "-h"], ["map", "--help"]):
        rc, out, _ = cli(capsys, *args)
        assert rc == 0 and "usage:" in out


def test_python_dash_m(tmp: Path) -> None:
    p = tmp / "m.qcow2"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    run = subprocess.run([sys.executable, "-m", "qcow2", "create", "-f", "qcow2", str(p), "1M"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout.startswith("Formatting")
    run = subprocess.run([sys.executable, "-m", "qcow2", "info", "--output=json", str(p)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout == qemu_img("info", "--output=json", str(p)).stdout
    run = subprocess.run([sys.executable, "-m", "qcow2", "info", str(tmp / "nope")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 1 and len(run.stderr.splitlines()) == 1 and run.stdout == ""


def test_info_of_snapshots_made_by_the_library(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = str(tmp / "ls.qcow2")
    qcow2.create(p, 4 << 20)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"x" * 70000, 1000)
        img.create_snapshot("one")
        img.create_snapshot("two", b"state" * 1000, vm_clock_nsec=3_723_004_000_000, icount=None)
        img.pwrite(b"y" * 5000, 0)
    _outputs_equal(capsys, p)
    with qcow2.open(p) as img:
        assert img.info() == qemu_info(p)
        assert [s["name"] for s in img.info()["snapshots"]] == ["one", "two"]
