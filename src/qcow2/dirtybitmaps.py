"""The persistent dirty bitmaps of an image opened read-write, kept true on every write.

As QEMU does, a bitmap we maintain is marked `in_use` on disk before the first guest
write after an open (or after a flush that stored it), so that a crash leaves it marked
inconsistent rather than silently wrong. Its dirty bits are kept in memory, packed as
on disk (bit 0 of byte 0 is the first granule), and set by every guest write, zero
write, discard and compressed write (`mark`), by a snapshot apply (the whole disk) and
resized with the disk. A flush stores them:

1. the changed bitmap data and table entries (in place while the bitmap is `in_use`
   on disk, as nothing trusts them then: only the 512-byte sectors of bits that changed,
   and the table sectors whose entries changed; new clusters where there were none, or
   where a table changes size), then a sync;
2. the directory: where only flags change, in place (every flag is one aligned word,
   and each bitmap is valid with either value of its in_use flag); where a table moved
   or the set of bitmaps changes, a new directory in new clusters, a sync, then the
   bitmaps header extension switched to it in place (one 24-byte field group);
3. only then are the clusters nothing points at any more released.

A crash at any point leaves every bitmap either consistent or `in_use`, and at most
leaked clusters. Bitmap clusters carry a stored refcount in every refcount mode (they
are not part of the live tree), so they are allocated with allocate_deferred + commit.

Bitmaps with unknown flags or extra data are preserved verbatim; while an enabled one
exists writes are refused (we cannot maintain it, and clearing the auto-clear bit would
lose every bitmap). Bitmaps found `in_use` (a crash, or a program still holding them)
are preserved as they are, as QEMU does, and never used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from .bitmaps import (
    FLAG_AUTO,
    FLAG_IN_USE,
    MAX_BITMAPS,
    MAX_DIRECTORY_SIZE,
    MAX_GRANULARITY_BITS,
    MAX_NAME_SIZE,
    MAX_TABLE_SIZE,
    MIN_GRANULARITY_BITS,
    TABLE_ALL_ONES,
    TABLE_OFFSET_MASK,
    TABLE_RESERVED_MASK,
    BitmapEntry,
    BitmapsExtension,
    read_directory,
    read_table,
    runs,
    supported,
    table_entries,
    validate_entry,
)
from .errors import (
    CorruptImageError,
    FormatError,
    InvalidArgumentError,
    Qcow2Error,
    UnsupportedFeatureError,
)
from .format import AUTOCLEAR_BITMAPS, EXT_BITMAPS
from .header import set_extension

# QEMU's limit on a bitmap's size in memory (BME_MAX_PHYS_SIZE)
MAX_PHYS_SIZE = 0x20000000
SECTOR = 512  # the unit in which changed bits are tracked and stored
SECTOR_BITS = 12  # log2 of the granules one sector of bits covers (512 * 8)


class BitmapNotFoundError(InvalidArgumentError):
    """No bitmap of that name."""


class _Live:
    """A bitmap loaded into memory: its bits (table_size * cluster_size bytes, as on
    disk), its table as on disk, which 512-byte sectors of the bits changed since the
    last store (so a store rewrites those, not whole clusters), and whether the table
    needs a new place (new bitmap, size change)."""

    def __init__(self, bits: np.ndarray, table: np.ndarray, moved: bool = False) -> None:
        self.bits = bits
        self.table = table
        self.touched = np.zeros(len(bits) // SECTOR, dtype=bool)
        self.moved = moved
        self.table_offset = 0  # where a moved table was written


def _granules(size: int, gbits: int) -> int:
    return -(-size // (1 << gbits))


class DirtyBitmaps:
    """The bitmaps of one writable Image (img._dirty)."""

    def __init__(self, img: Any, entries: list[BitmapEntry]) -> None:
        self.img = img
        # the directory as on disk (flags included); replaced by every directory write
        self.entries = entries
        self.live: dict[str, _Live] = {}
        self.logical: dict[str, int] = {}  # flags a live bitmap is stored with
        self.armed = False  # every live bitmap is in_use on disk
        self.changed = False  # live bits changed since they were stored
        self.hold = False  # inside a resize/apply: no marking, no storing
        self._track: list[tuple[np.ndarray, np.ndarray, int]] = []  # (bits, touched, gbits)
        self._drop: list[int] = []  # clusters to release once nothing on disk points at them

    # ------------------------------------------------------------------ loading --
    @classmethod
    def load(cls, img: Any) -> DirtyBitmaps | None:
        """The bitmaps of an image being opened for writing (None: none to keep).
        A directory QEMU would refuse is an error here."""
        h = img.header
        if h.version < 3 or not h.autoclear_features & AUTOCLEAR_BITMAPS or \
                img.layout.bitmaps_ext is None:
            return None
        _ext, entries = read_directory(img.storage, img.layout.bitmaps_ext,
                                       h.autoclear_features, img.storage.size())
        fsize = img.storage.size()
        names = set()
        for ent in entries:
            if ent.name in names:
                raise FormatError(f"Duplicate bitmap name '{ent.name}' in the bitmap directory")
            names.add(ent.name)
            if supported(ent):
                validate_entry(ent, img.size, img.cluster_size, fsize)
        return cls(img, list(entries))

    def _entry(self, name: str) -> BitmapEntry:
        for ent in self.entries:
            if ent.name == name:
                return ent
        raise BitmapNotFoundError(f"Dirty bitmap '{name}' not found")

    def _usable(self, ent: BitmapEntry) -> bool:
        return ent.name in self.live or (supported(ent) and not ent.in_use)

    def _load_live(self, ent: BitmapEntry) -> None:
        if ent.name in self.live:
            return
        if not supported(ent):
            raise UnsupportedFeatureError(
                f"Bitmap '{ent.name}' has unsupported flags or extra data")
        if ent.in_use:
            raise CorruptImageError(
                f"Bitmap '{ent.name}' is inconsistent and cannot be used; "
                "remove it ('qcow2 bitmap --remove')")
        img = self.img
        cs = img.cluster_size
        table = read_table(img.storage, ent)
        bits = np.zeros(len(table) * cs, dtype=np.uint8)
        fsize = img.storage.size()
        for i, e in enumerate(table.tolist()):
            off = e & TABLE_OFFSET_MASK
            if off:
                if off % cs or off + cs > fsize:
                    raise FormatError(f"Bitmap '{ent.name}' table entry {i} is invalid")
                bits[i * cs : (i + 1) * cs] = np.frombuffer(img.storage.pread(cs, off), np.uint8)
            elif e & TABLE_ALL_ONES:
                bits[i * cs : (i + 1) * cs] = 0xFF
        self.live[ent.name] = _Live(bits, table)
        self.logical[ent.name] = ent.flags & ~FLAG_IN_USE

    def _retrack(self) -> None:
        self._track = [(lv.bits, lv.touched, self._entry(n).granularity_bits)
                       for n, lv in self.live.items() if self.logical[n] & FLAG_AUTO]

    # ------------------------------------------------------------------ tracking --
    def arm(self, names: tuple[str, ...] = ()) -> None:
        """Load every enabled bitmap (and names) and mark them in_use on disk."""
        self.img._check_writable()
        want = []
        for ent in self.entries:
            if ent.name in names or (ent.auto and ent.name not in self.live and
                                     not (ent.in_use and supported(ent))):
                want.append(ent)
        for ent in want:
            if ent.auto and not supported(ent):
                raise UnsupportedFeatureError(
                    f"Bitmap '{ent.name}' has unsupported flags or extra data: cannot "
                    "maintain it, so the image cannot be written")
            self._load_live(ent)
        self._retrack()
        flags = [(e.flags | FLAG_IN_USE) if e.name in self.live else e.flags
                 for e in self.entries]
        if flags != [e.flags for e in self.entries]:
            self._write_flags(flags)
        self.armed = True

    def mark(self, offset: int, length: int) -> None:
        """Guest range [offset, offset+length) is about to change (the write path)."""
        if self.hold:
            return
        if not self.armed:
            self.arm()
        size = self.img.size
        end = min(offset + length, size)
        if offset < 0 or end <= offset:
            return
        self.changed = True
        for bits, touched, gbits in self._track:
            _set_bits(bits, offset >> gbits, ((end - 1) >> gbits) + 1)
            touched[offset >> (gbits + SECTOR_BITS) : ((end - 1) >> (gbits + SECTOR_BITS)) + 1] = True

    @contextmanager
    def rewriting(self, new_size: int, whole: bool) -> Iterator[None]:
        """Around a change of the disk size (resize) or of all of its content (snapshot
        apply, whole=True): every bitmap that must follow is in_use on disk first; the
        bits are resized (and set everywhere, for whole) afterwards."""
        resize = new_size != self.img.size
        if resize:
            for ent in self.entries:
                if not self._usable(ent):
                    raise UnsupportedFeatureError(
                        f"Cannot resize: bitmap '{ent.name}' is inconsistent or unsupported; "
                        "remove it first ('qcow2 bitmap --remove')")
        self.arm(tuple(e.name for e in self.entries) if resize else ())
        self.hold = True
        try:
            yield
        finally:
            self.hold = False
            self._resize(self.img.size)
            if whole:
                self.mark(0, self.img.size)

    def _resize(self, size: int) -> None:
        cs = self.img.cluster_size
        for name, lv in self.live.items():
            ent = self._entry(name)
            n = table_entries(size, ent.granularity_bits, cs)
            if n == len(lv.table) and not len(lv.bits) < n * cs:
                granules = _granules(size, ent.granularity_bits)
            else:
                bits = np.zeros(n * cs, dtype=np.uint8)
                k = min(len(bits), len(lv.bits))
                bits[:k] = lv.bits[:k]
                table = np.zeros(n, dtype=np.uint64)
                m = min(n, len(lv.table))
                table[:m] = lv.table[:m]
                self._drop.extend(int(e) & TABLE_OFFSET_MASK for e in lv.table[m:].tolist())
                touched = np.zeros(n * cs // SECTOR, dtype=bool)
                k = min(len(touched), len(lv.touched))
                touched[:k] = lv.touched[:k]
                lv.bits, lv.table, lv.touched, lv.moved = bits, table, touched, True
                granules = _granules(size, ent.granularity_bits)
            # bits past the disk end are zero on disk
            if _clear_from(lv.bits, granules):
                lv.touched[min(granules >> SECTOR_BITS, len(lv.touched) - 1):] = True
                self.changed = True
            if lv.moved:
                self.changed = True
        self._retrack()

    # ------------------------------------------------------------------ storing --
    def store(self) -> None:
        """Write the live bitmaps back and clear their in_use flags (crash-safe, see the
        module docstring). Called by the image's flush, after its own."""
        if self.hold or not self.armed:
            return
        img = self.img
        rc = img.refcounts
        st = img.storage
        cs = img.cluster_size
        drop = self._drop
        new_dir = False
        # (1) new clusters first, their refcounts durable before anything points at them
        writes: list[tuple[int, bytes]] = []
        for name, lv in self.live.items():
            before = lv.table.copy()
            spc = cs // SECTOR
            for i in np.flatnonzero(lv.touched.reshape(-1, spc).any(axis=1)).tolist():
                chunk = lv.bits[i * cs : (i + 1) * cs]
                old = int(lv.table[i])
                off = old & TABLE_OFFSET_MASK
                if not chunk.any():
                    new = 0
                elif bool((chunk == 0xFF).all()) and \
                        (i + 1) * cs * 8 << self._entry(name).granularity_bits <= img.size:
                    new = TABLE_ALL_ONES  # a wholly dirty cluster takes no space
                else:
                    if not off:
                        off = rc.allocate_deferred(1)
                        writes.append((off, chunk.tobytes()))
                    else:  # in its cluster: the changed sectors only
                        for a, b in _true_runs(lv.touched[i * spc : (i + 1) * spc]):
                            writes.append((off + a * SECTOR,
                                           chunk[a * SECTOR : b * SECTOR].tobytes()))
                    new = off
                if old & TABLE_OFFSET_MASK and not new & TABLE_OFFSET_MASK:
                    drop.append(old & TABLE_OFFSET_MASK)
                lv.table[i] = new
            ent = self._entry(name)
            if lv.moved:
                if ent.table_offset and ent.table_size:
                    drop.extend(_clusters(ent.table_offset, ent.table_size * 8, cs))
                n = -(-len(lv.table) * 8 // cs)
                lv.table_offset = rc.allocate_deferred(n)
                writes.append((lv.table_offset, _be(lv.table) + bytes(n * cs - len(lv.table) * 8)))
                new_dir = True
            else:
                # in place: only the sectors of the table whose entries changed (data
                # rewritten in its cluster leaves its entry, and the table, as it was)
                idx = np.flatnonzero(before != lv.table)
                if len(idx):
                    lo = int(idx[0]) // 64 * 64  # (64 entries: one 512-byte sector)
                    hi = min(len(lv.table), (int(idx[-1]) // 64 + 1) * 64)
                    writes.append((ent.table_offset + lo * 8, _be(lv.table[lo:hi])))
        rc.commit()
        # (2) data and tables (in place only where the bitmap is in_use on disk)
        for off, data in writes:
            img._guard(off, len(data), "a bitmap")
            st.pwrite(data, off, "bitmap")
        if writes:
            st.sync()
        entries = []
        for ent in self.entries:
            lv = self.live.get(ent.name)
            if lv is None:
                entries.append(ent)
                continue
            if lv.moved:
                ent = replace(ent, table_offset=lv.table_offset, table_size=len(lv.table))
            entries.append(replace(ent, flags=self.logical[ent.name]))
        if new_dir:
            self._switch_directory(entries)
        else:
            self._write_flags([e.flags for e in entries])
        for lv in self.live.values():
            lv.touched[:] = False
            lv.moved = False
        self.armed = False
        self.changed = False
        self._release()

    def _release(self) -> None:
        drop = [c for c in self._drop if c]
        self._drop = []
        if drop:
            rc = self.img.refcounts
            rc.update(np.array(drop, dtype=np.int64) >> self.img.geo.cluster_bits, -1)
            rc.commit()
        self.img._overlap.invalidate()  # bitmap clusters moved or were freed

    def _write_new(self, data: bytes, rc: Any) -> int:
        cs = self.img.cluster_size
        n = -(-len(data) // cs)
        off = rc.allocate_deferred(n)
        self.img._guard(off, n * cs, "a bitmap")
        self.img.storage.pwrite(data + bytes(n * cs - len(data)), off, "bitmap")
        return int(off)

    def _write_flags(self, flags: list[int]) -> None:
        """The directory in place with only flags changed (each an aligned word)."""
        entries = [replace(e, flags=f) for e, f in zip(self.entries, flags, strict=True)]
        ext = BitmapsExtension.unpack(self.img.layout.bitmaps_ext)
        data = b"".join(e.pack() for e in entries)
        if len(data) != ext.directory_size:
            raise FormatError("Bitmap directory size does not match its entries")
        self.img._guard(ext.directory_offset, len(data), "the bitmap directory")
        self.img.storage.pwrite(data, ext.directory_offset, "bitmap")
        self.img.storage.sync()
        self.entries = entries

    def _switch_directory(self, entries: list[BitmapEntry]) -> None:
        """A new directory in new clusters, then the extension pointed at it; the old
        directory's clusters are released after that (by _release)."""
        img = self.img
        rc = img.refcounts
        cs = img.cluster_size
        old = BitmapsExtension.unpack(img.layout.bitmaps_ext) \
            if img.layout.bitmaps_ext is not None and \
            img.header.autoclear_features & AUTOCLEAR_BITMAPS else None
        if not entries:
            _remove_extension(img)
        else:
            data = b"".join(e.pack() for e in entries)
            if len(entries) > MAX_BITMAPS or len(data) > MAX_DIRECTORY_SIZE:
                raise InvalidArgumentError("Too many persistent bitmaps")
            off = self._write_new(data, rc)
            rc.commit()
            _put_extension(img, BitmapsExtension(len(entries), len(data), off))
        if old is not None and old.directory_size:
            self._drop.extend(_clusters(old.directory_offset, old.directory_size, cs))
        self.entries = entries

    # ------------------------------------------------------------------ queries --
    def listing(self) -> list[BitmapEntry]:
        """The bitmaps with the flags they are stored with (not our own in_use)."""
        return [replace(e, flags=self.logical[e.name]) if e.name in self.live else e
                for e in self.entries]

    def dirty_ranges(self, name: str) -> Iterator[tuple[int, int]]:
        ent = self._entry(name)
        if ent.name not in self.live:
            self._load_live(ent)
        bits = np.unpackbits(self.live[name].bits, bitorder="little")
        n = _granules(self.img.size, ent.granularity_bits)
        return runs(bits[:n].astype(bool), ent.granularity, self.img.size)

    # ------------------------------------------------------------------ management --
    def add(self, name: str, granularity: int | None = None, disabled: bool = False) -> None:
        img = self.img
        if not name:
            raise InvalidArgumentError("Bitmap name cannot be empty")
        if any(e.name == name for e in self.entries):
            raise InvalidArgumentError(f"Bitmap already exists: {name}")
        if granularity is None:
            granularity = max(4096, img.cluster_size)
        if granularity < 512 or granularity & (granularity - 1) or \
                granularity > 1 << MAX_GRANULARITY_BITS:
            raise InvalidArgumentError("Granularity must be power of 2 and at least 512")
        gbits = granularity.bit_length() - 1
        assert gbits >= MIN_GRANULARITY_BITS
        prefix = f"Can't make bitmap '{name}' persistent in '{img.path}': "
        if img.header.version < 3:
            raise UnsupportedFeatureError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
        if len(name.encode()) > MAX_NAME_SIZE:
            raise InvalidArgumentError(
                prefix + f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")
        cs = img.cluster_size
        n = table_entries(img.size, gbits, cs)
        if n * cs > MAX_PHYS_SIZE:
            raise InvalidArgumentError(
                prefix + "Too much space will be occupied by the bitmap. Use larger granularity")
        if len(self.entries) >= MAX_BITMAPS:
            raise InvalidArgumentError(prefix + "Too many persistent bitmaps")
        self.store()
        flags = 0 if disabled else FLAG_AUTO
        ent = BitmapEntry(0, n, flags, 1, gbits, name)
        self.live[name] = _Live(np.zeros(n * cs, dtype=np.uint8), np.zeros(n, dtype=np.uint64),
                                moved=True)
        self.logical[name] = flags
        self.entries = [*self.entries, replace(ent, flags=flags | FLAG_IN_USE)]
        self.armed = True
        self.store()

    def remove(self, name: str) -> None:
        ent = self._entry(name)
        self.store()
        lv = self.live.pop(name, None)
        self.logical.pop(name, None)
        cs = self.img.cluster_size
        table = lv.table if lv is not None else self._valid_table(ent)
        self._switch_directory([e for e in self.entries if e.name != name])
        self._retrack()
        if table is not None:  # (else its clusters leak, as QEMU leaves them)
            self._drop.extend(int(e) & TABLE_OFFSET_MASK for e in table.tolist())
            if ent.table_offset and ent.table_size:
                self._drop.extend(_clusters(ent.table_offset, ent.table_size * 8, cs))
        self._release()

    def _valid_table(self, ent: BitmapEntry) -> np.ndarray | None:
        """The table of a bitmap not loaded (in use, or of an unknown kind) when it and
        every entry of it are valid, so that its clusters can be freed as QEMU's
        removal frees them; None when anything is invalid (QEMU then frees nothing)."""
        cs = self.img.cluster_size
        fsize = self.img.storage.size()
        if not ent.table_size:
            return np.zeros(0, np.uint64)
        if ent.table_offset % cs or not ent.table_offset or ent.table_size > MAX_TABLE_SIZE \
                or ent.table_offset + ent.table_size * 8 > fsize:
            return None
        table = read_table(self.img.storage, ent)
        offs = table & np.uint64(TABLE_OFFSET_MASK)
        used = offs != 0
        if (table & np.uint64(TABLE_RESERVED_MASK)).any() or \
                (offs[used] % np.uint64(cs)).any() or \
                (offs[used] + np.uint64(cs) > np.uint64(fsize)).any() or \
                (used & ((table & np.uint64(TABLE_ALL_ONES)) != 0)).any():
            return None
        return table

    def _modify(self, name: str) -> _Live:
        ent = self._entry(name)
        if ent.in_use and ent.name not in self.live:
            raise CorruptImageError(
                f"Bitmap '{name}' is inconsistent and cannot be used\n"
                "Try block-dirty-bitmap-remove to delete this bitmap from disk")
        self.arm((name,))
        return self.live[name]

    def clear(self, name: str) -> None:
        lv = self._modify(name)
        lv.bits[:] = 0
        lv.touched[:] = True
        self.changed = True
        self.store()

    def set_enabled(self, name: str, enabled: bool) -> None:
        self._modify(name)
        f = self.logical[name]
        self.logical[name] = (f | FLAG_AUTO) if enabled else (f & ~FLAG_AUTO)
        self._retrack()
        self.store()

    def merge(self, name: str, source: Iterator[tuple[int, int]]) -> None:
        """Set in bitmap name every granule that a source run touches."""
        lv = self._modify(name)
        gbits = self._entry(name).granularity_bits
        size = self.img.size
        for off, n in source:
            end = min(off + n, size)
            if end > off:
                _set_bits(lv.bits, off >> gbits, ((end - 1) >> gbits) + 1)
                lv.touched[off >> (gbits + SECTOR_BITS) :
                           ((end - 1) >> (gbits + SECTOR_BITS)) + 1] = True
        self.changed = True
        self.store()


# ------------------------------------------------------------------ helpers --
def _be(table: np.ndarray) -> bytes:
    return table.astype(">u8").tobytes()


def _true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    m = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(m[1:] != m[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def _clusters(offset: int, nbytes: int, cs: int) -> list[int]:
    first = offset // cs
    return [c * cs for c in range(first, -(-(offset + nbytes) // cs))]


_LOW = [(1 << k) - 1 for k in range(9)]


def _set_bits(bits: np.ndarray, g0: int, g1: int) -> None:
    """Set granule bits [g0, g1) of a packed (LSB-first) array."""
    b0, b1 = g0 >> 3, g1 >> 3
    if b0 == b1:
        bits[b0] |= _LOW[g1 - g0] << (g0 & 7)
        return
    bits[b0] |= 0xFF & ~_LOW[g0 & 7]
    if b1 > b0 + 1:
        bits[b0 + 1 : b1] = 0xFF
    if g1 & 7:
        bits[b1] |= _LOW[g1 & 7]


def _clear_from(bits: np.ndarray, g: int) -> bool:
    """Clear every bit from granule g on; whether any was set."""
    b = g >> 3
    had = bool(bits[b + (1 if g & 7 else 0):].any())
    if g & 7 and b < len(bits):
        had |= bool(int(bits[b]) & (0xFF ^ _LOW[g & 7]))
        bits[b] &= _LOW[g & 7]
    bits[b + (1 if g & 7 else 0):] = 0
    return had


def _put_extension(img: Any, ext: BitmapsExtension) -> None:
    """Point the bitmaps extension at a new directory (in its place, or added after
    the others) with the auto-clear bit set, in one crash-safe switch of cluster 0
    (header.set_extension)."""
    auto = img.header.autoclear_features
    try:
        set_extension(img, EXT_BITMAPS, ext.pack(), autoclear_features=auto | AUTOCLEAR_BITMAPS)
    except UnsupportedFeatureError:
        if auto & AUTOCLEAR_BITMAPS:
            raise
        # a new extension where big unknown ones leave no room for the intermediate
        # layout: the extension first (void while the bit is clear: a crash leaves
        # leaked clusters), then the bit (one header write)
        set_extension(img, EXT_BITMAPS, ext.pack())
        img._update_header(autoclear_features=auto | AUTOCLEAR_BITMAPS)


def _remove_extension(img: Any) -> None:
    """No bitmaps left: the extension and the auto-clear bit go together (one
    crash-safe switch; the extensions after it move up)."""
    try:
        set_extension(img, EXT_BITMAPS, None,
                      autoclear_features=img.header.autoclear_features & ~AUTOCLEAR_BITMAPS)
    except UnsupportedFeatureError:
        # unknown extensions too big to move crash-safely: the auto-clear bit alone
        # (one header write) voids the extension, which QEMU drops on its next
        # read-write open
        img._update_header(autoclear_features=img.header.autoclear_features & ~AUTOCLEAR_BITMAPS)


# ------------------------------------------------------------------ image glue --
def open_for_writing(img: Any) -> None:
    """Called on a read-write open: img._dirty, the auto-clear bits we cannot keep
    (all but the bitmaps bit, while we maintain the bitmaps) cleared, and a void
    bitmaps extension (its auto-clear bit clear) dropped."""
    img._dirty = DirtyBitmaps.load(img)
    keep = AUTOCLEAR_BITMAPS if img._dirty is not None else 0
    h = img.header
    if img.layout.bitmaps_ext is not None and not h.autoclear_features & AUTOCLEAR_BITMAPS:
        # a program without bitmap support wrote the image (or a v2 image kept the
        # extension): the bitmaps are void, and QEMU drops the extension on a
        # read-write open (their clusters leak, for check -r); so do we, crash-safely
        try:
            set_extension(img, EXT_BITMAPS, None, autoclear_features=h.autoclear_features & keep)
            return
        except UnsupportedFeatureError:
            pass  # (no room to move the extensions after it crash-safely: it stays void)
    if h.autoclear_features & ~keep:
        img._update_header(autoclear_features=h.autoclear_features & keep)


def tracker(img: Any) -> DirtyBitmaps:
    """The image's bitmaps, for an operation that adds one (created when absent)."""
    img._check_writable()
    if img._dirty is None:
        if img.header.version < 3:
            raise UnsupportedFeatureError("Cannot store dirty bitmaps in qcow2 v2 files")
        img._dirty = DirtyBitmaps(img, [])
    return img._dirty


@contextmanager
def rewriting(img: Any, new_size: int, whole: bool = False) -> Iterator[None]:
    """Context for resize (whole=False) and snapshot apply (whole=True)."""
    d = img._dirty
    if d is None:
        yield
        return
    with d.rewriting(new_size, whole):
        yield


def listing(img: Any) -> list[BitmapEntry]:
    d = getattr(img, "_dirty", None)
    if d is not None:
        return d.listing()
    return read_directory(img.storage, img.layout.bitmaps_ext, img.header.autoclear_features,
                          img.storage.size())[1]


__all__ = ["BitmapNotFoundError", "DirtyBitmaps", "Qcow2Error", "listing", "open_for_writing",
           "rewriting", "tracker"]


class BitmapKeeper:
    """The Image's bitmap API (persistent dirty bitmaps, as `qemu-img bitmap`): Image
    holds one and delegates its bitmap methods to it."""

    def __init__(self, img: Any) -> None:
        self._img = img

    @property
    def bitmaps(self) -> list[BitmapEntry]:
        """Persistent dirty bitmaps (bitmaps.BitmapEntry: name, granularity, flags)."""
        return listing(self._img)

    def dirty_ranges(self, name: str) -> Iterator[tuple[int, int]]:
        """(offset, length) runs of guest data marked dirty in bitmap name."""
        if self._img._dirty is not None:
            return self._img._dirty.dirty_ranges(name)
        from .bitmaps import dirty_ranges

        return dirty_ranges(self._img, name)

    def add_bitmap(self, name: str, granularity: int | None = None, *,
                   disabled: bool = False) -> None:
        """Add an empty persistent bitmap (enabled unless disabled; granularity by
        default the cluster size, at least 4 KiB, as qemu-img's)."""
        tracker(self._img).add(name, granularity, disabled)

    def remove_bitmap(self, name: str) -> None:
        tracker(self._img).remove(name)

    def clear_bitmap(self, name: str) -> None:
        tracker(self._img).clear(name)

    def enable_bitmap(self, name: str) -> None:
        tracker(self._img).set_enabled(name, True)

    def disable_bitmap(self, name: str) -> None:
        tracker(self._img).set_enabled(name, False)

    def merge_bitmap(self, name: str, source: str, source_image: Any = None) -> None:
        """Set in bitmap name every granule dirty in bitmap source (of this image, or
        of source_image)."""
        d = tracker(self._img)
        d._entry(name)
        src = self._img if source_image is None else source_image
        if src.size != self._img.size:  # (QEMU's rule: same size)
            raise InvalidArgumentError("Bitmaps are incompatible and can't be merged")
        d.merge(name, list(src.dirty_ranges(source)))


# ------------------------------------------------------------------ NBD export --
class BitmapView:
    """Block status of one bitmap for an export (qemu:dirty-bitmap:NAME): the bits of
    a writable image are its live ones (kept current by its writes), a read-only
    image's are read once."""

    def __init__(self, img: Any, name: str) -> None:
        ent = next((e for e in listing(img) if e.name == name), None)
        if ent is None:
            raise BitmapNotFoundError(f"Bitmap '{name}' is not found")
        if ent.in_use and (img._dirty is None or name not in img._dirty.live):
            raise CorruptImageError(
                f"Bitmap '{name}' is inconsistent and cannot be used\n"
                "Try block-dirty-bitmap-remove to delete this bitmap from disk")
        if not supported(ent):
            raise UnsupportedFeatureError(f"Bitmap '{name}' has unsupported flags or data")
        self.img = img
        self.name = name
        self.gbits = ent.granularity_bits
        self._bits: np.ndarray | None = None
        if img._dirty is None:
            from .bitmaps import read_bits

            bits = read_bits(img.storage, ent, img.size, img.cluster_size, img.storage.size())
            self._bits = np.packbits(bits, bitorder="little")

    def _packed(self) -> np.ndarray:
        if self._bits is not None:
            return self._bits
        d = self.img._dirty
        if self.name not in d.live:
            d._load_live(d._entry(self.name))
        return d.live[self.name].bits

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, 1 if dirty else 0) descriptors covering [offset, offset+length)."""
        end = min(offset + length, self.img.size)
        if end <= offset:
            return []
        g0, g1 = offset >> self.gbits, ((end - 1) >> self.gbits) + 1
        packed = self._packed()
        bits = np.unpackbits(packed[g0 >> 3 : (g1 + 7) >> 3], bitorder="little")
        bits = bits[g0 & 7 : (g0 & 7) + g1 - g0].view(bool)
        edges = np.flatnonzero(np.diff(bits.view(np.int8))) + 1
        out = []
        pos = offset
        starts = [0, *edges.tolist()]
        for i, s in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else len(bits)
            hi = min(end, (g0 + stop) << self.gbits)
            out.append((hi - pos, int(bits[s])))
            pos = hi
        return out
