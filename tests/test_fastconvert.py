"""The numpy-free fast path of `qcow2 convert` (fastconvert.py, issue 12).

A plain convert (raw or plain qcow2 sources, a new raw or qcow2 output) takes it without
importing numpy; anything else falls back to the full path. Its outputs are compared
with the full path's (forced with QCOW2_CONVERT_FULL_PATH) and with qemu-img's own
convert of the same QEMU-written inputs: `qemu-img compare` equal, `qemu-img check`
clean, `qemu-img map` allocation equal to the full path's.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_clean, qemu_check, qemu_img, qemu_io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2
from qcow2 import fastconvert, storage
from qcow2.cli import main

KiB = 1024
MiB = 1024 * KiB

_PROBE = """
import json, sys
from qcow2.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "numpy": "numpy" in sys.modules,
                  "fast": "qcow2.fastconvert" in sys.modules and "qcow2.image" not in sys.modules}))
"""


def _probe(*args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "QCOW2_CONVERT_FULL_PATH"}
    p = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0, p.stderr
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def _mixed(tmp: Path, name: str = "mixed.qcow2", cluster: str = "65536",
           ctype: str = "zlib", size: int = 6 * MiB) -> Path:
    """A QEMU image with data, zero, compressed, discarded and unallocated clusters."""
    p = tmp / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster},compression_type={ctype}",
             str(p), str(size))
    # compressed writes are whole clusters
    cs = int(cluster.replace("M", "")) << 20 if cluster.endswith("M") else int(cluster)
    comp = [f"write -c -P 0x22 {MiB} 64k", f"write -c -P 0x66 {3 * MiB} 128k"] \
        if cs <= 64 * KiB else [f"write -c -P 0x22 {2 * MiB} {cs}"]
    qemu_io(p, *comp, "write -P 0x11 0 256k", f"write -z {512 * KiB} 128k",
            f"write -P 0x33 {4 * MiB} 1k", f"write -P 0x44 {64 * KiB} 4k",
            f"discard {2 * MiB + 512 * KiB} 64k", f"write -P 0x55 {5 * MiB + 4096} 8k",
            f"write -P 0 {3 * MiB + 256 * KiB} 64k")
    return p


def _allocation(path: Path, fmt: str) -> list[tuple[int, int, bool, bool]]:
    """qemu-img map's guest ranges (data, zero), without the host offsets."""
    out = json.loads(qemu_img("map", "--output=json", "-f", fmt, str(path)).stdout)
    merged: list[tuple[int, int, bool, bool]] = []
    for e in out:
        if merged and merged[-1][2:] == (e["data"], e["zero"]) and \
                merged[-1][0] + merged[-1][1] == e["start"]:
            merged[-1] = (merged[-1][0], merged[-1][1] + e["length"], e["data"], e["zero"])
        else:
            merged.append((e["start"], e["length"], e["data"], e["zero"]))
    return merged


