"""Sub-command convert: copy the guest content of one or more images (qcow2 or raw,
concatenated) into a new qcow2 or raw image, as `qemu-img convert` does.

Zero areas (4 KiB grains, qemu-img's default -S) are not written: they stay unallocated
in a qcow2 target and holes in a raw one; source ranges that the qcow2 metadata already
says read as zeros are not even read. With -c every qcow2 cluster that holds data is
written compressed (or plain, if it does not compress). With -n the target exists
already and is not assumed to be zeroed: zero areas are written as zeros. The output is
flushed to the disk at the end (qemu-img's default cache mode for convert, unsafe, skips
that; a copy that may vanish in a power cut is no copy).

Crash safety: a new output is written under a temporary name beside it and renamed once
complete and synced (the directory synced too), so OUTPUT never names a partial image; a
crash leaves only the temporary `.NAME.convert-PID`, which the next convert to the same
OUTPUT removes once no process PID exists and no live convert holds its lock
(remove_stale_temporaries); an error removes it at once. Since nobody opens that file before the rename, the syncs that order
metadata after data are left out: one sync when it is closed makes it durable. With -n
the target is written in place with every ordering sync, as any image write.

Beyond qemu-img: --snapshots copies every internal snapshot (copy_with_snapshots), and
OUTPUT '-' streams the image to stdout (stream.py).

A plain convert (fastconvert.plan says which) takes fastconvert.py's path, which writes
the same output without numpy (whose import alone costs about what qemu-img takes for
a whole convert of 128 MiB); this module therefore imports numpy only in the functions
of the full path. QCOW2_CONVERT_FULL_PATH=1 forces the full path (for tests).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import fastconvert
from .backing import RawFile, probe_format
from .errors import InvalidArgumentError, Qcow2Error, SnapshotNotFoundError
from .fastconvert import CHUNK, GRAIN, WINDOW, add_range, aligned, raw_data
from .geometry import div_round_up

if TYPE_CHECKING:
    import numpy as np

    from .compress import CompressPipeline

MAX_SPARSE = 16 << 20  # qemu-img's largest -S
FORMATS = ("qcow2", "raw")


class Source:
    """One input: a qcow2 image (or one of its snapshots) or a raw file."""

    def __init__(self, path: str, fmt: str | None, snapshot: str | None) -> None:
        from .image import open_image as qopen

        if not os.path.exists(path):
            # qemu's words: the format layer's open, then the file's
            raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                             "No such file or directory")
        fmt = fmt or probe_format(path, what="image")
        if fmt not in FORMATS:
            raise InvalidArgumentError(f"Unknown file format '{fmt}'")
        self.raw: RawFile | None = None
        self.img: Any = None
        self.view: Any = None
        if fmt == "raw":
            if snapshot is not None:
                raise InvalidArgumentError("Failed to load snapshot: raw images have no snapshots")
            self.raw = RawFile(path)
            self.size = self.raw.size
            return
        self.img = qopen(path)
        try:
            self.view = self.img if snapshot is None else _snapshot_view(self.img, snapshot)
        except BaseException:
            self.img.close()
            raise
        self.size = self.view.size

    def readinto(self, buf: memoryview, offset: int) -> None:
        (self.raw if self.raw is not None else self.view).readinto(buf, offset)

    def known_zero(self, offset: int, n: int) -> bool:
        """Whether the metadata alone says [offset, offset + n) reads as zeros: the
        qcow2 block status, or for a raw file the file system's holes (SEEK_DATA)."""
        if self.raw is not None:
            return _raw_hole(self.raw.fd, offset, n)
        if self.view is None:
            return False
        return _layer_zero(self.view, self.img.backing, offset, n)

    def data_ranges(self, offset: int, n: int) -> list[tuple[int, int]]:
        """The (start, end) ranges of [offset, offset + n) that may hold data: all of it
        but what known_zero would say reads as zeros, found in one pass."""
        if self.raw is not None:
            return raw_data(self.raw.fd, offset, n)
        if self.view is None:
            return [(offset, offset + n)] if n else []
        out: list[tuple[int, int]] = []
        _layer_data(self.view, self.img.backing, offset, n, out)
        return out

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
        if self.img is not None:
            self.img.close()


def _layer_data(layer: Any, backing: Any, offset: int, n: int, out: list[tuple[int, int]]) -> None:
    """Append to out the ranges of a qcow2 layer (and below unallocated parts, its
    backing chain) that its block status does not say read as zeros."""
    from .cluster import UNALLOCATED, ZERO

    for guest, length, kind in _status(layer, offset, n):
        if kind == ZERO:
            continue
        if kind != UNALLOCATED:
            add_range(out, guest, guest + length)
            continue
        if backing is None or guest >= backing.size:
            continue  # nothing below, or past the end of the backing file: zeros
        k = min(length, backing.size - guest)
        if isinstance(backing, RawFile):
            for s, e in raw_data(backing.fd, guest, k):
                add_range(out, s, e)
        else:
            _layer_data(backing, backing.backing, guest, k, out)


