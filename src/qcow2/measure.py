"""Sub-command measure: the file size a new image needs, as `qemu-img measure` computes it.

`required` is what a copy of the given source (or an empty image of --size) takes;
`fully-allocated` is the size with every cluster allocated; `bitmaps` is the room the
source's persistent dirty bitmaps would take in a qcow2 v3 target. The formulas are
QEMU's (qcow2_measure, qcow2_calc_prealloc_size, qcow2_refcount_metadata_size), so that
scripts sizing a volume get the same numbers from either tool.

The --size path is pure arithmetic and this module imports nothing heavy itself (the
package's __init__ still imports numpy through create and image: see issue 12, start-up).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

from .commands import (
    is_help_list,
    option_item,
    options_help,
    parse_bool,
    parse_create_options,
    parse_image_size,
    parse_size,
    split_option_list,
    valid_option_list,
)
from .errors import InvalidArgumentError, Qcow2Error

MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's QCOW_MAX_L1_SIZE


@dataclass
class Measurement:
    required: int
    fully_allocated: int
    bitmaps: int | None = None  # None: not shown (the target or source cannot hold bitmaps)

    def to_dict(self) -> dict[str, int]:
        """qemu-img measure's JSON fields, in its order."""
        out: dict[str, int] = {}
        if self.bitmaps is not None:
            out["bitmaps"] = self.bitmaps
        out["required"] = self.required
        out["fully-allocated"] = self.fully_allocated
        return out


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _div_up(a, b) * b


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount blocks and table that count `clusters` clusters and themselves
    (the fixed point, as QEMU finds it)."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = _div_up(clusters + table + blocks, per_block)
        table = _div_up(blocks, per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                  extended_l2: bool) -> int:
    """File size of a fully allocated image: header, L2 tables, L1 table, refcounts, data."""
    aligned = _round_up(total_size, cluster_size)
    l2e = 16 if extended_l2 else 8
    meta = cluster_size
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // 8)
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


@dataclass
class _Target:
    cluster_size: int = 65536
    version: int = 3
    refcount_bits: int = 16
    extended_l2: bool = False
    preallocation: str = "off"
    has_backing: bool = False


def _target_options(options: dict[str, tuple[str, Any]]) -> _Target:
    """The creation options measure looks at, validated as qcow2_measure validates them
    (others, e.g. lazy_refcounts or compression_type, are accepted and ignored)."""
    t = _Target()
    t.extended_l2 = bool(options.get("extended_l2", ("", False))[1])
    if "cluster_size" in options:
        t.cluster_size = int(options["cluster_size"][1])
    cs = t.cluster_size
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise InvalidArgumentError("Cluster size must be a power of two between 512 and 2048k")
    if t.extended_l2 and cs < 16384:
        raise InvalidArgumentError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    if "compat" in options:
        compat = options["compat"][0]
        versions = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
        if compat not in versions:
            raise InvalidArgumentError(f"Invalid compatibility level: '{compat}'")
        t.version = versions[compat]
    if "refcount_bits" in options:
        t.refcount_bits = int(options["refcount_bits"][1])
        rb = t.refcount_bits
        if rb < 1 or rb > 64 or rb & (rb - 1):
            raise InvalidArgumentError(
                "Refcount width must be a power of two and may not exceed 64 bits")
        if t.version < 3 and rb != 16:
            raise InvalidArgumentError(
                "Different refcount widths than 16 bits require compatibility level 1.1 or "
                "above (use compat=1.1 or greater)")
    if "preallocation" in options:
        mode = options["preallocation"][0]
        if mode not in ("off", "metadata", "falloc", "full"):
            raise InvalidArgumentError(f"invalid parameter value: {mode}")
        t.preallocation = mode
    t.has_backing = "backing_file" in options
    return t


def _data_bytes(source: Any, cluster_size: int) -> int:
    """Bytes of whole target clusters that hold the source's data (zero areas skipped),
    walking the source's block status as qcow2_measure does."""
    from .mapping import guest_size, image_map

    size = guest_size(source)
    extents = [(e["start"], e["start"] + e["length"], e["data"] and not e["zero"])
               for e in image_map(source)]
    required = 0
    offset = 0
    i = 0
    while offset < size:
        while i < len(extents) and extents[i][1] <= offset:
            i += 1
        if i == len(extents):
            break
        _start, end, data = extents[i]
        pnum = end - offset
        if data:
            # the data extends to the end of its cluster, and covers its beginning
            pnum = _round_up(offset + pnum, cluster_size) - offset
            required += offset % cluster_size + pnum
        offset += pnum
    return required


