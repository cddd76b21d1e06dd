"""On-disk layout of qcow2: constants and records (pack/unpack only, no I/O)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

from .errors import FormatError, UnsupportedFeatureError

if TYPE_CHECKING:
    from datetime import datetime, timedelta

    import numpy as np

MAGIC = b"QFI\xfb"

# Feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
# Ours (docs/format-extensions.md): the stored refcounts follow a non-standard refcount
# mode, named by the refcount-mode header extension. A high bit, far from QEMU's.
INCOMPAT_LAZY_COUNT = 1 << 59
INCOMPAT_OWNER = 1 << 58
INCOMPAT_REFCOUNT_MODES = INCOMPAT_LAZY_COUNT | INCOMPAT_OWNER
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
                  | INCOMPAT_EXTL2 | INCOMPAT_REFCOUNT_MODES)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Names QEMU writes in its feature name table, (type, bit) -> name
FEATURE_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}

# Our own features' names, written only into images that use them (cluster 0 of a
# 512-byte-cluster image has no room to spare)
OUR_FEATURE_NAMES: dict[tuple[int, int], str] = {
    (0, 59): "lazy-count refcounts",
    (0, 58): "owner refcounts",
}

# Header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXT_REFCOUNT_MODE = 0x52434D44  # ours: "RCMD"

# refcount modes: name -> (incompatible bit, id in the refcount-mode extension)
REFCOUNT_MODE_IDS = {"standard": 0, "lazy-count": 1, "owner": 2}
REFCOUNT_MODE_BITS = {"standard": 0, "lazy-count": INCOMPAT_LAZY_COUNT, "owner": INCOMPAT_OWNER}

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Table entry bits
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
L1E_OFFSET_MASK = OFFSET_MASK
L2E_OFFSET_MASK = OFFSET_MASK
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
HEADER_LENGTH_WITH_COMPRESSION = 112  # 104 + compression_type byte + padding
MAX_BACKING_FILE_NAME = 1023
MAX_L1_SIZE_BYTES = 32 * 1024 * 1024  # QEMU's limit on the L1 table
MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024  # QEMU's limit on the refcount table
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024
MAX_SNAPSHOT_EXTRA_DATA = 1024
SUBCLUSTERS_PER_CLUSTER = 32

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3_TAIL = struct.Struct(">QQQII")
_EXT_HDR = struct.Struct(">II")


@dataclass(frozen=True)
class Header:
    """The fixed qcow2 header (version 2 or 3), without extensions."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    # Header bytes between the known fields and header_length (future fields), kept verbatim.
    unknown_tail: bytes = b""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def with_(self, **changes: object) -> Header:
        return replace(self, **changes)  # type: ignore[arg-type]

    def pack(self) -> bytes:
        head = _HEADER_V2.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
            self.nb_snapshots, self.snapshots_offset,
        )
        if self.version == 2:
            return head
        tail = _HEADER_V3_TAIL.pack(
            self.incompatible_features, self.compatible_features, self.autoclear_features,
            self.refcount_order, self.header_length,
        )
        out = bytearray(head + tail)
        if self.header_length > V3_HEADER_LENGTH:
            extra = bytearray(self.header_length - V3_HEADER_LENGTH)
            extra[: len(self.unknown_tail)] = self.unknown_tail[: len(extra)]
            extra[0] = self.compression_type
            out += extra
        return bytes(out)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Parse the fixed header; raises FormatError for anything malformed."""
        if len(data) < 4 or data[:4] != MAGIC:
            raise FormatError("Image is not in qcow2 format")
        if len(data) < _HEADER_V2.size:
            raise FormatError("Image is truncated: the qcow2 header is incomplete")
        f = _HEADER_V2.unpack_from(data)
        version = f[1]
        if version not in (2, 3):
            raise FormatError(f"Unsupported qcow2 version {version}")
        kw: dict[str, object] = dict(
            version=version, backing_file_offset=f[2], backing_file_size=f[3],
            cluster_bits=f[4], size=f[5], crypt_method=f[6], l1_size=f[7],
            l1_table_offset=f[8], refcount_table_offset=f[9], refcount_table_clusters=f[10],
            nb_snapshots=f[11], snapshots_offset=f[12],
        )
        if version == 3:
            if len(data) < V3_HEADER_LENGTH:
                raise FormatError("Image is truncated: the qcow2 header is incomplete")
            inc, comp, auto, order, hlen = _HEADER_V3_TAIL.unpack_from(data, _HEADER_V2.size)
            if hlen < V3_HEADER_LENGTH:
                raise FormatError("qcow2 header too short")
            if hlen % 8:
                raise FormatError("qcow2 header length is not a multiple of 8")
            if len(data) < hlen:
                raise FormatError("Image is truncated: the qcow2 header is incomplete")
            tail = bytes(data[V3_HEADER_LENGTH:hlen])
            kw.update(
                incompatible_features=inc, compatible_features=comp, autoclear_features=auto,
                refcount_order=order, header_length=hlen,
                compression_type=tail[0] if tail else 0,
                unknown_tail=tail,
            )
        return cls(**kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class HeaderExtension:
    type: int
    data: bytes

    def pack(self) -> bytes:
        pad = (-len(self.data)) % 8
        return _EXT_HDR.pack(self.type, len(self.data)) + self.data + b"\0" * pad


def unpack_extensions(buf: bytes, start: int, end: int) -> list[HeaderExtension]:
    """Parse header extensions in buf[start:end] up to the end marker."""
    exts: list[HeaderExtension] = []
    seen: set[int] = set()
    pos = start
    while True:
        if pos + 8 > end:
            raise FormatError("Invalid header extension: it runs past the end of the first cluster")
        etype, length = _EXT_HDR.unpack_from(buf, pos)
        pos += 8
        if etype == EXT_END:
            return exts
        if length > end - pos:
            raise FormatError(f"Invalid header extension 0x{etype:x}: its length runs past the end of the first cluster")
        if etype in seen and etype in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE):
            raise FormatError(f"Duplicate header extension 0x{etype:x}")
        seen.add(etype)
        exts.append(HeaderExtension(etype, bytes(buf[pos : pos + length])))
        pos += (length + 7) & ~7


def pack_feature_table(entries: dict[tuple[int, int], str] | None = None) -> bytes:
    out = bytearray()
    for (ftype, bit), name in (entries or FEATURE_NAMES).items():
        out += struct.pack(">BB46s", ftype, bit, name.encode()[:46])
    return bytes(out)


def unpack_feature_table(data: bytes) -> dict[tuple[int, int], str]:
    table: dict[tuple[int, int], str] = {}
    for pos in range(0, len(data) - 47, 48):
        ftype, bit, raw = struct.unpack_from(">BB46s", data, pos)
        table[(ftype, bit)] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return table


_SNAP_HDR = struct.Struct(">QIHHIIQII")
SNAPSHOT_HEADER = _SNAP_HDR  # fixed part of a snapshot table entry (40 bytes)
SNAPSHOT_EXTRA_V3_SIZE = 24  # vm_state_size_large, disk_size, icount


@dataclass(frozen=True)
class SnapshotEntry:
    """One entry of the snapshot table."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None = None
    icount: int | None = None
    # extra data beyond the known fields, preserved as read
    unknown_extra: bytes = b""
    extra_data_size: int = SNAPSHOT_EXTRA_V3_SIZE

    @property
    def date(self) -> datetime:
        """Creation time (timezone-aware, UTC)."""
        from datetime import datetime, timedelta, timezone  # (start-up: only where used)

        return datetime.fromtimestamp(self.date_sec, tz=timezone.utc) + timedelta(
            microseconds=self.date_nsec // 1000)

    @property
    def vm_clock(self) -> timedelta:
        """Guest clock at the time of the snapshot."""
        from datetime import timedelta

        return timedelta(microseconds=self.vm_clock_nsec // 1000)

    def pack(self) -> bytes:
        extra = bytearray(self.extra_data_size)
        known = struct.pack(
            ">QQQ", self.vm_state_size,
            self.disk_size if self.disk_size is not None else 0,
            self.icount if self.icount is not None else 0xFFFFFFFFFFFFFFFF,
        )
        extra[: min(len(known), len(extra))] = known[: len(extra)]
        if self.extra_data_size > SNAPSHOT_EXTRA_V3_SIZE:
            room = self.extra_data_size - SNAPSHOT_EXTRA_V3_SIZE
            extra[SNAPSHOT_EXTRA_V3_SIZE:] = self.unknown_extra[:room].ljust(room, b"\0")
        # surrogateescape: names that are not UTF-8 are written back byte for byte
        id_b = self.id.encode("utf-8", "surrogateescape")
        name_b = self.name.encode("utf-8", "surrogateescape")
        vm32 = self.vm_state_size if self.vm_state_size < (1 << 32) else 0
        out = _SNAP_HDR.pack(
            self.l1_table_offset, self.l1_size, len(id_b), len(name_b), self.date_sec,
            self.date_nsec, self.vm_clock_nsec, vm32, self.extra_data_size,
        ) + bytes(extra) + id_b + name_b
        return out + b"\0" * ((-len(out)) % 8)

    @classmethod
    def unpack_from(cls, buf: bytes, pos: int, *, lenient: bool = False
                    ) -> tuple[SnapshotEntry, int]:
        """Parse one entry at buf[pos:]; returns (entry, position after padding).
        lenient (check reading a damaged table): extra data beyond the limit is skipped
        rather than refused (the entry keeps its first MAX_SNAPSHOT_EXTRA_DATA bytes;
        extra_data_size stays the size on disk)."""
        if pos + _SNAP_HDR.size > len(buf):
            raise FormatError("Snapshot table is truncated")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vm32, extra_size) = (
            _SNAP_HDR.unpack_from(buf, pos)
        )
        pos += _SNAP_HDR.size
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA and not lenient:
            raise FormatError("Too much extra metadata in snapshot table entry")
        end = pos + extra_size + id_len + name_len
        if end > len(buf):
            raise FormatError("Snapshot table is truncated")
        extra = bytes(buf[pos : pos + min(extra_size, MAX_SNAPSHOT_EXTRA_DATA)])
        pos += extra_size
        vm_size = vm32
        disk_size = icount = None
        if len(extra) >= 8:
            vm_size = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if len(extra) >= 24:
            icount = struct.unpack_from(">Q", extra, 16)[0]
        sid = bytes(buf[pos : pos + id_len]).decode("utf-8", "surrogateescape")
        pos += id_len
        name = bytes(buf[pos : pos + name_len]).decode("utf-8", "surrogateescape")
        pos += name_len
        pos += (-pos) % 8
        return cls(
            l1_table_offset=l1_off, l1_size=l1_size, id=sid, name=name, date_sec=dsec,
            date_nsec=dnsec, vm_clock_nsec=clock, vm_state_size=vm_size, disk_size=disk_size,
            icount=icount, unknown_extra=extra[SNAPSHOT_EXTRA_V3_SIZE:],
            extra_data_size=extra_size,
        ), pos


@dataclass(frozen=True)
class ImageLayout:
    """Header plus parsed extensions: everything in cluster 0."""

    header: Header
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_table: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps_ext: bytes | None = None
    crypto_ext: bytes | None = None
    refcount_mode_ext: RefcountModeExt | None = None
    unknown_extensions: tuple[HeaderExtension, ...] = ()


@dataclass(frozen=True)
class SnapshotNode:
    """Owner mode (docs/format-extensions.md): a snapshot's place in the snapshot tree,
    the first 16 bytes of its entry's extra data past the standard fields. node_id is
    the owner id its clusters carry in the refcount blocks; parent_id 0 means a root."""

    node_id: int
    parent_id: int = 0
    flags: int = 0

    HIDDEN: ClassVar[int] = 1  # deleted, kept while it has several children
    LIVE_PARENT: ClassVar[int] = 2  # the live state is a child of this node
    _FMT: ClassVar[struct.Struct] = struct.Struct(">IIII")
    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        return self._FMT.pack(self.node_id, self.parent_id, self.flags, 0)

    @classmethod
    def unpack(cls, data: bytes) -> SnapshotNode:
        if len(data) < cls.SIZE:
            raise FormatError("Snapshot entry lacks its owner-mode node record")
        node_id, parent_id, flags, _reserved = cls._FMT.unpack_from(data)
        return cls(node_id, parent_id, flags)

    @property
    def hidden(self) -> bool:
        return bool(self.flags & self.HIDDEN)

    @property
    def live_parent(self) -> bool:
        return bool(self.flags & self.LIVE_PARENT)


@dataclass(frozen=True)
class RefcountModeExt:
    """Our refcount-mode header extension (docs/format-extensions.md): which mode the
    stored refcounts follow. Read only when a refcount-mode incompatible bit is set."""

    mode_id: int
    version: int = 1

    _FMT = struct.Struct(">IIQ")

    def pack(self) -> bytes:
        return self._FMT.pack(self.mode_id, self.version, 0)

    @classmethod
    def unpack(cls, data: bytes) -> RefcountModeExt:
        if len(data) < cls._FMT.size:
            raise FormatError("Refcount mode header extension is truncated")
        mode_id, version, _reserved = cls._FMT.unpack_from(data)
        return cls(mode_id, version)


def mode_of(header: Header) -> str:
    """The refcount mode an image's header names."""
    bits = header.incompatible_features & INCOMPAT_REFCOUNT_MODES
    for name, bit in REFCOUNT_MODE_BITS.items():
        if bit == bits:
            return name
    raise UnsupportedFeatureError(f"Unknown refcount mode bits {bits:#x}")


# --- table encodings (numpy, big-endian on disk, native in memory) ---------------------
# numpy is imported by the functions that use it (once loaded, an import statement is a
# dictionary lookup): reading records (info, snapshot -l) must not pay for its import.


def decode_table(data: bytes) -> np.ndarray:
    """L1/L2/refcount-table bytes -> native uint64 array (writable copy)."""
    import numpy as np

    return np.frombuffer(data, dtype=">u8").astype(np.uint64)


def encode_table(table: np.ndarray) -> bytes:
    return table.astype(">u8", copy=False).tobytes()


_REFCOUNT_DTYPES = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}


def decode_refblock(data: bytes, refcount_order: int) -> np.ndarray:
    """Refcount block bytes -> uint64 array of refcounts (sub-byte widths LSB first)."""
    import numpy as np

    if refcount_order >= 3:
        return np.frombuffer(data, dtype=_REFCOUNT_DTYPES[refcount_order]).astype(np.uint64)
    width = 1 << refcount_order
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    bits = bits.reshape(-1, width).astype(np.uint64)
    weights = (np.uint64(1) << np.arange(width, dtype=np.uint64))
    return bits @ weights


def encode_refblock(values: np.ndarray, refcount_order: int) -> bytes:
    import numpy as np

    if refcount_order >= 3:
        return values.astype(_REFCOUNT_DTYPES[refcount_order]).tobytes()
    width = 1 << refcount_order
    shifts = np.arange(width, dtype=np.uint64)
    bits = ((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()
