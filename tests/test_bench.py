"""`qcow2 bench` against `qemu-img bench`: the same output lines (the time aside), exit
codes and messages, and for write tests the same image content afterwards (the same
offsets written with the same pattern), checked clean."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import assert_clean, qemu_img, run

from qcow2.cli import main

_TIME = re.compile(r"^Run completed in \d+\.\d{3} seconds\.$")


def _image(tmp: Path) -> Path:
    p = tmp / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "8M")
    return p


CASES = [
    ["-c", "100"],
    ["-c", "50", "-d", "4", "-s", "8k", "-S", "16k", "-o", "4096"],
    ["-c", "300", "-s", "64k", "-o", "1M", "-t", "none", "-i", "threads", "-n"],
    ["-w", "-c", "200", "-s", "3000", "-S", "5000", "--pattern=7"],
    ["-w", "-c", "400", "-d", "8", "--flush-interval=16", "--pattern=0x42", "-o", "7M"],
    ["-w", "-c", "100", "-d", "2", "--flush-interval=2", "--no-drain", "-s", "1M"],
    ["-c", "10", "-s", "0"],
    ["-w", "-c", "20", "-s", "512", "-S", "0", "--pattern=9"],  # step 0: one request size
]


@pytest.mark.parametrize("args", CASES)
def test_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path, args: list[str]) -> None:
    p = _image(tmp)
    ref = tmp / "ref.qcow2"
    shutil.copyfile(p, ref)
    theirs = run("qemu-img", "bench", *args, str(ref), check=False)
    rc = main(["bench", *args, str(p)])
    out = capsys.readouterr().out.splitlines()
    want = theirs.stdout.splitlines()
    assert rc == theirs.returncode == 0, theirs.stderr
    assert out[:-1] == want[:-1] and _TIME.match(out[-1]) and _TIME.match(want[-1])
    assert_clean(p)
    assert qemu_img("compare", str(p), str(ref), check=False).returncode == 0


def test_errors(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    p = _image(tmp)
    for args in (["-c", "x"], ["-d", "x"], ["-s", "x"], ["-o", "x"], ["-S", "x"],
                 ["-w", "--pattern=x"], ["-w", "--pattern=300"], ["--flush-interval=10"],
                 ["-w", "-d", "64", "--flush-interval=10"], ["-w", "-d", "4", "--flush-interval=x"],
                 ["-t", "foo"], ["-i", "foo"], ["-c", "1", "-o", "100M"],
                 ["-w", "-c", "200", "-s", "64k", "-S", "48k"],  # wraps past the end
                 ["-s", "3G"], ["-S", "3G"], ["-o", "9E"], ["-n", "-c", "1"],
                 ["-i", "native", "-t", "writeback"], ["-f", "foo"]):
        theirs = run("qemu-img", "bench", *args, str(p), check=False)
        rc = main(["bench", *args, str(p)])
        cap = capsys.readouterr()
        assert rc == theirs.returncode == 1, (args, theirs.stderr)
        first = [ln for ln in theirs.stderr.splitlines() if ln.startswith("qemu-img:")][0]
        first = first.replace("qemu-img:", "qcow2:")
        assert cap.err.count("\n") == 1 and cap.err.startswith(first), (args, cap.err, first)


def test_raw_and_missing_file_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    """A raw file (given with -f raw, or probed) is benchmarked as qemu-img does it."""
    for fmt in (["-f", "raw"], []):
        ours, ref = tmp / "o.raw", tmp / "r.raw"
        for f in (ours, ref):
            f.write_bytes(bytes(1 << 20))
        args = [*fmt, "-w", "-c", "30", "-s", "4k", "-S", "12k", "--pattern=5"]
        theirs = run("qemu-img", "bench", *args, str(ref), check=False)
        assert main(["bench", *args, str(ours)]) == theirs.returncode == 0
        out = capsys.readouterr().out.splitlines()
        assert out[:-1] == theirs.stdout.splitlines()[:-1]
        assert ours.read_bytes() == ref.read_bytes()
    theirs = run("qemu-img", "bench", str(tmp / "missing.qcow2"), check=False)
    assert main(["bench", str(tmp / "missing.qcow2")]) == theirs.returncode == 1
    assert capsys.readouterr().err == theirs.stderr.replace("qemu-img:", "qcow2:")
