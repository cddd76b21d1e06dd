"""An NBD server on asyncio: qcow2 images, their snapshots and raw files as NBD exports.

Protocol: fixed newstyle handshake (EXPORT_NAME, INFO, GO, LIST, ABORT, STRUCTURED_REPLY,
LIST/SET_META_CONTEXT with base:allocation, qemu:allocation-depth (-A) and
qemu:dirty-bitmap:NAME (-B); STARTTLS and unknown
options are refused), then READ (structured replies with hole chunks), WRITE (+FUA), FLUSH,
TRIM, WRITE_ZEROES (+NO_HOLE, +FAST_ZERO), BLOCK_STATUS, CACHE and DISC, with plain replies
for clients that do not ask for structured ones.

Threading: the image object is not thread-safe, so one thread at a time uses it, under
an asyncio lock per image object. Reads, writes, zeroing, trims and block status run on
the event loop's thread, synchronously, while they hold the lock (no await in between,
so a request can only be cancelled at an await, never half way through an image
operation). A flush (FLUSH, or a FUA request) does not block the loop: first one
fdatasync of the image file runs in a worker thread without the lock (the bulk of the
dirty pages reaches the disk while the image goes on serving every connection), then
Image.flush() runs in a worker thread holding the lock (its ordered syncs now have
little left to write). All connections share one image object, so a FLUSH on one
connection covers writes acknowledged on every other: multi-conn is advertised.

Memory per client is bounded: a request carries at most MAX_BLOCK bytes (larger writes are
read in pieces, thrown away and refused), option data at most MAX_OPTION bytes, block
status at most MAX_EXTENTS descriptors, and replies are drained before the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backing import probe_format
from .cluster import UNALLOCATED, ZERO
from .errors import InvalidArgumentError, NoSpaceError, Qcow2Error, ReadOnlyError
from .mapping import guest_size, image_map

if TYPE_CHECKING:
    from .storage import Storage

log = logging.getLogger("qcow2.nbd")

# ------------------------------------------------------------------ protocol constants --
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option replies
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server) and client flags
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
_CMD_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

CHUNK_FLAG_DONE = 1
CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = (1 << 15) + 1

STATE_HOLE = 1
STATE_ZERO = 2

CONTEXT_ALLOCATION = "base:allocation"
CONTEXT_DEPTH = "qemu:allocation-depth"

# the errno values the protocol knows (others are sent as EIO)
_NBD_ERRNOS = {errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
               errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN}
if hasattr(errno, "EOPNOTSUPP"):
    _NBD_ERRNOS.add(errno.EOPNOTSUPP)
_ERRNO_ALIASES = {errno.EDQUOT: errno.ENOSPC, errno.EFBIG: errno.ENOSPC}

MAX_BLOCK = 32 << 20  # largest READ/WRITE payload (as qemu-nbd's NBD_MAX_BUFFER_SIZE)
MAX_OPTION = 64 << 10  # largest option payload kept in memory
MAX_STRING = 4096  # export names, descriptions, context names (NBD_MAX_STRING_SIZE)
MAX_EXTENTS = 1 << 16  # descriptors in one block status reply
DEFAULT_PORT = 10809
SNDBUF = 4 << 20  # socket send buffer asked for each client

_REQ = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_OPT_REPLY = struct.Struct(">QIII")


class NBDError(Qcow2Error):
    """A request that gets an errno back; the connection stays usable."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class _Disconnect(Exception):
    """The connection must end (protocol violation, ABORT, DISC)."""


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, NBDError):
        return exc.errno
    if isinstance(exc, ReadOnlyError):
        return errno.EPERM
    if isinstance(exc, InvalidArgumentError):
        return errno.EINVAL
    if isinstance(exc, NoSpaceError):
        return errno.ENOSPC
    if isinstance(exc, OSError) and exc.errno:  # Qcow2IOError keeps the host errno
        e = _ERRNO_ALIASES.get(exc.errno, exc.errno)
        return e if e in _NBD_ERRNOS else errno.EIO
    return errno.EIO


