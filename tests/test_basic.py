"""Smoke tests of the engine against qemu-img."""

from __future__ import annotations

import os

import pytest
from conftest import assert_clean, qemu_img, raw_bytes

import qcow2
from qcow2.check import CheckHost
from qcow2.snapshot import SnapshotHost


def test_create_write_read_check(tmp):
    p = tmp / "a.qcow2"
    qcow2.create(p, 64 << 20)
    model = bytearray(64 << 20)
    with qcow2.open(p, "r+") as img:
        for off, n in [(12345, 100000), (70000, 5000), (0, 1), ((64 << 20) - 7, 7), (3 << 20, 2 << 20)]:
            data = os.urandom(n)
            assert img.pwrite(data, off) == n
            model[off : off + n] = data
        assert img.pread(200, 12300) == bytes(model[12300:12500])
    assert_clean(p)
    assert raw_bytes(p, tmp) == bytes(model)


def test_read_past_end_is_error(tmp):
    p = tmp / "a.qcow2"
    qcow2.create(p, 1 << 20)
    with qcow2.open(p) as img:
        with pytest.raises(qcow2.InvalidArgumentError):
            img.pread(2, (1 << 20) - 1)
        with pytest.raises(qcow2.ReadOnlyError):
            img.pwrite(b"x", 0)


def test_not_qcow2(tmp):
    p = tmp / "raw.img"
    p.write_bytes(bytes(4096))
    with pytest.raises(qcow2.FormatError):
        qcow2.open(p)


def test_qemu_written_image_reads_identically(tmp):
    p = tmp / "q.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "8M")
    from conftest import qemu_io

    qemu_io(p, "write -P 0x11 0 100k", "write -z 1M 64k", "write -P 0x22 2M 12345")
    with qcow2.open(p) as img:
        assert img.pread(img.size, 0) == raw_bytes(p, tmp)


def test_image_provides_what_its_collaborators_ask(tmp):
    """The snapshot operations and check reach the image only through the SnapshotHost
    and CheckHost protocols: an open image (read-only and read-write) has every member
    they name, so a renamed or removed image member fails here, not midway through a
    snapshot or a repair."""
    p = tmp / "h.qcow2"
    qcow2.create(p, 1 << 20)
    for how in ("r", "r+"):
        with qcow2.open(p, how) as img:
            for proto in (SnapshotHost, CheckHost):
                names = {n for n in vars(proto)
                         if not n.startswith("__") and n not in ("_is_protocol", "_abc_impl")}
                names |= set(proto.__annotations__)
                missing = sorted(n for n in names if not hasattr(img, n))
                assert not missing, (proto.__name__, how, missing)
