"""Sub-command amend: change the options of an existing qcow2 image (`qemu-img amend`).

What can change: compat (0.10 <-> 1.1), refcount_bits (the refcount structures are
rewritten), lazy_refcounts, size (a resize, shrinking allowed as qemu-img amend allows
it). backing_file and backing_fmt may only be restated, both together (qemu-img points to rebase for a
change); creation-only options get qemu-img's refusal.

Crash safety: every change ends in one switch of cluster 0 that a power cut leaves
either old or new. A downgrade to v2 first rewrites what v2 cannot express: zero-flag
L2 entries (in the active and every snapshot's tables) become unallocated (nothing
below them) or plain clusters of zeros. Each of those rewrites reads the same under
the old v3 header, so a crash before the switch leaves a valid v3 image with the same
content. The new cluster 0 is written so that the old one stays intact until its first
sector, the single atomic write, switches over: bytes past the first sector go where
the old header does not look, and are durable first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable
from typing import Any

from .commands import (
    option_item,
    parse_bool,
    parse_number,
    parse_size,
    split_option_list,
    valid_option_list,
)
from .errors import (
    FormatError,
    InvalidArgumentError,
    Qcow2Error,
    UnsupportedFeatureError,
)

AMEND_OPTIONS: list[tuple[str, str, str]] = [
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    # listed as qemu-img lists them (-o help); refused below: no image of ours has an
    # external data file or encryption
    ("data_file", "str", "File name of an external data file"),
    ("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
    ("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("encrypt.keyslot", "num", "Select a single keyslot to modify explicitly"),
    ("encrypt.new-secret", "str",
     "New secret to set in the matching keyslots. Empty string to erase"),
    ("encrypt.old-secret", "str", "Select all keyslots that match this password"),
    ("encrypt.state", "str", "Select new state of affected keyslots (active/inactive)"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
]
# qemu-img knows these as creation options only
_CREATE_ONLY = ("cluster_size", "extended_l2", "preallocation", "compression_type",
                "encryption", "nocow", "extent_size_hint", "encrypt.format",
                "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg",
                "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.key-secret")
# qemu's cache modes (bdrv_parse_cache_mode): accepted, our writes are ordered anyway
_CACHE_MODES = ("none", "off", "writeback", "writethrough", "directsync", "unsafe")
_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
Progress = Callable[[float], None]
_CHUNK_BYTES = 8 << 20  # L2 tables read, rewritten and synced at a time by a downgrade


def parse_amend_options(text: str) -> dict[str, Any]:
    """-o list -> {option: parsed value}, with qemu-img amend's refusals."""
    out: dict[str, Any] = {}
    for item in split_option_list(text):
        key, raw = option_item(item)
        if key in _CREATE_ONLY:
            raise InvalidArgumentError(
                f"Invalid parameter '{key}' (this option is only supported for image creation)")
        if key == "refcount_mode":  # ours (modes.py): not a qemu-img option
            from .modes import check_mode_name

            out[key] = check_mode_name(raw)
            continue
        if key not in {name for name, _, _ in AMEND_OPTIONS}:
            raise InvalidArgumentError(f"Invalid parameter '{key}'")
        # qemu-img's messages for an image without a data file or encryption (the only
        # images opened here)
        if key == "data_file":
            raise UnsupportedFeatureError(
                "data-file can only be set for images that use an external data file")
        if key == "data_file_raw":
            try:
                raw_on = parse_bool(raw)
            except ValueError:
                raise InvalidArgumentError(
                    "Parameter 'data_file_raw' expects 'on' or 'off'") from None
            if raw_on:
                raise UnsupportedFeatureError("data-file-raw cannot be set on existing images")
            continue  # off: what the image already is
        if key.startswith("encrypt."):
            raise UnsupportedFeatureError(
                "Can't amend encryption options - encryption not present")
        if key == "compat":
            if raw not in _VERSIONS:
                raise InvalidArgumentError(f"Unknown compatibility level {raw}")
            out[key] = _VERSIONS[raw]
        elif key == "lazy_refcounts":
            try:
                out[key] = parse_bool(raw)
            except ValueError:
                raise InvalidArgumentError(
                    "Parameter 'lazy_refcounts' expects 'on' or 'off'") from None
        elif key == "refcount_bits":
            try:
                bits = parse_number(raw)
            except ValueError:
                raise InvalidArgumentError("Parameter 'refcount_bits' expects a number") from None
            if bits < 1 or bits > 64 or bits & (bits - 1):
                raise InvalidArgumentError(
                    "Refcount width must be a power of two and may not exceed 64 bits")
            out[key] = bits
        elif key == "size":
            try:
                out[key] = parse_size(raw)
            except ValueError:
                raise InvalidArgumentError(
                    "Parameter 'size' expects a non-negative number below 2^64") from None
        else:
            out[key] = raw
    return out