def _layer_zero(layer: Any, backing: Any, offset: int, n: int) -> bool:
    """Whether a qcow2 layer's block status (and below unallocated parts, its backing
    chain's) says [offset, offset + n) reads as zeros."""
    from .cluster import UNALLOCATED, ZERO

    for guest, length, kind in _status(layer, offset, n):
        if kind == ZERO:
            continue
        if kind != UNALLOCATED:
            return False
        if backing is None or guest >= backing.size:
            continue  # nothing below, or past the end of the backing file: zeros
        k = min(length, backing.size - guest)
        if isinstance(backing, RawFile):
            if not _raw_hole(backing.fd, guest, k):
                return False
        elif not _layer_zero(backing, backing.backing, guest, k):
            return False
    return True


def _status(layer: Any, offset: int, n: int) -> Iterator[tuple[int, int, int]]:
    """(guest offset, length, kind) of a layer: from the L2 tables with numpy where the
    entries are standard ones, else from its block status."""
    from .cluster import entry_runs

    cmap = getattr(layer, "clusters", None)
    if cmap is None or cmap.geo.extended_l2:
        for guest, length, kind, _host in layer.block_status(offset, n):
            yield guest, length, kind
        return
    cbits = cmap.geo.cluster_bits
    end = offset + n
    for c, k, kind, _host in entry_runs(cmap, offset >> cbits, ((end - 1) >> cbits) + 1):
        s, e = max(c << cbits, offset), min((c + k) << cbits, end)
        yield s, e - s, kind


def _raw_hole(fd: int, offset: int, n: int) -> bool:
    """Whether [offset, offset + n) of a raw file is one hole (or past its end): no data
    from offset on before offset + n. Where SEEK_DATA is unknown, nothing is a hole."""
    seek_data = getattr(os, "SEEK_DATA", None)
    if seek_data is None:
        return False
    try:
        return os.lseek(fd, offset, seek_data) >= offset + n
    except OSError as exc:
        # ENXIO: no data at or after offset (the rest of the file is a hole)
        return exc.errno == errno.ENXIO


def _snapshot_view(img: Any, param: str) -> Any:
    """-l snapshot.name=NAME / snapshot.id=ID (both may be given) or -l/-s ID_OR_NAME."""
    want: dict[str, str] = {}
    if param.startswith("snapshot."):
        for item in param.split(","):
            key, sep, value = item.partition("=")
            if not sep or key not in ("snapshot.name", "snapshot.id"):
                raise InvalidArgumentError(f"Invalid snapshot parameter '{item}'")
            want[key.removeprefix("snapshot.")] = value
    for e in img.snapshots:
        if want:
            if all(getattr(e, k) == v for k, v in want.items()):
                return img.snapshot(e.id)
        elif param in (e.id, e.name):
            return img.snapshot(param)
    raise SnapshotNotFoundError("Failed to load snapshot: Can't find snapshot")


class _Target:
    """The output: an open qcow2 image, or a raw file written through the storage layer."""

    def __init__(self, path: str, fmt: str, size: int, create: bool, options: list[str],
                 compress: bool = False, threads: int | None = None) -> None:
        from .image import open_image as qopen
        from .storage import FileBackend, Storage, UnorderedFileBackend

        self.img: Any = None
        self.raw: Any = None
        # a new output (under a temporary name, renamed once closed) is synced once,
        # when it is closed, instead of at every ordering point
        self._backend: UnorderedFileBackend | None = None
        # with compress: the cluster being gathered (guest offset, bytes) before it is
        # written compressed in one piece
        self.compress = compress
        self._cluster: tuple[int, bytearray] | None = None
        self._packer: CompressPipeline | None = None
        if not create and not os.path.exists(path):
            # qemu's words: the format layer's open, then the file's
            raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                             "No such file or directory")
        if fmt == "qcow2":
            if create:
                _create_qcow2(path, size, options, compress)
                try:
                    self._backend = UnorderedFileBackend(path, writable=True)
                except OSError as exc:
                    raise Qcow2Error(f"Could not open '{path}': {exc.strerror}") from None
                self.img = qopen(path, "r+", backend=self._backend)
            else:
                self.img = qopen(path, "r+")
            have = self.img.size
        else:
            if create and options:
                raise InvalidArgumentError("raw output takes no -o options")
            try:
                backend = (UnorderedFileBackend if create else FileBackend)(
                    path, writable=True, create=create)
            except OSError as exc:
                raise Qcow2Error(f"Could not open '{path}': {exc.strerror}") from None
            if create:
                assert isinstance(backend, UnorderedFileBackend)
                self._backend = backend
            self.raw = Storage(backend, True)
            if create:
                self.raw.truncate(size)
            have = self.raw.size()
        if have < size:
            self.close()
            raise InvalidArgumentError(
                f"Target '{path}' is too small: {have} bytes for {size} bytes of input")
        if compress:
            from .compress import CompressPipeline

            img = self.img
            self._packer = CompressPipeline(
                img.header.compression_type, img.cluster_size, threads,
                lambda at, data, comp: img.write_compressed(at, data, compressed=comp))

    def write(self, data: memoryview, offset: int) -> None:
        if self.compress:
            self._gather(data, offset)
        elif self.img is not None:
            self.img.pwrite(data, offset)
        else:
            self.raw.pwrite(data, offset, "data")

    def _gather(self, data: memoryview, offset: int) -> None:
        """Collect data (coming in increasing offsets) cluster by cluster; a cluster is
        written compressed once the data moves past it. Parts never written are zeros
        (the target is new)."""
        cs = self.img.cluster_size
        pos = 0
        while pos < len(data):
            at = offset + pos
            start = at - at % cs
            if self._cluster is not None and self._cluster[0] != start:
                self._put_cluster()
            if self._cluster is None:
                self._cluster = (start, bytearray(min(cs, self.img.size - start)))
            buf = self._cluster[1]
            k = min(len(data) - pos, len(buf) - (at - start))
            buf[at - start : at - start + k] = data[pos : pos + k]
            pos += k

    def _put_cluster(self) -> None:
        assert self._cluster is not None and self._packer is not None
        start, buf = self._cluster
        self._cluster = None
        self._packer.put(start, buf)

    def zero(self, offset: int, n: int) -> None:
        if self.img is not None:
            self.img.write_zeroes(offset, n)
        else:
            self.raw.pwrite(bytes(n), offset, "data")

    def settle(self) -> None:
        """Write the compressed clusters gathered or being compressed, if any."""
        if self._cluster is not None:
            self._put_cluster()
        if self._packer is not None:
            self._packer.drain()

    def finish(self) -> None:
        self.settle()
        if self.img is not None:
            self.img.flush()
        else:
            self.raw.sync()

    def close(self) -> None:
        if self._packer is not None:
            self._packer.close()
        if self.img is not None:
            self.img.close()
        if self.raw is not None:
            self.raw.close()


