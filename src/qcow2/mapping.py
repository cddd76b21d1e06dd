"""Block status and `qemu-img map`-compatible extents across a backing chain."""

from __future__ import annotations

import os
from typing import Any

from .backing import RawFile
from .cluster import COMPRESSED, NORMAL, UNALLOCATED, ZERO, entry_runs


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
    if geo.extended_l2:
        return list(layer.block_status(offset, length))
    cs = geo.cluster_size
    end = offset + length
    pieces = []
    for c, n, kind, host in entry_runs(layer.clusters, offset // cs, -(-end // cs)):
        s = max(c * cs, offset)
        e = min((c + n) * cs, end)
        pieces.append((s, e - s, kind, host + (s - c * cs) if kind == NORMAL else 0))
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


def _walk(layer: Any, depth: int, offset: int, length: int, out: list[dict[str, Any]]) -> None:
    for guest, n, kind, host in _layer_status(layer, offset, length):
        if kind == UNALLOCATED:
            nxt = getattr(layer, "backing", None)
            if nxt is not None and guest < nxt.size:
                m = min(n, nxt.size - guest)
                _walk(nxt, depth + 1, guest, m, out)
                if m < n:
                    _emit(out, guest + m, n - m, depth + 1, False, True, False, None)
            else:
                _emit(out, guest, n, depth, False, True, False, None)
        elif kind == ZERO:
            _emit(out, guest, n, depth, True, True, False, host or None)
        elif kind == COMPRESSED:
            _emit(out, guest, n, depth, True, False, True, None)
        else:
            g = guest
            for h, m, hole in _holes(_layer_fd(layer), host, n):
                _emit(out, g, m, depth, True, hole, True, h)
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


def image_map(img: Any, offset: int = 0, length: int | None = None) -> list[dict[str, Any]]:
    length = img.size - offset if length is None else length
    out: list[dict[str, Any]] = []
    _walk(img, 0, offset, length, out)
    # Unallocated everywhere: QEMU reports the depth of the bottom of the chain.
    bottom = 0
    layer = img
    while getattr(layer, "backing", None) is not None:
        layer = layer.backing
        bottom += 1
    for e in out:
        if not e["present"]:
            e["depth"] = bottom
    merged: list[dict[str, Any]] = []
    for e in out:
        _emit(merged, e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"],
              e.get("offset"))
    return merged