# ------------------------------------------------------------------ exports --
class RawImage:
    """A raw file exported read-write or read-only: size in whole sectors like QEMU's.
    Writes go through the storage layer (counted, errors wrapped with the errno kept),
    uncombined so that SEEK_DATA/SEEK_HOLE on the file see every acknowledged write."""

    cluster_size = 4096

    def __init__(self, path: str, writable: bool) -> None:
        from .storage import FileBackend, Storage

        self.path = path
        self.writable = writable
        try:
            backend = FileBackend(path, writable)
        except OSError as exc:
            raise Qcow2Error(f"Could not open '{path}': {exc.strerror}") from None
        self.fd = backend.fd
        self.storage = Storage(backend, writable, combine=False)
        self.size = -(-self.storage.size() // 512) * 512
        self.closed = False

    def pread(self, n: int, offset: int) -> bytes:
        return self.storage.pread(n, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        self.storage.pwrite(data, offset, "data")
        return len(data)

    def write_zeroes(self, offset: int, length: int) -> None:
        zero = bytes(min(length, 1 << 20))
        while length:
            n = min(length, len(zero))
            self.storage.pwrite(memoryview(zero)[:n], offset, "data")
            offset += n
            length -= n

    def discard(self, offset: int, length: int) -> None:
        """Advisory, and a no-op here: the data stays (the protocol allows that)."""

    def flush(self) -> None:
        if self.writable:
            self.storage.sync()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.storage.close()

    def extents(self, offset: int, length: int) -> list[tuple[int, bool, int]]:
        """(length, is_hole, depth) runs from SEEK_DATA/SEEK_HOLE."""
        from .mapping import _holes

        out: list[tuple[int, bool, int]] = []
        real = self.storage.size()
        n = max(0, min(length, real - offset))
        if n:
            out = [(m, hole, 1) for _h, m, hole in _holes(self.fd, offset, n)]
        if n < length:
            out.append((length - n, True, 1))
        return out


class Export:
    """One export: an Image, a SnapshotView (always read-only) or a RawImage.

    close_image says whether the server closes the object when it stops."""

    def __init__(self, image: Any, name: str = "", description: str = "",
                 readonly: bool | None = None, close_image: bool = False,
                 bitmaps: Sequence[str] = (), allocation_depth: bool = False) -> None:
        if len(name.encode()) > MAX_STRING or len(description.encode()) > MAX_STRING:
            raise InvalidArgumentError("Export name or description is too long")
        self.image = image
        self.name = name
        self.description = description
        writable = bool(getattr(image, "writable", False))
        self.readonly = (not writable) if readonly is None else (readonly or not writable)
        self.raw = isinstance(image, RawImage)
        self.size = image.size if self.raw else guest_size(image)
        self.close_image = close_image
        self._logged: set[int] = set()
        # meta contexts in qemu-nbd's order: base:allocation, qemu:allocation-depth only
        # when asked for (qemu-nbd -A), then qemu:dirty-bitmap:NAME for each bitmap
        self.context_ids = {CONTEXT_ALLOCATION: 1}
        if allocation_depth:
            self.context_ids[CONTEXT_DEPTH] = 2
        self.bitmap_views: dict[str, Any] = {}
        if bitmaps:
            from .dirtybitmaps import BitmapView

            for b in reversed(bitmaps):  # (qemu-nbd lists the last -B first)
                ctx = f"qemu:dirty-bitmap:{b}"
                self.bitmap_views[ctx] = BitmapView(getattr(image, "_img", image), b)
                self.context_ids[ctx] = len(self.context_ids) + 1

    @property
    def flags(self) -> int:
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_DF | TF_CAN_MULTI_CONN | \
            TF_SEND_CACHE
        if self.readonly:
            return f | TF_READ_ONLY
        return f | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum): any byte alignment works (partial clusters are
        read-modify-written); the cluster is the unit that avoids that."""
        cs = getattr(self.image, "cluster_size", None) or self.image.geo.cluster_size
        return 1, max(4096, min(cs, MAX_BLOCK)), MAX_BLOCK

    def log_error(self, exc: BaseException) -> None:
        """Each kind of I/O error once per export, so a failing disk does not flood the log."""
        e = _errno_of(exc)
        if e not in self._logged:
            self._logged.add(e)
            what = exc if isinstance(exc, (Qcow2Error, OSError)) else f"{type(exc).__name__}: {exc}"
            log.error("export '%s': %s", self.name, what)

    # the image calls (on the loop thread only) ----------------------------------------
    def read_chunks(self, offset: int, length: int, holes: bool) -> list[tuple[int, Any]]:
        """[(offset, bytes)] data pieces and [(offset, size:int)] hole pieces in order."""
        img = self.image
        if not holes or length == 0:
            return [(offset, img.pread(length, offset))]
        runs: list[list[Any]] = []  # [start, length, is_zero]
        if self.raw:
            pos = offset
            for n, hole, _d in img.extents(offset, length):
                runs.append([pos, n, hole])
                pos += n
        else:
            no_backing = getattr(img, "backing", None) is None
            for guest, n, kind, _host in img.block_status(offset, length):
                z = kind == ZERO or (kind == UNALLOCATED and no_backing)
                if runs and runs[-1][2] == z:
                    runs[-1][1] += n
                else:
                    runs.append([guest, n, z])
        if len(runs) == 1 and not runs[0][2]:
            return [(offset, img.pread(length, offset))]
        out: list[tuple[int, Any]] = []
        for start, n, z in runs:
            out.append((start, n) if z else (start, img.pread(n, start)))
        return out

    def extents(self, offset: int, length: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Block status descriptors (length, flags) for base:allocation and
        qemu:allocation-depth, as qemu-nbd reports them (the same as `qemu-img map`)."""
        alloc: list[tuple[int, int]] = []
        depth: list[tuple[int, int]] = []
        if self.raw:
            for n, hole, d in self.image.extents(offset, length):
                alloc.append((n, STATE_HOLE | STATE_ZERO if hole else 0))
                depth.append((n, d))
        else:
            img = self.image
            geo = img.geo
            unit = geo.subcluster_size if geo.extended_l2 else geo.cluster_size
            # bound the work and the answer; the client asks again for the rest
            length = min(length, MAX_EXTENTS * unit - offset % unit)
            for e in image_map(img, offset, length):
                flags = (0 if e["data"] else STATE_HOLE) | (STATE_ZERO if e["zero"] else 0)
                alloc.append((e["length"], flags))
                depth.append((e["length"], e["depth"] + 1 if e["present"] else 0))
        return _merge(alloc)[:MAX_EXTENTS], _merge(depth)[:MAX_EXTENTS]

    def zeroes(self, offset: int, length: int, may_unmap: bool, fast: bool) -> None:
        img = self.image
        if self.raw:
            if fast:
                raise NBDError(errno.ENOTSUP, "fast zeroing is not possible on this export")
            img.write_zeroes(offset, length)
            return
        v3 = img.header.version >= 3
        if fast:
            geo = img.geo
            unit = geo.subcluster_size if geo.extended_l2 else geo.cluster_size
            end = offset + length
            if not v3 or offset % unit or (end % unit and end != img.size):
                # would write zero-filled data clusters: not the fast zeroing asked for
                raise NBDError(errno.ENOTSUP, "fast zeroing is not possible for this range")
        if may_unmap and v3:
            img.discard(offset, length)  # v3 discard leaves zero clusters
        img.write_zeroes(offset, length)

    def close(self) -> None:
        if self.close_image and not self.image.closed:
            self.image.close()


def _merge(descs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n, f in descs:
        if n <= 0:
            continue
        if out and out[-1][1] == f and out[-1][0] + n < 1 << 32:
            out[-1] = (out[-1][0] + n, f)
        else:
            out.append((n, f))
    return out


def open_export(path: str, *, fmt: str | None = None, readonly: bool = False,
                snapshot: str | None = None, name: str = "", description: str = "",
                bitmaps: Sequence[str] = (), allocation_depth: bool = False) -> Export:
    """Open a file as an export the server closes when it stops. snapshot
    ("snapshot.name=X", "snapshot.id=N" or an id or name) makes it read-only;
    allocation_depth also offers the qemu:allocation-depth context (qemu-nbd -A)."""
    from .convertfull import _snapshot_view
    from .image import open_image as qopen

    if not os.path.exists(path):
        raise Qcow2Error(f"Could not open '{path}': No such file or directory")
    fmt = fmt or probe_format(path, what="image")
    if fmt == "raw":
        if snapshot is not None:
            raise InvalidArgumentError("Failed to load snapshot: raw images have no snapshots")
        if bitmaps:
            raise InvalidArgumentError(f"Bitmap '{bitmaps[0]}' is not found")
        return Export(RawImage(path, not readonly), name, description, readonly, True,
                      allocation_depth=allocation_depth)
    if fmt != "qcow2":
        raise InvalidArgumentError(f"Unknown file format '{fmt}'")
    if snapshot is not None:
        img = qopen(path)
        try:
            view = _snapshot_view(img, snapshot)
        except BaseException:
            img.close()
            raise
        try:
            exp = Export(view, name, description, True, False, bitmaps, allocation_depth)
        except BaseException:
            img.close()
            raise
        exp.close = img.close  # type: ignore[method-assign]  # the view's image goes with it
        return exp
    img = qopen(path, "r" if readonly else "r+")
    try:
        return Export(img, name, description, readonly, True, bitmaps, allocation_depth)
    except BaseException:
        img.close()
        raise


# ------------------------------------------------------------------ the socket --
class _Conn(asyncio.BufferedProtocol):
    """One client's socket: the reader and the writer the connection code uses.

    asyncio's streams receive into a fresh bytes object per recv (256 KiB at most), add it
    to a buffer and copy requests out of that: three copies of every byte written, and
    allocations big enough to fault in fresh pages each time. Here the transport receives
    (recv_into) into one fixed buffer for requests and options, and a WRITE's payload
    straight into the client's payload buffer, which is reused from request to request.
    Memory per client: BUFFER bytes, the largest payload it sent (at most MAX_BLOCK) and
    what the transport holds of replies it has not read yet (drain waits then)."""

    BUFFER = 1 << 18

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(self.BUFFER)
        self._start = self._end = 0  # unread: _buf[_start:_end]
        self._target: memoryview | None = None  # a payload being received in place
        self._payload = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._paused_reading = False
        self._paused_writing = False
        self._drainers: list[asyncio.Future[None]] = []
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- protocol side --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # room in the kernel for a whole large read reply: one send() instead of a
            # partial one and the rest copied, queued and sent piecewise by the loop
            # (capped by net.core.wmem_max; kernel memory, not the process's)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        self._task = asyncio.get_running_loop().create_task(self.server._accept(self, self))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target
        if self._start:  # unread bytes to the front: the room is at the end
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        return memoryview(self._buf)[self._end:]  # never empty: full means paused

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._target = self._target[nbytes:]
            if len(self._target):
                return
            self._target = None
        else:
            self._end += nbytes
            if self._end == len(self._buf) and self._start == 0:
                self._pause()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        for f in self._drainers:
            if not f.done():
                f.set_exception(ConnectionResetError("Connection lost"))
        self._drainers.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        for f in self._drainers:
            if not f.done():
                f.set_result(None)
        self._drainers.clear()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _pause(self) -> None:
        assert self.transport is not None
        if not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        assert self.transport is not None
        if self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()

    async def _wait(self, want: int) -> None:
        if self._eof:
            raise asyncio.IncompleteReadError(b"", want)
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # ---------------------------------------------------------------- reader side --
    async def readexactly(self, n: int) -> bytes:
        if n > len(self._buf):
            buf = bytearray(n)
            await self.readinto(memoryview(buf))
            return bytes(buf)
        while self._end - self._start < n:
            self._resume()
            await self._wait(n)
        data = bytes(self._buf[self._start:self._start + n])
        self._start += n
        return data

    async def readinto(self, view: memoryview) -> None:
        """Fill view: first from what is buffered, then straight from the socket."""
        k = min(len(view), self._end - self._start)
        if k:
            view[:k] = self._buf[self._start:self._start + k]
            self._start += k
        if k == len(view):
            return
        self._target = view[k:]
        self._resume()
        try:
            while self._target is not None:
                await self._wait(len(view))
        finally:
            self._target = None

    async def read_payload(self, n: int) -> memoryview:
        """A WRITE's payload, in the client's reused buffer: valid until the next one."""
        if len(self._payload) < n:
            self._payload = bytearray(n)
        view = memoryview(self._payload)[:n]
        await self.readinto(view)
        return view

    # ---------------------------------------------------------------- writer side --
    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self._closed.done():
            raise ConnectionResetError("Connection lost")
        if self._paused_writing:
            f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drainers.append(f)
            await f

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await self._closed


# ------------------------------------------------------------------ connections --
class _Client:
    def __init__(self, server: NBDServer, reader: _Conn, writer: _Conn) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.contexts: list[str] = []  # negotiated meta contexts, in id order
        self.context_export: str | None = None
        self.no_zeroes = False

    # ---------------------------------------------------------------- handshake --
    async def handshake(self) -> Export | None:
        w = self.writer
        w.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await w.drain()
        (cflags,) = struct.unpack(">I", await self.reader.readexactly(4))
        if cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) or not cflags & FLAG_FIXED_NEWSTYLE:
            raise _Disconnect(f"unsupported client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        while True:
            magic, opt, length = struct.unpack(">QII", await self.reader.readexactly(16))
            if magic != IHAVEOPT:
                raise _Disconnect("bad option magic")
            if length > MAX_OPTION:
                await self._drain_payload(length)
                if opt == OPT_EXPORT_NAME:
                    raise _Disconnect("export name too long")
                await self._reply(opt, REP_ERR_TOO_BIG, b"option too long")
                continue
            data = await self.reader.readexactly(length)
            exp = await self._option(opt, data)
            if exp is not None:
                return exp

    async def _drain_payload(self, length: int) -> None:
        while length:
            got = await self.reader.readexactly(min(length, _Conn.BUFFER))
            length -= len(got)

    async def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self.writer.write(_OPT_REPLY.pack(REPLY_MAGIC, opt, rep, len(data)) + data)
        await self.writer.drain()

    async def _error(self, opt: int, rep: int, message: str) -> None:
        await self._reply(opt, rep, message.encode()[:MAX_STRING])

    async def _option(self, opt: int, data: bytes) -> Export | None:
        srv = self.server
        if opt == OPT_EXPORT_NAME:
            exp = srv.find(data.decode("utf-8", "replace"))
            if exp is None or srv.stopping:
                raise _Disconnect("unknown export")
            self._contexts_for(exp)
            tail = b"" if self.no_zeroes else bytes(124)
            self.writer.write(struct.pack(">QH", exp.size, exp.flags) + tail)
            await self.writer.drain()
            return exp
        if opt == OPT_ABORT:
            with contextlib.suppress(ConnectionError):
                await self._reply(opt, REP_ACK)
            raise _Disconnect("client aborted")
        if opt == OPT_LIST:
            if data:
                await self._error(opt, REP_ERR_INVALID, "LIST takes no data")
                return None
            for e in srv.exports:
                name = e.name.encode()
                await self._reply(opt, REP_SERVER,
                                  struct.pack(">I", len(name)) + name + e.description.encode())
            await self._reply(opt, REP_ACK)
            return None
        if opt == OPT_STARTTLS:
            await self._error(opt, REP_ERR_POLICY, "TLS not configured")
            return None
        if opt in (OPT_INFO, OPT_GO):
            return await self._info(opt, data)
        if opt == OPT_STRUCTURED_REPLY:
            if data:
                await self._error(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            elif self.structured:
                await self._error(opt, REP_ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                await self._reply(opt, REP_ACK)
            return None
        if opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            await self._meta_context(opt, data)
            return None
        await self._error(opt, REP_ERR_UNSUP, f"option {opt} not supported")
        return None

    def _contexts_for(self, exp: Export) -> None:
        # contexts set for another export do not carry over to this one
        if self.context_export is not None and self.server.find(self.context_export) is not exp:
            self.contexts = []

    async def _info(self, opt: int, data: bytes) -> Export | None:
        if len(data) < 6:
            await self._error(opt, REP_ERR_INVALID, "option too short")
            return None
        (nlen,) = struct.unpack_from(">I", data)
        if nlen > len(data) - 6:
            await self._error(opt, REP_ERR_INVALID, "name length beyond the option")
            return None
        name = data[4:4 + nlen].decode("utf-8", "replace")
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 6 + nlen + 2 * nreq:
            await self._error(opt, REP_ERR_INVALID, "option length does not match its requests")
            return None
        reqs = set(struct.unpack_from(f">{nreq}H", data, 6 + nlen))
        exp = self.server.find(name)
        if exp is None:
            await self._error(opt, REP_ERR_UNKNOWN, f"export '{name}' not present")
            return None
        if self.server.stopping:
            await self._error(opt, REP_ERR_SHUTDOWN, "server shutting down")
            return None
        await self._reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, exp.size, exp.flags))
        if INFO_NAME in reqs:
            await self._reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + exp.name.encode())
        if INFO_DESCRIPTION in reqs and exp.description:
            await self._reply(opt, REP_INFO,
                              struct.pack(">H", INFO_DESCRIPTION) + exp.description.encode())
        # block sizes are sent unasked too: clients that know them use them
        await self._reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, *exp.block_sizes))
        await self._reply(opt, REP_ACK)
        if opt == OPT_INFO:
            return None
        self._contexts_for(exp)
        return exp

    async def _meta_context(self, opt: int, data: bytes) -> None:
        if opt == OPT_SET_META_CONTEXT and not self.structured:
            await self._error(opt, REP_ERR_INVALID, "structured replies not negotiated")
            return
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4:4 + nlen].decode("utf-8", "replace")
            if 4 + nlen > len(data):
                raise ValueError
            pos = 4 + nlen
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if qlen > MAX_STRING or pos + qlen > len(data):
                    raise ValueError
                queries.append(data[pos:pos + qlen].decode("utf-8", "replace"))
                pos += qlen
            if pos != len(data):
                raise ValueError
        except (struct.error, ValueError):
            await self._error(opt, REP_ERR_INVALID, "malformed meta context option")
            return
        if self.server.find(name) is None:
            await self._error(opt, REP_ERR_UNKNOWN, f"export '{name}' not present")
            return
        ids = self.server.find(name).context_ids  # type: ignore[union-attr]
        chosen: list[str] = []
        for q in queries if queries else ([] if opt == OPT_SET_META_CONTEXT else ["base:", "qemu:"]):
            for ctx in ids:
                if opt == OPT_LIST_META_CONTEXT and q.endswith(":"):
                    match = ctx.startswith(q)  # "base:" lists every base context
                else:
                    match = q == ctx
                if match and ctx not in chosen:
                    chosen.append(ctx)
        for ctx in chosen:
            await self._reply(opt, REP_META_CONTEXT,
                              struct.pack(">I", ids[ctx]) + ctx.encode())
        if opt == OPT_SET_META_CONTEXT:
            self.contexts = sorted(chosen, key=ids.__getitem__)
            self.context_export = name
        await self._reply(opt, REP_ACK)

    # ---------------------------------------------------------------- transmission --
    async def transmission(self, exp: Export) -> None:
        reader, writer = self.reader, self.writer
        lock = self.server.lock_for(exp)
        while True:
            magic, flags, cmd, cookie, offset, length = _REQ.unpack(await reader.readexactly(28))
            if magic != REQUEST_MAGIC:
                raise _Disconnect("bad request magic")
            payload: bytes | memoryview | None = None
            if cmd == CMD_WRITE:
                if length > MAX_BLOCK:
                    await self._drain_payload(length)
                    await self._simple(cookie, errno.EINVAL)
                    continue
                payload = await reader.read_payload(length)
                if length <= 65536:
                    payload = bytes(payload)  # (the image's fast path for small writes)
            if cmd == CMD_DISC:
                raise _Disconnect("client disconnected")
            try:
                self._check(exp, cmd, flags, offset, length)
                if cmd == CMD_READ:
                    await self._read(exp, lock, cookie, flags, offset, length)
                elif cmd == CMD_BLOCK_STATUS:
                    await self._block_status(exp, lock, cookie, flags, offset, length)
                else:
                    async with lock:
                        flush = self._command(exp, cmd, flags, offset, length, payload)
                    if flush:
                        await self.server.flush(exp)
                    await self._simple(cookie, 0)
            except ConnectionError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is this request's EIO
                if not isinstance(exc, (NBDError, InvalidArgumentError)):
                    exp.log_error(exc)
                err = _errno_of(exc)
                if self.structured and cmd in (CMD_READ, CMD_BLOCK_STATUS):
                    await self._chunk_error(cookie, err, str(exc))
                else:
                    await self._simple(cookie, err)
            await writer.drain()

    def _check(self, exp: Export, cmd: int, flags: int, offset: int, length: int) -> None:
        allowed = _CMD_FLAGS.get(cmd)
        if allowed is None:
            raise NBDError(errno.EINVAL, f"unknown command {cmd}")
        if flags & ~allowed:
            raise NBDError(errno.EINVAL, f"unsupported flags {flags:#x} for command {cmd}")
        if cmd == CMD_FLUSH:
            if offset or length:
                raise NBDError(errno.EINVAL, "FLUSH takes no offset or length")
            return
        if exp.readonly and cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            raise NBDError(errno.EPERM, "export is read-only")
        if cmd == CMD_READ and length > MAX_BLOCK:
            raise NBDError(errno.EINVAL, "request too large")
        if cmd == CMD_BLOCK_STATUS:
            if not self.structured or not self.contexts:
                raise NBDError(errno.EINVAL, "no metadata context negotiated")
            if length == 0:
                raise NBDError(errno.EINVAL, "BLOCK_STATUS of length 0")
        if offset > exp.size or length > exp.size - offset:
            # EINVAL for every command, writes too, as qemu-nbd answers
            raise NBDError(errno.EINVAL, "request beyond the end of the export")

    def _command(self, exp: Export, cmd: int, flags: int, offset: int, length: int,
                 payload: bytes | memoryview | None) -> bool:
        """The request's image calls (with the image's lock held); True: a flush must
        follow before the reply (FLUSH, FUA)."""
        img = exp.image
        if cmd == CMD_WRITE:
            assert payload is not None
            if length:
                img.pwrite(payload, offset)
        elif cmd == CMD_FLUSH:
            return True
        elif cmd == CMD_TRIM:
            if length:
                img.discard(offset, length)
        elif cmd == CMD_WRITE_ZEROES:
            if length:
                exp.zeroes(offset, length, not flags & CMD_FLAG_NO_HOLE,
                           bool(flags & CMD_FLAG_FAST_ZERO))
        elif cmd == CMD_CACHE:
            return False
        return bool(flags & CMD_FLAG_FUA)

    async def _simple(self, cookie: int, err: int, data: bytes = b"") -> None:
        self.writer.write(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, err, cookie) + data)

    async def _chunk_error(self, cookie: int, err: int, message: str) -> None:
        msg = message.encode()[:MAX_STRING]
        body = struct.pack(">IH", err, len(msg)) + msg
        self.writer.write(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, CHUNK_FLAG_DONE, CHUNK_ERROR,
                                      cookie, len(body)) + body)

    async def _read(self, exp: Export, lock: asyncio.Lock, cookie: int, flags: int, offset: int,
                    length: int) -> None:
        w = self.writer
        if not self.structured:
            async with lock:
                data = exp.image.pread(length, offset)
            if length <= 65536:
                w.write(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie) + data)
            else:
                w.write(_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
                w.write(data)
            return
        async with lock:  # released before the replies go out: a slow reader holds nothing
            chunks = exp.read_chunks(offset, length, holes=not flags & CMD_FLAG_DF)
        last = len(chunks) - 1
        for i, (start, piece) in enumerate(chunks):
            done = CHUNK_FLAG_DONE if i == last else 0
            if isinstance(piece, int):
                w.write(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, done, CHUNK_OFFSET_HOLE, cookie, 12)
                        + struct.pack(">QI", start, piece))
                continue
            head = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, done, CHUNK_OFFSET_DATA, cookie,
                               8 + len(piece)) + struct.pack(">Q", start)
            if len(piece) <= 65536:
                w.write(head + piece)
            else:
                w.write(head)
                w.write(piece)
            if i != last:
                await w.drain()

    async def _block_status(self, exp: Export, lock: asyncio.Lock, cookie: int, flags: int,
                            offset: int, length: int) -> None:
        async with lock:
            alloc, depth = exp.extents(offset, length)
            chosen = {CONTEXT_ALLOCATION: alloc, CONTEXT_DEPTH: depth}
            for ctx in self.contexts:
                view = exp.bitmap_views.get(ctx)
                if view is not None:
                    chosen[ctx] = _merge(view.extents(offset, length))[:MAX_EXTENTS]
        last = len(self.contexts) - 1
        for i, ctx in enumerate(self.contexts):
            descs = chosen[ctx]
            if flags & CMD_FLAG_REQ_ONE:
                descs = descs[:1]
            body = struct.pack(">I", exp.context_ids[ctx]) + b"".join(
                struct.pack(">II", n, f) for n, f in descs)
            self.writer.write(_CHUNK.pack(STRUCTURED_REPLY_MAGIC,
                                          CHUNK_FLAG_DONE if i == last else 0,
                                          CHUNK_BLOCK_STATUS, cookie, len(body)) + body)


