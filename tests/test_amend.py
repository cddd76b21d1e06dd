"""`qcow2 amend` against `qemu-img amend`: the same refusals and exit codes, and amended
images that qemu-img checks clean and reads like its own amend of a copy (qemu-img info
fields, guest content of the active image and of every snapshot). compat both ways
(zero clusters expanded for v2, in snapshots too), lazy_refcounts, size."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import assert_clean, progress_values, qemu_img, qemu_info, qemu_io, run

import qcow2
from qcow2.amend import amend, parse_amend_options
from qcow2.cli import main
from qcow2.errors import InvalidArgumentError, UnsupportedFeatureError

KiB = 1024
MiB = 1024 * KiB


def _img(tmp: Path, name: str, opts: str = "", *cmds: str, size: str = "4M",
         backing: Path | None = None) -> Path:
    p = tmp / name
    args = ["create", "-q", "-f", "qcow2", *(["-o", opts] if opts else [])]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    qemu_img(*args, str(p), size)
    if cmds:
        qemu_io(p, *cmds)
    return p


def _both(capsys: pytest.CaptureFixture[str], path: Path, *args: str) -> tuple[int, Path]:
    ref = path.with_name("ref-" + path.name)
    shutil.copyfile(path, ref)
    theirs = run("qemu-img", "amend", *[str(ref) if a == str(path) else a for a in args],
                 check=False)
    rc = main(["amend", *args])
    cap = capsys.readouterr()
    assert rc == theirs.returncode, (args, cap.err, theirs.stderr)
    if rc == 0:
        assert cap.out == theirs.stdout, args
    else:
        first = theirs.stderr.splitlines()[0].replace("qemu-img:", "qcow2:")
        assert cap.err.count("\n") == 1 and cap.err.startswith(first.replace(str(ref), str(path)))
    return rc, ref


_INFO = ("virtual-size", "cluster-size", "backing-filename", "backing-filename-format")


def _same_image(tmp: Path, ours: Path, theirs: Path) -> None:
    assert_clean(ours)
    a, b = qemu_info(ours), qemu_info(theirs)
    for k in _INFO:
        assert a.get(k) == b.get(k), k
    fa, fb = a["format-specific"]["data"], b["format-specific"]["data"]
    for k in ("compat", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2"):
        assert fa.get(k) == fb.get(k), k
    assert [s["name"] for s in a.get("snapshots", [])] == [s["name"] for s in b.get("snapshots", [])]
    assert qemu_img("compare", str(ours), str(theirs), check=False).returncode == 0
    for s in a.get("snapshots", []):
        # every snapshot reads the same as in qemu-img's amended copy
        x, y = tmp / "sx.qcow2", tmp / "sy.qcow2"
        shutil.copyfile(ours, x)
        shutil.copyfile(theirs, y)
        qemu_img("snapshot", "-a", s["name"], str(x))
        qemu_img("snapshot", "-a", s["name"], str(y))
        assert qemu_img("compare", str(x), str(y), check=False).returncode == 0, s["name"]


def test_refusals(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    p = _img(tmp, "a.qcow2", "", "write -P 1 0 1M")
    for opts in ("cluster_size=4k", "extended_l2=on", "compression_type=zstd",
                 "preallocation=full", "foo=1", "compat=0.9", "lazy_refcounts=maybe",
                 "refcount_bits=3", "backing_file=x", "backing_fmt=raw", "data_file=x",
                 "data_file_raw=on", "data_file_raw=maybe", "encrypt.state=active",
                 "encrypt.foo=1"):
        before = p.read_bytes()
        assert _both(capsys, p, "-o", opts, str(p))[0] == 1, opts
        assert p.read_bytes() == before
    # refcount_mode is ours (qemu-img: "Invalid parameter"): an unknown mode is refused
    before = p.read_bytes()
    assert main(["amend", "-o", "refcount_mode=whatever", str(p)]) == 1
    assert "Invalid refcount_mode 'whatever'" in capsys.readouterr().err
    assert p.read_bytes() == before
    assert _both(capsys, p, str(p))[0] == 1  # no -o
    assert _both(capsys, p, "-f", "raw", "-o", "compat=0.10", str(p))[0] == 1
    ext = _img(tmp, "e.qcow2", "extended_l2=on", "write -P 1 0 64k")
    assert _both(capsys, ext, "-o", "compat=0.10", str(ext))[0] == 1
    r8 = _img(tmp, "r8.qcow2", "refcount_bits=8")
    assert _both(capsys, r8, "-o", "compat=0.10", str(r8))[0] == 1
    v2 = _img(tmp, "v2.qcow2", "compat=0.10")
    assert _both(capsys, v2, "-o", "lazy_refcounts=on", str(v2))[0] == 1
    assert _both(capsys, v2, "-o", "refcount_bits=8", str(v2))[0] == 1


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["amend", "-f", "qcow2", "-o", "help"]) == 0
    assert capsys.readouterr().out == qemu_img("amend", "-f", "qcow2", "-o", "help").stdout


def test_bare_no_prefix_means_off_like_qemu(capsys: pytest.CaptureFixture[str],
                                            tmp: Path) -> None:
    """QEMU reads a bare "noNAME" as NAME=off: nolazy_refcounts clears the flag, nofoo
    names the unknown option 'foo'."""
    p = _img(tmp, "a.qcow2", "lazy_refcounts=on")
    assert _both(capsys, p, "-o", "nofoo", str(p))[0] == 1
    rc, ref = _both(capsys, p, "-o", "nolazy_refcounts", str(p))
    assert rc == 0 and qemu_info(p)["format-specific"]["data"]["lazy-refcounts"] is False
    _same_image(tmp, p, ref)


def test_backing_restated_and_noops_like_qemu(capsys: pytest.CaptureFixture[str],
                                              tmp: Path) -> None:
    """qemu-img compares backing_file and backing_fmt both, one not given counting as
    none: restating only the file of an image that names a format is refused. -t and
    data_file_raw=off are accepted."""
    base = _img(tmp, "b.qcow2")
    p = _img(tmp, "a.qcow2", backing=base)
    for opts, expected in ((f"backing_file={base}", 1), ("backing_fmt=qcow2", 1),
                           (f"backing_file={base},backing_fmt=qcow2", 0),
                           ("data_file_raw=off", 0)):
        before = p.read_bytes()
        rc, ref = _both(capsys, p, "-o", opts, str(p))  # asserts qemu-img's exit code
        assert rc == expected, opts
        assert p.read_bytes() == before and ref.read_bytes() == before, opts
    assert _both(capsys, p, "-t", "nonsense", "-o", "compat=0.10", str(p))[0] == 1
    rc, ref = _both(capsys, p, "-t", "none", "-o", "compat=0.10", str(p))
    assert rc == 0
    _same_image(tmp, p, ref)


def _zero_image(tmp: Path, name: str, opts: str = "", backing: Path | None = None) -> Path:
    p = _img(tmp, name, opts, "write -P 1 0 256k", "write -z 64k 64k", "write -z 1M 192k",
             "write -c -P 3 2M 64k", backing=backing)
    qemu_img("snapshot", "-c", "one", str(p))
    qemu_io(p, "write -z 0 64k", "write -P 4 3M 64k", "write -z 3M 64k")
    return p


@pytest.mark.parametrize("with_backing", [False, True])
def test_downgrade_and_upgrade_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path,
                                         with_backing: bool) -> None:
    base = _img(tmp, "base.qcow2", "", "write -P 9 0 4M") if with_backing else None
    p = _zero_image(tmp, "z.qcow2", "cluster_size=64k,lazy_refcounts=on", base)
    # (a snapshot of another size than the disk prevents a downgrade)
    for opts, want in (("compat=0.10", 0), ("compat=1.1", 0), ("lazy_refcounts=on", 0),
                       ("lazy_refcounts=off", 0), ("compat=0.10,size=8M", 1), ("compat=v2", 0),
                       ("compat=1.1,lazy_refcounts=on,size=6M", 0), ("compat=v2", 1)):
        rc, ref = _both(capsys, p, "-o", opts, str(p))
        assert rc == want, opts
        if rc == 0:
            _same_image(tmp, p, ref)


@pytest.mark.parametrize("with_backing", [False, True])
def test_downgrade_many_tables_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         with_backing: bool) -> None:
    """Zero clusters spread over many L2 tables, some shared with a snapshot, rewritten
    a few tables per chunk (several chunks, runs of back-to-back tables and gaps)."""
    import importlib

    # (qcow2.amend is also the name of the function the package exports)
    monkeypatch.setattr(importlib.import_module("qcow2.amend"), "_CHUNK_BYTES", 8 * 512)
    base = _img(tmp, "base.qcow2", "", "write -P 9 0 4M") if with_backing else None
    p = _zero_image(tmp, "z.qcow2", "cluster_size=512", base)
    qemu_io(p, *[f"write -z {off} 1k" for off in range(0, 4 * MiB, 96 * KiB)])
    rc, ref = _both(capsys, p, "-o", "compat=0.10", str(p))
    assert rc == 0
    _same_image(tmp, p, ref)


@pytest.mark.parametrize("opts", ["compat=0.10", "refcount_bits=4"])
def test_progress_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path, opts: str) -> None:
    """-p: qemu-img's progress lines on stdout, from 0.00 to 100.00, then one newline (a
    downgrade with zero clusters to expand reported 100% twice, each with a newline)."""
    a = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(a), "8M")
    qemu_io(a, "write -P 1 0 3M", "write -z 4M 1M")
    b = tmp / "b.qcow2"
    shutil.copyfile(a, b)
    assert main(["amend", "-p", "-o", opts, str(a)]) == 0
    out = capsys.readouterr().out
    q = subprocess.run(["qemu-img", "amend", "-p", "-o", opts, str(b)], capture_output=True,
                       check=True)
    for text in (out, q.stdout.decode()):
        progress_values(text)
        assert text.endswith("(100.00/100%)\r\n") and text.count("\n") == 1, repr(text)
    assert qemu_info(a)["format-specific"] == qemu_info(b)["format-specific"]


def test_downgrade_long_backing_name(tmp: Path) -> None:
    """A backing file name that does not fit in the first sector with the header."""
    d = tmp / ("d" * 200) / ("e" * 200)
    d.mkdir(parents=True)
    base = _img(d, "b" * 150 + ".qcow2", "", "write -P 9 0 4M")
    p = _img(tmp, "long.qcow2", "", "write -z 0 1M", "write -P 1 1M 64k", backing=base)
    ref = tmp / "long-ref.qcow2"
    shutil.copyfile(p, ref)
    qemu_img("amend", "-o", "compat=0.10", str(ref))
    amend(p, {"compat": "0.10"})
    _same_image(tmp, p, ref)
    shutil.copyfile(p, ref)
    qemu_img("amend", "-o", "compat=1.1", str(ref))
    amend(p, {"compat": "1.1"})
    _same_image(tmp, p, ref)
    assert qemu_info(p)["backing-filename"] == str(base)


def test_zstd(tmp: Path) -> None:
    p = _img(tmp, "zs.qcow2", "compression_type=zstd", "write -P 1 0 64k", "write -z 1M 64k")
    ref = tmp / "zs-ref.qcow2"
    shutil.copyfile(p, ref)
    qemu_img("amend", "-o", "compat=0.10", str(ref))
    amend(p, {"compat": "0.10"})
    _same_image(tmp, p, ref)
    # compressed zstd clusters cannot be read by a v2 reader: refused, image unchanged
    c = _img(tmp, "zc.qcow2", "compression_type=zstd", "write -c -P 1 0 64k")
    before = c.read_bytes()
    with pytest.raises(UnsupportedFeatureError):
        amend(c, {"compat": "0.10"})
    assert c.read_bytes() == before


def test_downgrade_keeps_compressed_clusters(tmp: Path) -> None:
    """Bit 0 of a compressed L2 entry is part of its host offset/size field, not the
    zero flag: a downgrade leaves such entries as they are (it once took them for zero
    clusters and wrote zeros over the file)."""
    import struct

    raw = tmp / "in.raw"
    raw.write_bytes(b"".join(bytes([i]) * 1000 + bytes(range(256)) * 200 for i in range(40)))
    p = tmp / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(p))
    data = p.read_bytes()
    l1 = struct.unpack_from(">Q", data, struct.unpack_from(">Q", data, 40)[0])[0] & ((1 << 56) - 512)
    entries = struct.unpack_from(">128Q", data, l1)
    assert any(e >> 62 & 1 and e & 1 for e in entries)  # the case this test is about
    ref = tmp / "c-ref.qcow2"
    shutil.copyfile(p, ref)
    qemu_img("amend", "-o", "compat=0.10", str(ref))
    amend(p, {"compat": "0.10"})
    _same_image(tmp, p, ref)
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(p),
                    check=False).returncode == 0


def test_library_options(tmp: Path) -> None:
    assert parse_amend_options("compat=0.10,lazy_refcounts=off,size=1G") == {
        "compat": 2, "lazy_refcounts": False, "size": 1 << 30}
    with pytest.raises(InvalidArgumentError):
        parse_amend_options("cluster_size=4k")
    p = tmp / "l.qcow2"
    qcow2.create(p, 1 << 20)
    amend(p, {"lazy_refcounts": True})
    with qcow2.open(p) as img:
        assert img.lazy_refcounts
    amend(p, {"refcount_bits": 16})  # the current width: nothing to do
    amend(p, {"refcount_bits": 8})
    with qcow2.open(p) as img:
        assert img.geo.refcount_bits == 8
    assert_clean(p)


@pytest.mark.parametrize("opts", ["cluster_size=4k", "cluster_size=512,refcount_bits=64"])
def test_refcount_width_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path,
                                  opts: str) -> None:
    p = _img(tmp, "w.qcow2", opts, "write -P 1 0 3M", "write -c -P 2 3M 4k", size="8M")
    qemu_img("snapshot", "-c", "s", str(p))
    qemu_io(p, "write -P 3 1M 1M", "write -z 2M 512k")
    for o in ("refcount_bits=1", "refcount_bits=2", "refcount_bits=8", "refcount_bits=64",
              "refcount_bits=4,lazy_refcounts=on", "refcount_bits=16"):
        rc, ref = _both(capsys, p, "-o", o, str(p))  # (the same exit code as qemu-img's)
        # shared clusters need 2 bits at least, packed compressed ones more
        assert rc == 1 if o == "refcount_bits=1" else rc == 0 or o.startswith(
            ("refcount_bits=2", "refcount_bits=4")), o
        if rc == 0:
            _same_image(tmp, p, ref)
    v2 = _img(tmp, "w2.qcow2", "compat=0.10,cluster_size=4k", "write -P 1 0 1M")
    for o in ("refcount_bits=8,compat=1.1", "compat=0.10", "compat=0.10,refcount_bits=16"):
        rc, ref = _both(capsys, v2, "-o", o, str(v2))
        assert rc == (1 if o == "compat=0.10" else 0), o
        if rc == 0:
            _same_image(tmp, v2, ref)
