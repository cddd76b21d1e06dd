"""qcow2: read, write, check and snapshot qcow2 disk images, interchangeably with QEMU."""

from __future__ import annotations

import os
from typing import Any

from .amend import amend
from .create import create
from .errors import (
    BackingFileError,
    CorruptImageError,
    FormatError,
    InvalidArgumentError,
    NoSpaceError,
    Qcow2Error,
    Qcow2IOError,
    ReadOnlyError,
    RefcountOverflowError,
    SnapshotError,
    SnapshotNotFoundError,
    UnsupportedFeatureError,
)
from .image import Image, ImageFile
from .storage import Stats

__all__ = [
    "open", "create", "amend", "Image", "ImageFile", "Stats",
    "Qcow2Error", "FormatError", "UnsupportedFeatureError", "CorruptImageError",
    "ReadOnlyError", "BackingFileError", "SnapshotError", "SnapshotNotFoundError",
    "RefcountOverflowError", "NoSpaceError", "InvalidArgumentError", "Qcow2IOError",
]
__version__ = "0.1.0"


def open(path: str | os.PathLike[str], mode: str = "r", *, backing: bool = True,
         **options: Any) -> Image:  # noqa: A001 - mirrors the builtin on purpose
    """Open a qcow2 image. mode is "r" (read-only, default) or "r+" (read-write).

    backing=False does not follow the backing file name (for untrusted images).
    Options: cache_size (bytes of L2 tables cached), refcount_cache_size, backend.
    """
    if mode not in ("r", "r+", "rb", "r+b", "rb+"):
        raise InvalidArgumentError(f"Invalid mode {mode!r}: use 'r' or 'r+'")
    return Image._open(path, writable="+" in mode, backing=backing, **options)
