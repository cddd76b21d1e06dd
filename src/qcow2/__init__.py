"""qcow2: read, write, check and snapshot qcow2 disk images, interchangeably with QEMU."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .image import Image
    from .imagefile import ImageFile
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
    from .image import open_image

    return open_image(path, mode, backing=backing, **options)


# Image, ImageFile and Stats are imported on first use (PEP 562): importing the package
# (which `qcow2 info` does) must not import numpy, which the Image's tables need.
_LAZY = {"Image": "image", "ImageFile": "imagefile", "Stats": "storage"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
