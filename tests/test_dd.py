"""`qcow2 dd` against `qemu-img dd` on the same inputs: the same output size and content
(qemu-img compare), the same messages and exit codes for bad operands."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_clean, qemu_img, qemu_info, qemu_io, run

from qcow2.cli import main


@pytest.fixture
def src(tmp: Path) -> Path:
    p = tmp / "in.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "3M")
    qemu_io(p, "write -P 1 0 64k", "write -P 2 1M 100k", "write -z 2M 64k", "write -P 3 3000k 5k")
    return p


CASES = [
    [], ["bs=64k", "count=3", "skip=1"], ["bs=1M", "count=1", "skip=1"], ["bs=1.5k"],
    ["bs=1000", "skip=7"], ["skip=100000"], ["count=2", "bs=4M"], ["bs=512", "count=0"],
    ["bs=100", "count=3", "skip=1"], ["bs=64k", "skip=10", "count=5"],
]


@pytest.mark.parametrize("ops", CASES)
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path, src: Path, ops: list[str],
                   out_fmt: str) -> None:
    ours, theirs = tmp / "ours.img", tmp / "theirs.img"
    q = run("qemu-img", "dd", "-O", out_fmt, *ops, f"if={src}", f"of={theirs}", check=False)
    rc = main(["dd", "-O", out_fmt, *ops, f"if={src}", f"of={ours}"])
    cap = capsys.readouterr()
    assert rc == q.returncode == 0, q.stderr
    assert cap.out == q.stdout == ""
    # a skip past the end: qemu-img's warning, and an empty output
    assert cap.err == q.stderr.replace("qemu-img:", "qcow2:").replace(str(theirs), str(ours))
    assert qemu_info(ours)["virtual-size"] == qemu_info(theirs)["virtual-size"]
    if out_fmt == "raw":  # created in whole sectors
        assert ours.stat().st_size == theirs.stat().st_size
    assert qemu_img("compare", "-f", out_fmt, "-F", out_fmt, str(ours), str(theirs),
                    check=False).returncode == 0
    if out_fmt == "qcow2":
        assert_clean(ours)


def test_raw_input_and_overwrite(tmp: Path) -> None:
    raw = tmp / "in.raw"
    raw.write_bytes(bytes(range(256)) * 4096)
    out = tmp / "out.raw"
    out.write_bytes(b"\xff" * (5 << 20))  # replaced, not overwritten in place
    assert main(["dd", "-f", "raw", "bs=4k", "skip=2", f"if={raw}", f"of={out}"]) == 0
    assert out.read_bytes() == raw.read_bytes()[8192:]


def test_errors(capsys: pytest.CaptureFixture[str], tmp: Path, src: Path) -> None:
    for ops in ([f"if={src}"], [f"of={tmp / 'x'}"], ["bs=0"], ["count=x"], ["foo=1"],
                ["bs=3G"], [f"if={tmp / 'missing'}"], ["conv=notrunc"], ["bs=x"], ["-O", "foo"],
                ["-f", "qcow2", f"if={tmp / 'r.raw'}", f"of={tmp / 'o.img'}"],
                [f"if={src}", f"of={tmp / 'nodir' / 'o.img'}"], [f"if={src}", f"of={tmp}"]):
        (tmp / "r.raw").write_bytes(bytes(4096))
        args = ops if any(o.startswith(("if=", "of=")) for o in ops) else \
            [*ops, f"if={src}", f"of={tmp / 'o.img'}"]
        if args[0].startswith("if=") and len(args) == 1 and "missing" in args[0]:
            args = [*args, f"of={tmp / 'o.img'}"]
        q = run("qemu-img", "dd", *args, check=False)
        rc = main(["dd", *args])
        err = capsys.readouterr().err
        assert rc == q.returncode == 1, (args, q.stderr)
        first = q.stderr.splitlines()[0].replace("qemu-img:", "qcow2:")
        assert err.count("\n") == 1 and err.startswith(first), (args, err, q.stderr)
