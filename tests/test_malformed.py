"""Malformed and hostile images (a corpus built from valid images, in the spirit of
qemu-iotests 036/060/080/112/138/261).

Every image gives a clear Qcow2Error subclass through the API, and through the CLI a
non-zero exit with a one-line message (no traceback), quickly, within a small memory
limit, without writing to the file; qemu-img agrees that each image is malformed (or
the test states exactly where QEMU differs). Reads of undamaged clusters keep working
where QEMU's do. A hypothesis fuzz test checks that random damage to the header and
tables only ever raises Qcow2Error.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import qemu_img, qemu_io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_edit import COMPRESSED, COPIED, OFFSET_MASK, RawImage

import qcow2
from qcow2.errors import (
    BackingFileError,
    CorruptImageError,
    FormatError,
    Qcow2Error,
    UnsupportedFeatureError,
)

K, M, G = 1 << 10, 1 << 20, 1 << 30
CS = 64 * K
MEM_LIMIT = 512 * M  # address space for one CLI run on a hostile image
FEATURE_TABLE = 0x6803F857


# ------------------------------------------------------------------ base images --
@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bases")
    out = {}
    p = d / "v3.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "1G")
    qemu_io(p, "write -q -P 0x11 0 192k", "write -q -c -P 0x55 1M 64k",
            "write -q -P 0x33 2M 64k", "write -q -P 0x44 600M 64k")
    out["v3"] = p
    p = d / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(p), "16M")
    qemu_io(p, "write -q -P 0x11 0 192k")
    out["v2"] = p
    p = d / "snap.qcow2"
    shutil.copyfile(out["v3"], p)
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -q -P 0x66 0 64k")
    out["snap"] = p
    p = d / "extl2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(p), "16M")
    qemu_io(p, "write -q -P 0x11 0 64k", "write -q -P 0x22 64k 8k")
    out["extl2"] = p
    p = d / "zstd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", str(p), "16M")
    qemu_io(p, "write -q -c -P 0x55 1M 64k", "write -q -P 0x11 0 64k")
    out["zstd"] = p
    return out


# ------------------------------------------------------------------ damage --
def feature_table_pos(r: RawImage) -> tuple[int, int]:
    pos = r.get("header_length")
    while True:
        etype, length = struct.unpack(">II", r.read(pos, 8))
        if etype == 0:
            raise AssertionError("no feature table")
        if etype == FEATURE_TABLE:
            return pos + 8, length
        pos += 8 + ((length + 7) & ~7)


def named_unknown_feature(r: RawImage) -> None:
    pos, _ = feature_table_pos(r)
    r.write(pos, struct.pack(">BB46s", 0, 20, b"hostile feature"))
    r.set("incompatible_features", r.get("incompatible_features") | 1 << 20)


def ext_past_cluster(r: RawImage) -> None:
    pos, _ = feature_table_pos(r)
    r.write(pos - 4, struct.pack(">I", 0x100000))


def ext_duplicate(r: RawImage) -> None:
    pos, length = feature_table_pos(r)
    blob = r.read(pos - 8, 8 + ((length + 7) & ~7))
    end = r.get("header_length")
    while struct.unpack(">I", r.read(end, 4))[0]:
        end += 8 + ((struct.unpack(">I", r.read(end + 4, 4))[0] + 7) & ~7)
    r.write(end, blob + bytes(8))


def truncate_to(n: int) -> Callable[[RawImage], None]:
    def fn(r: RawImage) -> None:
        with open(r.path, "r+b") as f:
            f.truncate(n)
    return fn


def compressed_short(r: RawImage) -> None:
    """A compressed cluster whose stream ends after 100 bytes."""
    e = r.l2(16)
    host = e & ((1 << 54) - 1)
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    data = c.compress(b"x" * 100) + c.flush()
    r.write(host, data)


def compressed_bomb(r: RawImage) -> None:
    """A compressed cluster whose stream expands to 64 MiB (bounded to one cluster)."""
    e = r.l2(16)
    host = e & ((1 << 54) - 1)
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    data = c.compress(bytes(64 * M)) + c.flush()
    assert len(data) < 100 * K
    r.write(host, data)
    nsec = -(-(len(data) + (host & 511)) // 512)
    r.set_l2(16, COMPRESSED | ((nsec - 1) << 54) | host)


def snapshot_extra_too_large(r: RawImage) -> None:
    r.set_snapshot_extra_size(0, 2048)


@dataclass
class Case:
    base: str
    damage: Callable[[RawImage], None]
    err: type[Qcow2Error]
    match: str
    where: str = "open"  # open | read (of read_at) | snapshots | write (at read_at)
    read_at: int = 0
    good_at: int | None = None  # an undamaged guest offset that must still read right
    qemu: str = "info"  # how QEMU shows it is malformed: info | check | read | accepts
    checkable: bool = False  # `qcow2 check` reads its metadata all the same (exit 0)


def l1_entry_to(target: Callable[[RawImage], int]) -> Callable[[RawImage], None]:
    return lambda r: r.set_l1(0, target(r) | COPIED)


CASES: dict[str, Case] = {
    # -- header --------------------------------------------------------------------
    "bad_magic": Case("v3", lambda r: r.write(0, b"QFI\xfa"), FormatError, "not in qcow2 format"),
    "version_1": Case("v3", lambda r: r.set("version", 1), UnsupportedFeatureError, "version 1"),
    "version_4": Case("v3", lambda r: r.set("version", 4), UnsupportedFeatureError, "version 4"),
    "cluster_bits_8": Case("v3", lambda r: r.set("cluster_bits", 8), FormatError, "cluster size"),
    "cluster_bits_22": Case("v3", lambda r: r.set("cluster_bits", 22), FormatError, "cluster size"),
    "header_length_short": Case("v3", lambda r: r.set("header_length", 96), FormatError,
                                "header too short"),
    "header_length_odd": Case("v3", lambda r: r.set("header_length", 108), FormatError,
                              "multiple of 8"),
    "header_length_past_cluster": Case("v3", lambda r: r.set("header_length", 70000),
                                       FormatError, "exceeds cluster size"),
    "refcount_order_7": Case("v3", lambda r: r.set("refcount_order", 7), FormatError,
                             "may not exceed 64 bits"),
    "unknown_incompat_bit": Case("v3", lambda r: r.set("incompatible_features", 1 << 20),
                                 UnsupportedFeatureError, "Unknown incompatible feature: 100000"),
    "unknown_incompat_named": Case("v3", named_unknown_feature, UnsupportedFeatureError,
                                   "hostile feature"),
    "compression_bit_without_type": Case("v3", lambda r: r.set("incompatible_features", 8),
                                         FormatError, "Compression type"),
    "compression_type_without_bit": Case("v3", lambda r: r.set("compression_type", 1),
                                         FormatError, "Compression type"),
    "compression_type_unknown": Case(
        "v3", lambda r: (r.set("compression_type", 7), r.set("incompatible_features", 8)),
        UnsupportedFeatureError, "compression type 7"),
    # AES (1) opens in QEMU without a key; only its reads fail. LUKS (2) without its
    # header extension crashes qemu-img 7.2 (SIGSEGV): non-zero either way. Metadata is
    # never encrypted, so our check works on AES images without a key (QEMU's needs one).
    "crypt_aes": Case("v3", lambda r: r.set("crypt_method", 1), UnsupportedFeatureError,
                      "encrypt", qemu="read", checkable=True),
    "crypt_luks": Case("v3", lambda r: r.set("crypt_method", 2), UnsupportedFeatureError,
                       "encrypt", qemu="read"),
    "crypt_unknown": Case("v3", lambda r: r.set("crypt_method", 9), UnsupportedFeatureError,
                          "encrypt"),
    "empty_file": Case("v3", truncate_to(0), FormatError, "not in qcow2 format"),
    "truncated_in_magic": Case("v3", truncate_to(3), FormatError, "not in qcow2 format"),
    "truncated_in_v2_fields": Case("v3", truncate_to(50), FormatError, "truncated"),
    # QEMU pads a short header with zeros; its check then fails on the missing tables
    "truncated_in_v3_tail": Case("v3", truncate_to(108), FormatError, "truncated", qemu="check"),
    # -- header extensions and backing file name -----------------------------------
    "extension_past_cluster": Case("v3", ext_past_cluster, FormatError, "runs past the end"),
    # QEMU takes the last of duplicated extensions; we refuse the ambiguity
    "extension_duplicate": Case("v3", ext_duplicate, FormatError, "Duplicate header extension",
                                qemu="accepts"),
    "backing_name_too_long": Case(
        "v3", lambda r: (r.set("backing_file_offset", 1000), r.set("backing_file_size", 2000)),
        FormatError, "Backing file name too long"),
    "backing_name_past_cluster": Case(
        "v3", lambda r: (r.set("backing_file_offset", CS - 10), r.set("backing_file_size", 20)),
        FormatError, "Backing file name too long"),
    # -- tables --------------------------------------------------------------------
    "l1_too_small": Case("v3", lambda r: r.set("l1_size", 1), FormatError, "L1 table is too small"),
    "l1_beyond_limit": Case("v3", lambda r: r.set("l1_size", 0x7FFFFFFF), FormatError,
                            "L1 table too large"),
    "l1_unaligned": Case("v3", lambda r: r.set("l1_table_offset", r.get("l1_table_offset") + 8),
                         FormatError, "L1 table offset invalid"),
    "l1_past_eof": Case("v3", lambda r: r.set("l1_table_offset", 4096 * CS), FormatError,
                        "past the end of the file", qemu="check"),
    "reftable_unaligned": Case(
        "v3", lambda r: r.set("refcount_table_offset", r.get("refcount_table_offset") + 8),
        FormatError, "Reference count table offset invalid"),
    "reftable_past_eof": Case("v3", lambda r: r.set("refcount_table_offset", 4096 * CS),
                              FormatError, "past the end of the file", qemu="check"),
    "reftable_zero_clusters": Case("v3", lambda r: r.set("refcount_table_clusters", 0),
                                   FormatError, "does not contain a reference count table"),
    "reftable_beyond_limit": Case("v3", lambda r: r.set("refcount_table_clusters", 0x7FFFFFFF),
                                  FormatError, "Reference count table too large"),
    "snapshots_huge_count": Case("snap", lambda r: r.set("nb_snapshots", 0x7FFFFFFF),
                                 FormatError, "Too many snapshots"),
    "snapshot_table_unaligned": Case(
        "snap", lambda r: r.set("snapshots_offset", r.get("snapshots_offset") + 8),
        FormatError, "Snapshot table offset invalid"),
    "snapshot_table_past_eof": Case("snap", lambda r: r.set("snapshots_offset", 4096 * CS),
                                    FormatError, "past the end of the file", qemu="check"),
    "snapshot_extra_too_large": Case("snap", snapshot_extra_too_large, FormatError,
                                     "extra metadata", where="snapshots"),
    "snapshot_l1_unaligned": Case(
        "snap", lambda r: r.set_snapshot_l1(0, offset=r.snapshot_l1(0)[0] + 512),
        CorruptImageError, "L1 table offset invalid", where="snapshot", qemu="check"),
    "snapshot_l1_too_large": Case(
        "snap", lambda r: r.set_snapshot_l1(0, size=1 << 30), CorruptImageError,
        "L1 table too large", where="snapshot", qemu="check"),
    # -- table entries -------------------------------------------------------------
    "l2_unaligned": Case("v3", lambda r: r.set_l1(0, r.l1(0) + 512), CorruptImageError,
                         "not cluster aligned", where="read", good_at=600 * M, qemu="read"),
    "l2_past_eof": Case("v3", l1_entry_to(lambda r: 4096 * CS), CorruptImageError,
                        "past the end of the image file", where="read", good_at=600 * M,
                        qemu="check"),
    "l2_beyond_2_56": Case("v3", l1_entry_to(lambda r: (1 << 56) - CS), CorruptImageError,
                           "past the end of the image file", where="read", good_at=600 * M,
                           qemu="check"),
    "l2_in_header": Case("v3", l1_entry_to(lambda r: 512), CorruptImageError,
                         "not cluster aligned", where="read", good_at=600 * M, qemu="read"),
    "l2_is_l1_table": Case("v3", l1_entry_to(lambda r: r.get("l1_table_offset")),
                           CorruptImageError, "points at the active L1 table", where="read",
                           good_at=600 * M, qemu="check"),
    "l2_is_refcount_table": Case("v3", l1_entry_to(lambda r: r.get("refcount_table_offset")),
                                 CorruptImageError, "points at the refcount table",
                                 where="read", good_at=600 * M, qemu="check"),
    "l2_is_refcount_block": Case("v3", l1_entry_to(lambda r: r.reftable(0)), CorruptImageError,
                                 "points at a refcount block", where="read", good_at=600 * M,
                                 qemu="check"),
    "l2_two_l1_entries": Case("v3", lambda r: r.set_l1(1, r.l1(0)), CorruptImageError,
                              "more than one L1 entry", where="read", read_at=600 * M,
                              qemu="check"),
    "data_unaligned": Case("v3", lambda r: r.set_l2(32, r.l2(32) + 512), CorruptImageError,
                           "not cluster aligned", where="read", read_at=2 * M, good_at=0,
                           qemu="read"),
    "data_past_eof": Case("v3", lambda r: r.set_l2(32, (4096 * CS) | COPIED), CorruptImageError,
                          "past the end of the image file", where="read", read_at=2 * M,
                          good_at=0, qemu="check"),
    "data_beyond_2_56": Case("v3", lambda r: r.set_l2(32, r.l2(32) | 1 << 57),
                             CorruptImageError, "", where="check", read_at=2 * M, good_at=0,
                             qemu="check"),
    "data_is_l1_table_write": Case("v3", lambda r: r.set_l2(3, r.get("l1_table_offset") | COPIED),
                                   CorruptImageError, "overlaps with the active L1 table",
                                   where="write", read_at=3 * CS, good_at=0, qemu="check"),
    "data_is_own_l2_write": Case("v3", lambda r: r.set_l2(3, (r.l1(0) & OFFSET_MASK) | COPIED),
                                 CorruptImageError, "overlaps with an L2 table", where="write",
                                 read_at=3 * CS, good_at=0, qemu="check"),
    "data_is_refcount_table_write": Case(
        "v3", lambda r: r.set_l2(3, r.get("refcount_table_offset") | COPIED), CorruptImageError,
        "overlaps with the refcount table", where="write", read_at=3 * CS, good_at=0,
        qemu="check"),
    "data_is_refblock_write": Case("v3", lambda r: r.set_l2(3, r.reftable(0) | COPIED),
                                   CorruptImageError, "overlaps with a refcount block",
                                   where="write", read_at=3 * CS, good_at=0, qemu="check"),
    "compressed_past_eof": Case(
        "v3", lambda r: r.set_l2(16, (r.l2(16) & ~((1 << 54) - 1)) | (4096 * CS)),
        CorruptImageError, "runs past the end", where="read", read_at=M, good_at=0, qemu="read"),
    # the longest descriptor the format allows: decompression stops at one cluster, so
    # reads work (as in QEMU); check sees the neighbouring clusters referenced twice
    "compressed_absurd_length": Case(
        "v3", lambda r: r.set_l2(16, r.l2(16) | (0xFF << 54)), CorruptImageError, "",
        where="check", read_at=M, good_at=M, qemu="check"),
    "compressed_short_stream": Case("v3", compressed_short, CorruptImageError,
                                    "decompress", where="read", read_at=M, good_at=0, qemu="read"),
    "extl2_allocated_and_zero": Case("extl2", lambda r: r.set_bitmap(1, 0x0000000300000001),
                                     CorruptImageError, "both allocated and zero", where="read",
                                     read_at=CS, good_at=0, qemu="check"),
}


def build(bases: dict[str, Path], tmp: Path, name: str) -> Path:
    case = CASES[name]
    p = tmp / f"{name}.qcow2"
    shutil.copyfile(bases[case.base], p)
    case.damage(RawImage(p))
    return p


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a child with a memory limit and a timeout (a hang fails the test)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    return subprocess.run([sys.executable, "-m", "qcow2", *args], capture_output=True,
                          text=True, timeout=120, preexec_fn=limit)


def qemu_says_malformed(p: Path, how: str, read_at: int) -> bool:
    if how == "info":
        r = subprocess.run(["qemu-img", "info", "-f", "qcow2", str(p)], capture_output=True)
    elif how == "check":
        r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(p)], capture_output=True)
    else:
        r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read {read_at} 4k", str(p)],
                           capture_output=True, text=True)
        return r.returncode != 0 or "failed" in r.stdout
    return r.returncode != 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed(bases, tmp, name):
    case = CASES[name]
    p = build(bases, tmp, name)
    before = digest(p)
    pristine = qcow2.open(bases[case.base])
    try:
        if case.where == "open":
            with pytest.raises(case.err, match=case.match):
                qcow2.open(p)
            with pytest.raises(case.err, match=case.match):
                qcow2.open(p, "r+")
            cli = run_cli("info", "-f", "qcow2", str(p))  # (without -f: probed, as by qemu-img)
            assert cli.returncode == 1
            assert cli.stderr.count("\n") == 1 and case.match in cli.stderr, cli.stderr
        elif case.where == "snapshots":
            with qcow2.open(p) as img:
                with pytest.raises(case.err, match=case.match):
                    img.snapshots  # noqa: B018 - the listing parses the table
                assert img.pread(4, 0) == pristine.pread(4, 0)
        elif case.where == "snapshot":
            with qcow2.open(p) as img:
                with pytest.raises(case.err, match=case.match):
                    img.snapshot("s1").pread(4096, 0)
                assert img.pread(4096, 0) == pristine.pread(4096, 0)
        elif case.where in ("read", "check", "write"):
            with qcow2.open(p) as img:
                if case.where == "read":
                    with pytest.raises(case.err, match=case.match):
                        img.pread(4096, case.read_at)
                if case.good_at is not None:
                    assert img.pread(4096, case.good_at) == pristine.pread(4096, case.good_at)
                if case.qemu == "check":  # metadata damage: the check sees it
                    assert img.check().corruptions > 0
            if case.where == "write":
                assert digest(p) == before
                l1 = RawImage(p).read(RawImage(p).get("l1_table_offset"), CS)
                with qcow2.open(p, "r+") as img:
                    with pytest.raises(case.err, match=case.match):
                        img.pwrite(b"\x99" * 4096, case.read_at)
                    with pytest.raises(CorruptImageError):
                        img.pwrite(b"\x98", case.good_at or 0)
                # nothing but the corrupt bit changed; QEMU sees it too
                r = RawImage(p)
                assert r.get("incompatible_features") & 2
                assert r.read(r.get("l1_table_offset"), CS) == l1
                assert "corrupt: true" in qemu_img("info", str(p)).stdout
                with pytest.raises(CorruptImageError, match="corrupt"):
                    qcow2.open(p, "r+")
                return
        else:
            raise AssertionError(case.where)
    finally:
        pristine.close()
    assert digest(p) == before, "nothing may write to a malformed image"
    cli = run_cli("check", str(p))
    assert "Traceback" not in cli.stderr, cli.stderr
    if case.where == "read" and case.qemu == "read":
        # damaged data, sound metadata (a bad compressed stream...): both checks agree
        assert cli.returncode == qemu_img("check", str(p), check=False).returncode
    elif case.checkable:
        assert cli.returncode == 0, cli.stderr
    else:
        assert cli.returncode != 0 and cli.stderr.strip(), "the CLI says what is wrong"
    assert digest(p) == before
    if case.qemu == "accepts":
        assert not qemu_says_malformed(p, "info", 0)
    else:
        assert qemu_says_malformed(p, case.qemu, case.read_at), "QEMU sees it as malformed too"


def test_every_truncation_of_the_header(bases, tmp):
    """Every file length up to the end of the header (112 bytes with the compression
    type field), and an empty file: a FormatError, never another exception."""
    src = bases["v3"].read_bytes()
    p = tmp / "t.qcow2"
    for n in range(0, 113):
        p.write_bytes(src[:n])
        with pytest.raises(FormatError):
            qcow2.open(p)
    for n in (0, 4, 50, 100):  # QEMU refuses those too
        p.write_bytes(src[:n])
        assert qemu_says_malformed(p, "info", 0)


def test_v2_has_no_refcount_order_field(bases, tmp):
    """"v2 with refcount_order != 4" cannot be expressed: v2 headers end at byte 72 and
    always mean 16-bit refcounts. Bytes where v3 keeps refcount_order are outside a v2
    header (after the extension end marker) and are ignored by both implementations."""
    p = tmp / "v2.qcow2"
    shutil.copyfile(bases["v2"], p)
    r = RawImage(p)
    assert r.get("version") == 2 and struct.unpack(">I", r.read(72, 4))[0] == 0  # end marker
    r.write(96, struct.pack(">I", 7))
    with qcow2.open(p) as img:
        assert img.geo.refcount_bits == 16
        assert img.check().clean
        assert img.pread(4, 0) == b"\x11" * 4
    assert qemu_img("check", str(p)).returncode == 0


def test_decompression_bomb_is_bounded(bases, tmp):
    """A compressed cluster inflating to 64 MiB yields one cluster (as in QEMU, which
    also stops at the cluster size) without ever holding more in memory."""
    p = tmp / "bomb.qcow2"
    shutil.copyfile(bases["v3"], p)
    compressed_bomb(RawImage(p))
    with qcow2.open(p) as img:
        assert img.pread(CS, M) == bytes(CS)
    code = ("import qcow2,sys; img=qcow2.open(sys.argv[1]); "
            f"assert img.pread({CS}, {M}) == bytes({CS})")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True,
                       timeout=120, preexec_fn=lambda: resource.setrlimit(
                           resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT)))
    assert r.returncode == 0, r.stderr
    q = subprocess.run(["qemu-io", "-r", "-c", f"read -P 0 {M} 64k", str(p)],
                       capture_output=True, text=True)
    assert "Pattern verification failed" not in q.stdout and "failed" not in q.stdout


def test_zstd_garbage_stream(bases, tmp):
    p = tmp / "z.qcow2"
    shutil.copyfile(bases["zstd"], p)
    r = RawImage(p)
    host = r.l2(16) & ((1 << 54) - 1)
    r.write(host, b"\x28\xb5\x2f\xfd" + os.urandom(200))
    with qcow2.open(p) as img:
        with pytest.raises(CorruptImageError):
            img.pread(CS, M)
        assert img.pread(4, 0) == b"\x11" * 4
    assert qemu_says_malformed(p, "read", M)


def test_many_overlapping_snapshot_l1_tables(bases, tmp):
    """3000 snapshot entries whose L1 tables (up to the 32 MiB limit each) start all
    over the file: the check reads each L1 entry of the file once, however many tables
    cover it, so it finishes promptly in little memory, and reports the damage."""
    p = tmp / "many.qcow2"
    shutil.copyfile(bases["snap"], p)
    r = RawImage(p)
    clusters = r.file_size // CS
    rng = __import__("random").Random(3)
    entries = bytearray()
    for i in range(3000):
        name = f"s{i}".encode()
        e = struct.pack(">QIHHIIQII", rng.randrange(1, clusters) * CS, rng.randrange(1, 1 << 22),
                        len(name), len(name), 0, 0, 0, 0, 24) + bytes(24) + name + name
        entries += e + bytes((-len(e)) % 8)
    table_at = r.append_cluster()
    r.write(table_at * CS, bytes(entries))
    r.set("snapshots_offset", table_at * CS)
    r.set("nb_snapshots", 3000)
    before = digest(p)
    cli = run_cli("check", str(p))
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr[-2000:]
    assert digest(p) == before


# ------------------------------------------------------------------ backing files --
def test_backing_missing(tmp):
    p = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", str(p), "1M")
    with pytest.raises(BackingFileError, match="gone.qcow2"):
        qcow2.open(p)
    with qcow2.open(p, backing=False) as img:  # the image itself is fine
        assert img.backing_file == "gone.qcow2"
    cli = run_cli("info", "--backing-chain", str(p))
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1
    assert qemu_img("info", "--backing-chain", str(p), check=False).returncode != 0


def test_backing_loop(tmp):
    a, b = tmp / "a.qcow2", tmp / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(b), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(a))
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
    with pytest.raises(BackingFileError, match="loop"):
        qcow2.open(a)
    cli = run_cli("info", "--backing-chain", str(a))
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1, cli.stderr
    assert qemu_img("info", "--backing-chain", str(a), check=False).returncode != 0


def test_backing_chain_too_deep(tmp):
    from qcow2.backing import MAX_CHAIN_DEPTH

    prev = tmp / "l0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(prev), "1M")
    for i in range(1, MAX_CHAIN_DEPTH + 2):
        cur = tmp / f"l{i}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", prev.name, "-F", "qcow2", str(cur), "1M")
        prev = cur
    with pytest.raises(BackingFileError, match="deeper"):
        qcow2.open(prev)
    with qcow2.open(tmp / f"l{MAX_CHAIN_DEPTH - 1}.qcow2") as img:  # one level less is fine
        assert img.pread(1, 0) == b"\0"
    # QEMU has no such limit and opens the chain: a documented difference
    assert qemu_img("info", str(prev), check=False).returncode == 0


@pytest.mark.parametrize("name", [
    'json:{"driver": "file", "filename": "/nonexistent/x"}',
    "nbd://127.0.0.1:1/export",
    "file:/nonexistent/x.qcow2",
])
def test_backing_names_must_be_plain_paths(tmp, name):
    p = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2", str(p), "1M")
    with pytest.raises(BackingFileError, match="not a plain file path"):
        qcow2.open(p)
    cli = run_cli("info", "--backing-chain", str(p))
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1
    assert qemu_img("info", "--backing-chain", str(p), check=False).returncode != 0


# ------------------------------------------------------------------ fuzzing --
class _Blob(bytes):
    def __repr__(self) -> str:  # keep hypothesis reports short
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "f.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(p), "256k")
    qemu_io(p, "write -q -P 0x11 0 8k", "write -q -c -P 0x22 64k 512", "write -q -P 0x33 200k 1k")
    qemu_img("snapshot", "-c", "s", str(p))
    qemu_io(p, "write -q -P 0x44 0 1k")
    return _Blob(p.read_bytes())


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(patches=st.lists(st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=8)),
                        min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 12000)))
def test_fuzz_only_qcow2_errors(fuzz_base, tmp_path_factory, patches, cut):
    """Random bytes over the header, tables and refcounts (the first 8 clusters), and
    random truncation: opening, reading everything, listing snapshots and checking
    raise nothing but Qcow2Error."""
    data = bytearray(fuzz_base)
    for off, blob in patches:
        data[off : off + len(blob)] = blob
    if cut is not None:
        del data[cut:]
    p = tmp_path_factory.getbasetemp() / f"fuzz-{os.getpid()}.qcow2"
    p.write_bytes(bytes(data))
    try:
        with qcow2.open(p, backing=False) as img:
            size = min(img.size, 1 * M)
            for off in range(0, size, 64 * K):
                try:
                    img.pread(min(64 * K, size - off), off)
                except CorruptImageError:
                    pass
            try:
                img.snapshots  # noqa: B018
            except Qcow2Error:
                pass
            res = img.check()
            assert res.exit_code in (0, 1, 2, 3)
    except Qcow2Error:
        pass
    assert bytes(data) == p.read_bytes(), "a read-only open never writes"
