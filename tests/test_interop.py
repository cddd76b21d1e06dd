"""Interchangeability with QEMU (issue 2): a matrix of image options, each exercised in
both directions.

* QEMU creates and writes (qemu-img / qemu-io), we read: every cluster kind, backing
  chains, extended L2 subclusters, compressed clusters, preallocation.
* QEMU-written images that we then modify (r+): qemu-img check stays clean and QEMU reads
  exactly our bytearray model.
* Images we create and write with random unaligned/overlapping operations: qemu-img check
  clean, QEMU reads the model. The same operations replayed through qemu-io on a
  QEMU-created image must give the same bytes, which pins our model of discard and
  write-zeroes semantics to QEMU's.
* COPIED flags and internal snapshots taken by qemu-img stay consistent after our writes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_clean, qemu_check, qemu_img, qemu_io

import qcow2

K = 1024
M = 1024 * 1024

# ---------------------------------------------------------------------------------------
# Option matrix. Every refcount width, every notable cluster size, both compat levels and
# extended L2 appear at least once; sizes are chosen so that small clusters span several
# L2 tables and several refcount blocks.
GEOMS: list[Any] = [
    pytest.param(dict(cluster_size=512, refcount_bits=64), id="c512-r64"),
    pytest.param(dict(cluster_size=4096, refcount_bits=1), id="c4k-r1"),
    pytest.param(dict(cluster_size=4096, refcount_bits=2), id="c4k-r2"),
    pytest.param(dict(cluster_size=2048, refcount_bits=4), id="c2k-r4"),
    pytest.param(dict(cluster_size=65536, refcount_bits=8, lazy_refcounts=True), id="c64k-r8-lazy"),
    pytest.param(dict(cluster_size=65536, refcount_bits=16, compat="0.10"), id="c64k-v2"),
    pytest.param(dict(cluster_size=1024, refcount_bits=16, compat="0.10"), id="c1k-v2"),
    pytest.param(dict(cluster_size=2 * M, refcount_bits=32), id="c2M-r32"),
    pytest.param(dict(cluster_size=16384, extended_l2=True), id="c16k-extl2"),
    pytest.param(dict(cluster_size=65536, extended_l2=True, refcount_bits=64), id="c64k-extl2-r64"),
    pytest.param(dict(cluster_size=2 * M, extended_l2=True), id="c2M-extl2"),
]


def geo_size(g: dict[str, Any]) -> int:
    """A virtual size that spans several L2 tables for small clusters and stays small
    (fast raw conversions) for big ones. Deliberately not a multiple of the cluster size."""
    cs = g["cluster_size"]
    l2_cover = cs * (cs // (16 if g.get("extended_l2") else 8))
    if l2_cover * 2 <= 24 * M:
        return 2 * l2_cover + 5 * cs + 1536
    return max(19 * cs, 6 * M) + 1536


def qemu_opts(g: dict[str, Any], **extra: Any) -> str:
    opts = {**g, **extra}
    out = []
    for k, v in opts.items():
        if isinstance(v, bool):
            v = "on" if v else "off"
        out.append(f"{k}={v}")
    return ",".join(out)


def qemu_create(path: Path, size: int | None, g: dict[str, Any], *extra: str, **opts: Any) -> None:
    args = ["create", "-q", "-f", "qcow2", "-o", qemu_opts(g, **opts), *extra, str(path)]
    if size is not None:
        args.append(str(size))
    qemu_img(*args)


def our_create(path: Path, size: int | None, g: dict[str, Any], **kw: Any) -> None:
    qcow2.create(path, size, **{**g, **kw})


def is_v3(g: dict[str, Any]) -> bool:
    return g.get("compat", "1.1") != "0.10"


# ---------------------------------------------------------------------------------------
# Operations, the bytearray model, and replay through qemu-io

Op = tuple  # ("write", off, data) | ("zero", off, n) | ("discard", off, n) | ("flush",) | ("reopen",)


def apply_model(model: bytearray, op: Op, cs: int, v3: bool, has_backing: bool) -> None:
    """QEMU semantics: discard drops whole clusters only (the image end counts as aligned)
    and they read as zeros; on a v2 image with a backing file discard does nothing (QEMU
    refuses it: without a zero flag the clusters would show stale backing data)."""
    kind = op[0]
    if kind == "write":
        _, off, data = op
        model[off : off + len(data)] = data
    elif kind == "zero":
        _, off, n = op
        model[off : off + n] = bytes(n)
    elif kind == "discard":
        _, off, n = op
        size = len(model)
        start = -(-off // cs) * cs
        end = off + n
        end = end if end == size else (end // cs) * cs
        if end > start and (v3 or not has_backing):
            model[start:end] = bytes(end - start)


def apply_ours(img: qcow2.Image, op: Op, **open_kw: Any) -> qcow2.Image:
    kind = op[0]
    if kind == "write":
        assert img.pwrite(op[2], op[1]) == len(op[2])
    elif kind == "zero":
        img.write_zeroes(op[1], op[2])
    elif kind == "discard":
        img.discard(op[1], op[2])
    elif kind == "flush":
        img.flush()
    elif kind == "reopen":
        path = img.path
        img.close()
        img = qcow2.open(path, "r+", **open_kw)
    return img


def run_ours(path: Path, ops: list[Op], **open_kw: Any) -> None:
    img = qcow2.open(path, "r+", **open_kw)
    try:
        for op in ops:
            img = apply_ours(img, op, **open_kw)
    finally:
        img.close()


def qemu_replay(path: Path, ops: list[Op], tmp: Path, fmt: str = "qcow2") -> None:
    """The same operations through qemu-io (data via `write -s file`)."""
    cmds: list[str] = []
    for i, op in enumerate(ops):
        kind = op[0]
        if kind == "write":
            src = tmp / f"replay-{path.name}-{i}.bin"
            src.write_bytes(op[2])
            cmds.append(f"write -q -s {src} {op[1]} {len(op[2])}")
        elif kind == "zero":
            cmds.append(f"write -q -z {op[1]} {op[2]}")
        elif kind == "discard":
            cmds.append(f"discard -q {op[1]} {op[2]}")
        elif kind in ("flush", "reopen"):
            cmds.append("flush")
    try:
        for i in range(0, len(cmds), 200):
            qemu_io(path, *cmds[i : i + 200], fmt=fmt)
    finally:
        for f in tmp.glob(f"replay-{path.name}-*.bin"):
            f.unlink()


def interesting_offsets(size: int, cs: int, scs: int, l2_cover: int) -> list[int]:
    pts = {0, size}
    for step in (cs, scs, l2_cover):
        for k in range(1, min(size // step, 64) + 1):
            pts.add(k * step)
    return sorted(p for p in pts if p <= size)


def gen_ops(rng: random.Random, size: int, g: dict[str, Any], n: int,
            kinds: tuple[str, ...] = ("write",) * 5 + ("zero", "zero", "discard", "discard", "flush"),
            max_len: int | None = None) -> list[Op]:
    """Random operations biased towards cluster, subcluster and L2-table boundaries:
    unaligned, overlapping, spanning clusters and tables."""
    cs = g["cluster_size"]
    ext = bool(g.get("extended_l2"))
    scs = cs // 32 if ext else cs
    l2_cover = cs * (cs // (16 if ext else 8))
    pts = interesting_offsets(size, cs, scs, l2_cover)
    max_len = max_len or min(3 * cs, 512 * K)
    ops: list[Op] = []
    for _ in range(n):
        kind = rng.choice(kinds)
        if kind in ("flush", "reopen"):
            ops.append((kind,))
            continue
        r = rng.random()
        if r < 0.55:
            off = rng.choice(pts) + rng.choice([0, 0, 0, -1, 1, -512, 512, 17, -4097, rng.randrange(scs)])
        else:
            off = rng.randrange(size)
        off = min(max(off, 0), size - 1)
        if kind == "discard" or (kind == "zero" and rng.random() < 0.5):
            # mostly whole units so that they have an effect
            unit = cs if kind == "discard" else rng.choice([cs, scs])
            if rng.random() < 0.8:
                off = (off // unit) * unit
            length = unit * rng.randrange(1, 4) + (0 if rng.random() < 0.8 else rng.randrange(-300, 300))
        else:
            length = rng.choice([1, rng.randrange(1, 600), rng.randrange(1, cs + 1), cs,
                                 rng.randrange(1, max_len + 1), scs, 2 * scs + 3])
        length = max(1, min(length, size - off, max_len))
        if kind == "write":
            data = rng.randbytes(length) if rng.random() < 0.7 else bytes([rng.randrange(1, 256)]) * length
            ops.append(("write", off, data))
        else:
            ops.append((kind, off, length))
    return ops


def check_reads(path: Path, expect: bytes, rng: random.Random, chunks: int = 20) -> None:
    """Whole-image read plus unaligned pieces, with our reader."""
    with qcow2.open(path) as img:
        assert img.size == len(expect)
        got = img.pread(img.size, 0)
        assert got == expect, first_diff(got, expect)
        for _ in range(chunks):
            off = rng.randrange(len(expect))
            n = rng.randrange(0, min(len(expect) - off, 3 * img.cluster_size) + 1)
            assert img.pread(n, off) == expect[off : off + n], (off, n)


def raw_bytes(path: Path, tmp: Path, snapshot: str | None = None,
              regions: list[tuple[int, int]] | None = None) -> bytes:
    """Guest content as QEMU sees it (qemu-img convert -O raw), optionally only some
    (offset, length) regions concatenated. The converted file is removed at once: big
    files left in the tmp tree make pytest's cleanup slow."""
    out = tmp / f"qraw-{path.name}-{snapshot or 'active'}.raw"
    args = ["convert", "-O", "raw"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    qemu_img(*args, str(path), str(out))
    try:
        with open(out, "rb") as f:
            if regions is None:
                return f.read()
            parts = []
            for off, n in regions:
                f.seek(off)
                parts.append(f.read(n))
            return b"".join(parts)
    finally:
        out.unlink()


def first_diff(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"length {len(a)} != {len(b)}"
    for i in range(0, len(a), 4096):
        if a[i : i + 4096] != b[i : i + 4096]:
            j = next(k for k in range(i, min(i + 4096, len(a))) if a[k] != b[k])
            return f"first difference at byte {j:#x}: {a[j]:#x} != {b[j]:#x}"
    return "equal"


def assert_same(got: bytes, expect: bytes, what: str = "") -> None:
    assert got == expect, f"{what}: {first_diff(got, expect)}"


def assert_no_copied_errors(path: Path) -> None:
    p = qemu_img("check", str(path), check=False)
    assert "OFLAG_COPIED" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert_clean(path)


def map_shape(path: Path) -> list[tuple[int, int, bool, bool]]:
    """qemu-img map extents without host offsets (layouts may differ, mapping may not).
    For data extents "zero" only says whether the host file is sparse there: ignored."""
    import json

    out: list[tuple[int, int, bool, bool]] = []
    for e in json.loads(qemu_img("map", "--output=json", str(path)).stdout):
        key = (e["data"], e["zero"] and not e["data"])
        if out and out[-1][2:] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *key)
        else:
            out.append((e["start"], e["length"], *key))
    return out


def map_kinds(path: Path) -> set[str]:
    """Cluster kinds present according to qemu-img map."""
    import json

    kinds = set()
    for e in json.loads(qemu_img("map", "--output=json", str(path)).stdout):
        if not e["present"]:
            kinds.add("unallocated")
        elif e["data"]:
            kinds.add("data" if "offset" in e else "compressed")
        elif e["zero"]:
            kinds.add("zero-alloc" if "offset" in e else "zero")
    return kinds


def seed_of(*parts: Any) -> int:
    return sum((i + 1) * sum(map(ord, str(p))) for i, p in enumerate(parts))


# ---------------------------------------------------------------------------------------
# 1. QEMU writes, we read (then we write, QEMU reads)

def qemu_kinds_script(g: dict[str, Any], size: int) -> list[str]:
    """qemu-io commands producing every cluster kind at known places."""
    cs = g["cluster_size"]
    ext = bool(g.get("extended_l2"))
    scs = cs // 32 if ext else cs
    c = cs
    cmds = [
        f"write -q -P 0x11 0 {c + c // 2}",                      # normal, then partial (COW tail)
        f"write -q -P 0x12 {3 * c + 100} 1000",                  # unaligned inside a cluster
        f"write -q -z {4 * c} {c}",                              # zero, never allocated
        f"write -q -P 0x22 {6 * c} {2 * c}",
        f"write -q -z {6 * c} {c}",                              # zero, allocated (kept on v3)
        f"write -q -P 0x33 {9 * c} {c}",
        f"discard -q {9 * c} {c}",                               # discarded
        f"write -q -P 0x44 {11 * c - 7} 20",                     # spans a cluster boundary
        f"write -q -P 0x55 {12 * c} {c}",
        f"write -q -z -u {12 * c} {c}",                          # zero with unmap
        f"write -q -P 0x66 {13 * c + 3} {c // 2}",
        f"write -q -z {13 * c + 512} 1024",                      # partial zero (falls back)
        f"write -q -P 0x77 {size - 700} 700",                    # the unaligned image end
    ]
    if ext:
        cmds += [
            f"write -q -P 0x88 {15 * c + scs + 17} {scs}",       # two partial subclusters
            f"write -q -z {15 * c + 4 * scs} {2 * scs}",         # zero subclusters
            f"write -q -z {16 * c + 3 * scs} {scs}",             # zero bits in an unallocated cluster
            f"write -q -P 0x99 {16 * c + 10 * scs} {3 * scs - 5}",
            f"write -q -z -u {16 * c + 10 * scs} {scs}",
            f"write -q -P 0xaa {17 * c + 31 * scs} {scs}",       # last subcluster only
        ]
    l2_cover = cs * (cs // (16 if ext else 8))
    if l2_cover < size - c:
        cmds.append(f"write -q -P 0xbb {l2_cover - c // 2 - 3} {c + 9}")  # spans two L2 tables
    return cmds


@pytest.mark.parametrize("g", GEOMS)
def test_qemu_written_all_kinds_then_ours(g, tmp):
    size = geo_size(g)
    p = tmp / "q.qcow2"
    qemu_create(p, size, g)
    qemu_io(p, *qemu_kinds_script(g, size))
    expect = raw_bytes(p, tmp)
    # the script really produced every kind (QEMU's own view of the image)
    kinds = map_kinds(p)
    assert {"data", "unallocated"} <= kinds
    if is_v3(g):
        assert {"zero", "zero-alloc"} <= kinds, kinds
    rng = random.Random(seed_of("kinds", g))
    check_reads(p, expect, rng)

    # now we modify QEMU's image: QEMU must read exactly our model, check clean
    model = bytearray(expect)
    ops = gen_ops(rng, size, g, 40, kinds=("write",) * 5 + ("zero", "discard", "flush", "reopen"))
    for op in ops:
        apply_model(model, op, g["cluster_size"], is_v3(g), False)
    run_ours(p, ops)
    assert_no_copied_errors(p)
    assert_same(raw_bytes(p, tmp), bytes(model), "QEMU reading our writes")
    check_reads(p, bytes(model), rng, chunks=5)


@pytest.mark.parametrize("g,ctype", [
    pytest.param(dict(cluster_size=65536), "zlib", id="c64k-zlib"),
    pytest.param(dict(cluster_size=65536), "zstd", id="c64k-zstd"),
    pytest.param(dict(cluster_size=4096, refcount_bits=2), "zlib", id="c4k-r2-zlib"),
    pytest.param(dict(cluster_size=4096, refcount_bits=2), "zstd", id="c4k-r2-zstd"),
    pytest.param(dict(cluster_size=512, refcount_bits=8), "zstd", id="c512-r8-zstd"),
    pytest.param(dict(cluster_size=512, refcount_bits=8), "zlib", id="c512-r8-zlib"),
    pytest.param(dict(cluster_size=32768, extended_l2=True), "zlib", id="c32k-extl2-zlib"),
    pytest.param(dict(cluster_size=32768, extended_l2=True), "zstd", id="c32k-extl2-zstd"),
    pytest.param(dict(cluster_size=2 * M), "zstd", id="c2M-zstd"),
    # compat=0.10 knows zlib only
    pytest.param(dict(cluster_size=65536, compat="0.10"), "zlib", id="c64k-v2-zlib"),
])
def test_compressed_clusters(g, ctype, tmp):
    cs = g["cluster_size"]
    nclusters = 40 if cs < M else 10
    size = nclusters * cs + 3 * 512
    rng = random.Random(seed_of("comp", g, ctype))
    src = bytearray(size)
    text = b"The quick brown qcow2 jumps over the lazy raw image. " * (cs // 16)
    for c in range(nclusters):
        r = rng.random()
        if r < 0.5:
            src[c * cs : (c + 1) * cs] = text[rng.randrange(50) :][:cs]     # compressible
        elif r < 0.7:
            src[c * cs : (c + 1) * cs] = rng.randbytes(cs)                  # incompressible
        elif r < 0.85:
            src[c * cs + rng.randrange(cs)] = 7                              # nearly zero
        # else: all zero (left unallocated by convert)
    src[nclusters * cs :] = rng.randbytes(size - nclusters * cs)
    src[2 * cs : 3 * cs] = bytes(cs)  # unallocated: QEMU only writes compressed clusters there
    raw = tmp / "src.raw"
    raw.write_bytes(bytes(src))
    p = tmp / "c.qcow2"
    opts = qemu_opts(g, compression_type=ctype) if is_v3(g) else qemu_opts(g)
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(raw), str(p))
    # also a compressed write through qemu-io into an already compressed image
    qemu_io(p, f"write -q -c -P 0x5a {2 * cs} {cs}")
    src[2 * cs : 3 * cs] = b"\x5a" * cs
    assert_same(raw_bytes(p, tmp), bytes(src), "qemu convert")
    assert "compressed" in map_kinds(p)
    check_reads(p, bytes(src), rng)

    # QEMU partially overwrites compressed clusters (its own COW), we read
    qemu_io(p, f"write -q -P 0x61 {5 * cs + 100} 300", f"write -q -z {7 * cs} {cs}",
            f"discard -q {8 * cs} {cs}")
    src[5 * cs + 100 : 5 * cs + 400] = b"\x61" * 300
    src[7 * cs : 8 * cs] = bytes(cs)
    apply_model(src, ("discard", 8 * cs, cs), cs, is_v3(g), False)
    assert_same(raw_bytes(p, tmp), bytes(src), "qemu modified compressed image")
    check_reads(p, bytes(src), rng)

    # we write over compressed clusters (partial: decompress + COW; zero; discard)
    ops = gen_ops(rng, size, g, 40, kinds=("write",) * 4 + ("zero", "discard", "reopen"))
    for op in ops:
        apply_model(src, op, cs, is_v3(g), False)
    run_ours(p, ops)
    assert_no_copied_errors(p)
    assert_same(raw_bytes(p, tmp), bytes(src), "QEMU reading our writes over compressed clusters")


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("g", [
    pytest.param(dict(cluster_size=65536), id="c64k"),
    pytest.param(dict(cluster_size=512, refcount_bits=4), id="c512-r4"),
    pytest.param(dict(cluster_size=4096, compat="0.10"), id="c4k-v2"),
    pytest.param(dict(cluster_size=32768, extended_l2=True), id="c32k-extl2"),
])
def test_backing_chain_qemu_written(g, base_fmt, tmp):
    """base (smaller) <- mid <- top, relative backing names, QEMU writes every layer."""
    cs = g["cluster_size"]
    size = 48 * cs + 1024
    base_size = 20 * cs + 512 + (0 if base_fmt == "qcow2" else 0)
    base = tmp / f"base.{base_fmt}"
    if base_fmt == "raw":
        qemu_img("create", "-q", "-f", "raw", str(base), str(base_size))
        qemu_io(base, f"write -q -P 0xb1 0 {base_size}", f"write -q -P 0xb2 {3 * cs + 5} {cs}", fmt="raw")
    else:
        qemu_create(base, base_size, g)
        qemu_io(base, f"write -q -P 0xb1 0 {base_size}", f"write -q -P 0xb2 {3 * cs + 5} {cs}",
                f"write -q -z {6 * cs} {cs}")
    mid = tmp / "mid.qcow2"
    qemu_create(mid, 40 * cs, g, "-b", base.name, "-F", base_fmt)
    qemu_io(mid, f"write -q -P 0xc1 {cs + 100} 200",              # partial COW from backing
            f"write -q -z {8 * cs} {cs}",                           # zero over backing data
            f"discard -q {9 * cs} {cs}",                            # v3: zero, v2: backing shows
            f"write -q -P 0xc2 {19 * cs} {3 * cs}")                 # crosses the base's end
    top = tmp / "top.qcow2"
    qemu_create(top, size, g, "-b", mid.name, "-F", "qcow2")
    qemu_io(top, f"write -q -P 0xd1 {2 * cs + 7} {cs}", f"write -q -P 0xd2 {41 * cs - 3} 10",
            f"discard -q {19 * cs} {cs}", f"write -q -z {20 * cs + 1} {cs}")
    if g.get("extended_l2"):
        scs = cs // 32
        qemu_io(top, f"write -q -P 0xd3 {11 * cs + 5 * scs + 1} {scs}",
                f"write -q -z {12 * cs + 2 * scs} {scs}")
    expect = raw_bytes(top, tmp)
    rng = random.Random(seed_of("chain", g, base_fmt))
    check_reads(top, expect, rng)
    check_reads(mid, raw_bytes(mid, tmp), rng, chunks=5)

    # our writes into the top layer: partial clusters COW from the chain
    model = bytearray(expect)
    mid_view = raw_bytes(mid, tmp)
    ops = gen_ops(rng, size, g, 40, kinds=("write",) * 5 + ("zero", "discard", "flush", "reopen"))
    for op in ops:
        apply_model(model, op, cs, is_v3(g), True)
    run_ours(top, ops)
    assert_no_copied_errors(top)
    assert_same(raw_bytes(top, tmp), bytes(model), "QEMU reading our overlay writes")
    assert_same(raw_bytes(mid, tmp), mid_view, "backing file untouched")


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("g", [
    pytest.param(dict(cluster_size=65536), id="c64k"),
    pytest.param(dict(cluster_size=4096, refcount_bits=64), id="c4k-r64"),
    pytest.param(dict(cluster_size=32768, extended_l2=True), id="c32k-extl2"),
    pytest.param(dict(cluster_size=65536, compat="0.10"), id="c64k-v2"),
])
def test_preallocation_both_ways(g, prealloc, tmp):
    cs = g["cluster_size"]
    size = 36 * cs + 1536
    rng = random.Random(seed_of("prealloc", g, prealloc))
    # QEMU creates with preallocation and writes, we read and then write
    p = tmp / "q.qcow2"
    qemu_create(p, size, g, preallocation=prealloc)
    qemu_io(p, *qemu_kinds_script(g, size)[:8])
    expect = raw_bytes(p, tmp)
    check_reads(p, expect, rng)
    model = bytearray(expect)
    ops = gen_ops(rng, size, g, 30)
    for op in ops:
        apply_model(model, op, cs, is_v3(g), False)
    run_ours(p, ops)
    assert_no_copied_errors(p)
    assert_same(raw_bytes(p, tmp), bytes(model), "QEMU reading our writes (QEMU prealloc)")

    # we create with preallocation; QEMU must see a clean, fully mapped image
    o = tmp / "o.qcow2"
    our_create(o, size, g, preallocation=prealloc)
    assert_clean(o)
    assert raw_bytes(o, tmp) == bytes(size)
    ref = tmp / "ref.qcow2"
    qemu_create(ref, size, g, preallocation=prealloc)
    assert map_shape(o) == map_shape(ref)
    model = bytearray(size)
    for op in ops:
        apply_model(model, op, cs, is_v3(g), False)
    run_ours(o, ops)
    assert_no_copied_errors(o)
    assert_same(raw_bytes(o, tmp), bytes(model), "QEMU reading our writes (our prealloc)")


# ---------------------------------------------------------------------------------------
# 2. We create and write, QEMU checks and reads; the same ops replayed through qemu-io

@pytest.mark.parametrize("g", GEOMS)
def test_our_writes_match_model_and_qemu(g, tmp):
    size = geo_size(g)
    cs = g["cluster_size"]
    rng = random.Random(seed_of("ours", g))
    ops = gen_ops(rng, size, g, 60, kinds=("write",) * 6 + ("zero", "zero", "discard", "discard",
                                                                  "flush", "reopen"))
    model = bytearray(size)
    for op in ops:
        apply_model(model, op, cs, is_v3(g), False)

    ours = tmp / "ours.qcow2"
    our_create(ours, size, g)
    run_ours(ours, ops)
    assert_no_copied_errors(ours)
    assert_same(raw_bytes(ours, tmp), bytes(model), "QEMU reading our image")
    check_reads(ours, bytes(model), rng, chunks=10)

    # QEMU executing the same operations on its own image agrees with the model
    theirs = tmp / "theirs.qcow2"
    qemu_create(theirs, size, g)
    qemu_replay(theirs, ops, tmp)
    assert_same(raw_bytes(theirs, tmp), bytes(model), "QEMU replay vs model")

    # and QEMU writing into our image afterwards still gives a consistent image we read
    qemu_io(ours, f"write -q -P 0xee {cs // 2} {cs}", f"write -q -z {3 * cs} {2 * cs}")
    model[cs // 2 : cs // 2 + cs] = b"\xee" * cs
    model[3 * cs : 5 * cs] = bytes(2 * cs)
    assert_clean(ours)
    check_reads(ours, bytes(model), rng, chunks=5)


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("g", [
    pytest.param(dict(cluster_size=65536), id="c64k"),
    pytest.param(dict(cluster_size=1024, refcount_bits=2), id="c1k-r2"),
    pytest.param(dict(cluster_size=4096, compat="0.10"), id="c4k-v2"),
    pytest.param(dict(cluster_size=16384, extended_l2=True), id="c16k-extl2"),
])
def test_our_overlay_over_backing(g, base_fmt, tmp):
    """We create the overlay (relative backing name, smaller backing) and write partial
    clusters that must be completed from the backing file; QEMU agrees."""
    cs = g["cluster_size"]
    size = geo_size(g)
    base_size = size // 2 + 512
    rng = random.Random(seed_of("overlay", g, base_fmt))
    base = tmp / f"base.{base_fmt}"
    base_data = rng.randbytes(base_size)
    if base_fmt == "raw":
        base.write_bytes(base_data)
    else:
        raw = tmp / "base-src.raw"
        raw.write_bytes(base_data)
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", qemu_opts(g), str(raw), str(base))
    ours = tmp / "ours.qcow2"
    our_create(ours, size, g, backing_file=base.name, backing_format=base_fmt)
    info = qemu_img("info", str(ours)).stdout
    assert f"backing file: {base.name}" in info
    backing = base_data + bytes(size - base_size)
    ops = gen_ops(rng, size, g, 50, kinds=("write",) * 6 + ("zero", "discard", "discard", "reopen"))
    model = bytearray(backing)
    for op in ops:
        apply_model(model, op, cs, is_v3(g), True)
    run_ours(ours, ops)
    assert_no_copied_errors(ours)
    assert_same(raw_bytes(ours, tmp), bytes(model), "QEMU reading our overlay")
    check_reads(ours, bytes(model), rng, chunks=10)

    theirs = tmp / "theirs.qcow2"
    qemu_create(theirs, size, g, "-b", base.name, "-F", base_fmt)
    qemu_replay(theirs, ops, tmp)
    assert_same(raw_bytes(theirs, tmp), bytes(model), "QEMU replay vs model")
    if base_fmt == "raw":
        assert base.read_bytes() == base_data


@pytest.mark.parametrize("g", [
    pytest.param(dict(cluster_size=16384, extended_l2=True), id="c16k"),
    pytest.param(dict(cluster_size=65536, extended_l2=True, refcount_bits=2), id="c64k-r2"),
])
def test_extended_l2_subcluster_writes(g, tmp):
    """Sub-subcluster writes at every alignment, zeroing subclusters, allocating
    around existing ones, over a backing file: bitmaps QEMU accepts and reads."""
    cs = g["cluster_size"]
    scs = cs // 32
    size = 24 * cs
    rng = random.Random(seed_of("extl2", g))
    base = tmp / "base.qcow2"
    base_data = rng.randbytes(12 * cs)
    raw = tmp / "b.raw"
    raw.write_bytes(base_data)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    backing = base_data + bytes(size - len(base_data))
    ops: list[Op] = []
    for c in range(20):
        for _ in range(4):
            sc = rng.randrange(32)
            off = c * cs + sc * scs + rng.choice([0, 1, scs // 2, scs - 1])
            n = rng.choice([1, scs - 1, scs, scs + 1, 3 * scs + 7])
            n = min(n, size - off)
            if rng.random() < 0.25:
                ops.append(("zero", off, n))
            else:
                ops.append(("write", off, rng.randbytes(n)))
        if c % 5 == 4:
            ops.append(("reopen",))
    ops.append(("discard", 3 * cs, 2 * cs))
    ops.append(("zero", 5 * cs + 4 * scs, 8 * scs))
    for with_backing in (False, True):
        ours = tmp / f"ours{int(with_backing)}.qcow2"
        theirs = tmp / f"theirs{int(with_backing)}.qcow2"
        if with_backing:
            our_create(ours, size, g, backing_file=base.name, backing_format="qcow2")
            qemu_create(theirs, size, g, "-b", base.name, "-F", "qcow2")
            model = bytearray(backing)
        else:
            our_create(ours, size, g)
            qemu_create(theirs, size, g)
            model = bytearray(size)
        for op in ops:
            apply_model(model, op, cs, True, with_backing)
        run_ours(ours, ops)
        assert_no_copied_errors(ours)
        assert_same(raw_bytes(ours, tmp), bytes(model), "QEMU reading our subclusters")
        qemu_replay(theirs, ops, tmp)
        assert_same(raw_bytes(theirs, tmp), bytes(model), "QEMU replay vs model")
        check_reads(theirs, bytes(model), rng, chunks=10)


def test_refcount_table_growth(tmp):
    """cluster_size=512 with 64-bit refcounts: one refblock covers 64 clusters and one
    reftable cluster 4096 clusters (2 MiB of file), so writing ~6 MiB must grow the
    refcount table (twice) and create many refblocks and L2 tables."""
    g = dict(cluster_size=512, refcount_bits=64)
    size = 8 * M
    p = tmp / "g.qcow2"
    our_create(p, size, g)
    before = qcow2.open(p)
    rt_before = (before.header.refcount_table_offset, before.header.refcount_table_clusters)
    before.close()
    rng = random.Random(7)
    model = bytearray(size)
    ops: list[Op] = []
    # sequential big writes fill the file; random small ones scatter L2 tables
    for off in range(0, 6 * M, 256 * K):
        ops.append(("write", off + rng.randrange(512), rng.randbytes(200 * K)))
    ops += gen_ops(rng, size, g, 80, max_len=8 * K)
    for op in ops:
        apply_model(model, op, 512, True, False)
    # tiny caches: L2 tables and refcount blocks are evicted (written back) constantly
    run_ours(p, ops, cache_size=2048, refcount_cache_size=2048)
    assert_no_copied_errors(p)
    with qcow2.open(p) as img:
        assert img.header.refcount_table_clusters > rt_before[1]
        assert img.header.refcount_table_offset != rt_before[0]
    assert_same(raw_bytes(p, tmp), bytes(model), "after refcount table growth")
    qemu_io(p, "write -q -P 0x42 7M 512k")
    model[7 * M : 7 * M + 512 * K] = b"\x42" * (512 * K)
    assert_clean(p)
    check_reads(p, bytes(model), rng)


def test_qemu_image_refcount_growth_by_us(tmp):
    """The same growth starting from a QEMU-made image with data already in it."""
    p = tmp / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=32", str(p), "6M")
    qemu_io(p, "write -q -P 0x12 0 1M")
    model = bytearray(raw_bytes(p, tmp))
    rng = random.Random(11)
    ops: list[Op] = [("write", off, rng.randbytes(100 * K)) for off in range(M, 5 * M, 128 * K)]
    for op in ops:
        apply_model(model, op, 512, True, False)
    run_ours(p, ops)
    assert_clean(p)
    assert_same(raw_bytes(p, tmp), bytes(model), "QEMU reading our growth")


# ---------------------------------------------------------------------------------------
# 4. COPIED flags and internal snapshots

@pytest.mark.parametrize("g", [
    pytest.param(dict(cluster_size=65536), id="c64k"),
    pytest.param(dict(cluster_size=512, refcount_bits=2), id="c512-r2"),
    pytest.param(dict(cluster_size=4096, compat="0.10"), id="c4k-v2"),
    pytest.param(dict(cluster_size=32768, extended_l2=True), id="c32k-extl2"),
])
def test_writes_after_qemu_snapshot(g, tmp):
    cs = g["cluster_size"]
    size = geo_size(g)
    p = tmp / "s.qcow2"
    qemu_create(p, size, g)
    qemu_io(p, *qemu_kinds_script(g, size))
    qemu_img("snapshot", "-c", "s1", str(p))
    snap1 = raw_bytes(p, tmp, snapshot="s1")
    model = bytearray(raw_bytes(p, tmp))
    assert bytes(model) == snap1
    rng = random.Random(seed_of("snap", g))
    ops = gen_ops(rng, size, g, 40, kinds=("write",) * 5 + ("zero", "discard", "flush", "reopen"))
    for op in ops:
        apply_model(model, op, cs, is_v3(g), False)
    run_ours(p, ops)
    assert_no_copied_errors(p)
    assert_same(raw_bytes(p, tmp, snapshot="s1"), snap1, "snapshot s1 after our writes")
    assert_same(raw_bytes(p, tmp), bytes(model), "active layer after our writes")

    # a second snapshot over our writes, more of our writes, then QEMU deletes s1
    qemu_img("snapshot", "-c", "s2", str(p))
    snap2 = bytes(model)
    ops = gen_ops(rng, size, g, 30)
    for op in ops:
        apply_model(model, op, cs, is_v3(g), False)
    run_ours(p, ops)
    assert_no_copied_errors(p)
    assert_same(raw_bytes(p, tmp, snapshot="s2"), snap2, "snapshot s2")
    assert_same(raw_bytes(p, tmp, snapshot="s1"), snap1, "snapshot s1 again")
    qemu_img("snapshot", "-d", "s1", str(p))
    assert_clean(p)
    # QEMU reverts to s2: shared clusters again, and COPIED flags that we must respect
    qemu_img("snapshot", "-a", "s2", str(p))
    model = bytearray(snap2)
    ops = gen_ops(rng, size, g, 20)
    for op in ops:
        apply_model(model, op, cs, is_v3(g), False)
    run_ours(p, ops)
    assert_no_copied_errors(p)
    assert_same(raw_bytes(p, tmp, snapshot="s2"), snap2, "snapshot s2 after s1 deleted")
    assert_same(raw_bytes(p, tmp), bytes(model), "active layer at the end")
    check_reads(p, bytes(model), rng, chunks=5)


def test_copied_flags_after_our_writes(tmp):
    """Every L1/L2 entry we write has COPIED set exactly when its refcount is 1: QEMU's
    check reports no OFLAG_COPIED problem, on our image and on a QEMU image we rewrote."""
    g = dict(cluster_size=4096)
    size = 4 * M
    rng = random.Random(3)
    for maker in ("ours", "qemu"):
        p = tmp / f"{maker}.qcow2"
        (our_create if maker == "ours" else qemu_create)(p, size, g)
        ops = gen_ops(rng, size, g, 50)
        run_ours(p, ops)
        rep = qemu_check(p)
        assert rep["returncode"] == 0 and not rep.get("corruptions") and not rep.get("leaks"), rep
        assert_no_copied_errors(p)
        # QEMU-side modifications (which rely on COPIED for in-place writes) keep it clean
        qemu_io(p, "write -q -P 1 0 1M", "write -q -z 1M 64k", "discard -q 2M 64k")
        assert_clean(p)


def test_long_contiguous_allocations_small_refblocks(tmp):
    """cluster_size=512: a refcount block covers only 64 (64-bit) or 128 (32-bit)
    clusters, not more than the L1 table (64 or 128 clusters) that a snapshot copies.
    Such runs must still be allocated (they used to loop forever)."""
    for rb, size in ((64, 128 * M), (32, 256 * M)):
        p = tmp / f"l1-{rb}.qcow2"
        our_create(p, size, dict(cluster_size=512, refcount_bits=rb))
        with qcow2.open(p, "r+") as img:
            img.pwrite(b"\x01" * 100_000, 12345)
            img.create_snapshot("a")
            img.pwrite(b"\x02" * 100_000, 22345)
            img.create_snapshot("b")
            img.pwrite(b"\x03" * 3000, size - 5000)
        assert_no_copied_errors(p)
        regions = [(0, 256 * K), (size - 8192, 8192)]
        snap_a = bytearray(256 * K + 8192)
        snap_a[12345 : 12345 + 100_000] = b"\x01" * 100_000
        active = bytearray(snap_a)
        active[22345 : 22345 + 100_000] = b"\x02" * 100_000
        active[256 * K + 3192 : 256 * K + 6192] = b"\x03" * 3000
        assert raw_bytes(p, tmp, snapshot="a", regions=regions) == snap_a
        assert raw_bytes(p, tmp, regions=regions) == active


def test_reftable_growth_beyond_refblock_span(tmp):
    """A refcount table longer than one refcount block's span (cluster_size=512, 64-bit:
    64 clusters) must itself be placed after self-describing refblocks at the file's end.
    Allocated directly through the refcount layer (writing 130 MiB of data at 512-byte
    clusters would be slow); everything is released again, so QEMU must find no leak."""
    p = tmp / "rt.qcow2"
    our_create(p, M, dict(cluster_size=512, refcount_bits=64))
    runs: list[int] = []
    with qcow2.open(p, "r+") as img:
        rc = img.refcounts
        assert rc is not None
        for _ in range(8):
            runs.append(rc.allocate(36000))
        import numpy as np

        clusters = np.concatenate([np.arange(o >> 9, (o >> 9) + 36000) for o in runs])
        assert len(np.unique(clusters)) == len(clusters)  # disjoint runs
        assert (rc.get_many(clusters) == 1).all()
        assert img.header.refcount_table_clusters > 64
        for o in runs:
            rc.release(o, 36000)
        img.flush()
    assert_clean(p)
    qemu_io(p, "write -q -P 0x21 0 64k")
    assert_clean(p)
