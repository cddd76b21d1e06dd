"""convert to standard output: a qcow2 (or raw) image written strictly sequentially, to a
pipe or any other file that cannot seek.

A qcow2 image is written in one go only if its layout is known before its first byte:
a first pass over the input finds the clusters that hold data (metadata that says zeros
spares the read), then the image goes out in file order: header cluster, refcount table,
refcount blocks (every cluster counted once), L1 table, the L2 tables that map
something, and the data clusters in guest order, as QEMU's scripts/qcow2-to-stdout.py
lays it out. The second pass reads the data again. With -c the first pass compresses
every data cluster to learn its size (the layout packs them as QEMU does) and the second
compresses it again (zlib and zstd are deterministic): twice the CPU, in the thread pool,
rather than a buffer as large as the image. Nothing seeks, so a consumer may
read the image from a pipe; `qemu-img check` finds it clean (no leaks: every cluster
written is referenced once).

A crash (or a closed pipe) leaves a truncated image. Cut in its metadata, readers refuse
or `qemu-img check` flags it; cut in the data, its metadata is whole and the clusters
past the cut read as zeros, which no check can tell: nothing written can be taken back
on a pipe, so only convert's exit status (0) says the stream is complete.
"""

from __future__ import annotations

import errno
from typing import Any, BinaryIO

import numpy as np

from .compress import CompressPipeline
from .errors import InvalidArgumentError, Qcow2Error
from .format import (
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    ImageLayout,
    encode_refblock,
    encode_table,
)
from .geometry import Geometry, div_round_up

CHUNK = 2 << 20
WINDOW = 1 << 30  # zero ranges are looked up this much at a time
# -o options a streamed image takes; the others need a layout this writer does not make
_STREAM_OPTS = ("cluster_size", "refcount_bits", "compat", "compression_type", "lazy_refcounts")


class _Concat:
    """The inputs, concatenated: reads and zero knowledge across their boundaries."""

    def __init__(self, sources: list[Any]) -> None:
        self.parts: list[tuple[int, Any]] = []
        base = 0
        for s in sources:
            self.parts.append((base, s))
            base += s.size
        self.size = base

    def _pieces(self, offset: int, n: int) -> list[tuple[Any, int, int, int]]:
        """(source, its offset, length, position in the request)."""
        out = []
        for base, s in self.parts:
            lo, hi = max(offset, base), min(offset + n, base + s.size)
            if lo < hi:
                out.append((s, lo - base, hi - lo, lo - offset))
        return out

    def readinto(self, mv: memoryview, offset: int) -> None:
        for s, at, k, pos in self._pieces(offset, len(mv)):
            s.readinto(mv[pos : pos + k], at)

    def known_zero(self, offset: int, n: int) -> bool:
        return all(s.known_zero(at, k) for s, at, k, _pos in self._pieces(offset, n))

    def data_ranges(self, offset: int, n: int) -> list[tuple[int, int]]:
        """(start, end) ranges that may hold data (the others read as zeros)."""
        out: list[tuple[int, int]] = []
        for s, at, k, pos in self._pieces(offset, n):
            shift = offset + pos - at
            out += [(a + shift, b + shift) for a, b in s.data_ranges(at, k)]
        return out