# ------------------------------------------------------------------ server --
class NBDServer:
    """Serves exports on a Unix socket, TCP, or a listening socket passed in.

    shared: clients served at once (0: no limit); more wait until one leaves.
    persistent: keep serving after the last client left (else stop then)."""

    def __init__(self, exports: Export | Sequence[Export], *, shared: int = 1,
                 persistent: bool = False) -> None:
        self.exports = [exports] if isinstance(exports, Export) else list(exports)
        if not self.exports:
            raise InvalidArgumentError("No export to serve")
        names = [e.name for e in self.exports]
        if len(set(names)) != len(names):
            raise InvalidArgumentError("Export names must be unique")
        self.shared = shared
        self.persistent = persistent
        self.stopping = False
        self._clients: set[asyncio.Task[None]] = set()
        self._connections = 0
        self._served = 0
        self._slots: asyncio.Semaphore | None = None
        self._done: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._locks: dict[int, asyncio.Lock] = {}

    def lock_for(self, exp: Export) -> asyncio.Lock:
        """The lock of the image object behind exp (a snapshot view shares its image's)."""
        img = getattr(exp.image, "_img", exp.image)
        lock = self._locks.get(id(img))
        if lock is None:
            lock = self._locks[id(img)] = asyncio.Lock()
        return lock

    async def flush(self, exp: Export) -> None:
        """Make every write to exp's image acknowledged so far durable, off the loop."""
        st = getattr(exp.image, "storage", None) if getattr(exp.image, "writable", False) \
            else None
        if st is not None:
            # without the lock: the other requests go on meanwhile. Its error is the
            # flush's (the kernel reports a failed writeback to one sync only)
            await _in_thread(_early_sync, st)
        async with self.lock_for(exp):
            await _in_thread(exp.image.flush)

    def find(self, name: str) -> Export | None:
        # exact names only: as qemu-nbd, "" is the default export only when an export
        # is named "" (no -x), not a shortcut to the first one
        return next((e for e in self.exports if e.name == name), None)

    async def start(self, sock: socket.socket) -> None:
        """Start accepting on a bound, listening socket."""
        self._slots = asyncio.Semaphore(self.shared) if self.shared > 0 else None
        self._done = asyncio.Event()
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(lambda: _Conn(self), sock=sock)
        else:
            self._server = await loop.create_server(lambda: _Conn(self), sock=sock)

    async def wait(self) -> None:
        assert self._done is not None
        await self._done.wait()

    def stop(self) -> None:
        """Stop accepting and end every connection (at their next await)."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for t in list(self._clients):
            t.cancel()
        if not self._clients and self._done is not None:
            self._done.set()

    async def _accept(self, reader: _Conn, writer: _Conn) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            if self._slots is not None:
                await self._slots.acquire()
            try:
                if not self.stopping:
                    self._served += 1
                    await self._serve_client(reader, writer)
            finally:
                if self._slots is not None:
                    self._slots.release()
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            # the bookkeeping comes before the last await: a stop() cancelling this task
            # there must still find it gone
            self._clients.discard(task)
            if not self._clients and (self.stopping or (not self.persistent and self._served)):
                self.stopping = True
                if self._server is not None:
                    self._server.close()
                assert self._done is not None
                self._done.set()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_client(self, reader: _Conn, writer: _Conn) -> None:
        client = _Client(self, reader, writer)
        try:
            exp = await client.handshake()
            if exp is not None:
                await client.transmission(exp)
        except _Disconnect as exc:
            log.debug("connection closed: %s", exc)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            log.debug("client went away: %s", exc)

    def close_exports(self) -> None:
        """Flush and close what the server opened (after it stopped)."""
        first: BaseException | None = None
        for e in self.exports:
            try:
                if not e.readonly and not e.image.closed:
                    e.image.flush()
                e.close()
            except (Qcow2Error, OSError) as exc:
                first = first or exc
        if first is not None:
            raise first


def _early_sync(storage: Storage) -> None:  # (a name of its own, for the test that holds it up)
    storage.sync_ahead()


async def _in_thread(fn: Callable[..., object], *args: Any) -> None:
    """fn(*args) in a worker thread. If the awaiting task is cancelled, the call is still
    waited for: nothing may touch the image (or close it) while the thread uses it."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({fut})
        raise


