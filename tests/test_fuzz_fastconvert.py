"""Hostile inputs for `qcow2 convert`'s fast path (fastconvert.py), fuzzed against the
full path (QCOW2_CONVERT_FULL_PATH=1).

Small images written by qemu-img and qemu-io (512 B, 4 KiB, 64 KiB and 2 MiB clusters,
16- and 64-bit refcounts, zlib and zstd compressed clusters, zero clusters, extended L2
entries, a backing file) get a few fields corrupted: header fields, L1 entries, L2 entries (and their subcluster
bitmaps), values past the end of the file, unaligned, pointing at the header, the L1,
an L2 or a refcount structure, huge compressed sizes, reserved bits; sometimes the file
is truncated too. Each case is converted to raw and to qcow2 by `qcow2.cli.main`, both
ways, each in a forked child with a time and an address-space limit.

Every run ends in main's return code 0 (nothing on stderr with -q) or 1 (one line,
`qcow2: ...`), never an exception, a hang or a memory error; where both paths succeed,
their outputs hold the same guest data (qemu-img compare); the fast path never succeeds
where the full path refuses the input.

Derandomized and small by default (a few seconds); QCOW2_FASTFUZZ_COUNT sets the number
of examples for a longer run by hand.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QEMU_IMG, qemu_img, qemu_io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_edit import FIELDS, OFFSET_MASK, RawImage
from test_hostile import in_child

from qcow2.cli import main

K, M = 1 << 10, 1 << 20
pytestmark = pytest.mark.standard_only  # (QEMU-written inputs, mutated by hand)

COUNT = int(os.environ.get("QCOW2_FASTFUZZ_COUNT", "6"))
TIMEOUT = 30  # seconds per convert (a base image converts in well under one)
MEMORY = 512 * M  # address space per convert beyond what the child inherits


def make_bases(d: Path) -> list[Path]:
    """The inputs mutated, all clean for qemu-img check."""
    out = []
    p = d / "c512.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(p), "1M")
    qemu_io(p, "write -q -P 0x11 0 8k", "write -q -c -P 0x22 16k 512", "write -q -z 24k 2k",
            "write -q -P 0x33 700k 1k", "write -q -c -P 0x44 900k 512")
    out.append(p)
    p = d / "zstd4k.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,compression_type=zstd",
             str(p), "2M")
    qemu_io(p, "write -q -c -P 0x55 0 4k", "write -q -c -P 0x66 8k 4k",
            "write -q -P 0x77 64k 12k", "write -q -z 128k 8k", "write -q -P 0x78 1M 4k")
    out.append(p)
    base = d / "backing.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -q -P 0x99 0 1M", "write -q -c -P 0x9a 2M 64k")
    p = d / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(p), "4M")
    qemu_io(p, "write -q -P 0xaa 64k 64k", "write -q -z 256k 64k", "write -q -c -P 0xab 3M 64k")
    out.append(p)
    p = d / "extl2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", str(p), "4M")
    qemu_io(p, "write -q -P 0x11 0 64k", "write -q -P 0x22 1M 8k", "write -q -z 2M 16k",
            "write -q -c -P 0x23 3M 64k")
    out.append(p)
    p = d / "c2m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M,refcount_bits=64", str(p), "8M")
    qemu_io(p, "write -q -P 0x31 0 4k", "write -q -P 0x32 6M 4k")
    out.append(p)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_bases(tmp_path_factory.mktemp("fastfuzzbases"))


# ------------------------------------------------------------------ the mutator --
def fields(r: RawImage) -> list[tuple[int, int, str]]:
    """(file offset, width, what) of the fields worth corrupting."""
    out = [(off, struct.calcsize(fmt), name) for name, (off, fmt) in FIELDS.items()
           if name not in ("magic", "version")]
    cs = r.cluster_size
    esz = 16 if r.extended_l2 else 8
    l1 = r.get("l1_table_offset")
    for i in range(min(r.get("l1_size"), 4)):
        out.append((l1 + 8 * i, 8, f"l1[{i}]"))
        l2 = r.u64(l1 + 8 * i) & OFFSET_MASK
        if not l2:
            continue
        # the allocated entries first (the interesting ones), a few empty ones
        for j in range(cs // esz):
            if r.u64(l2 + j * esz) or j in (1, 7):
                out.append((l2 + j * esz, 8, f"l2[{i}][{j}]"))
                if esz == 16:
                    out.append((l2 + j * esz + 8, 8, f"l2bitmap[{i}][{j}]"))
    rt = r.get("refcount_table_offset")
    out.append((rt, 8, "reftable[0]"))
    return out


def values(ctx: dict[str, int], old: int, width: int, pick: int, rand: int) -> int:
    cs, fs, l1, rt, l2, rb = ctx["cs"], ctx["fs"], ctx["l1"], ctx["rt"], ctx["l2"], ctx["rb"]
    top = (1 << (8 * width)) - 1
    comp = 1 << 62
    cands = [0, 1, top, top >> 1, 1 << (8 * width - 1), old ^ (1 << rand % (8 * width)),
             old + 1, old - 1, old + cs, old * 2, 1 << 31, 1 << 62, (1 << 63) - 512,
             fs, fs + cs, fs - cs, cs // 2, (1 << 56) - cs,
             # offsets of an L1/L2 entry: flags kept, the structures of the file
             (old & ~OFFSET_MASK) | cs * 0, (old & ~OFFSET_MASK) | l1, (old & ~OFFSET_MASK) | rt,
             (old & ~OFFSET_MASK) | rb,
             (old & ~OFFSET_MASK) | l2, (old & ~OFFSET_MASK) | (rand % max(fs, 1) & ~511),
             (old & ~OFFSET_MASK) | (fs + 7 * cs), (old & ~OFFSET_MASK) | (old & OFFSET_MASK) + 512,
             old | 1, old | (0x3F << 56) & ~comp, old | (0xFF << 1) & ~OFFSET_MASK,
             # compressed descriptors: a huge sector count, past the end, at metadata
             comp | top >> 2, comp | l1, comp | rt, comp | fs, comp | (old & ((1 << 54) - 1)) | (1 << 53),
             rand]
    return cands[pick % len(cands)] & top


def mutate(src: Path, dst: Path, muts: list[tuple[int, int, int]], trunc: int | None) -> list[str]:
    dst.write_bytes(src.read_bytes())
    r = RawImage(dst)
    targets = fields(r)
    # (from the unmutated image: a first mutation may make these absurd)
    ctx = {"cs": r.cluster_size, "fs": r.file_size, "l1": r.get("l1_table_offset"),
           "rt": r.get("refcount_table_offset")}
    ctx["l2"] = r.u64(ctx["l1"]) & OFFSET_MASK
    ctx["rb"] = r.u64(ctx["rt"]) & OFFSET_MASK
    done = []
    for which, pick, rand in muts:
        off, width, what = targets[which % len(targets)]
        old = int.from_bytes(r.read(off, width), "big")
        new = values(ctx, old, width, pick, rand)
        r.write(off, new.to_bytes(width, "big"))
        done.append(f"{what}@{off:#x}: {old:#x} -> {new:#x}")
    if trunc is not None:
        size = src.stat().st_size
        with open(dst, "r+b") as f:
            f.truncate(trunc % size)
        done.append(f"truncated to {trunc % size}")
    return done


# ------------------------------------------------------------------ the converts --
def _convert(fmt: str, src: str, dst: str, full: bool) -> tuple[int, str]:
    """main's return code and stderr (in the child: nothing escapes to the parent)."""
    if full:
        os.environ["QCOW2_CONVERT_FULL_PATH"] = "1"
    else:
        os.environ.pop("QCOW2_CONVERT_FULL_PATH", None)
    err = io.StringIO()
    sys.stderr = err
    rc = main(["convert", "-q", "-O", fmt, src, dst])
    return rc, err.getvalue()