@pytest.fixture
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the conversions the fast path writes."""
    calls: list[int] = []
    real = fastconvert.run

    def spy(*a: Any, **kw: Any) -> None:
        calls.append(1)
        real(*a, **kw)

    monkeypatch.setattr(fastconvert, "run", spy)
    return calls


def _both(tmp: Path, monkeypatch: pytest.MonkeyPatch, fast_calls: list[int],
          args: list[str], fmt: str) -> tuple[Path, Path]:
    """The output of the fast path and of the full path for the same arguments."""
    fast, full = tmp / f"fast.{fmt}", tmp / f"full.{fmt}"
    monkeypatch.delenv("QCOW2_CONVERT_FULL_PATH", raising=False)
    assert main(["convert", "-q", *args, str(fast)]) == 0
    assert fast_calls == [1]
    monkeypatch.setenv("QCOW2_CONVERT_FULL_PATH", "1")
    assert main(["convert", "-q", *args, str(full)]) == 0
    assert fast_calls == [1]
    monkeypatch.delenv("QCOW2_CONVERT_FULL_PATH")
    return fast, full


@pytest.mark.parametrize("cluster, ctype, out_opts, sparse", [
    ("65536", "zlib", [], None),
    ("512", "zlib", ["-o", "cluster_size=2M,refcount_bits=1"], None),
    ("2M", "zstd", ["-o", "cluster_size=512,refcount_bits=64,lazy_refcounts=on"], "512"),
    ("16384", "zlib", ["-o", "compat=0.10"], "64k"),
    ("65536", "zstd", ["-o", "refcount_bits=8,compression_type=zstd"], "0"),
    ("4096", "zlib", ["-o", "cluster_size=4096,refcount_bits=4"], "1536"),
])
def test_fast_qcow2_output_matches_full_path_and_qemu(
        tmp: Path, monkeypatch: pytest.MonkeyPatch, fast_calls: list[int], cluster: str,
        ctype: str, out_opts: list[str], sparse: str | None) -> None:
    src = _mixed(tmp, cluster=cluster, ctype=ctype)
    extra = ["-S", sparse] if sparse else []
    fast, full = _both(tmp, monkeypatch, fast_calls, [*extra, "-O", "qcow2", *out_opts, str(src)],
                       "qcow2")
    assert_clean(fast)
    assert qemu_img("compare", str(src), str(fast)).returncode == 0
    assert qemu_img("compare", str(full), str(fast)).returncode == 0
    assert _allocation(fast, "qcow2") == _allocation(full, "qcow2")
    theirs = tmp / "qemu.qcow2"
    qemu_img("convert", *extra, "-O", "qcow2", *out_opts, str(src), str(theirs))
    assert qemu_img("compare", str(theirs), str(fast)).returncode == 0
    info_fast, info_full = (json.loads(qemu_img("info", "--output=json", str(p)).stdout)
                            for p in (fast, full))
    for key in ("virtual-size", "cluster-size", "format-specific"):
        assert info_fast[key] == info_full[key]
    # the file holds the data and its tables, no more: no larger than the full path's
    assert os.path.getsize(fast) <= os.path.getsize(full) + int(info_full["cluster-size"])


def test_fast_raw_output_and_concatenation(tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                           fast_calls: list[int]) -> None:
    a = _mixed(tmp, "a.qcow2", cluster="512")
    b = tmp / "b.raw"
    with open(b, "wb") as f:  # data, a hole, a partial last sector (read as zeros)
        f.write(random.Random(3).randbytes(100 * KiB))
        f.seek(3 * MiB)
        f.write(b"\x77" * 1000)
    fast, full = _both(tmp, monkeypatch, fast_calls, ["-O", "raw", str(a), str(b)], "raw")
    assert fast.read_bytes() == full.read_bytes()
    theirs = tmp / "qemu.raw"
    qemu_img("convert", "-O", "raw", str(a), str(b), str(theirs))
    assert fast.read_bytes() == theirs.read_bytes()
    assert _allocation(fast, "raw") == _allocation(full, "raw")
    # and raw -> qcow2 from two sources, one of them raw
    fast_calls.clear()
    fq, fullq = _both(tmp, monkeypatch, fast_calls, ["-O", "qcow2", str(b), str(a)], "qcow2")
    assert_clean(fq)
    assert qemu_img("compare", str(fullq), str(fq)).returncode == 0
    assert _allocation(fq, "qcow2") == _allocation(fullq, "qcow2")


def test_fast_path_imports_no_numpy_and_falls_back(tmp: Path) -> None:
    src = _mixed(tmp)
    raw = tmp / "in.raw"
    raw.write_bytes(b"\x01" * MiB)
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    dirty = tmp / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(dirty), "1M")
    with open(dirty, "r+b") as f:  # the dirty bit (incompatible feature bit 0)
        f.seek(79)
        f.write(b"\x01")
    over_dirty = tmp / "over-dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(dirty), "-F", "qcow2", "-u",
             str(over_dirty), "1M")
    out = str(tmp / "out")
    fast = [
        ["-O", "qcow2", str(src)],
        ["-O", "raw", str(src)],
        ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=2", str(raw)],
        ["-p", "-S", "0", str(raw), str(src)],
        ["-O", "qcow2", str(top)],  # a backing chain
    ]
    full = [
        ["-c", "-O", "qcow2", str(src)],  # compression
        ["-s", "nosuch", "-O", "raw", str(src)],  # a snapshot (fails in the full path)
        ["-O", "qcow2", str(dirty)],  # a dirty image (refcounts to repair)
        ["-O", "raw", str(over_dirty)],  # ... as a backing file
        ["-O", "qcow2", "-o", "preallocation=metadata", str(src)],
        ["-O", "qcow2", "-o", "cluster_size=3k", str(src)],  # an error: the full path's
    ]
    for args in fast:
        got = _probe("convert", "-q", *args, out)
        assert got == {"rc": 0, "numpy": False, "fast": True}, args
        os.unlink(out)
    for args in full:
        got = _probe("convert", "-q", *args, out)
        assert got["numpy"] and not got["fast"], args
        if os.path.exists(out):
            os.unlink(out)


def _to_both_formats(tmp: Path, monkeypatch: pytest.MonkeyPatch, fast_calls: list[int],
                     src: Path) -> None:
    """src to qcow2 and to raw by both paths: what qemu-img reads in src, the same
    allocation as the full path's, a clean image."""
    for fmt in ("qcow2", "raw"):
        fast_calls.clear()
        fast, full = _both(tmp, monkeypatch, fast_calls, ["-O", fmt, str(src)], fmt)
        assert qemu_img("compare", "-F", fmt, str(src), str(fast)).returncode == 0
        assert qemu_img("compare", "-f", fmt, "-F", fmt, str(full), str(fast)).returncode == 0
        assert _allocation(fast, fmt) == _allocation(full, fmt)
        if fmt == "qcow2":
            assert_clean(fast)
        fast.unlink()
        full.unlink()