def amend(path: str | os.PathLike[str], options: dict[str, Any],
          progress: Progress | None = None) -> None:
    """Change the options of the qcow2 image at path. options: compat ("0.10"/"1.1" or
    2/3), lazy_refcounts (bool), size (int), refcount_bits (int), backing_file/backing_fmt
    (their current values only)."""
    from .image import open_image as qopen

    opts = dict(options)
    if isinstance(opts.get("compat"), str):
        if opts["compat"] not in _VERSIONS:
            raise InvalidArgumentError(f"Unknown compatibility level {opts['compat']}")
        opts["compat"] = _VERSIONS[opts["compat"]]
    with qopen(path, "r+") as img:
        amend_image(img, opts, progress)


def amend_image(img: Any, opts: dict[str, Any], progress: Progress | None = None) -> None:
    """amend() on an open, writable image (closed by the caller)."""
    h = img.header
    old_version = h.version
    new_version = opts.get("compat", old_version)
    lazy = opts.get("lazy_refcounts")
    bits = opts.get("refcount_bits")
    layout = img.layout
    if "backing_file" in opts or "backing_fmt" in opts:
        # as qemu-img: both are compared, one not given counts as none (so restating the
        # backing file alone is refused when the image names a backing format)
        same_file = opts.get("backing_file") == layout.backing_file
        same_fmt = opts.get("backing_fmt") == layout.backing_format
        if not (same_file and same_fmt):
            raise InvalidArgumentError(
                "Cannot amend the backing file (you can use 'qcow2 rebase' instead)")
    # the checks qemu-img makes before changing anything
    if bits is not None and bits != 16 and new_version < 3:
        raise InvalidArgumentError(
            "Refcount widths other than 16 bits require compatibility level 1.1 or "
            "above (use compat=1.1 or greater)")
    if new_version < 3 and (bits or h.refcount_bits) != 16:
        raise InvalidArgumentError("compat=0.10 requires refcount_bits=16")
    if lazy and new_version < 3:
        raise InvalidArgumentError(
            "Lazy refcounts only supported with compatibility level 1.1 and above "
            "(use compat=1.1 or greater)")
    if new_version < old_version:
        final = int(opts.get("size", img.size))
        for e in img.snapshots:
            # v2 readers do not know the snapshot's own disk size or a VM state past
            # 4 GiB (checked before anything changes; qemu-img resizes first)
            if (e.vm_state_size or 0) > 0xFFFFFFFF or (e.disk_size or 0) != final:
                raise UnsupportedFeatureError("Internal snapshots prevent downgrade of image")
        if img.bitmaps:
            # v2 cannot hold them: QEMU drops them and leaks their clusters; they are the
            # user's incremental-backup state, so refuse instead
            raise UnsupportedFeatureError(
                "Cannot store dirty bitmaps in qcow2 v2 files: remove the persistent "
                "bitmaps first ('qcow2 bitmap --remove')")
    # Refcount mode: the other changes rewrite standard refcount structures, so a
    # non-standard image goes to standard first and to its new mode last.
    mode = opts.get("refcount_mode", img.refcount_mode)
    if mode != "standard" and new_version < 3:
        raise InvalidArgumentError(
            "Refcount modes other than standard need compatibility level 1.1 (compat=1.1)")
    restructures = (bits is not None and bits != h.refcount_bits) or new_version != old_version \
        or ("size" in opts and opts["size"] != img.size)
    if img.refcount_mode != "standard" and restructures:
        if mode != "standard":
            raise InvalidArgumentError(
                "compat, refcount_bits and size can be amended in refcount_mode=standard only "
                "(amend -o refcount_mode=standard first)")
        img.set_refcount_mode("standard")
    if progress:
        progress(0.0)
    img.flush()  # what was written before is durable before the header changes
    if new_version > old_version:
        _switch_cluster0(img, _upgraded(img))
    if bits is not None and bits != img.header.refcount_bits:
        change_refcount_width(img, bits, progress)
    if lazy is not None and img.header.version >= 3:
        from .format import COMPAT_LAZY_REFCOUNTS

        cf = img.header.compatible_features
        cf = cf | COMPAT_LAZY_REFCOUNTS if lazy else cf & ~COMPAT_LAZY_REFCOUNTS
        if cf != img.header.compatible_features:
            img._update_header(compatible_features=cf)
    if "size" in opts and opts["size"] != img.size:
        from .resize import resize_image

        resize_image(img, int(opts["size"]), shrink=True)
    if new_version < old_version:
        _downgrade(img, progress)
    img.flush()
    if mode != img.refcount_mode:
        img.set_refcount_mode(mode)
    if progress:
        progress(100.0)


