"""Error hierarchy: every failure the library raises derives from Qcow2Error."""

from __future__ import annotations

import errno as _errno


class Qcow2Error(Exception):
    """Base class of every error raised by this package."""


class InvalidArgumentError(Qcow2Error, ValueError):
    """A caller passed a bad argument (size, offset, option value...)."""


class FormatError(Qcow2Error):
    """The file is not a valid qcow2 image (bad magic, bad header, bad table)."""


class UnsupportedFeatureError(FormatError):
    """The image uses a feature this implementation cannot handle."""


class CorruptImageError(Qcow2Error):
    """Metadata is inconsistent (the image is marked corrupt or should be)."""


class ReadOnlyError(Qcow2Error):
    """A write was attempted on an image opened read-only."""


class BackingFileError(Qcow2Error):
    """The backing chain cannot be opened (missing, loop, too deep, bad name)."""


class SnapshotError(Qcow2Error):
    """A snapshot operation failed."""


class SnapshotNotFoundError(SnapshotError, KeyError):
    """No snapshot has the given id or name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class RefcountOverflowError(Qcow2Error):
    """A refcount would exceed the maximum of the image's refcount width."""


class NoSpaceError(Qcow2Error):
    """The image cannot grow any further (host offset limits)."""


class Qcow2IOError(Qcow2Error, OSError):
    """An I/O error from the host file; errno is kept."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0, "EIO")
        return f"{self.strerror} ({name})"