def test_fast_backing_chain_matches_full_path_and_qemu(
        tmp: Path, monkeypatch: pytest.MonkeyPatch, fast_calls: list[int]) -> None:
    """raw (3 MiB, a hole) <- qcow2 (4 MiB, compressed) <- qcow2 overlay (6 MiB, 4 KiB
    clusters): zero clusters over the base's data, unallocated ones over a hole and
    past the end of each backing file."""
    raw = tmp / "base.raw"
    with open(raw, "wb") as f:
        f.write(random.Random(5).randbytes(MiB))
        f.seek(2 * MiB)
        f.write(b"\x21" * MiB)
    mid = tmp / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", str(raw), "-F", "raw",
             str(mid), str(4 * MiB))
    qemu_io(mid, f"write -c -P 0x31 {512 * KiB} 64k", f"write -P 0x32 {3 * MiB + 4096} 8k",
            "write -z 4096 8k")
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2",
             "-F", "qcow2", str(top), str(6 * MiB))
    qemu_io(top, f"write -z {512 * KiB} 16k", f"write -P 0x41 {2 * MiB - 2048} 8k",
            f"write -P 0x42 {5 * MiB} 4k", "write -z 0 4k")
    _to_both_formats(tmp, monkeypatch, fast_calls, top)


def test_fast_extended_l2_matches_full_path_and_qemu(
        tmp: Path, monkeypatch: pytest.MonkeyPatch, fast_calls: list[int]) -> None:
    """Extended L2 entries: allocated, zero and unallocated subclusters (the last ones
    read from the backing file), a compressed cluster."""
    raw = tmp / "base.raw"
    raw.write_bytes(random.Random(9).randbytes(2 * MiB))
    src = tmp / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k",
             "-b", str(raw), "-F", "raw", str(src), str(3 * MiB))
    qemu_io(src, "write -P 0x51 6k 2k", "write -P 0x52 10k 8k", "write -z 32k 4k",
            f"write -c -P 0x53 {MiB} 64k", f"write -P 0x54 {2 * MiB + 62 * KiB} 4k",
            f"write -z {1536 * KiB} 64k", f"discard {256 * KiB} 64k")
    _to_both_formats(tmp, monkeypatch, fast_calls, src)


def _l1_entry(path: Path, index: int) -> tuple[int, int]:
    """(file offset of L1 entry index, its value)."""
    with open(path, "rb") as f:
        head = f.read(48)
    l1_off = struct.unpack_from(">Q", head, 40)[0]
    with open(path, "rb") as f:
        f.seek(l1_off + 8 * index)
        return l1_off + 8 * index, struct.unpack(">Q", f.read(8))[0]