# ------------------------------------------------------------------ refcount width --
def change_refcount_width(img: Any, bits: int, progress: Progress | None = None) -> None:
    """Rewrite the refcount table and blocks with bits-wide entries. The new structures
    go past the end of the file (nothing can overlap them) and are durable before one
    header write switches refcount_order and the table together; the old structures
    are then unreferenced (free) clusters."""
    import numpy as np

    from .check import CheckResult, _Checker, _quiesce
    from .errors import CorruptImageError
    from .format import encode_refblock, encode_table

    if bits < 1 or bits > 64 or bits & (bits - 1):
        raise InvalidArgumentError("Refcount width must be a power of two and may not exceed 64 bits")
    if img.header.version < 3:
        raise InvalidArgumentError(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above "
            "(use compat=1.1 or greater)")
    _quiesce(img)
    res = CheckResult(filename=img.path)
    checker = _Checker(img, None, res)
    checker.run()  # the exact reference count of every cluster, as check computes them
    if res.corruptions or res.check_errors or res.failure:
        raise CorruptImageError("The image has corruptions: run 'qcow2 check -r all' before "
                                "changing the refcount width")
    refs = checker.refs.dense[: checker.refs.nb].astype(np.int64)
    if bits < 64:
        over = np.flatnonzero(refs > (1 << bits) - 1)
        if len(over):
            c = int(over[0])
            raise InvalidArgumentError(
                f"Cannot decrease refcount entry width to {bits} bits: Cluster at offset "
                f"{c * img.geo.cluster_size:#x} has a refcount of {int(refs[c])}")
    # the old table and blocks are not referenced by the new structures
    h = img.header
    cs = img.geo.cluster_size
    first = h.refcount_table_offset // cs
    old_table = decode_table_clusters(img, h.refcount_table_offset, h.refcount_table_clusters)
    for c in [*range(first, first + h.refcount_table_clusters), *old_table]:
        if c < len(refs):
            refs[c] = max(0, refs[c] - 1)
    order = bits.bit_length() - 1
    per_block = cs * 8 // bits
    start = -(-img.storage.size() // cs)  # the first cluster past the end of the file
    blocks = table = 0
    while True:
        total = start + blocks + table
        nb = -(-total // per_block)
        nt = max(1, -(-nb * 8 // cs))
        if (nb, nt) == (blocks, table):
            break
        blocks, table = nb, nt
    vals = np.zeros(blocks * per_block, dtype=np.uint64)
    vals[: len(refs)] = refs.astype(np.uint64)
    vals[start : start + blocks + table] = 1
    st = img.storage
    reftable = np.zeros(table * cs // 8, dtype=np.uint64)
    for b in range(blocks):
        off = (start + b) * cs
        st.pwrite(encode_refblock(vals[b * per_block : (b + 1) * per_block], order), off,
                  "refcount")
        reftable[b] = off
        if progress:
            progress(90.0 * (b + 1) / blocks)
    table_off = (start + blocks) * cs
    st.pwrite(encode_table(reftable), table_off, "refcount")
    st.sync()
    img._update_header(refcount_order=order, refcount_table_offset=table_off,
                       refcount_table_clusters=table)
    img._reload_metadata()


def decode_table_clusters(img: Any, offset: int, clusters: int) -> list[int]:
    """Cluster numbers of the refcount blocks a refcount table points at."""
    import numpy as np

    from .format import decode_table

    cs = img.geo.cluster_size
    t = decode_table(img.storage.pread(clusters * cs, offset)) & np.uint64(~(cs - 1) & (2**64 - 1))
    return (t[t != 0] // np.uint64(cs)).astype(np.int64).tolist()


# ------------------------------------------------------------------ version switch --
def _upgraded(img: Any) -> Any:
    from .format import HEADER_LENGTH_WITH_COMPRESSION, ImageLayout

    h = img.header.with_(version=3, header_length=HEADER_LENGTH_WITH_COMPRESSION,
                         incompatible_features=0, compatible_features=0,
                         autoclear_features=0, refcount_order=4, compression_type=0)
    return ImageLayout(**{**img.layout.__dict__, "header": h})


def _downgrade(img: Any, progress: Progress | None) -> None:
    from .format import (
        COMPRESSION_ZLIB,
        INCOMPAT_COMPRESSION,
        INCOMPAT_CORRUPT,
        INCOMPAT_DIRTY,
        V2_HEADER_LENGTH,
        ImageLayout,
    )

    h = img.header
    extra = h.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION)
    if extra:
        raise UnsupportedFeatureError(
            f"Cannot downgrade an image with incompatible features {extra:#x} set")
    zstd = h.compression_type != COMPRESSION_ZLIB
    _expand_zero_clusters(img, refuse_compressed=zstd, progress=progress)
    nh = h.with_(version=2, header_length=V2_HEADER_LENGTH, incompatible_features=0,
                 compatible_features=0, autoclear_features=0, compression_type=0,
                 unknown_tail=b"")
    # v2 has no feature table and no bitmaps; the backing format extension stays
    layout = ImageLayout(header=nh, backing_file=img.layout.backing_file,
                         backing_format=img.layout.backing_format,
                         unknown_extensions=img.layout.unknown_extensions)
    _switch_cluster0(img, layout)


def _expand_zero_clusters(img: Any, refuse_compressed: bool, progress: Progress | None) -> None:
    """Rewrite every zero-flag L2 entry of the active and the snapshot tables into what
    v2 reads the same way (see the module docstring). The tables go through the tree
    walker's chunked reads (back-to-back tables in one read), and one sync per chunk
    makes the chunk's zeroed clusters and refcounts durable before any of its tables
    points at them (it was one sync per table: 20 s of the 26 s a 64 GiB image with
    4 KiB clusters took)."""
    import numpy as np

    from .format import (
        L2E_OFFSET_MASK,
        QCOW_OFLAG_COMPRESSED,
        QCOW_OFLAG_COPIED,
        QCOW_OFLAG_ZERO,
        encode_table,
    )
    from .tree import l2_offsets, runs, table_chunks

    img.flush()
    cs = img.geo.cluster_size
    st = img.storage
    rc = img.refcounts
    cmap = img.clusters
    l1s = [cmap.l1] + [img._snapshots._snapshot_l1(e) for e in img.snapshots]
    # every L2 table once (a snapshot shares tables with the active state), sorted
    offsets = np.unique(np.concatenate([l2_offsets(l1, cs) for l1 in l1s]))
    has_backing = img.layout.backing_file is not None
    zero = np.uint64(QCOW_OFLAG_ZERO)
    mask = np.uint64(L2E_OFFSET_MASK)
    total = max(1, len(offsets))
    for first, offs, tables in table_chunks(st, offsets, cs, st.size(), _CHUNK_BYTES):
        if refuse_compressed and ((tables & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0).any():
            raise UnsupportedFeatureError(
                "Cannot downgrade an image with zstd-compressed clusters (v2 knows zlib only)")
        # bit 0 of a compressed entry belongs to its host offset/size field: not a flag
        zmask = ((tables & zero) != 0) & ((tables & np.uint64(QCOW_OFLAG_COMPRESSED)) == 0)
        rows = np.flatnonzero(zmask.any(axis=1))
        if len(rows):
            hosts = tables & mask
            alloc = zmask & (hosts != 0)
            # preallocated zero clusters: their host clusters are zeroed, the flag dropped
            for h in hosts[alloc].tolist():
                img._guard(int(h), cs, "data")
                st.pwrite(bytes(cs), int(h), "data")
            tables[alloc] &= ~zero
            plain = zmask & (hosts == 0)
            if has_backing:
                # zeros must hide the backing file: fresh clusters of zeros, counted once
                # for every L1 table that reaches this L2 table (its own refcount)
                for r in rows.tolist():
                    refs = rc.get(int(offs[r]) >> img.geo.cluster_bits)
                    copied = np.uint64(QCOW_OFLAG_COPIED) if refs == 1 else np.uint64(0)
                    for j in np.flatnonzero(plain[r]).tolist():
                        host = rc.allocate(1)
                        if refs > 1:
                            rc.update(np.array([host >> img.geo.cluster_bits], dtype=np.int64),
                                      refs - 1)
                        st.pwrite(bytes(cs), host, "data")
                        tables[r, j] = np.uint64(host) | copied
            else:
                tables[plain] = 0
            rc.write_back()
            st.sync()  # zeros and refcounts durable before a table points at them
            changed = offs[rows]
            for s, e in runs(changed, cs):  # back-to-back tables in one write
                for off in changed[s:e].tolist():
                    img._guard(off, cs, "an L2 table")
                    cmap.l2cache.discard(off)
                st.pwrite(encode_table(tables[rows[s:e]].reshape(-1)), int(changed[s]), "l2")
        if progress:
            progress(100.0 * (first + len(offs)) / total)
    st.sync()


def _switch_cluster0(img: Any, layout: Any) -> None:
    """Switch cluster 0 to layout's header, backing file name and format, keeping
    every other extension as it is on disk (bitmaps, crypto, ours, unknown ones; the
    ones v2 cannot hold go with a downgrade) in one crash-safe switch
    (header.write_cluster0). An upgrade to v3 adds QEMU's feature name table where
    there is room for it."""
    from .format import (
        EXT_BACKING_FORMAT,
        EXT_FEATURE_TABLE,
        FEATURE_NAMES,
        HeaderExtension,
        pack_feature_table,
    )
    from .header import extension_area, write_cluster0

    img.flush()
    h = layout.header
    raw = bytes(img.storage.pread(img.header.cluster_size, 0)).ljust(img.header.cluster_size,
                                                                     b"\0")
    exts, _ = extension_area(raw, img.header)
    at = next((i for i, e in enumerate(exts) if e.type == EXT_BACKING_FORMAT), 0)
    exts = [e for e in exts if e.type != EXT_BACKING_FORMAT]
    if layout.backing_format:
        exts.insert(at, HeaderExtension(EXT_BACKING_FORMAT, layout.backing_format.encode()))
    name = layout.backing_file.encode() if layout.backing_file else None
    if h.version >= 3 and img.header.version < 3 and \
            not any(e.type == EXT_FEATURE_TABLE for e in exts):
        table = HeaderExtension(EXT_FEATURE_TABLE, pack_feature_table(FEATURE_NAMES))
        k = 1 if layout.backing_format else 0
        try:  # (informational: left out where there is no room for it)
            write_cluster0(img, h, [*exts[:k], table, *exts[k:]], name)
            img.clusters.version = img.header.version
            return
        except (FormatError, UnsupportedFeatureError):
            pass
    write_cluster0(img, h, exts, name)
    img.clusters.version = img.header.version


# ------------------------------------------------------------------ CLI --
def amend_help() -> str:
    lines = ["Amend options for 'qcow2':"]
    for name, typ, text in AMEND_OPTIONS:
        head = f"  {name}=<{typ}>"
        lines.append(f"{head:<24} - {text}")
    return "\n".join(lines)


def cmd_amend(args: argparse.Namespace) -> int:
    if not args.options:
        raise InvalidArgumentError("Must specify options (-o)")
    for chunk in args.options:
        if not valid_option_list(chunk):
            raise InvalidArgumentError(f"Invalid option list: {chunk}")
    text = ",".join(args.options)
    if any(item in ("help", "?") for item in split_option_list(text)):
        print(amend_help())
        return 0
    if args.filename is None:
        raise InvalidArgumentError("Expecting one image file name")
    if args.cache is not None and args.cache not in _CACHE_MODES:
        raise InvalidArgumentError(f"Invalid cache option: {args.cache}")
    if args.fmt is not None and args.fmt != "qcow2":
        raise InvalidArgumentError(f"Format driver '{args.fmt}' does not support option amendment")
    path = args.filename
    if not os.path.exists(path):
        raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                         "No such file or directory")
    with open(path, "rb") as f:
        if f.read(4) != b"QFI\xfb":
            raise InvalidArgumentError("Format driver 'raw' does not support option amendment")
    opts = parse_amend_options(text)
    from .progress import QemuProgress

    show = args.progress and not args.quiet
    with QemuProgress(1.0) if show else contextlib.nullcontext() as progress:  # qemu's 1% step
        amend(path, opts, progress)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "amend", help="change the options of an existing image",
        description="Change image options (qemu-img amend): compat, refcount_bits, "
        "lazy_refcounts, size.",
        usage="qcow2 amend [-p] [-q] [-f qcow2] [-t CACHE] -o OPTIONS FILE")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="options to change ('-o help' lists them)")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (qcow2)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-t", dest="cache", metavar="CACHE",
                   help="cache mode (accepted: none, writeback, writethrough, directsync, unsafe)")
    p.add_argument("-U", "--force-share", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--force", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("filename", metavar="FILE", nargs="?")
    p.set_defaults(func=cmd_amend)

