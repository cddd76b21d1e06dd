"""Opening backing files: name validation, format probing, chain limits."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Protocol

from .errors import BackingFileError, Qcow2Error
from .format import MAGIC
from .storage import file_size, open_file

MAX_CHAIN_DEPTH = 64
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class Readable(Protocol):
    size: int

    def pread(self, n: int, offset: int) -> bytes: ...
    def close(self) -> None: ...


class RawFile:
    """A raw backing file (read-only)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = _open_backing_fd(path)
        # QEMU sees a raw file in whole sectors: a partial last sector reads as zeroes
        self.size = -(-file_size(self.fd) // 512) * 512
        self.filename = path
        self.format = "raw"

    def pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        return data if len(data) == n else data + bytes(n - len(data))

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Fill buf from offset (zeros past the end of the file)."""
        got = os.preadv(self.fd, [buf], offset)
        if got < len(buf):
            buf[got:] = bytes(len(buf) - got)
        return len(buf)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def resolve_backing_name(image_path: str, name: str) -> str:
    """Validate a backing file name and resolve it against the image's folder."""
    if not name:
        raise BackingFileError("Backing file name is empty")
    if "\0" in name:
        raise BackingFileError("Backing file name contains a NUL byte")
    if name.startswith("json:") or (_PROTOCOL.match(name) and not os.path.exists(name)):
        raise BackingFileError(
            f"Backing file name '{name}' is not a plain file path (protocols are not supported)"
        )
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def _open_backing_fd(path: str, what: str = "backing file") -> int:
    try:
        return open_file(path, os.O_RDONLY)
    except OSError as exc:
        raise BackingFileError(f"Could not open {what} '{path}': {exc.strerror}") from exc
    except Qcow2Error as exc:
        raise BackingFileError(f"Could not open {what} '{path}': not a regular file or "
                               "block device") from exc


def probe_format(path: str, what: str = "backing file") -> str:
    fd = _open_backing_fd(path, what)
    try:
        return "qcow2" if os.pread(fd, 4, 0) == MAGIC else "raw"
    except OSError as exc:
        raise BackingFileError(f"Could not read {what} '{path}': {exc.strerror}") from exc
    finally:
        os.close(fd)


def open_backing(image_path: str, name: str, fmt: str | None, seen: tuple[str, ...],
                 open_qcow2: Callable[[str, tuple[str, ...]], Readable]) -> Readable:
    """The backing file `name` of the image at image_path, checked (no loop, chain depth,
    supported format). open_qcow2(path, seen) opens a qcow2 backing file: an Image
    (image.open_backing_image), or its metadata only (meta.py), with its own chain; seen
    holds the real paths of the chain so far."""
    resolve_backing_name(image_path, name)  # a plain file name, or an error
    # the file under the name QEMU gives it: combined with the folder part of the image's
    # name as given, relative if that is (the same file, as the chain is opened now); the
    # layers below combine their names with this one, so that their messages name files
    # as qemu-img's do however deep they are
    path = name if os.path.isabs(name) or "/" not in image_path else \
        image_path[: image_path.rindex("/") + 1] + name
    if not os.path.exists(path):
        raise BackingFileError(
            f"Could not open backing file: Could not open '{path}': No such file or directory")
    real = os.path.realpath(path)
    if real in seen:
        raise BackingFileError(f"Backing file loop detected: '{path}' is its own backing file")
    if len(seen) >= MAX_CHAIN_DEPTH:
        raise BackingFileError(f"Backing chain is deeper than {MAX_CHAIN_DEPTH} images")
    fmt = fmt or probe_format(path)
    if fmt == "raw":
        return RawFile(path)
    if fmt != "qcow2":
        raise BackingFileError(f"Backing file format '{fmt}' is not supported")
    try:
        return open_qcow2(path, seen + (real,))
    except Qcow2Error as exc:  # one "Could not open backing file: " per level, as qemu
        raise BackingFileError(f"Could not open backing file: {exc}") from exc
