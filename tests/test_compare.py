"""`qcow2 compare` against `qemu-img compare`: the same message on stdout and the same
exit code for identical images, mismatches (reported at the first differing sector),
size mismatches, raw against qcow2, backing chains, and images that cannot be opened."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import qemu_img, qemu_io, run

from qcow2.cli import main

KiB = 1024
MiB = 1024 * KiB


def _parity(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    theirs = run("qemu-img", "compare", *args, check=False)
    rc = main(["compare", *args])
    out = capsys.readouterr().out
    assert (rc, out) == (theirs.returncode, theirs.stdout), (args, theirs.stderr)
    return rc, out


def _img(tmp: Path, name: str, size: int, *cmds: str, fmt: str = "qcow2", opts: str = "") -> str:
    p = tmp / name
    qemu_img("create", "-q", "-f", fmt, *(["-o", opts] if opts else []), str(p), str(size))
    if cmds:
        qemu_io(p, *cmds, fmt=fmt)
    return str(p)


def test_identical_and_different(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _img(tmp, "a.qcow2", 4 * MiB, "write -P 0x11 0 1M", "write -z 2M 64k")
    b = _img(tmp, "b.qcow2", 4 * MiB, "write -P 0x11 0 1M", "write -c -P 0 3M 64k",
             opts="cluster_size=4096")
    assert _parity(capsys, a, b) == (0, "Images are identical.\n")
    c = _img(tmp, "c.qcow2", 4 * MiB, "write -P 0x11 0 1M", "write -P 0x12 2049k 1")
    rc, out = _parity(capsys, a, c)
    assert rc == 1 and "2098176" in out  # 2049 KiB: the sector holding the changed byte
    assert _parity(capsys, "-q", a, c) == (1, "")


def test_progress_like_qemu(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-p: qemu-img's progress lines on stdout, the verdict after the last one, then a
    newline of its own (also when an image cannot be opened)."""
    a = _img(tmp, "a.qcow2", 24 * MiB, "write -P 0x11 0 20M")
    b = _img(tmp, "b.qcow2", 24 * MiB, "write -P 0x11 0 20M")
    c = _img(tmp, "c.qcow2", 24 * MiB, "write -P 0x11 0 20M", "write -P 0x12 15M 1")
    for args in ((a, b), (a, c), (a, str(tmp / "missing"))):
        rc = main(["compare", "-p", *args])
        out = capsys.readouterr().out
        q = subprocess.run(["qemu-img", "compare", "-p", *args], capture_output=True)
        assert rc == q.returncode, args
        for text in (out, q.stdout.decode()):
            body, _, verdict = text.rpartition("\r")
            assert re.fullmatch(r"(    \(\d+\.\d\d/100%\)\r)*", body + "\r" if body else ""), text
            assert verdict.endswith("\n\n") or verdict == "\n", repr(text)
        assert out.rpartition("\r")[2] == q.stdout.decode().rpartition("\r")[2], args
        if rc == 0:
            assert out.startswith("    (0.00/100%)\r") and "(100.00/100%)\rImages" in out


def test_raw_against_qcow2(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = _img(tmp, "q.qcow2", 2 * MiB, "write -P 0x21 100k 300k")
    r = tmp / "r.raw"
    qemu_img("convert", "-O", "raw", q, str(r))
    assert _parity(capsys, "-f", "qcow2", "-F", "raw", q, str(r))[0] == 0
    qemu_io(r, "write -P 0x22 1M 512", fmt="raw")
    assert _parity(capsys, "-f", "qcow2", "-F", "raw", q, str(r))[0] == 1


def test_size_mismatch(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = _img(tmp, "small.qcow2", MiB, "write -P 0x31 0 64k")
    big = _img(tmp, "big.qcow2", 3 * MiB, "write -P 0x31 0 64k", "write -z 2M 64k")
    assert _parity(capsys, small, big) == (0, "Warning: Image size mismatch!\nImages are identical.\n")
    qemu_io(big, "write -P 0x32 2500k 4k")
    assert _parity(capsys, small, big)[0] == 1
    assert _parity(capsys, big, small)[0] == 1


def test_backing_chain(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _img(tmp, "base.qcow2", 2 * MiB, "write -P 0x41 0 2M")
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", str(top))
    qemu_io(top, "write -P 0x42 1M 4k")
    flat = tmp / "flat.qcow2"
    qemu_img("convert", "-O", "qcow2", str(top), str(flat))
    assert _parity(capsys, str(top), str(flat))[0] == 0
    assert _parity(capsys, base, str(flat))[0] == 1


def test_cannot_open(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _img(tmp, "a.qcow2", MiB)
    nope = str(tmp / "nope.qcow2")
    assert main(["compare", a, nope]) == 2
    err = capsys.readouterr().err
    q = run("qemu-img", "compare", a, nope, check=False)
    assert (q.returncode, err) == (2, q.stderr.replace("qemu-img: ", "qcow2: ")), err
    assert main(["compare", "-f", "vmdk", a, a]) == 2
    assert "Unknown file format" in capsys.readouterr().err
    assert main(["compare", "-s", a, a]) == 1  # strict mode is not offered: a usage error
    assert "unrecognized option '-s'" in capsys.readouterr().err