def _poke(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


@pytest.mark.parametrize("damage, message, fast", [
    # found while opening: the full path reports it (with its message)
    ("l2_past_eof", "L2 table offset 0x40000000 is past the end of the image file", False),
    ("l2_unaligned", "is not cluster aligned", False),
    ("l2_on_l1", "points at the active L1 table", False),
    # found while copying: the fast path reports it (with the full path's message)
    ("compressed_past_eof", "runs past the end of the file", True),
    ("data_past_eof", "is past the end of the image file", True),
    ("compressed_garbage", "Compressed cluster cannot be decompressed", True),
])
def test_hostile_source_gets_one_line(tmp: Path, capfd: pytest.CaptureFixture[str],
                                      fast_calls: list[int], damage: str, message: str,
                                      fast: bool) -> None:
    src = tmp / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "4M")
    qemu_io(src, "write -c -P 0x22 0 64k", "write -P 0x33 64k 64k")
    at, l1e = _l1_entry(src, 0)
    l2 = l1e & 0x00FFFFFFFFFFFE00
    if damage == "l2_past_eof":
        _poke(src, at, (1 << 30) | (1 << 63))
    elif damage == "l2_unaligned":
        _poke(src, at, (l2 + 4096) | (1 << 63))
    elif damage == "l2_on_l1":
        _poke(src, at, (at - at % 65536) | (1 << 63))
    else:
        with open(src, "rb") as f:
            f.seek(l2)
            e0, e1 = struct.unpack(">QQ", f.read(16))
        if damage == "compressed_past_eof":
            # the same sector count, the data 1 GiB on (cluster_bits 16: offset bits 0-53)
            _poke(src, l2, e0 + (1 << 30))
        elif damage == "compressed_garbage":
            with open(src, "r+b") as f:
                f.seek(e0 & ((1 << 54) - 1))
                f.write(b"\xff" * 64)
        else:
            _poke(src, l2 + 8, (1 << 63) | (1 << 40))
    capfd.readouterr()
    out = tmp / "out.qcow2"
    rc = main(["convert", "-O", "qcow2", str(src), str(out)])
    err = capfd.readouterr().err
    assert rc == 1
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert fast_calls == ([1] if fast else [])
    assert not out.exists()
    assert [n for n in os.listdir(tmp) if n.startswith(".out")] == []


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "zero"]),
                              st.integers(0, 1 << 20), st.integers(1, 200 * KiB),
                              st.integers(0, 255)), max_size=12),
       cluster=st.sampled_from([512, 4096, 65536]),
       out_cluster=st.sampled_from([512, 65536, 1 << 21]),
       grain=st.sampled_from([None, "0", "512", "8k"]),
       extended=st.booleans())
def test_fast_convert_reads_back_as_the_model(tmp_path_factory: pytest.TempPathFactory,
                                              ops: list[tuple[str, int, int, int]],
                                              cluster: int, out_cluster: int,
                                              grain: str | None, extended: bool) -> None:
    tmp = tmp_path_factory.mktemp("model")
    size = (1 << 20) + 300 * KiB
    model = bytearray(size)
    src = tmp / "src.qcow2"
    qcow2.create(str(src), size, cluster_size=cluster, extended_l2=extended and cluster >= 16384)
    with qcow2.open(str(src), "r+") as img:
        for kind, off, n, byte in ops:
            n = min(n, size - off)
            if kind == "write":
                data = bytes([byte]) * n if byte % 3 else random.Random(byte).randbytes(n)
                img.pwrite(data, off)
                model[off : off + n] = data
            else:
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
    extra = ["-S", grain] if grain is not None else []
    for fmt in ("qcow2", "raw"):
        out = tmp / f"out.{fmt}"
        opts = ["-o", f"cluster_size={out_cluster}"] if fmt == "qcow2" else []
        assert main(["convert", "-q", *extra, "-O", fmt, *opts, str(src), str(out)]) == 0
        if fmt == "raw":
            assert out.read_bytes() == bytes(model)
        else:
            with qcow2.open(str(out)) as img:
                assert img.pread(size, 0) == bytes(model)
            assert qemu_check(out)["returncode"] == 0
        out.unlink()


