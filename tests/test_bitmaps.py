"""Persistent dirty bitmaps: our parser against bitmaps qemu-img creates and qemu-io updates."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from conftest import assert_clean, qemu_img, qemu_info, qemu_io, raw_bytes

import qcow2
from qcow2.bitmaps import BitmapEntry, BitmapsExtension, read_directory
from qcow2.info import image_info


def _expected_runs(ops: list[tuple[int, int]], gran: int, size: int) -> list[tuple[int, int]]:
    """Granule-rounded union of the written ranges (the model of what QEMU marks)."""
    dirty = sorted({g for off, n in ops for g in range(off // gran, -(-(off + n) // gran))})
    out: list[tuple[int, int]] = []
    for g in dirty:
        if out and out[-1][0] + out[-1][1] == g * gran:
            out[-1] = (out[-1][0], out[-1][1] + gran)
        else:
            out.append((g * gran, gran))
    return [(o, min(o + n, size) - o) for o, n in out]


@pytest.mark.parametrize("gran", [512, 65536, 1 << 20])
def test_dirty_ranges_match_qemu_io(tmp: Path, gran: int) -> None:
    size = 100 * 1024 * 1024 + 4096  # a partial last granule
    p = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), str(size))
    qemu_img("bitmap", "--add", "-g", str(gran), str(p), "b0")
    qemu_img("bitmap", "--add", "--disable", str(p), "off")
    rng = random.Random(gran)
    ops: list[tuple[int, int]] = []
    cmds = []
    for i in range(30):
        n = rng.choice([512, 4096, 65536, 300 * 1024])
        off = rng.randrange(0, size - n) // 512 * 512
        kind = ["write", "write -z", "discard"][i % 3]
        cmds.append(f"{kind} {off} {n}")
        ops.append((off, n))
    cmds.append(f"write {size - 512} 512")
    ops.append((size - 512, 512))
    qemu_io(p, *cmds)
    with qcow2.open(p) as img:
        assert [b.name for b in img.bitmaps] == ["b0", "off"]
        assert list(img.dirty_ranges("b0")) == _expected_runs(ops, gran, size)
        assert list(img.dirty_ranges("off")) == []
        with pytest.raises(qcow2.Qcow2Error):
            img.dirty_ranges("nope")


def test_info_lists_bitmaps_as_qemu(tmp: Path) -> None:
    p = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1G")
    qemu_img("bitmap", "--add", "-g", "4k", str(p), "b0")
    qemu_img("bitmap", "--add", "--disable", str(p), "name with spaces ü")
    with qcow2.open(p) as img:
        ours = image_info(img)["format-specific"]["data"]["bitmaps"]
    assert ours == qemu_info(p)["format-specific"]["data"]["bitmaps"]


def test_directory_pack_roundtrip_bit_for_bit(tmp: Path) -> None:
    p = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1G")
    for i in range(5):
        qemu_img("bitmap", "--add", str(p), "x" * (i * 7 + 1))
    with qcow2.open(p) as img:
        ext_data = img.layout.bitmaps_ext
        ext, entries = read_directory(img.storage, ext_data, img.header.autoclear_features,
                                      img.storage.size())
        assert ext is not None and BitmapsExtension.unpack(ext.pack()) == ext
        assert ext.pack() == bytes(ext_data[:24])
        raw = img.storage.pread(ext.directory_size, ext.directory_offset)
    packed = b"".join(e.pack() for e in entries)
    assert packed == bytes(raw)
    assert [BitmapEntry.unpack(packed, 0)[0]] == entries[:1]


def test_truncated_directory_is_an_error(tmp: Path) -> None:
    p = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1G")
    qemu_img("bitmap", "--add", str(p), "b0")
    with qcow2.open(p) as img:
        ext = BitmapsExtension.unpack(img.layout.bitmaps_ext)
    with open(p, "r+b") as f:  # name length past the directory
        f.seek(ext.directory_offset + 20)
        f.write(b"\x7f\xff")
    with qcow2.open(p) as img, pytest.raises(qcow2.FormatError):
        _ = img.bitmaps
    with qcow2.open(p) as img:
        assert img.check().corruptions >= 1


def test_check_finds_a_bad_entry(tmp: Path) -> None:
    p = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1G")
    qemu_img("bitmap", "--add", str(p), "b0")
    with qcow2.open(p) as img:
        assert img.check().corruptions == 0
        ext = BitmapsExtension.unpack(img.layout.bitmaps_ext)
    with open(p, "r+b") as f:  # granularity_bits 40: QEMU refuses the bitmap
        f.seek(ext.directory_offset + 17)
        f.write(bytes([40]))
    with qcow2.open(p) as img:
        assert img.check().corruptions == 1


# --------------------------------------------------------------------------------------
# Maintaining bitmaps: our writes against QEMU's for the same operations
# --------------------------------------------------------------------------------------
from qcow2.bitmaps import read_bits  # noqa: E402
from qcow2.resize import resize_image  # noqa: E402

pytestmark = pytest.mark.usefixtures("mode")


def _bits(path: Path) -> dict[str, tuple[int, bytes, list[str]]]:
    """Every bitmap of an image: granularity, dirty bits, qemu-img info flags."""
    out = {}
    with qcow2.open(path) as img:
        for ent in img.bitmaps:
            flags = [f for f, b in (("in-use", ent.in_use), ("auto", ent.auto)) if b]
            bits = b"" if ent.in_use else read_bits(
                img.storage, ent, img.size, img.cluster_size, img.storage.size()).tobytes()
            out[ent.name] = (ent.granularity, bits, flags)
    return out


def _qemu_flags(path: Path) -> dict[str, list[str]]:
    data = qemu_info(path)["format-specific"]["data"]
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


def _make(tmp: Path, name: str, size: int, by_qemu: bool, cluster: int = 65536) -> Path:
    p = tmp / name
    qcow2.create(p, size, cluster_size=cluster)
    specs = [("b0", 65536, False), ("fine", 512, False), ("off", 4096, True)]
    if by_qemu:
        for n, g, dis in specs:
            qemu_img("bitmap", "--add", "-g", str(g), *(["--disable"] if dis else []), str(p), n)
    else:
        with qcow2.open(p, "r+") as img:
            for n, g, dis in specs:
                img.add_bitmap(n, g, disabled=dis)
    return p


def _ops(rng: random.Random, size: int, cs: int, n: int = 24) -> list[tuple[str, int, int]]:
    ops = []
    for i in range(n):
        k = rng.choice([512, 4096, 65536, 300 * 1024])
        off = rng.randrange(0, size - k) // 512 * 512
        ops.append((["write", "zero", "discard", "write"][i % 4], off, k))
    c = rng.randrange(0, size // cs - 1) * cs
    ops.append(("compressed", c, cs))
    ops.append(("write", size - 512, 512))
    return ops


def _ours(p: Path, ops: list[tuple[str, int, int]], flush_every: int = 0) -> None:
    with qcow2.open(p, "r+") as img:
        for i, (kind, off, n) in enumerate(ops):
            if kind == "write":
                img.pwrite(bytes([i + 1]) * n, off)
            elif kind == "zero":
                img.write_zeroes(off, n)
            elif kind == "discard":
                img.discard(off, n)
            else:
                img.write_compressed(off, bytes([i + 1]) * n)
            if flush_every and i % flush_every == 0:
                img.flush()


def _qemu(p: Path, ops: list[tuple[str, int, int]]) -> None:
    cmds = []
    for i, (kind, off, n) in enumerate(ops):
        if kind == "write":
            cmds.append(f"write -P {i + 1} {off} {n}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {n}")
        elif kind == "discard":
            cmds.append(f"discard {off} {n}")
        else:
            cmds.append(f"write -c -P {i + 1} {off} {n}")
    qemu_io(p, *cmds)


@pytest.mark.parametrize("by_qemu", [True, False], ids=["qemu-made", "ours"])
def test_writes_keep_bitmaps_as_qemu(tmp: Path, by_qemu: bool) -> None:
    size = 64 * 1024 * 1024 + 4096
    a = _make(tmp, "a.qcow2", size, by_qemu)
    b = tmp / "b.qcow2"
    shutil.copyfile(a, b)
    ops = _ops(random.Random(5), size, 65536)
    _ours(a, ops, flush_every=7)
    _qemu(b, ops)
    assert_clean(a)
    assert qemu_img("check", str(a)).stdout.count("leaked") == 0
    ours, theirs = _bits(a), _bits(b)
    assert ours == theirs
    assert any(ours["b0"][1]) and not any(ours["off"][1])
    assert _qemu_flags(a) == {"b0": ["auto"], "fine": ["auto"], "off": []}
    with qcow2.open(a) as img:
        assert img.check().corruptions == 0 and img.check().leaks == 0
    assert raw_bytes(a, tmp) == raw_bytes(b, tmp)


def test_in_use_while_open_and_after_flush(tmp: Path) -> None:
    p = _make(tmp, "a.qcow2", 8 << 20, True)
    snap = tmp / "snap.qcow2"
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"x" * 4096, 0)
        shutil.copyfile(p, snap)  # what a crash now would leave
        assert _qemu_flags(snap)["b0"] == ["in-use", "auto"]
        assert _qemu_flags(snap)["off"] == []  # disabled: not touched
        assert [b.flags for b in img.bitmaps] == [2, 2, 0]  # our view: as they will be stored
        img.flush()
        shutil.copyfile(p, snap)
        assert _qemu_flags(snap)["b0"] == ["auto"]
        assert list(img.dirty_ranges("b0")) == [(0, 65536)]
        img.pwrite(b"y" * 512, 3 << 20)
        shutil.copyfile(p, snap)
        assert "in-use" in _qemu_flags(snap)["b0"]
    assert list(qcow2.open(p).dirty_ranges("b0")) == [(0, 65536), (3 << 20, 65536)]
    assert_clean(p)
    assert_clean(snap)  # in-use bitmaps of a crash: consistent refcounts, no leaks


def test_read_write_open_without_writes_changes_nothing(tmp: Path) -> None:
    p = _make(tmp, "a.qcow2", 8 << 20, True)
    before = p.read_bytes()
    with qcow2.open(p, "r+") as img:
        img.pread(4096, 0)
        img.flush()
    assert p.read_bytes() == before


@pytest.mark.parametrize("new_size", [(32 << 20) + 512, (3 << 20) + 512, 1 << 30])
def test_resize_as_qemu(tmp: Path, new_size: int) -> None:
    a = _make(tmp, "a.qcow2", 8 << 20, True)
    b = tmp / "b.qcow2"
    _ours(a, [("write", 0, 4096), ("write", (8 << 20) - 512, 512), ("write", 3 << 20, 70000)])
    shutil.copyfile(a, b)
    with qcow2.open(a, "r+") as img:
        resize_image(img, new_size, shrink=True)
        img.pwrite(b"z" * 512, new_size - 512)
    qemu_img("resize", "--shrink", str(b), str(new_size))
    qemu_io(b, f"write {new_size - 512} 512")
    assert_clean(a)
    assert _bits(a) == _bits(b)
    assert _qemu_flags(a) == {"b0": ["auto"], "fine": ["auto"], "off": []}


def test_snapshot_apply_marks_the_whole_disk(tmp: Path) -> None:
    # (qemu-img refuses to apply a snapshot to an image with bitmaps; we keep them true)
    p = _make(tmp, "a.qcow2", 8 << 20, False)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"a" * 4096, 0)
        img.create_snapshot("s1")
        img.flush()
        assert list(img.dirty_ranges("b0")) == [(0, 65536)]
        img.apply_snapshot("s1")
        assert list(img.dirty_ranges("b0")) == [(0, 8 << 20)]
        assert list(img.dirty_ranges("off")) == []
    assert_clean(p)
    with qcow2.open(p) as img:
        assert list(img.dirty_ranges("fine")) == [(0, 8 << 20)]
    assert _qemu_flags(p) == {"b0": ["auto"], "fine": ["auto"], "off": []}


def test_inconsistent_bitmap_is_kept_as_is(tmp: Path) -> None:
    p = _make(tmp, "a.qcow2", 8 << 20, True)
    with qcow2.open(p) as img:
        ext = BitmapsExtension.unpack(img.layout.bitmaps_ext)
    with open(p, "r+b") as f:  # b0 in use: what a crash of its writer leaves
        f.seek(ext.directory_offset + 12)
        f.write((3).to_bytes(4, "big"))
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"x" * 4096, 0)
        with pytest.raises(qcow2.Qcow2Error, match="inconsistent"):
            img.dirty_ranges("b0")
        with pytest.raises(qcow2.Qcow2Error, match="Cannot resize"):
            resize_image(img, 16 << 20)
    assert_clean(p)
    assert _qemu_flags(p)["b0"] == ["in-use", "auto"]
    assert list(qcow2.open(p).dirty_ranges("fine")) == [(0, 4096)]
    with qcow2.open(p, "r+") as img:
        img.remove_bitmap("b0")
    assert_clean(p)
    assert list(_qemu_flags(p)) == ["fine", "off"]


def test_unknown_flags_refuse_writes_and_keep_the_bitmap(tmp: Path) -> None:
    p = _make(tmp, "a.qcow2", 8 << 20, True)
    with qcow2.open(p) as img:
        ext = BitmapsExtension.unpack(img.layout.bitmaps_ext)
    with open(p, "r+b") as f:  # an unknown flag (bit 7) on the enabled bitmap b0
        f.seek(ext.directory_offset + 12)
        f.write((0x82).to_bytes(4, "big"))
    before = p.read_bytes()
    with qcow2.open(p, "r+") as img:
        with pytest.raises(qcow2.UnsupportedFeatureError, match="b0"):
            img.pwrite(b"x" * 4096, 0)
    assert p.read_bytes() == before  # the bit is kept and nothing changed


def test_v2_cannot_hold_bitmaps(tmp: Path) -> None:
    p = tmp / "v2.qcow2"
    qcow2.create(p, 1 << 20, compat="0.10")
    with qcow2.open(p, "r+") as img, pytest.raises(qcow2.Qcow2Error, match="v2"):
        img.add_bitmap("b")


def test_library_management_as_qemu_img(tmp: Path) -> None:
    a = _make(tmp, "a.qcow2", 8 << 20, False)
    b = _make(tmp, "b.qcow2", 8 << 20, True)
    for p in (a, b):
        _ours(p, [("write", 0, 4096), ("write", 5 << 20, 200000)])
    with qcow2.open(a, "r+") as img:
        img.disable_bitmap("b0")
        img.enable_bitmap("off")
        img.merge_bitmap("off", "fine")
        img.clear_bitmap("fine")
        img.add_bitmap("new", 1 << 20)
        img.remove_bitmap("b0")
        with pytest.raises(qcow2.Qcow2Error, match="Bitmap already exists: new"):
            img.add_bitmap("new")
        with pytest.raises(qcow2.Qcow2Error, match="Dirty bitmap 'b0' not found"):
            img.remove_bitmap("b0")
    for args in (["--disable", "b0"], ["--enable", "off"], ["--merge", "fine", "off"],
                 ["--clear", "fine"], ["--add", "-g", "1M", "new"], ["--remove", "b0"]):
        qemu_img("bitmap", *args[:-1], str(b), args[-1])
    assert_clean(a)
    assert _bits(a) == _bits(b)
    assert _qemu_flags(a) == _qemu_flags(b)
    with qcow2.open(a, "r+") as img:
        for n in ("fine", "off", "new"):
            img.remove_bitmap(n)
    assert_clean(a)
    assert "bitmaps" not in qemu_info(a)["format-specific"]["data"]
    with qcow2.open(a) as img:
        assert img.header.autoclear_features == 0 and img.bitmaps == []


def test_corpus_image_with_two_bitmaps(tmp: Path) -> None:
    src = Path("/work/shared/corpus/virtnbdbackup/vm5-sda.qcow2")
    if not src.exists():
        pytest.fail("corpus image missing")
    a, b = tmp / "a.qcow2", tmp / "b.qcow2"
    shutil.copyfile(src, a)
    shutil.copyfile(src, b)
    names = list(_qemu_flags(a))
    assert len(names) == 2
    ops = _ops(random.Random(9), qcow2.open(a).size, qcow2.open(a).cluster_size, n=12)
    ops = [o for o in ops if o[0] != "compressed"]
    _ours(a, ops)
    _qemu(b, ops)
    assert_clean(a)
    assert _bits(a) == _bits(b)
    assert _qemu_flags(a) == _qemu_flags(src)


def test_amend_keeps_bitmaps(tmp: Path, mode: str) -> None:
    p = _make(tmp, "a.qcow2", 8 << 20, True)
    _ours(p, [("write", 0, 4096)])
    before = _bits(p)
    if mode != "standard":  # (the mode switch keeps them; the rest needs standard)
        qcow2.amend(p, {"refcount_mode": "standard"})
        assert _bits(p) == before
    qcow2.amend(p, {"refcount_bits": 8})
    qcow2.amend(p, {"lazy_refcounts": True})
    assert_clean(p)
    assert _bits(p) == before
    with pytest.raises(qcow2.UnsupportedFeatureError, match="v2"):
        qcow2.amend(p, {"compat": "0.10", "refcount_bits": 16, "lazy_refcounts": False})
    assert _bits(p) == before
    assert_clean(p)


# --------------------------------------------------------------------------------------
# Property: the bits are exactly the granule-rounded union of what was changed
# --------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SIZE = 4 << 20
_OP = st.tuples(st.sampled_from(["write", "zero", "discard", "flush", "reopen", "grow"]),
                st.integers(0, _SIZE - 1), st.integers(1, 200_000))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_OP, min_size=1, max_size=14), gran_bits=st.sampled_from([9, 12, 16, 20]))
def test_bits_are_the_union_of_changes(tmp: Path, ops: list[tuple[str, int, int]],
                                       gran_bits: int) -> None:
    p = tmp / f"h{gran_bits}.qcow2"
    p.unlink(missing_ok=True)
    qcow2.create(p, _SIZE, cluster_size=4096)
    with qcow2.open(p, "r+") as img:
        img.add_bitmap("b", 1 << gran_bits)
        img.add_bitmap("off", 1 << gran_bits, disabled=True)
    dirty: set[int] = set()
    img = qcow2.open(p, "r+")
    try:
        for kind, off, n in ops:
            n = min(n, img.size - off)
            if kind in ("write", "zero", "discard"):
                if kind == "write":
                    img.pwrite(b"\x5a" * n, off)
                elif kind == "zero":
                    img.write_zeroes(off, n)
                else:
                    img.discard(off, n)
                dirty.update(range(off >> gran_bits, ((off + n - 1) >> gran_bits) + 1))
            elif kind == "flush":
                img.flush()
            elif kind == "reopen":
                img.close()
                img = qcow2.open(p, "r+")
            elif img.size < 2 * _SIZE:
                resize_image(img, img.size + 512 * (n % 9 + 1))
            assert list(img.dirty_ranges("b")) == _expected_runs(
                [(g << gran_bits, 1 << gran_bits) for g in dirty], 1 << gran_bits, img.size)
    finally:
        img.close()
    with qcow2.open(p) as img:
        assert list(img.dirty_ranges("b")) == _expected_runs(
            [(g << gran_bits, 1 << gran_bits) for g in dirty], 1 << gran_bits, img.size)
        assert list(img.dirty_ranges("off")) == []
        res = img.check()
        assert res.corruptions == 0 and res.leaks == 0, res.messages


def test_repair_counts_bitmap_clusters(tmp: Path) -> None:
    p = _make(tmp, "a.qcow2", 8 << 20, True)
    _ours(p, [("write", 0, 4096), ("write", 3 << 20, 200000)])
    crashed = tmp / "crashed.qcow2"
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"x" * 70000, 5 << 20)
        img.flush()
        img.pwrite(b"y" * 512, 7 << 20)  # in use again, and a pool of reserved clusters
        shutil.copyfile(p, crashed)
    before = _bits(p)
    for path in (p, crashed):
        with qcow2.open(path, "r+") as img:
            res = img.check(repair="all")
            assert res.corruptions == 0, res.messages
        assert_clean(path)
    assert _bits(p) == before
    flags = _qemu_flags(crashed)
    assert flags["b0"] == ["in-use", "auto"] and flags["off"] == []


# --------------------------------------------------------------------------------------
# Header extensions kept, void extension dropped, unsupported bitmaps removed cleanly
# --------------------------------------------------------------------------------------
_OTHER = (0x7E57E7E0, b"an extension nobody knows" * 2)


def _exts(p: Path) -> list[tuple[int, bytes]]:
    from qcow2.header import extension_area

    with qcow2.open(p) as img:
        raw = img.storage.pread(img.cluster_size, 0)
        return [(e.type, e.data) for e in extension_area(raw, img.header)[0]]


def test_rebase_and_amend_keep_every_extension(tmp: Path, mode: str) -> None:
    """qemu-img's bitmaps, an unknown extension (and ours in a refcount mode) survive
    rebase -u and amend (which switch cluster 0); QEMU still sees the bitmaps."""
    from qcow2.cli import main
    from qcow2.header import set_extension

    for b in ("base.qcow2", "other.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp / b), "8M")
    p = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(p))
    qemu_img("bitmap", "--add", str(p), "b0")
    qemu_img("bitmap", "--add", "-g", "4k", "--disable", str(p), "off")
    qemu_io(p, "write 0 64k", "write 5M 300k")
    with qcow2.open(p, "r+") as img:
        set_extension(img, *_OTHER)
        if mode != "standard":
            img.set_refcount_mode(mode)
    bits, flags = _bits(p), _qemu_flags(p)
    assert main(["rebase", "-u", "-b", "other.qcow2", "-F", "qcow2", str(p)]) == 0
    assert main(["amend", "-o", "lazy_refcounts=on", str(p)]) == 0
    assert main(["amend", "-o", "compat=1.1", str(p)]) == 0
    exts = _exts(p)
    assert _OTHER in exts and sum(t == _OTHER[0] for t, _ in exts) == 1
    assert qemu_info(p)["backing-filename"] == "other.qcow2"
    assert _bits(p) == bits and _qemu_flags(p) == flags
    assert_clean(p)


def test_removing_an_unsupported_bitmap_frees_its_clusters(tmp: Path, capsys:
                                                           pytest.CaptureFixture[str]) -> None:
    """QEMU refuses to open an image with a bitmap of unknown flags; we can remove it,
    and its table and data clusters are freed as QEMU's removal frees them."""
    from qcow2.cli import main

    p = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "16M")
    qemu_img("bitmap", "--add", "-g", "512", str(p), "b0")
    qemu_img("bitmap", "--add", str(p), "b1")
    qemu_io(p, "write 0 1M", "write 9M 3M")
    keep = list(qcow2.open(p).dirty_ranges("b1"))
    with qcow2.open(p) as img:
        ext = BitmapsExtension.unpack(img.layout.bitmaps_ext)
    with open(p, "r+b") as f:  # an unknown flag (bit 7) on b0
        f.seek(ext.directory_offset + 12)
        f.write((0x82).to_bytes(4, "big"))
    assert qemu_img("check", str(p), check=False).returncode != 0  # QEMU cannot open it
    assert main(["bitmap", "--remove", str(p), "b0"]) == 0
    assert_clean(p)  # no leaked clusters
    assert list(_qemu_flags(p)) == ["b1"]
    assert list(qcow2.open(p).dirty_ranges("b1")) == keep