def _create_qcow2(path: str, size: int, options: list[str], compress: bool = False) -> None:
    from .commands import CREATE_KWARGS, parse_create_options, valid_option_list
    from .create import create

    for chunk in options:
        if not valid_option_list(chunk):
            raise InvalidArgumentError(f"Invalid option list: {chunk}")
    opts = parse_create_options(",".join(options)) if options else {}
    for name in ("backing_file", "backing_fmt", "size"):
        if name in opts:
            raise InvalidArgumentError(f"Parameter '{name}' is not supported by convert")
    kw = {name: value for name, (_text, value) in opts.items() if name in CREATE_KWARGS}
    if compress and kw.get("preallocation", "off") != "off":
        raise InvalidArgumentError("Compression and preallocation not supported at the same time")
    try:
        create(path, size, **kw)
    except Qcow2Error as exc:
        raise InvalidArgumentError(f"{path}: error while converting qcow2: {exc}") from None


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """(first, end, value) of each run of equal values in a boolean array."""
    import numpy as np

    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    starts = np.r_[0, edges]
    ends = np.r_[edges, len(mask)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield s, e, bool(mask[s])


def copy(sources: list[Source], target: _Target, zero_target: bool, progress: Any = None,
         grain: int = GRAIN) -> None:
    """Copy the concatenated sources into target. With zero_target (a new image), zero
    areas are left alone; otherwise they are written as zeros. grain: the zero
    detection unit (-S); 0 writes everything as data."""
    import numpy as np

    buf = np.zeros(max(CHUNK, grain) // 8, dtype=np.uint64)
    base = 0
    for src in sources:
        copy_range(src, target, 0, src.size, base, zero_target, buf, progress, grain)
        base += src.size


def copy_range(src: Source, target: _Target, start: int, end: int, base: int, zero_target: bool,
               buf: np.ndarray, progress: Any = None, grain: int = GRAIN) -> None:
    """Copy [start, end) of src to base + start in target. buf: the one buffer for every
    chunk (a fresh one each time costs page faults), padded with zeros to whole grains;
    zero grains are found on 64-bit words. Ranges the metadata says are zeros are not
    read; they are found a window at a time (one pass over the L2 tables or the file's
    holes), so that their list stays small."""
    pos = start
    while pos < end:
        w_end = min(end, pos + WINDOW)
        # with -S 0 nothing is sparse: every byte is written, zeros too
        data = aligned(src.data_ranges(pos, w_end - pos), grain, pos, w_end) if grain \
            else [(pos, w_end)]
        for s, e in data:
            if s > pos:
                if not zero_target:
                    target.zero(base + pos, s - pos)
                if progress is not None:
                    progress.update(s - pos)
            _copy_data(src, target, s, e, base, zero_target, buf, progress, grain)
            pos = e
        if pos < w_end:
            if not zero_target:
                target.zero(base + pos, w_end - pos)
            if progress is not None:
                progress.update(w_end - pos)
            pos = w_end


def _copy_data(src: Source, target: _Target, start: int, end: int, base: int, zero_target: bool,
               buf: np.ndarray, progress: Any, grain: int) -> None:
    """Read [start, end) and write its data (its zero grains only to a target that is
    not zeroed)."""
    whole = memoryview(buf).cast("B")
    chunk = len(whole) if not grain else len(whole) // grain * grain
    pos = start
    while pos < end:
        n = min(chunk, end - pos)
        mv = whole[:n]
        src.readinto(mv, pos)
        if not grain:
            target.write(mv, base + pos)
        else:
            grains = -(-n // grain)
            if n % grain:
                whole[n : grains * grain] = bytes(grains * grain - n)
            nonzero = buf[: grains * grain // 8].reshape(grains, grain // 8).any(axis=1)
            for g0, g1, has_data in _runs(nonzero):
                s, e = g0 * grain, min(g1 * grain, n)
                if has_data:
                    target.write(mv[s:e], base + pos + s)
                elif not zero_target:
                    target.zero(base + pos + s, e - s)
        pos += n
        if progress is not None:
            progress.update(n)


def check_snapshots(src: Source) -> None:
    """--snapshots' refusals, before anything is created: every snapshot must have the
    image's disk size (the output's states are made by snapshotting one image)."""
    if src.img is None:
        raise InvalidArgumentError("--snapshots needs a qcow2 input")
    for e in src.img.snapshots:
        if e.disk_size is not None and e.disk_size != src.img.size:
            raise InvalidArgumentError(
                f"--snapshots: snapshot '{e.name}' has a disk size of {e.disk_size} bytes, the "
                f"image {src.img.size}: snapshots of another size cannot be copied")


def _changed_clusters(prev: Any, cur: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Guest clusters (input cluster size) whose L2 entry differs between two states of
    one image (prev None: an empty state), and cur's entries there (COPIED cleared; two
    columns, the entry and its subcluster bitmap, 0 without extended L2): the clusters
    that do not share their host cluster (or zero/unallocated state). Whole L2 tables
    that both states share are skipped without reading them."""
    import numpy as np

    from .format import QCOW_OFLAG_COPIED

    geo = cur.clusters.geo
    n = div_round_up(size, geo.cluster_size)
    n_l1 = div_round_up(n, geo.l2_entries)
    words = 2 if geo.extended_l2 else 1
    mask = np.uint64(~QCOW_OFLAG_COPIED & 0xFFFFFFFFFFFFFFFF)
    empty = np.zeros(geo.l2_entries * words, dtype=np.uint64)
    out: list[np.ndarray] = []
    ents: list[np.ndarray] = []
    # only L1 entries that differ: the same table (or none in both) has the same entries
    before = _l2_offsets(prev.clusters, n_l1) if prev is not None else np.zeros(n_l1, np.uint64)
    differ = np.flatnonzero(before != _l2_offsets(cur.clusters, n_l1))
    for i in differ.tolist():
        a = prev.clusters.l2_offset(i) if prev is not None else 0
        b = cur.clusters.l2_offset(i)
        ta = prev.clusters.l2_table(i) if a else empty
        tb = cur.clusters.l2_table(i) if b else empty
        ea, eb = ta.reshape(-1, words).copy(), tb.reshape(-1, words).copy()
        ea[:, 0] &= mask
        eb[:, 0] &= mask
        rows = np.flatnonzero((ea != eb).any(axis=1))
        rows = rows[rows + i * geo.l2_entries < n]
        out.append(rows + i * geo.l2_entries)
        got = np.zeros((len(rows), 2), dtype=np.uint64)
        got[:, :words] = eb[rows]
        ents.append(got)
    if not out:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.uint64)
    return np.concatenate(out), np.concatenate(ents)


def _l2_offsets(cmap: Any, n: int) -> np.ndarray:
    """The L2 table offsets of a map's first n L1 entries (0 past its L1 table)."""
    import numpy as np

    from .format import L1E_OFFSET_MASK

    out = np.zeros(n, dtype=np.uint64)
    m = min(n, len(cmap.l1))
    out[:m] = cmap.l1[:m] & np.uint64(L1E_OFFSET_MASK)
    return out


BASE_CANDIDATES = 16  # earlier states a state is compared with, newest first


def _best_base(copied: list[tuple[Any, Any]], view: Any, size: int
               ) -> tuple[Any, np.ndarray, np.ndarray]:
    """The state already copied that differs from view in the fewest clusters (the
    latest one on a tie: it needs no apply), those clusters and view's entries there."""

    best: tuple[Any, np.ndarray, np.ndarray] | None = None
    for entry, other in reversed(copied[-BASE_CANDIDATES:]):
        changed, ents = _changed_clusters(other, view, size)
        if best is None or len(changed) < len(best[1]):
            best = (entry, changed, ents)
            if not len(changed):
                break
    assert best is not None
    return best


class _Held:
    """Which output snapshot holds the copy of which input data cluster: sorted arrays
    (an image's worth of clusters costs 32 bytes each, not a Python object), keyed by
    the input L2 entry (COPIED cleared), with its subcluster bitmap, the index of the
    state (in copy order) and the guest cluster the copy is at. The first state that
    holds a cluster keeps it."""

    def __init__(self, extended: bool) -> None:
        import numpy as np

        self.extended = extended
        self.key = np.zeros(0, dtype=np.uint64)
        self.bitmap = np.zeros(0, dtype=np.uint64)
        self.state = np.zeros(0, dtype=np.int64)
        self.guest = np.zeros(0, dtype=np.int64)

    def _data(self, entries: np.ndarray) -> np.ndarray:
        """Which L2 entries point at data: a data cluster (not a preallocated zero one)
        or a compressed cluster."""
        import numpy as np

        from .format import L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO

        comp = (entries & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
        normal = (entries & np.uint64(L2E_OFFSET_MASK)) != 0
        if not self.extended:
            normal &= (entries & np.uint64(QCOW_OFLAG_ZERO)) == 0
        return comp | normal

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position, found) of each key."""
        import numpy as np

        pos = np.minimum(np.searchsorted(self.key, keys), max(len(self.key) - 1, 0))
        found = self.key[pos] == keys if len(self.key) else np.zeros(len(keys), dtype=bool)
        return pos, found

    def add(self, state: int, clusters: np.ndarray, entries: np.ndarray) -> None:
        """The state (now an output snapshot) holds these input clusters' copies."""
        import numpy as np

        data = self._data(entries[:, 0])
        keys, first = np.unique(entries[data, 0], return_index=True)
        new = ~self._find(keys)[1]
        keys, first = keys[new], first[new]
        order = np.argsort(np.concatenate([self.key, keys]), kind="stable")
        self.key = np.concatenate([self.key, keys])[order]
        self.bitmap = np.concatenate([self.bitmap, entries[data, 1][first]])[order]
        self.state = np.concatenate([self.state, np.full(len(keys), state, np.int64)])[order]
        self.guest = np.concatenate([self.guest, clusters[data][first]])[order]

    def holder(self, clusters: np.ndarray, entries: np.ndarray) -> np.ndarray:
        """The state holding each cluster's data at that very guest cluster, else -1."""
        import numpy as np

        out = np.full(len(clusters), -1, dtype=np.int64)
        if not len(clusters) or not len(self.key):
            return out
        pos, found = self._find(entries[:, 0])
        found &= self._data(entries[:, 0]) & (self.bitmap[pos] == entries[:, 1]) & \
            (self.guest[pos] == clusters)
        out[found] = self.state[pos[found]]
        return out


def _shareable_units(view: Any, changed: np.ndarray, ents: np.ndarray, held: _Held,
                     per_unit: int, n_clusters: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Split the units (the larger of the two cluster sizes; per_unit input clusters)
    that hold changed clusters into those an output snapshot already holds alike, as
    (unit, state index), and those to copy. A unit is held alike when every input
    cluster in it is a data cluster whose copy one and the same earlier state holds at
    the same guest cluster (its entry there is that very host cluster, so its content
    is the same): with a larger output cluster, a unit whose input clusters were copied
    for different states, or are zero or unallocated, is copied."""
    import numpy as np

    from .format import QCOW_OFLAG_COPIED

    holder = held.holder(changed, ents)
    if per_unit == 1:
        units, unit_holder = changed, holder
    else:
        units = np.unique(changed // per_unit)
        grid = np.full((len(units), per_unit), -2, dtype=np.int64)  # -2: not looked up
        grid[np.searchsorted(units, changed // per_unit), changed % per_unit] = holder
        cl = units[:, None] * per_unit + np.arange(per_unit)
        grid[cl >= n_clusters] = -3  # past the disk: not part of the unit
        rows, cols = np.nonzero(grid == -2)
        if len(rows):
            # clusters of the unit the state did not change: the base's entries
            extended = bool(view.clusters.geo.extended_l2)
            others = cl[rows, cols]
            got = np.zeros((len(others), 2), dtype=np.uint64)
            for k, c in enumerate(others.tolist()):
                e0, e1 = view.clusters.get(c)
                got[k] = (e0 & ~QCOW_OFLAG_COPIED, e1 if extended else 0)
            grid[rows, cols] = held.holder(others, got)
        first = grid[:, 0]
        alike = ((grid == first[:, None]) | (grid == -3)).all(axis=1) & (first >= 0)
        unit_holder = np.where(alike, first, -1)
    share = unit_holder >= 0
    return (list(zip(units[share].tolist(), unit_holder[share].tolist())),
            units[~share].tolist())


def _by_holder(shared: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """(state index, its units in order) from (unit, state index) pairs."""
    out: dict[int, list[int]] = {}
    for u, k in shared:
        out.setdefault(k, []).append(u)
    return list(out.items())


def _unit_ranges(units: list[int], unit: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges of sorted units, merged where they touch."""
    out: list[tuple[int, int]] = []
    for u in units:
        s, e = u * unit, min((u + 1) * unit, size)
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def copy_with_snapshots(src: Source, target: _Target, progress: Any = None,
                        grain: int = GRAIN) -> None:
    """Copy every internal snapshot and then the active state of a qcow2 input into a
    new qcow2 target, keeping what the states share shared.

    The oldest snapshot (table order, which is creation order) is copied whole, then the
    output is snapshotted with the input snapshot's id, name, date, VM clock, icount and
    VM state. Each later state is written as a difference on top of the closest state
    copied before it (the previous one, or an older one that the output then applies
    first, as after `snapshot -a` in the input): only the guest clusters whose input L2
    entry differs (another host cluster, or zero/unallocated) change in the output;
    every other cluster stays shared between the output's states, as it was in the
    input. A changed cluster whose input host cluster was copied for another earlier
    state (one that is not the base: a cluster kept by a snapshot, written over, then
    taken up again by a state that is not a child of it) is not copied again: the
    output's active state points at that state's copy (Image.share_from_snapshot).
    The unit is the larger cluster size (see _shareable_units). Where the output's
    refcount mode cannot express that sharing (owner mode: a node shares only with its
    ancestors), the cluster is copied."""
    import numpy as np

    img = src.img
    out = target.img
    size = img.size
    states: list[tuple[Any, Any]] = [(e, img.snapshot(e.id)) for e in img.snapshots]
    states.append((None, img))
    buf = np.zeros(max(CHUNK, grain) // 8, dtype=np.uint64)
    in_cs, out_cs = img.cluster_size, out.cluster_size
    unit = max(in_cs, out_cs)  # (both powers of two: one is a multiple of the other)
    per_unit = unit // in_cs
    n_clusters = div_round_up(size, in_cs)
    copied: list[tuple[Any, Any]] = []  # states in the output (as snapshots), oldest first
    held = _Held(bool(img.clusters.geo.extended_l2))
    for entry, view in states:
        src.view = view
        if not copied:
            changed, ents = _changed_clusters(None, view, size)
            copy_range(src, target, 0, size, 0, True, buf, progress, grain)
        else:
            base, changed, ents = _best_base(copied, view, size)
            if base is not copied[-1][0]:
                # an older state is closer (a snapshot applied, then written over):
                # start from it, as the input did
                target.settle()
                out.apply_snapshot(base.id)
            shared, to_copy = _shareable_units(view, changed, ents, held, per_unit, n_clusters)
            target.settle()
            for k, units in _by_holder(shared):
                for s, e in _unit_ranges(units, unit, size):
                    if not out.share_from_snapshot(copied[k][0].id, s, e - s):
                        to_copy.extend(range(s // unit, -(-e // unit)))
            done = 0
            for s, e in _unit_ranges(sorted(to_copy), unit, size):
                # the base state's clusters there leave the active state (the
                # snapshots keep theirs): the range reads as zeros, as in a new target
                target.settle()
                out.discard(s, e - s)
                copy_range(src, target, s, e, 0, True, buf, progress, grain)
                done += e - s
            if progress is not None:
                progress.update(size - done)
        target.settle()
        if entry is not None:
            # clusters reserved for later writes go back first: the snapshot's tables
            # then follow the data, and later data follows them, leaving no free hole
            # in the middle of the file
            out.flush()
            out.refcounts.return_pool()
            out.create_snapshot(entry.name, img.read_vm_state(entry.id),
                                vm_clock_nsec=entry.vm_clock_nsec, icount=entry.icount,
                                date_sec=entry.date_sec, date_nsec=entry.date_nsec,
                                snapshot_id=entry.id)
            held.add(len(copied), changed, ents)
            copied.append((entry, view))
    src.view = img


def check_bitmaps(src: Source, skip_broken: bool) -> None:
    """qemu-img convert --bitmaps' refusals, before anything is created."""
    if src.img is None:
        raise InvalidArgumentError("Source lacks bitmap support")
    for ent in src.img.bitmaps:
        if ent.in_use and not skip_broken:
            raise InvalidArgumentError(
                f"Cannot copy inconsistent bitmap '{ent.name}'\n"
                "Try --skip-broken-bitmaps, or use 'qcow2 bitmap --remove' to delete it")


def copy_bitmaps(src: Source, img: Any, skip_broken: bool) -> None:
    """Every persistent bitmap of the source into the target image: same name,
    granularity, enabled state and bits."""
    from .bitmaps import supported

    if img.header.version < 3:
        raise InvalidArgumentError("Format driver 'qcow2' does not support bitmaps")
    have = {b.name for b in img.bitmaps}
    for ent in reversed(src.img.bitmaps):  # (QEMU's order of its bitmap list)
        if ent.name in have:
            raise InvalidArgumentError(
                f"Failed to create bitmap {ent.name}: Bitmap already exists: {ent.name}")
    for ent in src.img.bitmaps:
        if ent.in_use or not supported(ent):
            if skip_broken:
                print(f"qcow2: warning: Skipping inconsistent bitmap '{ent.name}'",
                      file=sys.stderr)
                continue
            raise InvalidArgumentError(f"Cannot copy inconsistent bitmap '{ent.name}'")
        img.add_bitmap(ent.name, ent.granularity, disabled=not ent.auto)
        img.merge_bitmap(ent.name, ent.name, src.img)


def _sparse_size(text: str) -> int:
    """-S: qemu-img's sparse size (bytes, suffixes), a multiple of 512 up to 16 MiB."""
    from .commands import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        raise InvalidArgumentError(
            "Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E "
            "suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    if value % 512 or value > MAX_SPARSE:
        raise InvalidArgumentError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 "
            f"up to {MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates output).")
    return value


def _parallel(text: str) -> int:
    from .commands import parse_number

    try:
        value = parse_number(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 16:
        raise InvalidArgumentError(
            "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    return value


def _temporary_name(output: str) -> str:
    if os.path.isdir(output):
        raise Qcow2Error(f"Could not create '{output}': Is a directory")
    head, tail = os.path.split(output)
    return os.path.join(head, f".{tail}.convert-{os.getpid()}")


def _running(pid: int) -> bool:
    """Whether a process with this id exists here (one we may not signal does too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # EPERM, or no id a process here can have: not ours to judge
    return True


def remove_stale_temporaries(output: str) -> list[str]:
    """Remove the temporary files that killed converts to OUTPUT left behind, and return
    their paths. A file goes only when all of these hold: its name is exactly
    `.NAME.convert-PID` beside OUTPUT (PID in decimal, as _temporary_name writes it), it
    is a regular file (a symlink is never followed nor removed), no process PID exists
    here, and nobody holds its lock (a convert holds its temporary file's flock while it
    writes: that covers a convert in another PID namespace or on another host sharing
    the directory, whose PID means nothing here). Anything in doubt is left alone."""
    import fcntl
    import stat

    head, tail = os.path.split(output)
    prefix = f".{tail}.convert-"
    try:
        names = os.listdir(head or ".")
    except OSError:
        return []
    removed = []
    for name in names:
        digits = name[len(prefix):]
        if not name.startswith(prefix) or not (digits.isascii() and digits.isdigit()) \
                or digits[0] == "0":
            continue
        pid = int(digits)
        if pid == os.getpid() or _running(pid):
            continue
        path = os.path.join(head, name)
        try:  # O_NONBLOCK: a FIFO of that name must not stall us
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # a symlink (ELOOP), gone already, or not readable
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):  # not replaced meanwhile
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue  # locked by a live convert, or not ours to remove
        finally:
            os.close(fd)
    return removed


def _claim_temporary(path: str, output: str, fmt: str) -> int:
    """Create the temporary file and hold its lock (see remove_stale_temporaries) until
    the fd is closed: after the rename, or when the file is removed on an error."""
    import fcntl

    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # qemu-img's words (it creates OUTPUT itself)
            raise Qcow2Error(f"{output}: error while converting {fmt}: Could not create "
                             f"'{output}': {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st, now = os.fstat(fd), os.lstat(path)
        except OSError:
            os.close(fd)
            continue
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)  # removed by a cleaner that took it for stale before we locked it
    raise Qcow2Error(f"Could not create '{output}': its temporary file keeps being removed")


def _renamed(exc: Qcow2Error, path: str, output: str) -> Qcow2Error:
    """The error with the output's name where it names the temporary file."""
    from .errors import Qcow2IOError

    msg = exc.args[-1] if exc.args and isinstance(exc.args[-1], str) else str(exc)
    if path not in msg:
        return exc
    msg = msg.replace(path, output)
    if isinstance(exc, Qcow2IOError):
        return Qcow2IOError(exc.errno or errno.EIO, msg)
    try:
        return type(exc)(msg)
    except TypeError:
        return Qcow2Error(msg)


def _publish(path: str, output: str) -> None:
    """Rename the finished (and flushed) output to its name, durably: the directory
    entry is synced too."""
    from .storage import sync_directory

    try:
        os.replace(path, output)
    except OSError as exc:
        raise Qcow2Error(f"Could not create '{output}': {exc.strerror}") from None
    sync_directory(os.path.dirname(output))


@contextlib.contextmanager
def _progress(total: int, show: bool) -> Iterator[Any]:
    """qemu-img convert -p's progress lines on stdout (progress.py: programs parse them),
    updated as the bytes are copied, or None."""
    if not show:
        yield None
        return
    from .progress import QemuProgress

    with QemuProgress(1.0, total) as bar:  # qemu-img convert's 1% step
        yield bar


def _remove(path: str) -> None:
    """A half-written new image is of no use to anyone."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _convert_fast(fast: fastconvert.Plan, output: str, grain: int, show: bool) -> int:
    """A plain convert (fastconvert.plan): the same output as the full path, with the
    same publishing (a temporary name, renamed once complete and synced)."""
    claim: int | None = None  # the temporary output's fd, held for its lock
    try:
        path = _temporary_name(output)
        remove_stale_temporaries(output)
        claim = _claim_temporary(path, output, fast.out_fmt)
        with _progress(fast.total, show) as bar:
            try:
                fastconvert.run(fast, path, grain, bar)
            except Qcow2Error as exc:
                raise _renamed(exc, path, output) from None
        _publish(path, output)
    except BaseException:
        if claim is not None:
            _remove(path)
        raise
    finally:
        if claim is not None:
            os.close(claim)
        fast.close()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    # qemu-img's checks, in its order
    if args.skip_broken_bitmaps and not args.bitmaps:
        raise InvalidArgumentError("Use of --skip-broken-bitmaps requires --bitmaps")
    if args.no_create and args.options:
        raise InvalidArgumentError("-o has no effect when skipping image creation")
    if args.target_is_zero and not args.no_create:
        raise InvalidArgumentError("--target-is-zero requires use of -n flag")
    grain = GRAIN if args.sparse is None else _sparse_size(args.sparse)
    threads = _parallel(args.parallel) if args.parallel is not None else None
    if len(args.files) < 2:
        raise InvalidArgumentError("Must specify image file name")
    out_fmt = args.out_fmt or "raw"  # qemu-img convert's default
    if out_fmt not in FORMATS:
        raise InvalidArgumentError(f"Unknown file format '{out_fmt}'")
    if args.compress and out_fmt != "qcow2":
        raise InvalidArgumentError("Compression not supported for this file format")
    if args.compress and args.no_create and not args.target_is_zero:
        raise InvalidArgumentError("Compression needs a new target image (not -n) or "
                                   "--target-is-zero: compressed clusters are written only "
                                   "where there is no data yet")
    if args.fmt is not None and args.fmt not in FORMATS:
        raise InvalidArgumentError(f"Unknown file format '{args.fmt}'")
    *inputs, output = args.files
    snapshot = args.snapshot_param if args.snapshot_param is not None else args.snapshot
    if args.bitmaps and len(inputs) > 1:
        raise InvalidArgumentError("Copying bitmaps only possible with single source")
    if args.bitmaps and out_fmt != "qcow2":
        raise InvalidArgumentError(f"Format driver '{out_fmt}' does not support bitmaps")
    if snapshot is not None and len(inputs) > 1:
        raise InvalidArgumentError("No support for concatenating multiple snapshot")
    if args.snapshots:
        if snapshot is not None:
            raise InvalidArgumentError("--snapshots copies every snapshot: it cannot be used with -l/-s")
        if len(inputs) > 1:
            raise InvalidArgumentError("--snapshots needs a single source")
        if out_fmt != "qcow2":
            raise InvalidArgumentError("--snapshots needs qcow2 output (-O qcow2)")
        if args.no_create:
            raise InvalidArgumentError("--snapshots needs a new target image (not -n)")
    stream = output == "-"
    if stream and args.no_create:
        raise InvalidArgumentError("-n cannot write to standard output")
    if stream and sys.stdout.isatty():
        raise InvalidArgumentError("Standard output is a terminal: redirect it to a file or a pipe")
    if stream and (args.snapshots or args.bitmaps):
        raise InvalidArgumentError("--snapshots and --bitmaps cannot write to standard output")
    if output in inputs:
        raise InvalidArgumentError(f"Output '{output}' is also an input")
    if not (stream or args.no_create or args.compress or args.snapshots or args.bitmaps
            or snapshot is not None):
        fast = fastconvert.plan(inputs, args.fmt, out_fmt, args.options)
        if fast is not None:
            return _convert_fast(fast, output, grain, args.progress and not args.quiet)
    sources: list[Source] = []
    created = False
    claim: int | None = None  # the temporary output's fd, held for its lock
    try:
        for path in inputs:
            sources.append(Source(path, args.fmt, snapshot))
        if args.bitmaps:
            check_bitmaps(sources[0], args.skip_broken_bitmaps)
        if args.snapshots:
            check_snapshots(sources[0])
        size = sum(s.size for s in sources)
        if stream:
            from .stream import stream_convert

            try:
                stream_convert(sources, sys.stdout.buffer, out_fmt, args.options,
                               args.compress, grain, threads)
            except BaseException:
                # what is buffered cannot go out either: point stdout at /dev/null so
                # that the interpreter's last flush does not fail a second time
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
                raise
            return 0
        create = not args.no_create
        # a new output is written under a temporary name next to it and renamed at the
        # end: a crash never leaves a partial image under the output's name
        path = _temporary_name(output) if create else output
        if create:
            remove_stale_temporaries(output)
            claim = _claim_temporary(path, output, out_fmt)
        created = create
        try:
            target = _Target(path, out_fmt, size, create, args.options, args.compress, threads)
        except Qcow2Error as exc:
            raise _renamed(exc, path, output) from None
        try:
            states = len(sources[0].img.snapshots) + 1 if args.snapshots else 1
            with _progress(size * states, args.progress and not args.quiet) as bar:
                if args.snapshots:
                    copy_with_snapshots(sources[0], target, progress=bar, grain=grain)
                else:
                    copy(sources, target, zero_target=create or args.target_is_zero,
                         progress=bar, grain=grain)
            if args.bitmaps:  # after the data, which would mark them
                copy_bitmaps(sources[0], target.img, args.skip_broken_bitmaps)
            target.finish()
        finally:
            target.close()
        if create:
            _publish(path, output)
    except BaseException:
        if created:
            _remove(path)
        raise
    finally:
        if claim is not None:
            os.close(claim)
        for s in sources:
            s.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("convert", help="copy images into a new qcow2 or raw image",
                       description="Convert (copy) the concatenated guest content of the input "
                       "images into OUTPUT, like `qemu-img convert`. Zero areas are not written. "
                       "OUTPUT '-' writes the image to standard output, strictly sequentially "
                       "(a pipe will do). A new OUTPUT is written under a temporary name and "
                       "renamed when complete: a failed or crashed convert leaves no partial "
                       "OUTPUT (the next convert to OUTPUT removes the temporary file "
                       ".OUTPUT.convert-PID of a convert that was killed).")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="input format (qcow2 or raw; probed)")
    p.add_argument("-O", dest="out_fmt", metavar="FMT", help="output format (raw, default, or qcow2)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="qcow2 creation options, as for create")
    p.add_argument("-l", dest="snapshot_param", metavar="SNAPSHOT",
                   help="copy this internal snapshot: snapshot.name=NAME, snapshot.id=ID or ID_OR_NAME")
    p.add_argument("-s", dest="snapshot", metavar="SNAPSHOT", help="the same as -l ID_OR_NAME")
    p.add_argument("--snapshots", action="store_true",
                   help="qcow2 to qcow2: copy every internal snapshot too (ids, names, dates, "
                   "clocks, VM state), keeping the data they share shared")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="write into an existing OUTPUT (not assumed to be zeroed)")
    p.add_argument("--target-is-zero", action="store_true",
                   help="with -n: the existing OUTPUT reads as zeros, zero areas are not written")
    p.add_argument("-S", dest="sparse", metavar="SPARSE_SIZE",
                   help="zero detection unit (default 4k; a multiple of 512 up to 16M; "
                   "0: no sparse detection, everything is written as data)")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="write compressed clusters (qcow2 output; compression_type in -o), "
                   "compressed in a thread pool")
    p.add_argument("-m", dest="parallel", metavar="NUM",
                   help="with -c: compression threads (1 to 16; default: the CPUs); otherwise "
                   "accepted and ignored (qemu-img's coroutines: our copy is sequential)")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="accepted, no effect (qemu-img's out-of-order writes: ours are in order)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("--bitmaps", action="store_true",
                   help="copy the persistent dirty bitmaps too (qcow2 to qcow2)")
    p.add_argument("--skip-broken-bitmaps", action="store_true",
                   help="with --bitmaps: skip inconsistent bitmaps instead of failing")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("files", metavar="FILE", nargs="*", help="input images, then OUTPUT")
    p.set_defaults(func=cmd_convert)
