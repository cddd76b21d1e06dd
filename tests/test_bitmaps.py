"""Persistent dirty bitmaps: our parser against bitmaps qemu-img creates and qemu-io updates."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import qemu_img, qemu_info, qemu_io

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
