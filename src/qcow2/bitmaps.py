"""Persistent dirty bitmaps (the qcow2 bitmaps extension): the one parser of the bitmap
directory and tables, shared by info, check and the Image.

Records are frozen dataclasses with pack()/unpack(); dirty bits are numpy bool arrays with
one element per granule (bit 0 of byte 0 of the bitmap data is the first granule).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import (
    CorruptImageError,
    FormatError,
    InvalidArgumentError,
    UnsupportedFeatureError,
)
from .format import AUTOCLEAR_BITMAPS

if TYPE_CHECKING:  # numpy is imported where bits are read: info lists bitmaps without it
    import numpy as np

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
FLAGS_KNOWN = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 64 << 20
MAX_NAME_SIZE = 1023
MAX_TABLE_SIZE = 0x8000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1


@dataclass(frozen=True)
class BitmapsExtension:
    """Payload of the bitmaps header extension."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    _S = struct.Struct(">IIQQ")

    def pack(self) -> bytes:
        return self._S.pack(self.nb_bitmaps, 0, self.directory_size, self.directory_offset)

    @classmethod
    def unpack(cls, data: bytes) -> BitmapsExtension:
        if len(data) < cls._S.size:
            raise FormatError("bitmaps extension is too short")
        nb, reserved, size, off = cls._S.unpack_from(data)
        if reserved:
            raise FormatError("bitmaps extension: reserved field is not zero")
        return cls(nb, size, off)


@dataclass(frozen=True)
class BitmapEntry:
    """One bitmap directory entry (extra data kept verbatim)."""

    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data: bytes = b""

    _S = struct.Struct(">QIIBBHI")

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    def pack(self) -> bytes:
        name = self.name.encode()
        out = self._S.pack(self.table_offset, self.table_size, self.flags, self.type,
                           self.granularity_bits, len(name), len(self.extra_data))
        out += self.extra_data + name
        return out + bytes(-len(out) % 8)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, pos: int = 0) -> tuple[BitmapEntry, int]:
        """The entry at pos and the position of the next one."""
        if pos + cls._S.size > len(buf):
            raise FormatError("Bitmap directory is truncated")
        t_off, t_size, flags, typ, gbits, name_len, extra = cls._S.unpack_from(buf, pos)
        start = pos + cls._S.size
        end = start + extra + name_len
        if end > len(buf):
            raise FormatError("Bitmap directory is truncated")
        extra_data = bytes(buf[start : start + extra])
        try:
            name = bytes(buf[start + extra : end]).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("Bitmap name is not valid UTF-8") from None
        ent = cls(t_off, t_size, flags, typ, gbits, name, extra_data)
        return ent, end + (-end % 8)


