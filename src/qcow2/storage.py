"""The storage layer: every byte of image I/O and every sync passes through here.

A Storage wraps a backend (a real file by default). Tests substitute backends that
record the write/sync sequence (crash simulation) or inject faults (EIO, ENOSPC).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from .errors import Qcow2IOError

WRITE_KINDS = ("data", "l1", "l2", "refcount", "header", "snapshot_table")


class Backend(Protocol):
    def pread(self, length: int, offset: int) -> bytes: ...
    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int: ...
    def pwrite(self, data: bytes | memoryview, offset: int) -> int: ...
    def pwritev(self, buffers: Sequence[bytes | memoryview], offset: int) -> int: ...
    def sync(self) -> None: ...
    def truncate(self, length: int) -> None: ...
    def size(self) -> int: ...
    def close(self) -> None: ...


class FileBackend:
    """A host file accessed with os.pread/os.pwrite(v) and synced with fdatasync."""

    def __init__(self, path: str | os.PathLike[str], writable: bool, create: bool = False) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        self.path = os.fspath(path)
        self.fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)

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

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Stats:
    """Counters since open: writes by kind (count and bytes) and syncs."""

    data_writes: int = 0
    l1_writes: int = 0
    l2_writes: int = 0
    refcount_writes: int = 0
    header_writes: int = 0
    snapshot_table_writes: int = 0
    data_writes_bytes: int = 0
    l1_writes_bytes: int = 0
    l2_writes_bytes: int = 0
    refcount_writes_bytes: int = 0
    header_writes_bytes: int = 0
    snapshot_table_writes_bytes: int = 0
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


class Storage:
    """Typed, counted, error-wrapped access to an image file."""

    def __init__(self, backend: Backend, writable: bool) -> None:
        self.backend = backend
        self.writable = writable
        self.stats = Stats()
        self._size: int | None = None

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
        return data

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> None:
        """Fill buffers from offset; the part past EOF is zero-filled."""
        total = sum(len(b) for b in buffers)
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
        self._count(kind, len(data))
        try:
            done = self.backend.pwrite(data, offset)
        except OSError as exc:
            raise _io_error(exc, "Write") from exc
        if done != len(data):
            raise Qcow2IOError(errno.ENOSPC, "Write failed: short write")
        self._grew(offset + len(data))

    def pwritev(self, buffers: Sequence[bytes | memoryview], offset: int, kind: str) -> None:
        total = sum(len(b) for b in buffers)
        self._count(kind, total)
        try:
            done = self.backend.pwritev(buffers, offset)
        except OSError as exc:
            raise _io_error(exc, "Write") from exc
        if done != total:
            raise Qcow2IOError(errno.ENOSPC, "Write failed: short write")
        self._grew(offset + total)

    def sync(self) -> None:
        self.stats.syncs += 1
        try:
            self.backend.sync()
        except OSError as exc:
            raise _io_error(exc, "Sync") from exc

    def truncate(self, length: int) -> None:
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
        return self._size

    def allocated_bytes(self) -> int:
        fn = getattr(self.backend, "allocated_bytes", None)
        return int(fn()) if fn else self.size()

    def close(self) -> None:
        self.backend.close()

    def _count(self, kind: str, nbytes: int) -> None:
        s = self.stats
        setattr(s, kind + "_writes", getattr(s, kind + "_writes") + 1)
        setattr(s, kind + "_writes_bytes", getattr(s, kind + "_writes_bytes") + nbytes)

    def _grew(self, end: int) -> None:
        if self._size is not None and end > self._size:
            self._size = end
