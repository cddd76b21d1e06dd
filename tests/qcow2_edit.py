"""Byte-level editing of qcow2 files for tests: damage images on purpose.

Independent of the library (plain struct offsets from docs/interop/qcow2.txt), so a bug
in our own parser cannot hide a bug in the damage.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1

# header field -> (byte offset, struct format)
FIELDS = {
    "magic": (0, ">I"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"), "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}


class RawImage:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # -- raw access ------------------------------------------------------------------
    def read(self, offset: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(n).ljust(n, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def u64(self, offset: int) -> int:
        return struct.unpack(">Q", self.read(offset, 8))[0]

    def set_u64(self, offset: int, value: int) -> None:
        self.write(offset, struct.pack(">Q", value))

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    # -- header ----------------------------------------------------------------------
    def get(self, name: str) -> int:
        off, fmt = FIELDS[name]
        return struct.unpack(fmt, self.read(off, struct.calcsize(fmt)))[0]

    def set(self, name: str, value: int) -> None:
        off, fmt = FIELDS[name]
        self.write(off, struct.pack(fmt, value))

    @property
    def cluster_size(self) -> int:
        return 1 << self.get("cluster_bits")

    @property
    def extended_l2(self) -> bool:
        return bool(self.get("incompatible_features") & 16) if self.get("version") >= 3 else False

    # -- L1 / L2 ---------------------------------------------------------------------
    def l1_entry_offset(self, i: int, l1_offset: int | None = None) -> int:
        return (self.get("l1_table_offset") if l1_offset is None else l1_offset) + 8 * i

    def l1(self, i: int, l1_offset: int | None = None) -> int:
        return self.u64(self.l1_entry_offset(i, l1_offset))

    def set_l1(self, i: int, value: int, l1_offset: int | None = None) -> None:
        self.set_u64(self.l1_entry_offset(i, l1_offset), value)

    def l2_entry_offset(self, guest_cluster: int, l1_offset: int | None = None) -> int:
        esz = 16 if self.extended_l2 else 8
        per = self.cluster_size // esz
        l2 = self.l1(guest_cluster // per, l1_offset) & OFFSET_MASK
        assert l2, "no L2 table for this guest cluster"
        return l2 + esz * (guest_cluster % per)

    def l2(self, guest_cluster: int, l1_offset: int | None = None) -> int:
        return self.u64(self.l2_entry_offset(guest_cluster, l1_offset))

    def set_l2(self, guest_cluster: int, value: int, l1_offset: int | None = None) -> None:
        self.set_u64(self.l2_entry_offset(guest_cluster, l1_offset), value)

    def bitmap(self, guest_cluster: int) -> int:
        return self.u64(self.l2_entry_offset(guest_cluster) + 8)

    def set_bitmap(self, guest_cluster: int, value: int) -> None:
        self.set_u64(self.l2_entry_offset(guest_cluster) + 8, value)

    def host_cluster(self, guest_cluster: int) -> int:
        """Host cluster index of an allocated guest cluster."""
        return (self.l2(guest_cluster) & OFFSET_MASK) // self.cluster_size

    # -- refcounts -------------------------------------------------------------------
    def reftable_entry_offset(self, i: int) -> int:
        return self.get("refcount_table_offset") + 8 * i

    def reftable(self, i: int) -> int:
        return self.u64(self.reftable_entry_offset(i))

    def set_reftable(self, i: int, value: int) -> None:
        self.set_u64(self.reftable_entry_offset(i), value)

    def _refcount_loc(self, cluster: int) -> tuple[int, int, int]:
        order = self.get("refcount_order") if self.get("version") >= 3 else 4
        bits = 1 << order
        per_block = self.cluster_size * 8 // bits
        block = self.reftable(cluster // per_block) & ~0x1FF
        assert block, "no refcount block for this cluster"
        bitpos = (cluster % per_block) * bits
        return block, bitpos, bits

    def refcount(self, cluster: int) -> int:
        block, bitpos, bits = self._refcount_loc(cluster)
        if bits >= 8:
            return int.from_bytes(self.read(block + bitpos // 8, bits // 8), "big")
        byte = self.read(block + bitpos // 8, 1)[0]
        return (byte >> (bitpos % 8)) & ((1 << bits) - 1)

    def set_refcount(self, cluster: int, value: int) -> None:
        block, bitpos, bits = self._refcount_loc(cluster)
        if bits >= 8:
            self.write(block + bitpos // 8, value.to_bytes(bits // 8, "big"))
            return
        byte = self.read(block + bitpos // 8, 1)[0]
        mask = ((1 << bits) - 1) << (bitpos % 8)
        byte = (byte & ~mask) | ((value << (bitpos % 8)) & mask)
        self.write(block + bitpos // 8, bytes([byte]))

    # -- snapshot table --------------------------------------------------------------
    def snapshot_entry_offsets(self) -> list[int]:
        pos = self.get("snapshots_offset")
        out = []
        for _ in range(self.get("nb_snapshots")):
            out.append(pos)
            id_len, name_len = struct.unpack(">HH", self.read(pos + 12, 4))
            extra = struct.unpack(">I", self.read(pos + 36, 4))[0]
            pos += 40 + extra + id_len + name_len
            pos = (pos + 7) & ~7
        return out

    def snapshot_l1(self, i: int) -> tuple[int, int]:
        pos = self.snapshot_entry_offsets()[i]
        return struct.unpack(">QI", self.read(pos, 12))

    def set_snapshot_l1(self, i: int, offset: int | None = None, size: int | None = None) -> None:
        pos = self.snapshot_entry_offsets()[i]
        old_off, old_size = self.snapshot_l1(i)
        self.write(pos, struct.pack(">QI", old_off if offset is None else offset,
                                    old_size if size is None else size))

    def set_snapshot_extra_size(self, i: int, value: int) -> None:
        pos = self.snapshot_entry_offsets()[i]
        self.write(pos + 36, struct.pack(">I", value))

    def rewrite_snapshot_extra(self, i: int, extra: bytes) -> None:
        """Rebuild entry i in place with other extra data (the last entry only, as the
        ones after it would move)."""
        pos = self.snapshot_entry_offsets()[i]
        head = bytearray(self.read(pos, 40))
        id_len, name_len = struct.unpack(">HH", head[12:16])
        old_extra = struct.unpack(">I", head[36:40])[0]
        names = self.read(pos + 40 + old_extra, id_len + name_len)
        head[36:40] = struct.pack(">I", len(extra))
        self.write(pos, bytes(head) + extra + names)

    # -- file ------------------------------------------------------------------------
    def append_cluster(self, fill: bytes = b"\0") -> int:
        """Grow the file by one cluster; returns its index."""
        size = self.file_size
        cs = self.cluster_size
        idx = -(-size // cs)
        with open(self.path, "r+b") as f:
            f.truncate(idx * cs)
            f.seek(idx * cs)
            f.write((fill * cs)[:cs])
        return idx