def table_entries(size: int, granularity_bits: int, cluster_size: int) -> int:
    """Number of bitmap table entries a disk of size bytes needs."""
    granules = -(-size // (1 << granularity_bits))
    return -(-granules // (cluster_size * 8))


def validate_entry(ent: BitmapEntry, size: int, cluster_size: int, file_size: int) -> None:
    """Raise FormatError for an entry QEMU would refuse (block/qcow2-bitmap.c's checks)."""
    if not MIN_GRANULARITY_BITS <= ent.granularity_bits <= MAX_GRANULARITY_BITS:
        raise FormatError(f"Bitmap '{ent.name}' has an invalid granularity")
    if ent.type != TYPE_DIRTY_TRACKING:
        raise FormatError(f"Bitmap '{ent.name}' has an unknown type {ent.type}")
    if not ent.name or len(ent.name.encode()) > MAX_NAME_SIZE:
        raise FormatError("Bitmap name is empty or too long")
    if ent.table_size > MAX_TABLE_SIZE or ent.table_offset % cluster_size:
        raise FormatError(f"Bitmap '{ent.name}' has an invalid table")
    # (QEMU accepts any table size for a bitmap in use: one whose writer crashed during
    # a resize, say; it is never read)
    if not ent.in_use and ent.table_size != table_entries(size, ent.granularity_bits,
                                                          cluster_size):
        raise FormatError(f"Bitmap '{ent.name}' table size does not match the disk size")
    if ent.table_offset + ent.table_size * 8 > file_size:
        raise FormatError(f"Bitmap '{ent.name}' table is past the end of the file")


def supported(ent: BitmapEntry) -> bool:
    """Whether we may use (and rewrite) this bitmap: QEMU's rules for unknown flags/extra data."""
    if ent.flags & ~FLAGS_KNOWN:
        return False
    return not ent.extra_data or bool(ent.flags & FLAG_EXTRA_DATA_COMPATIBLE)


def read_directory(storage: Any, ext_data: bytes | None, autoclear: int,
                   file_size: int) -> tuple[BitmapsExtension | None, list[BitmapEntry]]:
    """Parse the bitmap directory. QEMU ignores the extension while the auto-clear bit is
    clear (a program without bitmap support has written the image)."""
    if ext_data is None or not autoclear & AUTOCLEAR_BITMAPS:
        return None, []
    ext = BitmapsExtension.unpack(ext_data)
    if not ext.nb_bitmaps:
        return ext, []
    if (ext.nb_bitmaps > MAX_BITMAPS or ext.directory_size > MAX_DIRECTORY_SIZE
            or ext.directory_offset + ext.directory_size > file_size):
        raise FormatError("Invalid bitmap directory in the bitmaps extension")
    buf = storage.pread(ext.directory_size, ext.directory_offset)
    out: list[BitmapEntry] = []
    pos = 0
    for _ in range(ext.nb_bitmaps):
        ent, pos = BitmapEntry.unpack(buf, pos)
        out.append(ent)
    return ext, out


def read_table(storage: Any, ent: BitmapEntry) -> np.ndarray:
    """The bitmap table as uint64 (callers validated the entry)."""
    raw = storage.pread(ent.table_size * 8, ent.table_offset)
    if len(raw) != ent.table_size * 8:
        raise FormatError(f"Bitmap '{ent.name}' table is truncated")
    import numpy as np

    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def read_bits(storage: Any, ent: BitmapEntry, size: int, cluster_size: int,
              file_size: int) -> np.ndarray:
    """Dirty bits of a bitmap, one bool per granule of the disk."""
    import numpy as np

    validate_entry(ent, size, cluster_size, file_size)
    table = read_table(storage, ent)
    granules = -(-size // ent.granularity)
    per_cluster = cluster_size * 8
    bits = np.zeros(len(table) * per_cluster, dtype=bool)
    for i, e in enumerate(table.tolist()):
        if e & TABLE_RESERVED_MASK:
            raise FormatError(f"Bitmap '{ent.name}' table entry {i} has reserved bits set")
        off = e & TABLE_OFFSET_MASK
        if off:
            if off % cluster_size or off + cluster_size > file_size:
                raise FormatError(f"Bitmap '{ent.name}' table entry {i} is invalid")
            data = np.frombuffer(storage.pread(cluster_size, off), dtype=np.uint8)
            bits[i * per_cluster : (i + 1) * per_cluster] = np.unpackbits(
                data, bitorder="little").astype(bool)
        elif e & TABLE_ALL_ONES:
            bits[i * per_cluster : (i + 1) * per_cluster] = True
    return bits[:granules]


def runs(bits: np.ndarray, granularity: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of set bits, clipped to the disk size."""
    if not len(bits):
        return
    import numpy as np

    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits.view(np.int8), [0]))))
    for start, stop in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
        off = start * granularity
        yield off, min(stop * granularity, size) - off


def info_dict(ent: BitmapEntry) -> dict[str, Any]:
    """The entry as `qemu-img info --output=json` lists it."""
    names = []
    if ent.flags & FLAG_IN_USE:
        names.append("in-use")
    if ent.flags & FLAG_AUTO:
        names.append("auto")
    return {"name": ent.name, "granularity": ent.granularity, "flags": names}


def dirty_ranges(img: Any, name: str) -> Iterator[tuple[int, int]]:
    """Runs of bitmap name of an open Image (an unknown name is an InvalidArgumentError)."""
    for ent in img.bitmaps:
        if ent.name == name:
            if not supported(ent):
                raise UnsupportedFeatureError(f"Bitmap '{name}' has unsupported flags or data")
            if ent.in_use:
                raise CorruptImageError(f"Bitmap '{name}' is inconsistent (in use)")
            size, fsize = img.size, img.storage.size()
            bits = read_bits(img.storage, ent, size, img.cluster_size, fsize)
            return runs(bits, ent.granularity, size)
    raise InvalidArgumentError(f"Dirty bitmap '{name}' not found")
