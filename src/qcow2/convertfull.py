"""The general convert path (convert.py's, for what fastconvert.py does not take): the
inputs through the engine (block status, snapshots), the target as an Image or a raw
file, the copy with its zero detection, and what goes beyond a plain copy: every
internal snapshot kept and shared (--snapshots) and persistent bitmaps (--bitmaps).
Its numpy import is why convert.py imports this module only when a convert needs it.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .backing import RawFile, probe_format
from .errors import InvalidArgumentError, Qcow2Error, SnapshotNotFoundError
from .fastconvert import CHUNK, FORMATS, GRAIN, WINDOW, add_range, aligned, raw_data
from .geometry import div_round_up

if TYPE_CHECKING:
    from .compress import CompressPipeline


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
        self.extended = extended
        self.key = np.zeros(0, dtype=np.uint64)
        self.bitmap = np.zeros(0, dtype=np.uint64)
        self.state = np.zeros(0, dtype=np.int64)
        self.guest = np.zeros(0, dtype=np.int64)

    def _data(self, entries: np.ndarray) -> np.ndarray:
        """Which L2 entries point at data: a data cluster (not a preallocated zero one)
        or a compressed cluster."""
        from .format import L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO

        comp = (entries & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
        normal = (entries & np.uint64(L2E_OFFSET_MASK)) != 0
        if not self.extended:
            normal &= (entries & np.uint64(QCOW_OFLAG_ZERO)) == 0
        return comp | normal

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position, found) of each key."""
        pos = np.minimum(np.searchsorted(self.key, keys), max(len(self.key) - 1, 0))
        found = self.key[pos] == keys if len(self.key) else np.zeros(len(keys), dtype=bool)
        return pos, found

    def add(self, state: int, clusters: np.ndarray, entries: np.ndarray) -> None:
        """The state (now an output snapshot) holds these input clusters' copies."""
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