def test_fast_path_without_sync_file_range(tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                           fast_calls: list[int]) -> None:
    """Where the system cannot start writeback, a thread syncs behind the writer."""
    import threading


    syncs: list[str] = []
    real = os.fdatasync
    monkeypatch.setattr(storage, "start_writeback", lambda fd, offset, length: False)
    monkeypatch.setattr(fastconvert, "SYNC_EVERY", 64 * KiB)
    monkeypatch.setattr(os, "fdatasync",
                        lambda fd: (syncs.append(threading.current_thread().name), real(fd))[1])
    src = _mixed(tmp)
    fast, full = _both(tmp, monkeypatch, fast_calls, ["-O", "qcow2", str(src)], "qcow2")
    assert "convert-sync" in syncs
    assert_clean(fast)
    assert qemu_img("compare", str(full), str(fast)).returncode == 0


@pytest.mark.parametrize("advice", [None, 9999])
def test_fast_path_without_mappings(tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                    fast_calls: list[int], advice: int | None) -> None:
    """Without MADV_POPULATE_READ (another system; 9999: a kernel that refuses it, found
    on the first chunk) every chunk is read into a buffer: the same output."""
    monkeypatch.setattr(storage, "_POPULATE_READ", advice)
    raw = tmp / "in.raw"
    with open(raw, "wb") as f:
        f.write(random.Random(7).randbytes(3 * MiB))
        f.write(bytes(2 * MiB))
        f.write(b"\x01" * 4096)
    fast, full = _both(tmp, monkeypatch, fast_calls, ["-f", "raw", "-O", "qcow2", str(raw)],
                       "qcow2")
    assert storage._POPULATE_READ is None
    assert_clean(fast)
    assert qemu_img("compare", "-f", "raw", str(raw), str(fast)).returncode == 0
    assert _allocation(fast, "qcow2") == _allocation(full, "qcow2")


def test_write_error_is_one_line_and_leaves_nothing(tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str],
                                                    fast_calls: list[int]) -> None:
    """A write that fails in the writer thread (a full disk) ends the convert with one
    line and no output, no temporary file."""
    import errno

    src = _mixed(tmp)
    real = os.pwrite
    calls: list[int] = []

    def failing(fd: int, data: Any, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    capfd.readouterr()
    out = tmp / "out.qcow2"
    assert main(["convert", "-O", "qcow2", str(src), str(out)]) == 1
    err = capfd.readouterr().err
    assert err.startswith("qcow2: Write failed: No space left on device") and err.count("\n") == 1
    assert fast_calls == [1]
    assert not out.exists()
    assert [n for n in os.listdir(tmp) if n.startswith(".out")] == []


def test_hostile_subcluster_both_allocated_and_zero(tmp: Path, fast_calls: list[int],
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    src = tmp / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(src), "1M")
    qemu_io(src, "write -P 0x61 0 4k")
    _at, l1e = _l1_entry(src, 0)
    l2 = l1e & 0x00FFFFFFFFFFFE00
    with open(src, "rb") as f:
        f.seek(l2 + 8)
        bitmap = struct.unpack(">Q", f.read(8))[0]
    _poke(src, l2 + 8, bitmap | (bitmap << 32))  # the allocated ones read as zeros too
    capfd.readouterr()
    out = tmp / "out.qcow2"
    assert main(["convert", "-O", "qcow2", str(src), str(out)]) == 1
    err = capfd.readouterr().err
    assert err == "qcow2: Subcluster of guest offset 0x0 is both allocated and zero\n"
    assert fast_calls == [1]
    assert not out.exists()


@pytest.mark.parametrize("full", [False, True])
def test_l2_table_on_a_refcount_block(tmp: Path, capfd: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch, full: bool) -> None:
    """An L1 entry pointing at a refcount block: with 64-bit refcounts of 1, read as an
    L2 table it is all zero clusters (found by test_fuzz_fastconvert). The full path
    refuses it; so does the fast path, with the same message."""
    src = tmp / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=64", str(src), "4M")
    qemu_io(src, "write -P 0x33 0 64k")
    with open(src, "rb") as f:
        rt = struct.unpack_from(">Q", f.read(56), 48)[0]
        f.seek(rt)
        block = struct.unpack(">Q", f.read(8))[0]
    at, _ = _l1_entry(src, 0)
    _poke(src, at, block | (1 << 63))
    if full:
        monkeypatch.setenv("QCOW2_CONVERT_FULL_PATH", "1")
    capfd.readouterr()
    for fmt in ("raw", "qcow2"):
        out = tmp / f"out.{fmt}"
        assert main(["convert", "-O", fmt, str(src), str(out)]) == 1
        err = capfd.readouterr().err
        assert err == f"qcow2: L2 table offset {block:#x} points at a refcount block\n"
        assert not out.exists()


def test_huge_virtual_size_over_few_tables(tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                           fast_calls: list[int]) -> None:
    """A virtual size of 1 PiB over two L2 tables (a header can claim up to 2047 PiB
    with a 32 MiB L1 table): the copy skips from one table's range to the next instead
    of looking at every 1 GiB window (a million of them here; at 2047 PiB, hours), and
    reads each table once (a 2 MiB cluster's table maps 512 windows)."""
    src = tmp / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", str(src), "1P")
    qemu_io(src, "write -P 0x11 0 64k", "write -P 0x22 999T 64k")
    windows: list[int] = []
    tables: list[int] = []
    real_extents, real_pread = fastconvert._Qcow2Source._extents, fastconvert._pread

    def extents(self: Any, start: int, end: int) -> Any:
        windows.append(start)
        return real_extents(self, start, end)

    def pread(fd: int, n: int, offset: int) -> bytes:
        if n == 2 * MiB:
            tables.append(offset)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(fastconvert._Qcow2Source, "_extents", extents)
    monkeypatch.setattr(fastconvert, "_pread", pread)
    out = tmp / "out.qcow2"
    assert main(["convert", "-q", "-O", "qcow2", "-o", "cluster_size=2M", str(src), str(out)]) == 0
    assert fast_calls == [1]
    assert len(windows) <= 2 * 512 + 2, len(windows)  # the two tables' windows, no more
    assert len(tables) == len(set(tables)) <= 3, tables  # the refcount table, two L2 tables
    assert qemu_img("compare", str(src), str(out)).returncode == 0
    assert_clean(out)


def test_raw_output_too_large_is_the_full_paths_message(
        tmp: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        fast_calls: list[int]) -> None:
    """A raw output the file system cannot hold (EFBIG: a hostile virtual size) is the
    full path's one line, not the bare OS message."""
    src = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "1M")

    def truncate(self: Any, length: int) -> None:
        raise OSError(27, os.strerror(27))

    monkeypatch.setattr(storage.FileBackend, "truncate", truncate)
    capfd.readouterr()
    out = tmp / "out.raw"
    assert main(["convert", "-O", "raw", str(src), str(out)]) == 1
    assert capfd.readouterr().err == "qcow2: Truncate failed: File too large (EFBIG)\n"
    assert fast_calls == [1]
    assert not out.exists()


