"""The storage layer: every byte of image I/O and every sync passes through here.

A Storage wraps a backend (a real file by default). Tests substitute backends that
record the write/sync sequence (crash simulation) or inject faults (EIO, ENOSPC).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from .errors import Qcow2Error, Qcow2IOError


class Backend(Protocol):
    def pread(self, length: int, offset: int) -> bytes: ...
    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int: ...
    def pwrite(self, data: bytes | memoryview, offset: int) -> int: ...
    def pwritev(self, buffers: Sequence[bytes | memoryview], offset: int) -> int: ...
    def sync(self) -> None: ...
    def truncate(self, length: int) -> None: ...
    def size(self) -> int: ...
    def close(self) -> None: ...


def _find_sync_file_range() -> Any:
    """libc's sync_file_range(2) (Linux only), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # on first use: reading an image (qcow2 info) does not need it

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range: Any = False  # not looked up yet
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing a range of a file to the disk now, without
    waiting (sync_file_range WRITE): a hint, not a barrier; it makes nothing durable.
    False where the system has no such call."""
    global _sync_file_range
    if _sync_file_range is False:
        _sync_file_range = _find_sync_file_range()
    if _sync_file_range is None:
        return False
    _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
    return True


# madvise(MADV_POPULATE_READ) (Linux 5.14): reads the pages in and says so when it cannot
# (an I/O error), where a plain mapping would kill the process with SIGBUS on access
_POPULATE_READ: int | None = getattr(mmap, "MADV_POPULATE_READ", 22) \
    if sys.platform.startswith("linux") else None


def map_for_reading(fd: int, host: int, n: int) -> memoryview | None:
    """The file's bytes [host, host + n) mapped (read-only, read in by one call), or
    None where that cannot be done (then read() copies them, and reports an I/O error
    as an error). Reading through the mapping saves copying the data into a buffer: the
    zero test looks at the page cache itself, and the writer copies from it. The
    mapping goes away with the last view of it (after the writer is done)."""
    global _POPULATE_READ
    if _POPULATE_READ is None:
        return None
    start = host - host % mmap.ALLOCATIONGRANULARITY
    try:
        mm = mmap.mmap(fd, host + n - start, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                       offset=start)
    except (OSError, ValueError, OverflowError):
        return None
    try:
        mm.madvise(_POPULATE_READ)
    except OSError as exc:
        mm.close()
        if exc.errno == errno.EINVAL:  # an older kernel: no mappings from now on
            _POPULATE_READ = None
        return None
    return memoryview(mm)[host - start : host - start + n]


def open_file(path: str, flags: int, mode: int = 0o644) -> int:
    """os.open for image and backing files: only regular files and block devices. The
    open is non-blocking (a FIFO would otherwise wait for a writer forever) and the
    file type is checked on the descriptor (fstat), so nothing can swap it in between."""
    fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise Qcow2Error(f"Could not open '{path}': {what} (only regular files and "
                             "block devices hold images)")
        # back to blocking I/O: O_NONBLOCK only served the open itself
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sync_directory(path: str) -> None:
    """Make a rename or a new name in directory path durable (best effort: a directory
    that cannot be opened or synced is left alone)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_size(fd: int) -> int:
    """Size of a regular file or of a block device (whose st_size is 0)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


class FileBackend:
    """A host file accessed with os.pread/os.pwrite(v) and synced with fdatasync."""

    def __init__(self, path: str | os.PathLike[str], writable: bool, create: bool = False) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        self.path = os.fspath(path)
        self.fd = open_file(self.path, flags, 0o644)

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        return os.preadv(self.fd, buffers, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    def pwritev(self, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        return os.pwritev(self.fd, buffers, offset)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def sync_ahead(self) -> None:
        os.fdatasync(self.fd)

    def start_writeback(self, offset: int, length: int) -> None:
        start_writeback(self.fd, offset, length)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def size(self) -> int:
        return file_size(self.fd)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class UnorderedFileBackend(FileBackend):
    """A FileBackend synced once, when it is closed: for a file that nobody can see
    until it is complete (convert writes a new image under a temporary name and renames
    it once closed), the syncs that order metadata after data protect nothing; the one
    at the end makes it all durable before the rename."""

    def sync(self) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                raise _io_error(exc, "Sync") from None
            finally:
                super().close()


@dataclass
class Stats:
    """Counters since open: writes by kind (count and bytes) and syncs."""

    data_writes: int = 0
    l1_writes: int = 0
    l2_writes: int = 0
    refcount_writes: int = 0
    header_writes: int = 0
    snapshot_table_writes: int = 0
    bitmap_writes: int = 0
    data_writes_bytes: int = 0
    l1_writes_bytes: int = 0
    l2_writes_bytes: int = 0
    refcount_writes_bytes: int = 0
    header_writes_bytes: int = 0
    snapshot_table_writes_bytes: int = 0
    bitmap_writes_bytes: int = 0
    syncs: int = 0
    reads: int = 0
    reads_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def copy(self) -> Stats:
        return Stats(**self.as_dict())

    def __sub__(self, other: Stats) -> Stats:
        return Stats(**{k: v - getattr(other, k) for k, v in self.as_dict().items()})


def _io_error(exc: OSError, what: str) -> Qcow2IOError:
    err = exc.errno or errno.EIO
    return Qcow2IOError(err, f"{what} failed: {os.strerror(err)}")


# Largest run of guest data writes merged in memory before it goes to the file.
COMBINE_MAX = 1 << 20
# Data written in pieces at least this large has its write-back started at once
# ("flush behind", as PostgreSQL's *_flush_after and RocksDB's bytes_per_sync do): the
# disk works while we go on, and the next sync has little left to wait for.
WRITEBACK_MIN = 256 << 10


class Storage:
    """Typed, counted, error-wrapped access to an image file.

    Guest data writes that continue or overwrite the previous one are combined in a
    small buffer (at most COMBINE_MAX bytes) and reach the file as one write: 4 KiB
    guest writes into a 64 KiB cluster cost one system call, not sixteen (scattered
    writes, which nothing joins, go straight to the file instead). The buffer
    goes to the file before every sync (so flush() covers it and ordering barriers
    see it), before another write that overlaps it, and on close; reads see it. If
    that write fails, the buffer is kept and the error raised; a later attempt (the
    next write or sync) retries it.
    """

    def __init__(self, backend: Backend, writable: bool, combine: bool = True) -> None:
        self.backend = backend
        self.writable = writable
        self.stats = Stats()
        self._size: int | None = None
        # Writes since the last successful sync (all kinds / guest data only): metadata
        # that must not reach the disk before them is written after a sync (ordering).
        self.unsynced_writes = 0
        self.unsynced_data_writes = 0
        self.combine = combine
        # Combined data not yet written: _wb is the buffer while a run is held (None
        # otherwise), its first _wb_len bytes the data for [_wb_off, _wb_off + _wb_len).
        # One buffer of COMBINE_MAX bytes is reused: growing a fresh one costs page
        # faults and reallocations many times the copy itself.
        self._wb: bytearray | None = None
        self._wb_buf: bytearray | None = None
        self._wb_off = 0
        self._wb_len = 0
        self._wb_merged = False  # whether a second write joined the buffered one
        # After a buffered write that nothing joined, writes go straight to the file
        # (scattered small writes gain nothing from a copy) until one continues the last.
        self._scattered = False
        self._last_end = -1
        self._start_writeback = getattr(backend, "start_writeback", None)
        # meta_guard(offset, length, kind) raises instead of a metadata write onto other
        # metadata (overlap.py); guest data is guarded by the write path, off this layer
        self.meta_guard: Any = None

    @property
    def name(self) -> str:
        return getattr(self.backend, "path", "<image>")

    def pread(self, length: int, offset: int) -> bytes:
        self.stats.reads += 1
        self.stats.reads_bytes += length
        try:
            data = self.backend.pread(length, offset)
        except OSError as exc:
            raise _io_error(exc, "Read") from exc
        if len(data) < length:  # past EOF reads as zeros, as for a sparse file
            data = data + bytes(length - len(data))
        if self._wb is not None and self._overlaps(offset, length):
            out = bytearray(data)
            self._overlay([memoryview(out)], offset)
            return bytes(out)
        return data

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> None:
        """Fill buffers from offset; the part past EOF is zero-filled."""
        total = sum(len(b) for b in buffers)
        self._preadv(buffers, offset, total)
        if self._wb is not None and self._overlaps(offset, total):
            self._overlay(buffers, offset)

    def _preadv(self, buffers: Sequence[memoryview], offset: int, total: int) -> None:
        self.stats.reads += 1
        self.stats.reads_bytes += total
        try:
            got = self.backend.preadv(buffers, offset)
        except OSError as exc:
            raise _io_error(exc, "Read") from exc
        if got < total:
            for b in buffers:
                if got >= len(b):
                    got -= len(b)
                    continue
                b[got:] = bytes(len(b) - got)
                got = 0

    def pwrite(self, data: bytes | memoryview, offset: int, kind: str) -> None:
        n = len(data)
        if kind == "data" and self.combine and n < COMBINE_MAX and (
                not self._scattered or offset == self._last_end):
            # (the hot path of small guest writes: kept free of calls)
            wb = self._wb
            if wb is not None:
                rel = offset - self._wb_off
                if 0 <= rel <= self._wb_len and rel + n <= COMBINE_MAX:
                    wb[rel : rel + n] = data  # overwrite and/or extend the buffered run
                    if rel + n > self._wb_len:
                        self._wb_len = rel + n
                    self._wb_merged = True
                else:
                    # nothing joined the buffered write and this one does not either:
                    # scattered writes; the next ones go straight to the file
                    scattered = not self._wb_merged
                    self._drain()
                    if scattered:
                        self._scattered = True
                        self._write_data(data, offset, n)
                        return
                    self._hold(data, offset, n)
            else:
                self._hold(data, offset, n)
            self._scattered = False
            # counted as unsynced now; the file write is counted when the buffer goes out
            self.unsynced_writes += 1
            self.unsynced_data_writes += 1
            size = self._size
            if size is not None and offset + n > size:
                self._size = offset + n
            return
        if self._wb is not None and (kind == "data" or self._overlaps(offset, n)):
            self._drain()
        if kind == "data":
            self._write_data(data, offset, n)
            return
        if self.meta_guard is not None:
            self.meta_guard(offset, n, kind)
        self._count(kind, n)
        self.unsynced_writes += 1
        self._checked(self.backend.pwrite, data, offset, n)
        self._grew(offset + n)

    def pwritev(self, buffers: Sequence[bytes | memoryview], offset: int, kind: str) -> None:
        total = sum(len(b) for b in buffers)
        if kind != "data" and self.meta_guard is not None:
            self.meta_guard(offset, total, kind)
        if self._wb is not None and (kind == "data" or self._overlaps(offset, total)):
            self._drain()
        self._count(kind, total)
        self.unsynced_writes += 1
        if kind == "data":
            self.unsynced_data_writes += 1
        self._checked(self.backend.pwritev, buffers, offset, total)
        if kind == "data":
            self._last_end = offset + total
            if total >= WRITEBACK_MIN and self._start_writeback is not None:
                self._start_writeback(offset, total)
        self._grew(offset + total)

    def sync(self) -> None:
        if self._wb is not None:
            self._drain()
        self.stats.syncs += 1
        try:
            self.backend.sync()
        except OSError as exc:
            raise _io_error(exc, "Sync") from exc
        self.unsynced_writes = self.unsynced_data_writes = 0

    def sync_ahead(self) -> None:
        """Sync what the file already holds, from any thread, while the image goes on
        being used: it drains nothing and orders nothing, so it is no durability point of
        the image's; it leaves the next sync() little to do (the NBD server runs it
        before a FLUSH's Image.flush, off the lock). Backends without a file skip it."""
        fn = getattr(self.backend, "sync_ahead", None)
        if fn is None:
            return
        self.stats.syncs += 1
        try:
            fn()
        except OSError as exc:
            raise _io_error(exc, "Sync") from exc

    def truncate(self, length: int) -> None:
        if self._wb is not None:
            self._drain()
        try:
            self.backend.truncate(length)
        except OSError as exc:
            raise _io_error(exc, "Truncate") from exc
        self._size = length

    def size(self) -> int:
        if self._size is None:
            try:
                self._size = self.backend.size()
            except OSError as exc:
                raise _io_error(exc, "Stat") from exc
            if self._wb is not None:
                self._size = max(self._size, self._wb_off + self._wb_len)
        return self._size

    def allocated_bytes(self) -> int:
        if self._wb is not None:
            self._drain()
        fn = getattr(self.backend, "allocated_bytes", None)
        return int(fn()) if fn else self.size()

    def close(self) -> None:
        try:
            if self._wb is not None:
                self._drain()  # unflushed data still goes to the file (not made durable)
        except Qcow2Error:
            pass  # closing after a failure: the caller already has an error
        finally:
            self._wb = self._wb_buf = None
            self.backend.close()

    # -- internals ---------------------------------------------------------------------
    def _overlaps(self, offset: int, length: int) -> bool:
        assert self._wb is not None
        return offset < self._wb_off + self._wb_len and self._wb_off < offset + length

    def _overlay(self, buffers: Sequence[memoryview], offset: int) -> None:
        """Copy the buffered data over what was read from the file (read your writes)."""
        wb = self._wb
        assert wb is not None
        lo, hi = self._wb_off, self._wb_off + self._wb_len
        pos = offset
        for b in buffers:
            s, e = max(pos, lo), min(pos + len(b), hi)
            if s < e:
                b[s - pos : e - pos] = wb[s - lo : e - lo]
            pos += len(b)

    def _drain(self) -> None:
        """Write the combined data out. On failure it stays buffered (to be retried)."""
        wb = self._wb
        assert wb is not None
        off = self._wb_off
        n = self._wb_len
        s = self.stats
        s.data_writes += 1
        s.data_writes_bytes += n
        self._checked(self.backend.pwrite, memoryview(wb)[:n], off, n)
        self._wb = None
        self._wb_merged = False
        self._last_end = off + n
        if n >= WRITEBACK_MIN and self._start_writeback is not None:
            self._start_writeback(off, n)

    def _hold(self, data: bytes | memoryview, offset: int, n: int) -> None:
        """Start a combined run with data (the buffer must not be holding one)."""
        buf = self._wb_buf
        if buf is None:
            buf = self._wb_buf = bytearray(COMBINE_MAX)
        buf[:n] = data
        self._wb = buf
        self._wb_off = offset
        self._wb_len = n

    def _write_data(self, data: bytes | memoryview, offset: int, n: int) -> None:
        """A guest data write straight to the file."""
        s = self.stats
        s.data_writes += 1
        s.data_writes_bytes += n
        self.unsynced_writes += 1
        self.unsynced_data_writes += 1
        # (_checked inlined: this is every scattered small guest write)
        try:
            done = self.backend.pwrite(data, offset)
        except OSError as exc:
            raise _io_error(exc, "Write") from exc
        if done != n:
            raise Qcow2IOError(errno.ENOSPC, "Write failed: short write")
        end = self._last_end = offset + n
        if self._size is not None and end > self._size:
            self._size = end

    @staticmethod
    def _checked(write: Any, data: Any, offset: int, n: int) -> None:
        """One backend write: OS errors become Qcow2IOError, a short write ENOSPC."""
        try:
            done = write(data, offset)
        except OSError as exc:
            raise _io_error(exc, "Write") from exc
        if done != n:
            raise Qcow2IOError(errno.ENOSPC, "Write failed: short write")

    def _count(self, kind: str, nbytes: int) -> None:
        s = self.stats
        if kind == "data":
            s.data_writes += 1
            s.data_writes_bytes += nbytes
            return
        setattr(s, kind + "_writes", getattr(s, kind + "_writes") + 1)
        setattr(s, kind + "_writes_bytes", getattr(s, kind + "_writes_bytes") + nbytes)

    def _grew(self, end: int) -> None:
        if self._size is not None and end > self._size:
            self._size = end
