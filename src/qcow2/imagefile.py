"""The file-like (io.RawIOBase) view of a virtual disk: of an Image, or of a read-only
snapshot view (its own module, so that snapshot.py's views need not import image.py)."""

from __future__ import annotations

import io
from typing import Any

from .errors import InvalidArgumentError, ReadOnlyError


class ImageFile(io.RawIOBase):
    """File-like view of an image (or of a read-only snapshot view)."""

    def __init__(self, source: Any) -> None:
        super().__init__()
        self._src = source
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return bool(getattr(self._src, "writable", False))

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._src.size + offset
        else:
            raise InvalidArgumentError(f"Invalid whence {whence}")
        if pos < 0:
            raise InvalidArgumentError("Negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = max(0, min(len(mv), self._src.size - self._pos))
        if n:
            data = self._src.pread(n, self._pos)
            mv[:n] = data
            self._pos += n
        return n

    def write(self, b: Any) -> int:
        if not self.writable():
            raise ReadOnlyError("Image is opened read-only")
        mv = memoryview(b).cast("B")
        if self._pos + len(mv) > self._src.size:
            raise InvalidArgumentError("Write beyond the end of the image")
        self._src.pwrite(mv, self._pos)
        self._pos += len(mv)
        return len(mv)

    def flush(self) -> None:
        if self.writable() and not self.closed:
            self._src.flush()

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("qcow2 images cannot be truncated through the file view")