class _Out:
    """Sequential writes; a closed pipe or a full disk is one clear error."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pos = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.f.write(data)
        except OSError as exc:
            why = "Broken pipe" if exc.errno == errno.EPIPE else (exc.strerror or str(exc))
            raise Qcow2Error(f"Could not write to standard output: {why}") from None
        self.pos += len(memoryview(data).cast("B"))

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as exc:
            raise Qcow2Error(f"Could not write to standard output: {exc.strerror or exc}") from None


def _options(options: list[str]) -> dict[str, Any]:
    from .commands import parse_create_options, valid_option_list

    for chunk in options:
        if not valid_option_list(chunk):
            raise InvalidArgumentError(f"Invalid option list: {chunk}")
    opts = parse_create_options(",".join(options)) if options else {}
    for name, (text, value) in opts.items():
        if name not in _STREAM_OPTS and not (name == "preallocation" and value == "off") and \
                not (name == "refcount_mode" and value == "standard") and \
                not (name == "extended_l2" and not value):
            raise InvalidArgumentError(
                f"Parameter '{name}' ({text}) is not supported when writing to standard output")
    return {name: value for name, (_text, value) in opts.items()}


def stream_convert(sources: list[Any], f: BinaryIO, out_fmt: str, options: list[str],
                   compress: bool, grain: int, threads: int | None = None) -> None:
    """Write the concatenated sources to f (not seekable) as a qcow2 or raw image."""
    src = _Concat(sources)
    out = _Out(f)
    if out_fmt == "raw":
        if options:
            raise InvalidArgumentError("raw output takes no -o options")
        _stream_raw(src, out)
    else:
        _stream_qcow2(src, out, _options(options), grain, compress, threads)
    out.flush()


def _stream_raw(src: _Concat, out: _Out) -> None:
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    zeros = bytes(CHUNK)
    for pos in range(0, src.size, CHUNK):
        n = min(CHUNK, src.size - pos)
        if src.known_zero(pos, n):
            out.write(memoryview(zeros)[:n])
        else:
            src.readinto(mv[:n], pos)
            out.write(mv[:n])


def _stream_qcow2(src: _Concat, out: _Out, opts: dict[str, Any], grain: int, compress: bool,
                  threads: int | None) -> None:
    from .create import new_header, standard_params
    from .header import pack_cluster0

    cs = int(opts.get("cluster_size", 65536))
    refcount_bits = int(opts.get("refcount_bits", 16))
    ctype_name = str(opts.get("compression_type", "zlib"))
    lazy = bool(opts.get("lazy_refcounts", False))
    # (as qemu-img creates it: the size in whole sectors)
    version, size = standard_params(src.size, cs, refcount_bits, str(opts.get("compat", "1.1")),
                                    lazy, ctype_name)
    geo = Geometry(cs.bit_length() - 1, refcount_bits.bit_length() - 1, False)
    l1_size = geo.l1_size_for(size)
    if l1_size * 8 > 32 * 1024 * 1024:
        raise InvalidArgumentError("Image size too large for this cluster size (L1 table limit)")

    ctype = COMPRESSION_ZSTD if ctype_name == "zstd" else COMPRESSION_ZLIB
    # pass 1: which clusters hold data (and with -c, what each compresses to)
    # (arrays as long as the data, never as the disk: a huge sparse disk costs nothing)
    data_idx = _data_clusters(src, size, cs, grain)
    clen = _compressed_sizes(src, data_idx, cs, ctype, threads) if compress else None
    per = geo.l2_entries
    present = np.unique(data_idx // per)  # the L2 tables that map something
    n_l1 = div_round_up(l1_size * 8, cs)
    n_l2 = len(present)
    # the data area: where each data cluster goes, relative to its start, and the
    # references each of its host clusters gets
    rel, area_refs = _data_area(clen, len(data_idx), cs, geo.refcount_max)
    n_data = len(area_refs)
    rblocks, rtable = geo.refcount_clusters_needed(1 + n_l1 + n_l2 + n_data)
    rtable_off = cs
    rblocks_off = rtable_off + rtable * cs
    l1_off = rblocks_off + rblocks * cs
    l2_off = l1_off + n_l1 * cs
    data_off = l2_off + n_l2 * cs
    n_meta = 1 + rtable + rblocks + n_l1 + n_l2

    header = new_header(version, geo, size, l1_size, l1_off if l1_size else 0, rtable_off,
                        rtable, lazy, ctype_name)
    out.write(pack_cluster0(ImageLayout(header=header), cs).ljust(cs, b"\0"))

    reftable = np.zeros(rtable * cs // 8, dtype=np.uint64)
    reftable[:rblocks] = rblocks_off + np.arange(rblocks, dtype=np.uint64) * np.uint64(cs)
    out.write(encode_table(reftable))
    entries = geo.refblock_entries
    for b in range(rblocks):
        counts = np.zeros(entries, dtype=np.uint64)
        lo, hi = b * entries, (b + 1) * entries
        counts[: max(0, min(entries, n_meta - lo))] = 1  # metadata: one reference each
        a, z = max(lo, n_meta), min(hi, n_meta + n_data)
        if a < z:
            counts[a - lo : z - lo] = area_refs[a - n_meta : z - n_meta]
        out.write(encode_refblock(counts, geo.refcount_order))

    l1 = np.zeros(n_l1 * cs // 8, dtype=np.uint64)
    l1[present] = (l2_off + np.arange(n_l2, dtype=np.uint64) * np.uint64(cs)) | \
        np.uint64(QCOW_OFLAG_COPIED)
    if n_l1:
        out.write(encode_table(l1))
    # the L2 entry of every data cluster, in guest order
    hosts = data_off + rel
    if clen is None:
        ent = hosts.astype(np.uint64) | np.uint64(QCOW_OFLAG_COPIED)
    else:
        plain = clen >= cs
        nsec = (hosts + clen + 511) // 512 - hosts // 512  # sectors the data touches
        desc = hosts.astype(np.uint64) | ((nsec - 1).astype(np.uint64) << np.uint64(geo.csize_shift))
        ent = np.where(plain, hosts.astype(np.uint64) | np.uint64(QCOW_OFLAG_COPIED),
                       desc | np.uint64(QCOW_OFLAG_COMPRESSED))
    bounds = np.searchsorted(data_idx, np.r_[present, present[-1:] + 1] * per) \
        if n_l2 else np.zeros(1, dtype=np.int64)
    for j, t in enumerate(present.tolist()):
        a, b = int(bounds[j]), int(bounds[j + 1])
        table = np.zeros(per, dtype=np.uint64)
        table[data_idx[a:b] - t * per] = ent[a:b]
        out.write(encode_table(table))

    # pass 2: the data clusters, in guest order
    if clen is None:
        _write_plain(src, out, data_idx, cs)
    else:
        _write_compressed(src, out, data_idx, clen, hosts, cs, ctype, threads)
    end = data_off + n_data * cs
    if out.pos > end:  # (the layout promised exactly this much)
        raise Qcow2Error("Internal error: streamed image does not match its layout")
    out.write(bytes(end - out.pos))  # the rest of the last host cluster


def _write_plain(src: _Concat, out: _Out, data_idx: np.ndarray, cs: int) -> None:
    """The data clusters in guest order: each run of consecutive ones read in chunks."""
    chunk = max(CHUNK, cs)
    buf = bytearray(chunk)
    mv = memoryview(buf)
    for first, end in _index_runs(data_idx):
        pos, stop = first * cs, end * cs
        while pos < stop:
            n = min(chunk, stop - pos)
            k = max(0, min(n, src.size - pos))
            src.readinto(mv[:k], pos)
            mv[k:n] = bytes(n - k)  # (past the input's end: the zero padding of the sector)
            out.write(mv[:n])
            pos += n


def _index_runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) of each run of consecutive values of a sorted index array."""
    if not len(idx):
        return []
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    return list(zip(np.r_[idx[:1], idx[brk]].tolist(), (np.r_[idx[brk - 1], idx[-1:]] + 1).tolist()))