def convert_case(src: Path, work: Path) -> dict[tuple[str, bool], tuple[int, str]]:
    """Each output format by each path; asserts the one-line properties."""
    out = {}
    for fmt in ("raw", "qcow2"):
        for full in (False, True):
            dst = work / f"{'full' if full else 'fast'}.{fmt}"
            status, got = in_child(_convert, fmt, str(src), str(dst), full,
                                   timeout=TIMEOUT, mem=MEMORY)
            what = f"{'full' if full else 'fast'} path -O {fmt}"
            assert status == "ok", f"{what}: {status} {got}"
            rc, err = got
            if rc == 0:
                assert err == "" and dst.exists(), f"{what}: {err!r}"
            else:
                assert rc == 1, f"{what}: rc {rc}: {err}"
                lines = err.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("qcow2: "), f"{what}: {err!r}"
                assert not dst.exists(), what
            leftovers = [n for n in os.listdir(work) if n.startswith(".")]
            assert leftovers == [], f"{what}: {leftovers}"
            out[(fmt, full)] = (rc, err)
    return out


def same_content(a: Path, fa: str, b: Path, fb: str) -> bool:
    p = subprocess.run([QEMU_IMG, "compare", "-q", "-f", fa, "-F", fb, str(a), str(b)],
                       capture_output=True, text=True, timeout=120)
    return p.returncode == 0


def check_case(src: Path, work: Path, what: list[str]) -> None:
    res = convert_case(src, work)
    for fmt in ("raw", "qcow2"):
        fast_rc, fast_err = res[(fmt, False)]
        full_rc, full_err = res[(fmt, True)]
        # the fast path may refuse more, never less
        assert not (fast_rc == 0 and full_rc != 0), \
            f"-O {fmt}: the fast path copied what the full path refuses ({full_err.strip()}); {what}"
        if fast_rc == 0 and full_rc == 0:
            assert same_content(work / f"fast.{fmt}", fmt, work / f"full.{fmt}", fmt), \
                f"-O {fmt}: the paths' outputs differ; {what}"
    if res[("raw", False)][0] == 0 and res[("qcow2", False)][0] == 0:
        assert same_content(work / "fast.raw", "raw", work / "fast.qcow2", "qcow2"), what


_mutation = st.tuples(st.integers(0, 1 << 16), st.integers(0, 1 << 16), st.integers(0, (1 << 64) - 1))


@settings(max_examples=COUNT, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.integers(0, 4), muts=st.lists(_mutation, min_size=1, max_size=3),
       trunc=st.none() | st.integers(0, 1 << 30))
def test_fast_path_on_hostile_images(bases: list[Path], tmp_path_factory: pytest.TempPathFactory,
                                     base: int, muts: list[tuple[int, int, int]],
                                     trunc: int | None) -> None:
    work = tmp_path_factory.mktemp("fastfuzz")
    src = work / "in.qcow2"
    what = mutate(bases[base], src, muts, trunc)
    out = work / "out"
    out.mkdir()
    check_case(src, out, [bases[base].name, *what])