def test_void_bitmaps_extension_dropped_as_qemu(tmp: Path) -> None:
    """A bitmaps extension whose auto-clear bit is clear (written by a program without
    bitmap support) is dropped on a read-write open, as QEMU drops it: the same
    extensions remain, qemu-img sees no bitmaps and counts the same leaks."""
    import json

    import qcow2_edit

    from qcow2.header import set_extension

    a = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(a), "16M")
    with qcow2.open(a, "r+") as img:  # an extension after the bitmaps one: it moves
        set_extension(img, *_OTHER)
    qemu_img("bitmap", "--add", "-g", "4k", str(a), "b0")
    qemu_io(a, "write 0 1M")
    e = qcow2_edit.RawImage(a)
    e.set("autoclear_features", 0)
    b = tmp / "b.qcow2"
    shutil.copyfile(a, b)
    qemu_io(b, "write 2M 4k")
    with qcow2.open(a, "r+") as img:
        assert img.bitmaps == []
        img.pwrite(b"\xcd" * 4096, 2 << 20)
    assert _exts(a) == _exts(b)
    assert not any(t == 0x23852875 for t, _ in _exts(a))
    assert "bitmaps" not in qemu_info(a)["format-specific"]["data"]
    ca = qemu_img("check", "--output=json", str(a), check=False)
    cb = qemu_img("check", "--output=json", str(b), check=False)
    assert ca.returncode == cb.returncode == 3
    assert json.loads(ca.stdout)["leaks"] == json.loads(cb.stdout)["leaks"] > 0