def _clusters(src: _Concat, data_idx: np.ndarray, cs: int) -> Any:
    """(index among the data clusters, guest cluster, its bytes, zero-padded), in order."""
    buf = bytearray(cs)
    for k, c in enumerate(data_idx.tolist()):
        at = c * cs
        n = min(cs, src.size - at)
        src.readinto(memoryview(buf)[:n], at)
        yield k, c, bytes(buf[:n]).ljust(cs, b"\0")


def _compressed_sizes(src: _Concat, data_idx: np.ndarray, cs: int, ctype: int,
                      threads: int | None) -> np.ndarray:
    """The compressed length of every data cluster (cs or more: stored plain)."""
    clen = np.zeros(len(data_idx), dtype=np.int64)

    def note(k: int, _data: bytes, comp: bytes) -> None:
        clen[k] = len(comp)

    _compress_all(src, data_idx, cs, ctype, threads, note)
    return clen


def _compress_all(src: _Concat, data_idx: np.ndarray, cs: int, ctype: int,
                  threads: int | None, sink: Any) -> None:
    """Every data cluster through the compression pool, sink(k, data, compressed) in
    order (both passes over the data use it)."""
    pipe = CompressPipeline(ctype, cs, threads, sink)
    try:
        for k, _c, data in _clusters(src, data_idx, cs):
            pipe.put(k, data)
        pipe.drain()
    finally:
        pipe.close()