# ------------------------------------------------------------------ listening sockets --
def listen_unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bound and listening under a temporary name, then renamed: whoever waits for the
    # path to appear can connect at once (no window between bind and listen)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}")
    if len(os.fsencode(tmp)) > 107:  # sun_path limit: then bind the name itself
        tmp = path
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run, as qemu-nbd does
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        s.bind(tmp)
        s.listen(128)
        if tmp != path:
            os.rename(tmp, path)
    except OSError as exc:
        s.close()
        if tmp != path:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise Qcow2Error(f"Failed to bind socket to {path}: {exc.strerror}") from None
    return s


def listen_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise Qcow2Error(f"Address resolution failed for {host}:{port}: {exc}") from None
    family, kind, proto, _name, addr = infos[0]
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(128)
    except OSError as exc:
        s.close()
        raise Qcow2Error(f"Failed to bind socket to {host}:{port}: {exc.strerror}") from None
    return s


def activation_socket() -> socket.socket | None:
    """The listening socket passed by systemd-style socket activation (LISTEN_PID,
    LISTEN_FDS, fd 3), as `nbdinfo -- [ CMD ]` and libnbd's connect_systemd_socket_activation
    pass it; None when there is none."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    s = socket.socket(fileno=3)
    os.set_inheritable(3, False)
    return s


def serve(exports: Export | Sequence[Export], *, socket_path: str | None = None,
          host: str | None = None, port: int = DEFAULT_PORT, sock: socket.socket | None = None,
          shared: int = 1, persistent: bool = False,
          ready: Callable[[], object] | None = None, handle_signals: bool = True) -> None:
    """Serve exports until the last client leaves (unless persistent) or SIGINT/SIGTERM,
    then flush and close them and remove the Unix socket. One of sock, socket_path or
    host/port (default 127.0.0.1:10809) says where; ready is called once listening."""
    if sock is None:
        sock = listen_unix(socket_path) if socket_path else listen_tcp(host or "127.0.0.1", port)
    server = NBDServer(exports, shared=shared, persistent=persistent)
    old: list[Any] = []
    try:
        asyncio.run(_run(server, sock, ready, handle_signals))
    finally:
        if handle_signals:
            # a second SIGINT/SIGTERM must not cut the final flush short
            old = [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)]
        try:
            server.close_exports()
        finally:
            for s, handler in zip((signal.SIGINT, signal.SIGTERM), old):
                signal.signal(s, handler)
            sock.close()
            if socket_path:
                with contextlib.suppress(OSError):
                    os.unlink(socket_path)


async def _run(server: NBDServer, sock: socket.socket, ready: Callable[[], object] | None,
               handle_signals: bool) -> None:
    loop = asyncio.get_running_loop()
    await server.start(sock)
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
    if ready is not None:
        ready()
    try:
        await server.wait()
    finally:
        server.stop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


# ------------------------------------------------------------------ command line --
def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "nbd", help="serve an image over NBD (qemu-nbd compatible options)",
        description="Serve FILE over the NBD protocol, with qemu-nbd's options where they "
                    "overlap. Listens on 127.0.0.1:10809 unless told otherwise, or on a "
                    "socket passed by systemd-style socket activation.")
    p.add_argument("filename", metavar="FILE")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument("-x", "--export-name", default="", metavar="NAME")
    p.add_argument("-D", "--description", default="", metavar="TEXT")
    p.add_argument("-k", "--socket", metavar="PATH", help="listen on this Unix socket")
    p.add_argument("-b", "--bind", metavar="ADDR", help="TCP address (default 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, metavar="PORT", help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnected")
    p.add_argument("-e", "--shared", type=int, default=1, metavar="N",
                   help="clients served at once (default 1, 0 for no limit)")
    p.add_argument("--pid-file", metavar="PATH")
    p.add_argument("-l", "--load-snapshot", metavar="SNAPSHOT",
                   help="export an internal snapshot read-only: snapshot.name=NAME, "
                        "snapshot.id=ID or ID_OR_NAME")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"))
    p.add_argument("--fork", action="store_true", help="serve in the background once listening")
    p.add_argument("-v", "--verbose", action="store_true", help="log each connection")
    p.add_argument("-A", "--allocation-depth", action="store_true",
                   help="also export the qemu:allocation-depth meta context")
    p.add_argument("-B", "--bitmap", action="append", default=[], metavar="NAME",
                   help="also export bitmap NAME as meta context qemu:dirty-bitmap:NAME")
    p.set_defaults(func=_cmd)


def _cmd(args: Any) -> int:
    if args.shared < 0:
        raise InvalidArgumentError("--shared must be 0 or more")
    if args.port is not None and not 0 < args.port < 65536:
        raise InvalidArgumentError(f"Invalid port '{args.port}'")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="qcow2 nbd: %(message)s")
    sock = None
    if args.socket is None and args.bind is None and args.port is None:
        sock = activation_socket()
    exp = open_export(args.filename, fmt=args.format,
                      readonly=args.read_only or args.load_snapshot is not None,
                      snapshot=args.load_snapshot, name=args.export_name,
                      description=args.description, bitmaps=args.bitmap,
                      allocation_depth=args.allocation_depth)
    try:
        if sock is None:
            sock = (listen_unix(args.socket) if args.socket else
                    listen_tcp(args.bind or "127.0.0.1", args.port or DEFAULT_PORT))
    except BaseException:
        exp.close()
        raise
    notify: socket.socket | None = None
    if args.fork:
        parent_end, notify = socket.socketpair()
        if os.fork():
            # the parent returns once the child listens (and wrote its pid file)
            notify.close()
            ok = parent_end.recv(1) == b"1"
            os._exit(0 if ok else 1)
        parent_end.close()
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.close(null)

    def ready() -> None:
        if args.pid_file:
            # not an image file, so not through the storage layer
            Path(args.pid_file).write_text(f"{os.getpid()}\n")
        if notify is not None:
            notify.sendall(b"1")
            notify.close()

    try:
        serve(exp, sock=sock, socket_path=args.socket, shared=args.shared,
              persistent=args.persistent, ready=ready)
    finally:
        if args.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(args.pid_file)
    return 0


__all__ = ["Export", "NBDServer", "RawImage", "open_export", "serve", "register"]