def bitmaps_size(img: Any, cluster_size: int) -> int:
    """Room the persistent dirty bitmaps of a qcow2 image take in a target with this
    cluster size: every bitmap fully allocated, its table, and the directory."""
    from .bitmaps import BitmapEntry, read_directory

    layout = img.layout
    # (QEMU ignores bitmaps that a program without bitmap support may have made stale)
    _ext, entries = read_directory(img.storage, layout.bitmaps_ext,
                                   layout.header.autoclear_features, img.storage.size())
    size = img.size // 512 * 512
    total = 0
    dir_bytes = 0
    fixed = BitmapEntry._S.size
    for ent in entries:
        if ent.granularity_bits > 63:
            raise Qcow2Error("Bitmap granularity is invalid")
        nbytes = _div_up(_div_up(size, 1 << ent.granularity_bits), 8)
        clusters = _div_up(nbytes, cluster_size)
        total += clusters * cluster_size + _round_up(clusters * 8, cluster_size)
        dir_bytes += _round_up(fixed + len(ent.name.encode()), 8)
    return total + _round_up(dir_bytes, cluster_size)


def measure(source: Any = None, *, size: int | None = None, fmt: str = "qcow2",
            options: dict[str, tuple[str, Any]] | None = None) -> Measurement:
    """Measure a new image of format fmt ("qcow2" or "raw"): of `size` bytes, or holding
    the guest content of `source` (an open Image, snapshot view or backing.RawFile).
    options: parsed -o creation options (commands.parse_create_options)."""
    options = options or {}
    if (source is None) == (size is None):
        raise InvalidArgumentError("Either --size N or one filename must be specified.")
    if fmt == "raw":
        if source is not None:
            from .mapping import guest_size

            n = guest_size(source)
        else:
            n = _round_up(int(size or 0), 512)
        return Measurement(n, n)
    if fmt != "qcow2":
        raise InvalidArgumentError(f"Block driver '{fmt}' does not support size measurement")
    t = _target_options(options)
    cs = t.cluster_size
    virtual_size = _round_up(int(size or 0), cs)
    l2e = 16 if t.extended_l2 else 8
    l2_tables = _div_up(virtual_size // cs, cs // l2e)
    if l2_tables * 8 > MAX_L1_BYTES:
        raise InvalidArgumentError("The image size is too large (try using a larger cluster size)")
    required = 0
    if source is not None:
        from .mapping import guest_size

        virtual_size = _round_up(guest_size(source), cs)
        # with a backing file the new image may share nothing with the source: every
        # cluster may have to be written
        required = virtual_size if t.has_backing else _data_bytes(source, cs)
    if t.preallocation in ("full", "falloc"):
        required = virtual_size
    full = prealloc_size(virtual_size, cs, t.refcount_bits.bit_length() - 1, t.extended_l2)
    result = Measurement(full - virtual_size + required, full)
    base = getattr(source, "_img", source)  # a snapshot view's bitmaps are its image's
    if t.version >= 3 and source is not None and hasattr(base, "layout") \
            and base.layout.header.version >= 3:
        result.bitmaps = bitmaps_size(base, cs)
    return result


# ------------------------------------------------------------------ CLI --
# Options that do not change the figures: qemu-img measure checks their type only
# (a data file or the file system's settings hold no qcow2 metadata)
_NO_EFFECT = {"data_file": "str", "data_file_raw": "bool", "nocow": "bool",
              "extent_size_hint": "size"}
# raw's creation options (qemu-img create -f raw -o help); preallocation is not checked
_RAW_OPTS = {"extent_size_hint": "size", "nocow": "bool", "preallocation": "str",
             "size": "size"}


def _check_type(key: str, raw: str, typ: str) -> None:
    try:
        if typ == "bool":
            parse_bool(raw)
        elif typ == "size":
            parse_size(raw)
    except ValueError:
        what = {"size": "a non-negative number below 2^64", "bool": "'on' or 'off'"}[typ]
        raise InvalidArgumentError(f"Parameter '{key}' expects {what}") from None


def _parse_options(chunks: list[str], out_fmt: str = "qcow2") -> dict[str, tuple[str, Any]]:
    for chunk in chunks:
        if not valid_option_list(chunk):
            raise InvalidArgumentError(f"Invalid option list: {chunk}")
    text = ",".join(chunks)
    if not text:
        return {}
    kept = []
    for item in split_option_list(text):
        key, raw = option_item(item)
        typ = (_RAW_OPTS if out_fmt == "raw" else _NO_EFFECT).get(key)
        if typ is None and out_fmt == "raw":
            raise InvalidArgumentError(f"Invalid parameter '{key}'")
        if typ is None:
            kept.append(item.replace(",", ",,"))
        else:
            _check_type(key, raw, typ)
    if out_fmt == "raw":
        return {}  # nothing in them changes a raw file's size
    return parse_create_options(",".join(kept)) if kept else {}


def cmd_measure(args: argparse.Namespace) -> int:
    if args.output not in (None, "human", "json"):
        raise InvalidArgumentError("--output must be used with human or json as argument.")
    if args.out_fmt not in ("qcow2", "raw"):
        if args.out_fmt in ("vmdk", "vdi", "vpc", "vhdx", "qed", "qcow", "luks", "parallels"):
            raise InvalidArgumentError(
                f"Block driver '{args.out_fmt}' does not support size measurement")
        raise InvalidArgumentError(f"Unknown file format '{args.out_fmt}'")
    if args.options and all(valid_option_list(c) for c in args.options) \
            and is_help_list(",".join(args.options)):
        print(options_help())
        return 0
    if args.filename is not None and args.size is not None:
        raise InvalidArgumentError("--size N cannot be used together with a filename.")
    if args.filename is None and (args.snapshot is not None or args.src_fmt is not None):
        raise InvalidArgumentError("--image-opts, -f, and -l require a filename argument.")
    if args.filename is None and args.size is None:
        raise InvalidArgumentError("Either --size N or one filename must be specified.")
    options = _parse_options(args.options, args.out_fmt)
    if args.size is not None:
        size = parse_image_size(args.size)
        result = measure(size=size, fmt=args.out_fmt, options=options)
    else:
        result = _measure_file(args.filename, args.src_fmt, args.snapshot, args.out_fmt, options)
    if args.output == "json":
        print(json.dumps(result.to_dict(), indent=4))
    else:
        print(f"required size: {result.required}")
        print(f"fully allocated size: {result.fully_allocated}")
        if result.bitmaps is not None:
            print(f"bitmaps size: {result.bitmaps}")
    return 0


def _measure_file(path: str, src_fmt: str | None, snapshot: str | None, out_fmt: str,
                  options: dict[str, tuple[str, Any]]) -> Measurement:
    from .convertfull import Source

    if not os.path.exists(path):
        # (qemu-img names the file twice: once for the image, once for its protocol layer)
        raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                         "No such file or directory")
    src = Source(path, src_fmt, snapshot)
    try:
        return measure(src.raw if src.raw is not None else src.view, fmt=out_fmt,
                       options=options)
    finally:
        src.close()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "measure", help="compute the size a new image needs",
        description="Compute the file size of a new image (qemu-img measure): of --size "
        "bytes, or holding the content of FILE.",
        usage="qcow2 measure [--output=human|json] [-O qcow2|raw] [-o OPTIONS] "
        "[--size N | [-f FMT] [-l SNAPSHOT] FILE]")
    p.add_argument("--output", metavar="FMT", help="human (default) or json")
    p.add_argument("-O", dest="out_fmt", default="raw", metavar="FMT",
                   help="format of the new image (raw, the default, or qcow2)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="creation options of the new image ('-o help' lists them)")
    p.add_argument("--size", metavar="N", help="virtual size of an empty new image")
    p.add_argument("-f", dest="src_fmt", metavar="FMT", help="source format (qcow2 or raw)")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                   help="measure this internal snapshot of the source (snapshot.id=, "
                   "snapshot.name= or ID_OR_NAME)")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility")
    p.add_argument("filename", metavar="FILE", nargs="?")
    p.set_defaults(func=cmd_measure)
