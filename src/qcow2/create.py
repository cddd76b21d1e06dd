"""Creating images (qemu-img create semantics)."""

from __future__ import annotations

import os
from typing import Any

from .errors import InvalidArgumentError, Qcow2Error
from .format import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    HEADER_LENGTH_WITH_COMPRESSION,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    QCOW_OFLAG_COPIED,
    V2_HEADER_LENGTH,
    Header,
    ImageLayout,
    encode_refblock,
    encode_table,
)
from .geometry import Geometry, div_round_up
from .header import pack_cluster0
from .storage import FileBackend, Storage

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
COMPAT_ALIASES = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_V3_MSG = "(use version=v3 or greater)"


def _validate(size: int, cluster_size: int, refcount_bits: int, version: int,
              extended_l2: bool, lazy_refcounts: bool, compression_type: str,
              backing_file: str | None, backing_format: str | None, preallocation: str) -> None:
    if size < 0:
        raise InvalidArgumentError("Image size must not be negative")
    if cluster_size < 512 or cluster_size > 2 * 1024 * 1024 or cluster_size & (cluster_size - 1):
        raise InvalidArgumentError("Cluster size must be a power of two between 512 and 2048k")
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise InvalidArgumentError("Refcount width must be a power of two and may not exceed 64 bits")
    if version == 2 and refcount_bits != 16:
        raise InvalidArgumentError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above " + _V3_MSG)
    if version == 2 and lazy_refcounts:
        raise InvalidArgumentError(
            "Lazy refcounts only supported with compatibility level 1.1 and above " + _V3_MSG)
    if compression_type not in ("zlib", "zstd"):
        raise InvalidArgumentError(f"Parameter 'compression_type' does not accept value '{compression_type}'")
    if version == 2 and compression_type != "zlib":
        raise InvalidArgumentError(
            "Non-zlib compression type is only supported with compatibility level 1.1 and above " + _V3_MSG)
    if extended_l2:
        if version == 2:
            raise InvalidArgumentError(
                "Extended L2 entries are only supported with compatibility level 1.1 and above " + _V3_MSG)
        if cluster_size < 16384:
            raise InvalidArgumentError(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    if preallocation not in PREALLOC_MODES:
        raise InvalidArgumentError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    if backing_format and not backing_file:
        raise InvalidArgumentError("Backing file format specified without a backing file")
    if backing_file and preallocation != "off" and not extended_l2:
        raise InvalidArgumentError(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on")


def new_header(version: int, geo: Geometry, size: int, l1_size: int, l1_off: int,
               rtable_off: int, rtable: int, lazy_refcounts: bool, compression_type: str
               ) -> Header:
    """The header of a new image (no backing file, no snapshots) with its tables where
    the caller put them."""
    incompat = 0
    ctype = COMPRESSION_ZLIB
    if compression_type == "zstd":
        ctype = COMPRESSION_ZSTD
        incompat |= INCOMPAT_COMPRESSION
    if geo.extended_l2:
        incompat |= INCOMPAT_EXTL2
    return Header(
        version=version, backing_file_offset=0, backing_file_size=0,
        cluster_bits=geo.cluster_bits, size=size, crypt_method=0, l1_size=l1_size,
        l1_table_offset=l1_off, refcount_table_offset=rtable_off,
        refcount_table_clusters=rtable, nb_snapshots=0, snapshots_offset=0,
        incompatible_features=incompat,
        compatible_features=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        autoclear_features=0, refcount_order=geo.refcount_order,
        header_length=HEADER_LENGTH_WITH_COMPRESSION if version == 3 else V2_HEADER_LENGTH,
        compression_type=ctype,
    )


def standard_params(size: int, cluster_size: int, refcount_bits: int, compat: str,
                    lazy_refcounts: bool, compression_type: str) -> tuple[int, int]:
    """(version, size rounded up to whole sectors) of a plain new image (no backing
    file, no preallocation, standard refcounts), with create()'s refusals."""
    if compat not in COMPAT_ALIASES:
        raise InvalidArgumentError(f"Invalid compatibility level: '{compat}'")
    version = COMPAT_ALIASES[compat]
    size = -(-int(size) // 512) * 512
    _validate(size, cluster_size, refcount_bits, version, False, lazy_refcounts,
              compression_type, None, None, "off")
    return version, size


def create(
    path: str | os.PathLike[str],
    size: int | None = None,
    *,
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    compat: str = "1.1",
    extended_l2: bool = False,
    lazy_refcounts: bool = False,
    compression_type: str = "zlib",
    backing_file: str | None = None,
    backing_format: str | None = None,
    preallocation: str = "off",
    refcount_mode: str = "standard",
) -> None:
    """Create a qcow2 image. Without a size, the backing file's size is used.
    refcount_mode "lazy-count" or "owner" creates an image in that mode (see lazycount.py,
    owner.py; they need compat 1.1, and QEMU cannot open them until converted back)."""
    from .modes import check_mode_name

    check_mode_name(refcount_mode)
    from .modes import MODES

    if refcount_bits < MODES[refcount_mode].min_refcount_bits:
        raise InvalidArgumentError(
            f"refcount_mode={refcount_mode} needs refcount_bits of at least "
            f"{MODES[refcount_mode].min_refcount_bits}")
    if refcount_mode != "standard" and COMPAT_ALIASES.get(compat) == 2:
        raise InvalidArgumentError(
            "Refcount modes other than standard need compatibility level 1.1 (compat=1.1)")
    if compat not in COMPAT_ALIASES:
        raise InvalidArgumentError(f"Invalid compatibility level: '{compat}'")
    version = COMPAT_ALIASES[compat]
    path = os.fspath(path)
    if size is None:
        if not backing_file:
            raise InvalidArgumentError("Image creation needs a size parameter")
        size = _backing_size(path, backing_file, backing_format)
        if backing_format is None:
            from .backing import probe_format, resolve_backing_name

            backing_format = probe_format(resolve_backing_name(path, backing_file))
    size = int(size)
    size = -(-size // 512) * 512  # qemu-img rounds the size up to whole sectors
    _validate(size, cluster_size, refcount_bits, version, extended_l2, lazy_refcounts,
              compression_type, backing_file, backing_format, preallocation)
    if backing_file:
        from .backing import resolve_backing_name

        resolve_backing_name(path, backing_file)  # refuse protocol names early

    cluster_bits = cluster_size.bit_length() - 1
    refcount_order = refcount_bits.bit_length() - 1
    geo = Geometry(cluster_bits, refcount_order, extended_l2)
    l1_size = geo.l1_size_for(size)
    if l1_size * 8 > 32 * 1024 * 1024:
        raise InvalidArgumentError("Image size too large for this cluster size (L1 table limit)")
    # an empty disk has no L1 table at all (offset 0, as QEMU writes it): a counted but
    # unused L1 cluster would show up as a leak once the file grows
    l1_clusters = div_round_up(l1_size * 8, cluster_size)
    prealloc = preallocation != "off"
    data_clusters = div_round_up(size, cluster_size) if prealloc else 0
    l2_tables = l1_size if prealloc else 0
    meta = 1 + l1_clusters + l2_tables + data_clusters
    rblocks, rtable = geo.refcount_clusters_needed(meta)
    rtable_off = cluster_size
    rblocks_off = rtable_off + rtable * cluster_size
    l1_off = rblocks_off + rblocks * cluster_size
    l2_off = l1_off + l1_clusters * cluster_size
    data_off = l2_off + l2_tables * cluster_size
    total_clusters = 1 + rtable + rblocks + l1_clusters + l2_tables + data_clusters
    if (data_off + data_clusters * cluster_size) >= 1 << 56:
        raise InvalidArgumentError("Image size too large to preallocate")

    header = new_header(version, geo, size, l1_size, l1_off if l1_size else 0, rtable_off, rtable,
                        lazy_refcounts, compression_type)
    layout = ImageLayout(header=header, backing_file=backing_file, backing_format=backing_format)
    cluster0 = pack_cluster0(layout, cluster_size)

    import numpy as np  # here, not at the top: the package imports this module (start-up)

    reftable = np.zeros(rtable * cluster_size // 8, dtype=np.uint64)
    reftable[:rblocks] = rblocks_off + np.arange(rblocks, dtype=np.uint64) * cluster_size
    refs = np.zeros(rblocks * geo.refblock_entries, dtype=np.uint64)
    refs[:total_clusters] = 1

    try:
        storage = Storage(FileBackend(path, writable=True, create=True), writable=True)
    except OSError as exc:
        raise Qcow2Error(f"Could not create '{path}': {exc.strerror}") from exc
    try:
        storage.pwrite(cluster0, 0, "header")
        storage.pwrite(encode_table(reftable), rtable_off, "refcount")
        storage.pwrite(encode_refblock(refs, refcount_order), rblocks_off, "refcount")
        if prealloc:
            l1 = (l2_off + np.arange(l1_size, dtype=np.uint64) * cluster_size) | np.uint64(QCOW_OFLAG_COPIED)
            storage.pwrite(encode_table(l1), l1_off, "l1")
            _write_prealloc_l2(storage, geo, l2_off, l2_tables, data_off, data_clusters, size)
            end = data_off + data_clusters * cluster_size
            if preallocation == "metadata":
                storage.truncate(end)
            elif preallocation == "falloc":
                storage.truncate(end)
                _fallocate(storage, data_off, end - data_off)
            else:
                _write_zeros(storage, data_off, end - data_off)
        elif l1_size:
            storage.pwrite(bytes(l1_size * 8), l1_off, "l1")
        else:
            storage.truncate(l1_off)
        storage.sync()
    except BaseException:
        storage.close()
        raise
    storage.close()
    if refcount_mode != "standard":
        from .image import Image
        from .modes import set_refcount_mode

        with Image._open(path, writable=True, backing=False) as img:
            set_refcount_mode(img, refcount_mode, fresh=True)


def _write_prealloc_l2(storage: Storage, geo: Geometry, l2_off: int, l2_tables: int,
                       data_off: int, data_clusters: int, size: int) -> None:
    import numpy as np

    per = geo.l2_entries
    chunk_tables = max(1, (8 << 20) // geo.cluster_size)  # write 8 MiB of tables at a time
    cs = geo.cluster_size
    for t0 in range(0, l2_tables, chunk_tables):
        t1 = min(l2_tables, t0 + chunk_tables)
        c0, c1 = t0 * per, min(data_clusters, t1 * per)
        entries = np.zeros((t1 - t0) * per, dtype=np.uint64)
        n = c1 - c0
        entries[:n] = (data_off + (c0 + np.arange(n, dtype=np.uint64)) * cs) | np.uint64(QCOW_OFLAG_COPIED)
        if geo.extended_l2:
            ext = np.zeros(2 * len(entries), dtype=np.uint64)
            # As QEMU does: the clusters are allocated but every subcluster stays
            # "unallocated" (bitmap 0), so reads fall through to the backing file or zeroes.
            ext[0::2] = entries
            entries = ext
        storage.pwrite(encode_table(entries), l2_off + t0 * cs, "l2")


def _fallocate(storage: Storage, offset: int, length: int) -> None:
    fd = getattr(storage.backend, "fd", None)
    if fd is not None and hasattr(os, "posix_fallocate") and length:
        try:
            os.posix_fallocate(fd, offset, length)
            return
        except OSError:
            pass
    _write_zeros(storage, offset, length)


def _write_zeros(storage: Storage, offset: int, length: int) -> None:
    chunk = bytes(min(length, 8 << 20))
    pos = 0
    while pos < length:
        n = min(len(chunk), length - pos)
        storage.pwrite(memoryview(chunk)[:n], offset + pos, "data")
        pos += n


def _backing_size(path: str, backing_file: str, backing_format: str | None) -> int:
    from .backing import open_backing
    from .image import open_backing_image

    bk: Any = open_backing(path, backing_file, backing_format, (), open_backing_image)
    try:
        return int(bk.size)
    finally:
        bk.close()
