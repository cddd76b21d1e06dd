"""Block status and `qemu-img map`-compatible extents across a backing chain."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .backing import RawFile
from .cluster import COMPRESSED, NORMAL, UNALLOCATED, ZERO, entry_runs
from .errors import Qcow2Error
from .format import L2E_OFFSET_MASK


def _layer_status(layer: Any, offset: int, length: int) -> list[tuple[int, int, int, int]]:
    """(guest offset, length, kind, host) pieces of one layer; raw files are all data."""
    if isinstance(layer, RawFile):
        if offset >= layer.size:
            return [(offset, length, UNALLOCATED, 0)]
        n = min(length, layer.size - offset)
        out = [(offset, n, NORMAL, offset)]
        if n < length:
            out.append((offset + n, length - n, UNALLOCATED, 0))
        return out
    geo = layer.geo
    cs = geo.cluster_size
    if geo.extended_l2:
        # Pieces lie within one cluster. Zero and unallocated subclusters of a cluster
        # that has a host offset report it too, as QEMU does (ZERO_ALLOC/UNALLOCATED_ALLOC).
        pieces = []
        for guest, n, kind, host in layer.block_status(offset, length):
            if kind in (ZERO, UNALLOCATED):
                entry, _ = layer.clusters.get(guest >> geo.cluster_bits)
                base = entry & L2E_OFFSET_MASK
                host = base + (guest & (cs - 1)) if base else 0
            pieces.append((guest, n, kind, host))
        return pieces
    end = offset + length
    pieces = []
    for c, n, kind, host in entry_runs(layer.clusters, offset // cs, -(-end // cs)):
        s = max(c * cs, offset)
        e = min((c + n) * cs, end)
        pieces.append((s, e - s, kind, host + (s - c * cs) if host else 0))
    return pieces


def _holes(fd: int | None, host: int, length: int) -> list[tuple[int, int, bool]]:
    """Split a host range into (offset, length, is_hole) using SEEK_DATA/SEEK_HOLE."""
    if fd is None or not hasattr(os, "SEEK_DATA"):
        return [(host, length, False)]
    out = []
    pos, end = host, host + length
    try:
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                data = end
            if data > pos:
                n = min(data, end) - pos
                out.append((pos, n, True))
                pos += n
                continue
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            out.append((pos, hole - pos, False))
            pos = hole
    except OSError:
        return [(host, length, False)]
    return out


def _layer_fd(layer: Any) -> int | None:
    if isinstance(layer, RawFile):
        return layer.fd
    return getattr(layer.storage.backend, "fd", None)


def _metadata_preallocated(layer: Any) -> bool:
    """QEMU's test for a metadata-preallocated image: clearly more clusters are in use
    (refcount > 0) than the host file has allocated. Only then does qemu-img look for
    host holes under qcow2 data clusters (and report them as zero). In use is what the
    refcount mode says (lazy-count: the live state's clusters count 0 but are used)."""
    cs = layer.geo.cluster_size
    storage = layer.storage
    real_clusters = storage.allocated_bytes() // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-storage.size() // cs)
    if end_cluster < threshold:
        return False
    try:
        rc = layer._usage_refcounts()
        per = layer.geo.refblock_entries
        count = 0
        for first in range(0, end_cluster, per):
            clusters = np.arange(first, min(first + per, end_cluster), dtype=np.int64)
            count += int(np.count_nonzero(rc.in_use_many(clusters)))
            if count >= threshold:
                return True
    except Qcow2Error:
        return False  # QEMU treats a failed detection as "not preallocated"
    return False


def _walk(layer: Any, depth: int, offset: int, length: int, out: list[dict[str, Any]],
          prealloc: dict[int, bool] | None = None) -> None:
    prealloc = {} if prealloc is None else prealloc
    for guest, n, kind, host in _layer_status(layer, offset, length):
        if kind == UNALLOCATED:
            # host is set for an unallocated subcluster of an allocated cluster
            nxt = getattr(layer, "backing", None)
            m = min(n, max(0, guest_size(nxt) - guest)) if nxt is not None else 0
            if m:
                _walk(nxt, depth + 1, guest, m, out, prealloc)
            if m < n:
                # no backing data: zeroes at this depth (also past the end of a shorter
                # backing file)
                _emit(out, guest + m, n - m, depth, False, True, False, host + m if host else None)
        elif kind == ZERO:
            _emit(out, guest, n, depth, True, True, False, host or None)
        elif kind == COMPRESSED:
            _emit(out, guest, n, depth, True, False, True, None)
        else:
            # A raw layer's host hole is zeroes without data. A qcow2 data cluster stays
            # data; it is also reported zero over a host hole, but only in an image that
            # QEMU detects as metadata-preallocated (elsewhere it does not look).
            raw = isinstance(layer, RawFile)
            if not raw:
                key = id(layer)
                if key not in prealloc:
                    prealloc[key] = _metadata_preallocated(layer)
                if not prealloc[key]:
                    _emit(out, guest, n, depth, True, False, True, host)
                    continue
            g = guest
            for h, m, hole in _holes(_layer_fd(layer), host, n):
                _emit(out, g, m, depth, True, hole, not (raw and hole), h)
                g += m


def _emit(out: list[dict[str, Any]], start: int, length: int, depth: int, present: bool,
          zero: bool, data: bool, offset: int | None) -> None:
    if length <= 0:
        return
    if out:
        p = out[-1]
        if (p["start"] + p["length"] == start and p["depth"] == depth and p["present"] == present
                and p["zero"] == zero and p["data"] == data
                and ("offset" in p) == (offset is not None)
                and (offset is None or p["offset"] + p["length"] == offset)):
            p["length"] += length
            return
    e: dict[str, Any] = {"start": start, "length": length, "depth": depth, "present": present,
                         "zero": zero, "data": data}
    if offset is not None:
        e["offset"] = offset
    out.append(e)


def guest_size(layer: Any) -> int:
    """Guest size as QEMU sees it: a qcow2 size in whole sectors (a partial last sector
    is dropped); raw files are already rounded up."""
    return layer.size if isinstance(layer, RawFile) else layer.size // 512 * 512


def image_map(img: Any, offset: int = 0, length: int | None = None) -> list[dict[str, Any]]:
    length = max(0, guest_size(img) - offset) if length is None else length
    out: list[dict[str, Any]] = []
    if length == 0:
        # qemu-img map prints one empty entry for an empty range
        return [{"start": offset, "length": 0, "depth": 0, "present": False, "zero": False,
                 "data": False}]
    # Unallocated in every layer comes out at the depth of the bottom layer, and past the
    # end of a shorter backing file at the depth of the layer above it, as in QEMU.
    _walk(img, 0, offset, length, out)  # _emit merges neighbours as qemu-img does
    return out
