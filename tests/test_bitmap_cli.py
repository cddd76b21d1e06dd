"""`qcow2 bitmap` against `qemu-img bitmap`: the same images, messages and exit codes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import assert_clean, qemu_img, qemu_info, qemu_io

import qcow2
from qcow2.cli import main


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _pair(tmp: Path) -> tuple[Path, Path]:
    a = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(a), "16M")
    qemu_img("bitmap", "--add", str(a), "b0")
    qemu_img("bitmap", "--add", "-g", "4k", "--disable", str(a), "off")
    qemu_io(a, "write 0 64k", "write 5M 300k")
    b = tmp / "b.qcow2"
    shutil.copyfile(a, b)
    return a, b


def _same(capsys: pytest.CaptureFixture[str], a: Path, b: Path, *args: str) -> None:
    """One command on a (ours) and b (qemu-img): exit code, stdout, stderr equal."""
    mine = [str(a) if x == "IMG" else x for x in args]
    theirs = [str(b) if x == "IMG" else x for x in args]
    rc, out, err = _cli(capsys, "bitmap", *mine)
    q = qemu_img("bitmap", *theirs, check=False)
    qerr = q.stderr.replace(str(b), "IMG").replace("qemu-img: ", "qcow2: ")
    assert (rc, out, err.replace(str(a), "IMG")) == (q.returncode, q.stdout, qerr), args


ERRORS = [
    ("IMG", "b0"),
    ("--add", "IMG"),
    ("--remove", "-g", "64k", "IMG", "b0"),
    ("--merge", "b0", "-F", "raw", "IMG", "off"),
    ("--add", "-b", "IMG", "IMG", "x"),
    ("--remove", "IMG", "nope"),
    ("--add", "IMG", "b0"),
    ("--add", "IMG", ""),
    ("--add", "-g", "1000", "IMG", "x"),
    ("--add", "-g", "4G", "IMG", "x"),
    ("--add", "-g", "xx", "IMG", "x"),
    ("--enable", "IMG", "nope"),
    ("--clear", "IMG", "nope"),
    ("--merge", "nope", "IMG", "b0"),
    ("--remove", "IMG", "off", "--remove"),
    ("--add", "missing.qcow2", "x"),
]


@pytest.mark.parametrize("args", ERRORS, ids=[" ".join(a) for a in ERRORS])
def test_errors_like_qemu_img(tmp: Path, capsys: pytest.CaptureFixture[str],
                              args: tuple[str, ...]) -> None:
    a, b = _pair(tmp)
    _same(capsys, a, b, *args)


def test_operations_like_qemu_img(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _pair(tmp)
    other = tmp / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(other), "16M")
    qemu_img("bitmap", "--add", "-g", "512", str(other), "src")
    qemu_io(other, "write 7M 4k")
    for args in (("--add", "-g", "64k", "IMG", "new"), ("--add", "--disable", "IMG", "dis"),
                 ("--merge", "b0", "IMG", "dis"), ("--enable", "IMG", "off"),
                 ("--merge", "src", "-b", str(other), "-F", "qcow2", "IMG", "new"),
                 ("--disable", "IMG", "b0"), ("--clear", "IMG", "off"),
                 ("--add", "--remove", "IMG", "tmp"), ("--remove", "IMG", "b0")):
        _same(capsys, a, b, *args)
        assert qemu_info(a)["format-specific"]["data"].get("bitmaps") == \
            qemu_info(b)["format-specific"]["data"].get("bitmaps"), args
        assert_clean(a)
    # the bits are QEMU's too
    with qcow2.open(a) as x, qcow2.open(b) as y:
        for name in ("new", "dis", "off"):
            assert list(x.dirty_ranges(name)) == list(y.dirty_ranges(name)), name
        assert list(x.dirty_ranges("new")) == [(7 << 20, 65536)]


def test_missing_or_broken_backing_file_like_qemu_img(tmp: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """qemu-img bitmap does not open the backing chain: a missing backing file or one
    that is not an image stops neither the image nor the merge source (-b)."""
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    junk = tmp / "junk.qcow2"
    junk.write_bytes(b"not an image" * 1000)
    a = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(a))
    src = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", junk.name, "-F", "qcow2", str(src), "16M")
    qemu_img("bitmap", "--add", str(src), "s")
    base.unlink()
    b = tmp / "b.qcow2"
    shutil.copyfile(a, b)
    for args in (("--add", "IMG", "x"), ("--merge", "s", "-b", str(src), "IMG", "x"),
                 ("--disable", "IMG", "x"), ("--clear", "IMG", "x"), ("--remove", "IMG", "x"),
                 ("--add", "--remove", "IMG", "x")):
        _same(capsys, a, b, *args)
        # qemu-img info opens the chain unless told there is none
        ia, ib = (qemu_info(f"driver=qcow2,file.filename={x},backing=", "--image-opts")
                  for x in (a, b))
        assert ia["format-specific"] == ib["format-specific"], args
        qemu_img("check", "--image-opts", f"driver=qcow2,file.filename={a},backing=")


def test_convert_bitmaps_like_qemu_img(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, _b = _pair(tmp)
    ours, theirs = tmp / "o.qcow2", tmp / "q.qcow2"
    rc, _out, err = _cli(capsys, "convert", "--bitmaps", "-O", "qcow2", str(a), str(ours))
    assert rc == 0, err
    qemu_img("convert", "--bitmaps", "-O", "qcow2", str(a), str(theirs))
    assert_clean(ours)
    assert qemu_info(ours)["format-specific"]["data"]["bitmaps"] == \
        qemu_info(theirs)["format-specific"]["data"]["bitmaps"]
    with qcow2.open(ours) as x, qcow2.open(theirs) as y:
        for name in ("b0", "off"):
            assert list(x.dirty_ranges(name)) == list(y.dirty_ranges(name)), name
        assert list(x.dirty_ranges("b0")) == [(0, 65536), (5 << 20, 5 * 65536)]


CONVERT_ERRORS = [
    ("--bitmaps", "-O", "raw", "IMG", "OUT"),
    ("--bitmaps", "-O", "qcow2", "IMG", "IMG", "OUT"),
    ("--skip-broken-bitmaps", "-O", "qcow2", "IMG", "OUT"),
    ("-n", "--bitmaps", "-O", "qcow2", "IMG", "IMG2"),
]


@pytest.mark.parametrize("args", CONVERT_ERRORS, ids=[" ".join(a) for a in CONVERT_ERRORS])
def test_convert_bitmap_errors_like_qemu_img(tmp: Path, capsys: pytest.CaptureFixture[str],
                                            args: tuple[str, ...]) -> None:
    a, b = _pair(tmp)
    for p in (tmp / "a2.qcow2", tmp / "b2.qcow2"):  # existing targets with the bitmaps
        shutil.copyfile(a, p)
    sub = {"IMG": str(a), "OUT": str(tmp / "o.qcow2"), "IMG2": str(tmp / "a2.qcow2")}
    rc, out, err = _cli(capsys, "convert", *[sub.get(x, x) for x in args])
    sub = {"IMG": str(b), "OUT": str(tmp / "q.qcow2"), "IMG2": str(tmp / "b2.qcow2")}
    q = qemu_img("convert", *[sub.get(x, x) for x in args], check=False)
    assert (rc, out) == (q.returncode, q.stdout)
    assert err.splitlines() == [q.stderr.strip().replace("qemu-img: ", "qcow2: ")]


def test_convert_bitmaps_from_a_snapshot_like_qemu_img(tmp: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """convert --bitmaps -l SNAPSHOT: qemu-img 7.2 copies the snapshot's data and the
    image's (active) bitmaps, as they are; so do we."""
    src = tmp / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "16M")
    qemu_io(src, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "snap", str(src))
    qemu_img("bitmap", "--add", str(src), "b0")
    qemu_img("bitmap", "--add", "-g", "4k", "--disable", str(src), "off")
    qemu_io(src, "write -P 2 1M 64k", "write -P 3 0 4k")
    ours, theirs = tmp / "o.qcow2", tmp / "q.qcow2"
    rc, _out, err = _cli(capsys, "convert", "--bitmaps", "-l", "snap", "-O", "qcow2",
                         str(src), str(ours))
    assert rc == 0, err
    qemu_img("convert", "--bitmaps", "-l", "snap", "-O", "qcow2", str(src), str(theirs))
    assert_clean(ours)
    qemu_img("compare", str(ours), str(theirs))  # the snapshot's data
    assert qemu_info(ours)["format-specific"]["data"]["bitmaps"] == \
        qemu_info(theirs)["format-specific"]["data"]["bitmaps"]
    with qcow2.open(ours) as x, qcow2.open(theirs) as y:
        for name in ("b0", "off"):
            assert list(x.dirty_ranges(name)) == list(y.dirty_ranges(name)), name
        assert list(x.dirty_ranges("b0")) == [(0, 65536), (1 << 20, 65536)]