def test_fragmented_small_clusters_bound_the_extents_held(
        tmp: Path, monkeypatch: pytest.MonkeyPatch, fast_calls: list[int]) -> None:
    """512-byte clusters whose L2 entries all map one host cluster (none merges with the
    next): a 1 GiB window of them was 2 Mi extents, some 400 MB for a 16 MiB file. The
    extents of at most WINDOW_CLUSTERS clusters are held at a time."""
    src = tmp / "frag.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(src), "40M")
    with open(src, "r+b") as f:
        head = f.read(48)
        l1_size, l1_off = struct.unpack_from(">I", head, 36)[0], struct.unpack_from(">Q", head, 40)[0]
        data = -(-os.path.getsize(src) // 512) * 512
        f.seek(data)
        f.write(b"\x5a" * 512 + struct.pack(">Q", data | (1 << 63)) * 64 * l1_size)
        f.seek(l1_off)
        f.write(b"".join(struct.pack(">Q", (data + 512 * (1 + i)) | (1 << 63))
                         for i in range(l1_size)))
    held: list[int] = []
    real = fastconvert._Qcow2Source._extents

    def extents(self: Any, start: int, end: int) -> Any:
        out = real(self, start, end)
        held.append(len(out))
        return out

    monkeypatch.setattr(fastconvert._Qcow2Source, "_extents", extents)
    out = tmp / "out.qcow2"
    assert main(["convert", "-q", "-O", "qcow2", str(src), str(out)]) == 0
    assert fast_calls == [1]
    assert sum(held) == 40 * MiB // 512 and max(held) <= 1 << 16  # (WINDOW_CLUSTERS)
    # every guest cluster reads as the one host cluster (QEMU reading the source is slow)
    assert "Pattern verification failed" not in qemu_io(out, "read -P 0x5a 0 40M")
    assert_clean(out)