def test_last_bitmap_removed_before_a_big_unknown_extension(tmp: Path) -> None:
    """An unknown extension too big for the first sector cannot be moved crash-safely:
    removing the last bitmap then voids the bitmaps extension (auto-clear bit clear),
    which every reader ignores; qemu-img sees no bitmap and drops it, and a later
    read-write open of ours keeps working."""
    from qcow2.cli import main
    from qcow2.header import set_extension

    p = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(p), "16M")
    big = (0x7E57E7E1, bytes(range(256)) * 3)
    with qcow2.open(p, "r+") as img:
        set_extension(img, *big)
    qemu_img("bitmap", "--add", str(p), "b0")
    assert main(["bitmap", "--remove", str(p), "b0"]) == 0
    assert 0x23852875 in [t for t, _ in _exts(p)]  # void: its auto-clear bit is clear
    assert qcow2.open(p).header.autoclear_features == 0
    assert "bitmaps" not in qemu_info(p)["format-specific"]["data"]
    assert big in _exts(p)
    with qcow2.open(p, "r+") as img:
        assert img.bitmaps == []
        img.pwrite(b"x" * 4096, 0)
    assert_clean(p)
    assert big in _exts(p)
    assert main(["bitmap", "--add", str(p), "b1"]) == 0  # the void one reused in place
    assert_clean(p)
    assert list(_qemu_flags(p)) == ["b1"] and big in _exts(p)
    q = tmp / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q), "16M")
    with qcow2.open(q, "r+") as img:
        set_extension(img, *big)
    assert main(["bitmap", "--add", str(q), "b2"]) == 0  # after it, then the bit
    assert_clean(q)
    assert list(_qemu_flags(q)) == ["b2"] and _exts(q)[-1][0] == 0x23852875


def test_store_writes_the_changed_sectors_only(tmp: Path) -> None:
    """A flush after a small write rewrites the bitmap sector that changed (and the
    directory's flags), not its whole 64 KiB data cluster nor the table; QEMU reads
    the result bit for bit as its own."""
    a = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(a), "64M")
    qemu_img("bitmap", "--add", "-g", "512", str(a), "b0")
    b = tmp / "b.qcow2"
    shutil.copyfile(a, b)
    offs = [(i * 7919 * 4096) % (64 << 20) for i in range(12)]
    with qcow2.open(a, "r+") as img:
        img.pwrite(b"x" * 4096, 1 << 20)
        img.flush()  # (the data cluster of the bitmap is allocated: written whole)
        before = img.stats.copy()
        for off in offs:
            img.pwrite(b"y" * 4096, off)
            img.flush()
        per_flush = (img.stats - before).bitmap_writes_bytes / len(offs)
    assert per_flush <= 2 * 512  # a sector of bits and the directory entry's flags
    qemu_io(b, "write 1M 4k", *[f"write {off} 4k" for off in offs])
    assert _bits(a) == _bits(b)
    assert_clean(a)