def _data_area(clen: np.ndarray | None, n: int, cs: int, refcount_max: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Where each data cluster goes (byte offset from the start of the data area) and
    how many references each host cluster of the area gets. Without compression, one
    cluster each. With it, compressed clusters are packed back to back as QEMU packs
    them (one that does not fit continues into the next host cluster and references
    both), a plain one starts a host cluster; a host cluster is not packed past what
    its refcount can count."""
    if clen is None:
        return np.arange(n, dtype=np.int64) * cs, np.ones(n, dtype=np.uint64)
    rel = np.zeros(n, dtype=np.int64)
    refs: list[int] = []
    pos = 0
    for k, length in enumerate(clen.tolist()):
        if length >= cs:  # stored plain, at a cluster boundary
            pos = -(-pos // cs) * cs
            rel[k] = pos
            refs.append(1)
            pos += cs
            continue
        first, last = pos // cs, (pos + length - 1) // cs
        if pos % cs and refs[first] + 1 > refcount_max:
            pos = -(-pos // cs) * cs  # that host cluster cannot count one more
            first, last = pos // cs, (pos + length - 1) // cs
        rel[k] = pos
        for h in range(first, last + 1):
            if h < len(refs):
                refs[h] += 1
            else:
                refs.append(1)
        pos += length
    return rel, np.array(refs, dtype=np.uint64)


def _write_compressed(src: _Concat, out: _Out, data_idx: np.ndarray, clen: np.ndarray,
                      hosts: np.ndarray, cs: int, ctype: int, threads: int | None) -> None:
    """The data clusters again, compressed again (the codecs are deterministic), each
    written where the layout put it."""
    def put(k: int, data: bytes, comp: bytes) -> None:
        at = int(hosts[k])
        if len(comp) != clen[k]:
            raise Qcow2Error("Internal error: a cluster compressed differently the second time")
        if at < out.pos:
            raise Qcow2Error("Internal error: streamed image does not match its layout")
        if at > out.pos:
            out.write(bytes(at - out.pos))
        out.write(data if len(comp) >= cs else comp)

    _compress_all(src, data_idx, cs, ctype, threads, put)


def _data_clusters(src: _Concat, size: int, cs: int, grain: int) -> np.ndarray:
    """The output clusters that hold data (any non-zero byte; with -S 0 all of them), as
    sorted cluster indexes."""
    n_clusters = div_round_up(size, cs)
    if grain == 0:
        return np.arange(n_clusters, dtype=np.int64)
    found: list[np.ndarray] = []
    chunk = max(CHUNK, cs)
    buf = np.zeros(chunk // 8, dtype=np.uint64)
    mv = memoryview(buf).cast("B")
    for w in range(0, src.size, WINDOW):
        for s, e in src.data_ranges(w, min(WINDOW, src.size - w)):
            # whole clusters: the data range widened to cluster boundaries
            pos = s - s % cs
            end = min(src.size, -(-e // cs) * cs)
            while pos < end:
                n = min(chunk, end - pos)
                src.readinto(mv[:n], pos)
                k = div_round_up(n, cs)
                mv[n : k * cs] = bytes(k * cs - n)
                flags = buf[: k * cs // 8].reshape(k, cs // 8).any(axis=1)
                found.append(pos // cs + np.flatnonzero(flags))
                pos += n
    if not found:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(found))  # (ranges widened may share a cluster)
