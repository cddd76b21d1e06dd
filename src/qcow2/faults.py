"""Storage backends for testing durability: in memory, recording, fault-injecting.

They plug into `Storage` (the only path for image I/O) through `qcow2.open(...,
backend=...)`:

* `MemoryBackend` holds an image file in a bytearray (fast crash-state checks).
* `RecordingBackend` passes everything to an inner backend and records the sequence of
  writes, truncates and syncs, from which a crash simulator builds the file states a
  power cut could leave behind.
* `FaultBackend` fails the Nth write or sync with an errno (EIO, ENOSPC...), once or
  from then on, as QEMU's blkdebug does for iotests 026.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .storage import Backend

# Recorded operation kinds
WRITE, SYNC, TRUNCATE, MARK = "write", "sync", "truncate", "mark"


class MemoryBackend:
    """An image file held in memory. Reads past the end return short, like a file."""

    def __init__(self, data: bytes | bytearray | memoryview = b"", path: str = "<memory>") -> None:
        self.data = bytearray(data)
        self.path = path
        self.closed = False

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        done = 0
        for b in buffers:
            chunk = self.data[offset + done : offset + done + len(b)]
            b[: len(chunk)] = chunk
            done += len(chunk)
            if len(chunk) < len(b):
                break
        return done

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        n = len(data)
        end = offset + n
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data
        return n

    def pwritev(self, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        done = 0
        for b in buffers:
            done += self.pwrite(b, offset + done)
        return done

    def sync(self) -> None:
        pass

    def truncate(self, length: int) -> None:
        if length < len(self.data):
            del self.data[length:]
        else:
            self.data.extend(bytes(length - len(self.data)))

    def size(self) -> int:
        return len(self.data)

    def close(self) -> None:
        self.closed = True


@dataclass
class Op:
    """One recorded operation. For WRITE, data holds the bytes; for TRUNCATE, offset is
    the new length; for MARK, payload is whatever the caller attached."""

    kind: str
    offset: int = 0
    data: bytes = b""
    payload: Any = None


@dataclass
class Recording:
    """The operation log of a RecordingBackend (shared, so it outlives the backend)."""

    ops: list[Op] = field(default_factory=list)

    def mark(self, payload: Any) -> None:
        self.ops.append(Op(MARK, payload=payload))

    @property
    def writes(self) -> int:
        return sum(1 for o in self.ops if o.kind == WRITE)

    @property
    def syncs(self) -> int:
        return sum(1 for o in self.ops if o.kind == SYNC)


class _PassThrough:
    """A backend that hands every operation to `inner`; the wrappers below override
    what they watch. (Write-back hints are not passed on: they are not operations a
    crash or a fault model needs, and the real file is not under them.)"""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.path = getattr(inner, "path", "<image>")

    def pread(self, length: int, offset: int) -> bytes:
        return self.inner.pread(length, offset)

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        return self.inner.preadv(buffers, offset)

    def size(self) -> int:
        return self.inner.size()

    def allocated_bytes(self) -> int:
        fn = getattr(self.inner, "allocated_bytes", None)
        return int(fn()) if fn else self.inner.size()

    def close(self) -> None:
        self.inner.close()


class RecordingBackend(_PassThrough):
    """Passes every operation to `inner` and appends writes, truncates and syncs (in
    program order) to `recording.ops`. Operations that fail are not recorded."""

    def __init__(self, inner: Backend, recording: Recording | None = None) -> None:
        super().__init__(inner)
        self.recording = recording if recording is not None else Recording()

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        n = self.inner.pwrite(data, offset)
        self.recording.ops.append(Op(WRITE, offset, bytes(data[:n])))
        return n

    def pwritev(self, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        n = self.inner.pwritev(buffers, offset)
        self.recording.ops.append(Op(WRITE, offset, b"".join(bytes(b) for b in buffers)[:n]))
        return n

    def sync(self) -> None:
        self.inner.sync()
        self.recording.ops.append(Op(SYNC))

    def truncate(self, length: int) -> None:
        self.inner.truncate(length)
        self.recording.ops.append(Op(TRUNCATE, length))


class FaultBackend(_PassThrough):
    """Passes operations to `inner`, failing the `fail_write`-th write (1-based, a
    pwritev counts once) and/or the `fail_sync`-th sync with OSError(err). With sticky,
    every later write and sync fails too (a device that went away); otherwise the
    fault fires once. A failed write changes nothing in the file."""

    def __init__(self, inner: Backend, *, fail_write: int | None = None,
                 fail_sync: int | None = None, err: int = errno.EIO,
                 sticky: bool = False) -> None:
        super().__init__(inner)
        self.fail_write = fail_write
        self.fail_sync = fail_sync
        self.err = err
        self.sticky = sticky
        self.writes = 0
        self.syncs = 0
        self.tripped = 0  # faults raised so far

    def _fail(self) -> None:
        self.tripped += 1
        raise OSError(self.err, os.strerror(self.err))

    def _should_fail(self, count: int, target: int | None) -> bool:
        if self.sticky and self.tripped:
            return True
        return target is not None and count == target

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        self.writes += 1
        if self._should_fail(self.writes, self.fail_write):
            self._fail()
        return self.inner.pwrite(data, offset)

    def pwritev(self, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        self.writes += 1
        if self._should_fail(self.writes, self.fail_write):
            self._fail()
        return self.inner.pwritev(buffers, offset)

    def sync(self) -> None:
        self.syncs += 1
        if self._should_fail(self.syncs, self.fail_sync):
            self._fail()
        self.inner.sync()

    def truncate(self, length: int) -> None:
        if self.sticky and self.tripped:
            self._fail()
        self.inner.truncate(length)
