"""The snapshot table: parsing, packing and listing its records, with struct only.

Kept apart from snapshot.py (the snapshot operations, vectorized with numpy) so that
reading and listing snapshots (`qcow2 info`, `qcow2 snapshot -l`) need no numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .errors import FormatError, SnapshotError
from .format import MAX_SNAPSHOT_TABLE_BYTES, MAX_SNAPSHOTS, SNAPSHOT_EXTRA_V3_SIZE, SnapshotEntry

if TYPE_CHECKING:
    from .format import Header
    from .storage import Storage

ICOUNT_NONE = 0xFFFFFFFFFFFFFFFF  # QEMU's "no instruction count" (-1)
MAX_NAME_BYTES = 0xFFFF  # id and name lengths are 16-bit fields


def _normalize(e: SnapshotEntry, disk_size: int) -> SnapshotEntry:
    """Fill the fields an old entry lacks the way QEMU does on reading (disk size = the
    current size, no icount) and size the extra data as QEMU writes it back."""
    extra = SNAPSHOT_EXTRA_V3_SIZE + len(e.unknown_extra)
    if e.disk_size is not None and e.icount != ICOUNT_NONE and e.icount is not None \
            and e.extra_data_size == extra:
        return e  # the common case, without the cost of replace()
    icount = None if e.icount == ICOUNT_NONE else e.icount
    return replace(e, disk_size=disk_size if e.disk_size is None else e.disk_size,
                   icount=icount, extra_data_size=extra)


def read_snapshot_table(storage: Storage, header: Header) -> tuple[list[SnapshotEntry], int]:
    """Parse the snapshot table: (entries, size of the table in bytes). Entries are
    normalized (disk_size filled in, icount None when absent or -1)."""
    n = header.nb_snapshots
    if not n:
        return [], 0
    if n > MAX_SNAPSHOTS:
        raise FormatError(f"Too many snapshots ({n}; the limit is {MAX_SNAPSHOTS})")
    off = header.snapshots_offset
    if off % header.cluster_size or off == 0:
        raise FormatError("Snapshot table offset invalid")
    avail = max(0, storage.size() - off)
    limit = min(MAX_SNAPSHOT_TABLE_BYTES, avail)
    # Entries are at least 40 bytes; read a guess and read more (bounded by the 64 MiB
    # limit and the file) when the entries turn out longer, resuming where parsing stopped.
    want = min(limit, max(65536, n * 80))
    buf = storage.pread(want, off)
    out: list[SnapshotEntry] = []
    pos = 0
    while len(out) < n:
        try:
            e, nxt = SnapshotEntry.unpack_from(buf, pos)
        except FormatError as exc:
            if "truncated" not in str(exc):
                raise
            if want >= limit:
                if avail < MAX_SNAPSHOT_TABLE_BYTES:
                    raise FormatError(
                        "Snapshot table is truncated: it runs past the end of the file") from None
                raise FormatError(
                    "Snapshot table exceeds the size limit of "
                    f"{MAX_SNAPSHOT_TABLE_BYTES >> 20} MiB") from None
            want = min(limit, want * 4)
            buf = storage.pread(want, off)
            continue
        out.append(e)
        pos = nxt
    # QEMU counts the table up to the last byte of the last entry (no padding)
    size = pos - ((-_entry_len(out[-1])) % 8)
    return [_normalize(e, header.size) for e in out], size


# (snapshots_offset, nb_snapshots, entries, table size in bytes): the parsed table,
# valid while the header names that table
CachedTable = tuple[int, int, list[SnapshotEntry], int]


def cached_snapshot_table(storage: Storage, header: Header,
                          cache: CachedTable | None) -> CachedTable:
    """The table the header names: cache when it is that one, else read again."""
    if cache is None or cache[0] != header.snapshots_offset or cache[1] != header.nb_snapshots:
        entries, size = read_snapshot_table(storage, header)
        cache = (header.snapshots_offset, header.nb_snapshots, entries, size)
    return cache


def _entry_len(e: SnapshotEntry) -> int:
    return 40 + e.extra_data_size + len(e.id.encode("utf-8", "surrogateescape")) + len(
        e.name.encode("utf-8", "surrogateescape"))


def pack_snapshot_table(entries: Sequence[SnapshotEntry]) -> bytes:
    """The table as QEMU writes it: entries 8-byte aligned, no padding after the last."""
    out = b"".join(e.pack() for e in entries)
    if entries:
        out = out[: len(out) - ((-_entry_len(entries[-1])) % 8)]
    if len(out) > MAX_SNAPSHOT_TABLE_BYTES:
        raise SnapshotError(
            f"Snapshot table would exceed the size limit of {MAX_SNAPSHOT_TABLE_BYTES >> 20} MiB")
    return out


def _strtoul(s: str) -> int:
    """C strtoul(s, NULL, 10) as QEMU uses it to read ids (wraps, saturates)."""
    i, n = 0, len(s)
    while i < n and s[i] in " \t\n\v\f\r":
        i += 1
    neg = False
    if i < n and s[i] in "+-":
        neg = s[i] == "-"
        i += 1
    j = i
    while j < n and "0" <= s[j] <= "9":
        j += 1
    if j == i:
        return 0
    v = int(s[i:j])
    if v > ICOUNT_NONE:
        return ICOUNT_NONE
    return (-v) % (1 << 64) if neg else v


def next_snapshot_id(entries: Sequence[SnapshotEntry]) -> str:
    """QEMU's choice of id: the largest numeric id plus one."""
    top = max((_strtoul(e.id) for e in entries), default=0)
    return str((top + 1) % (1 << 64))


def find_snapshot(entries: Sequence[SnapshotEntry], name_or_id: str) -> int:
    """Index of the snapshot with this id, else of the first with this name; -1."""
    for i, e in enumerate(entries):
        if e.id == name_or_id:
            return i
    for i, e in enumerate(entries):
        if e.name == name_or_id:
            return i
    return -1


def size_to_str(value: int) -> str:
    """QEMU's human size: three significant digits, IEC units ("1.5 GiB")."""
    import math

    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = max(0, min(int((exp - 1) / 10), 6))
    unit = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")[i]
    return f"{value / (1 << (i * 10)):0.3g} {unit}B"
