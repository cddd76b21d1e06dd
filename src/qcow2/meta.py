"""An image's metadata records, read-only and with struct only: what `qcow2 info` and
`qcow2 snapshot -l` show.

Opening an `Image` reads the L1 table and sets up the table machinery, which is numpy's
(an import that costs several times what qemu-img takes for a whole `info`). These
commands need only cluster 0 (header, extensions, backing file name), the snapshot table,
the bitmap directory and the backing chain, so they open an `ImageMetadata` instead. It
validates exactly what a read-only `Image` open validates (the same `read_layout`, the
same backing chain rules and messages), so both refuse the same images the same way.
"""

from __future__ import annotations

import os
from typing import Any

from .backing import Readable, open_backing
from .errors import BackingFileError, Qcow2Error
from .format import Header, ImageLayout, SnapshotEntry, mode_of
from .header import read_layout
from .snaptable import CachedTable, cached_snapshot_table
from .storage import FileBackend, Storage


class ImageMetadata:
    """Header, extensions, snapshot table and backing chain of a qcow2 image, duck-typed
    like the `Image` attributes that info.py and the mode hooks read (path, storage,
    header, layout, backing, snapshots, _snapshots._snapshot_entries)."""

    def __init__(self, path: str | os.PathLike[str], *, backing: bool = True,
                 _seen: tuple[str, ...] = ()) -> None:
        self.path = os.fspath(path)
        self.closed = True
        self.backing: Readable | None = None
        try:
            be = FileBackend(self.path, False)
        except OSError as exc:  # the message of Image._open
            raise Qcow2Error(f"Could not open '{self.path}': {exc.strerror}") from exc
        self.storage = Storage(be, False)
        self.closed = False
        self._snap_cache: CachedTable | None = None
        # the mode hooks read the snapshot table through Image._snapshots (SnapshotOps);
        # here the table reader is this object itself
        self._snapshots = self
        try:
            self.layout: ImageLayout = read_layout(self.storage)
            self.header: Header = self.layout.header
            if backing and self.layout.backing_file:
                try:
                    self.backing = open_backing(
                        self.path, self.layout.backing_file, self.layout.backing_format,
                        _seen or (os.path.realpath(self.path),), _open_backing_layer)
                except BackingFileError as exc:
                    if _seen:  # a backing file's own: the level above says which image
                        raise
                    raise BackingFileError(f"Could not open '{self.path}': {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _snapshot_entries(self) -> list[SnapshotEntry]:
        """Every entry of the snapshot table (those the mode hides too)."""
        self._snap_cache = cached_snapshot_table(self.storage, self.header, self._snap_cache)
        return self._snap_cache[2]

    @property
    def snapshots(self) -> list[SnapshotEntry]:
        """The snapshot records users see, in table order (as Image.snapshots)."""
        if self.closed:
            raise Qcow2Error("I/O operation on a closed image")
        entries = self._snapshot_entries()
        mode = mode_of(self.header)
        if mode == "standard":  # every entry is a snapshot; no need for the mode registry
            return list(entries)
        from .modes import MODES

        visible = MODES[mode].visible
        return [e for e in entries if visible(e)]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.backing is not None:
                self.backing.close()
                self.backing = None
        finally:
            self.storage.close()

    def __enter__(self) -> ImageMetadata:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<qcow2.meta.ImageMetadata {self.path!r}>"


def _open_backing_layer(path: str, seen: tuple[str, ...]) -> Any:
    return ImageMetadata(path, backing=True, _seen=seen)


def open_metadata(path: str | os.PathLike[str], *, backing: bool = True) -> ImageMetadata:
    """The metadata of the qcow2 image at path (and of its backing chain with backing)."""
    return ImageMetadata(path, backing=backing)
