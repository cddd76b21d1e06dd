"""Image information as `qemu-img info` reports it (JSON and human forms).

The JSON text is byte-identical to qemu-img's: QEMU prints dictionaries in the iteration
order of its hash table (QDict), so the keys are ordered by the same hash here, and strings
are escaped the way QEMU's JSON writer escapes them.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .backing import RawFile
from .bitmaps import info_dict, read_directory
from .errors import BackingFileError, FormatError, InvalidArgumentError, Qcow2Error
from .format import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    MAX_SNAPSHOT_TABLE_BYTES,
    MAX_SNAPSHOTS,
    SnapshotEntry,
    mode_of,
)

# ----------------------------------------------------------------------------- sizes --
_SIZE_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def size_to_str(value: int) -> str:
    """Human size as QEMU prints it: three significant digits, IEC units ("1.5 GiB")."""
    # The unit switches once the number would reach 1000 of the smaller unit.
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)  # C division truncates toward zero (value 0 gives unit 0)
    i = max(0, min(i, len(_SIZE_SUFFIXES) - 1))
    return f"{value / (1 << (i * 10)):0.3g} {_SIZE_SUFFIXES[i]}B"


# ----------------------------------------------------------------------------- JSON --
_QDICT_BUCKETS = 512


def _qdict_bucket(key: str) -> int:
    data = key.encode("utf-8", "surrogateescape")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _QDICT_BUCKETS


def qdict_order(keys: Iterable[str]) -> list[str]:
    """Keys in QEMU's QDict iteration order, given their insertion order: buckets in
    ascending order, newest first within a bucket."""
    indexed = list(enumerate(keys))
    indexed.sort(key=lambda p: (_qdict_bucket(p[1]), -p[0]))
    return [k for _, k in indexed]


def json_quote(text: str) -> str:
    """A JSON string as QEMU writes it: ASCII only, \\uXXXX (upper-case hex) otherwise."""
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif 0xD800 <= cp <= 0xDFFF:
            out.append("\\uFFFD")  # undecodable byte or lone surrogate
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json(value: Any, indent: int = 0) -> str:
    """Pretty JSON text as qemu-img prints it (4-space indent, QDict key order)."""
    pad = " " * (4 * (indent + 1))
    end = "\n" + " " * (4 * indent)
    if isinstance(value, dict):
        items = [f"{pad}{json_quote(k)}: {to_json(value[k], indent + 1)}"
                 for k in qdict_order(value)]
        return "{" + ("\n" + ",\n".join(items) if items else "") + end + "}"
    if isinstance(value, (list, tuple)):
        items = [pad + to_json(v, indent + 1) for v in value]
        return "[" + ("\n" + ",\n".join(items) if items else "") + end + "]"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.17g}"
    return json_quote(str(value))


# ----------------------------------------------------------------------------- names --
def path_combine(base: str, name: str) -> str:
    """A backing file name as QEMU resolves it for display: relative names are taken
    relative to the folder part of the image name as it was given."""
    if os.path.isabs(name) or "/" not in base:
        return name
    return base[: base.rindex("/") + 1] + name


# ----------------------------------------------------------------------------- records --
def _snapshot_records(img: Any) -> list[Any]:
    """Snapshot records of an image: from the snapshot module when it provides them,
    else read from the snapshot table (read-only, bounded)."""
    records = getattr(img, "snapshots", None)
    if callable(records):
        records = records()
    if records is not None:
        return list(records)
    h = img.header
    if not h.nb_snapshots:
        return []
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise FormatError("Too many snapshots")
    storage = img.storage
    limit = min(MAX_SNAPSHOT_TABLE_BYTES, max(0, storage.size() - h.snapshots_offset))
    chunk = min(limit, 64 * 1024)
    while True:
        buf = storage.pread(chunk, h.snapshots_offset)
        try:
            out, pos = [], 0
            for _ in range(h.nb_snapshots):
                entry, pos = SnapshotEntry.unpack_from(buf, pos)
                out.append(entry)
            return out
        except FormatError:
            if chunk >= limit:
                raise
            chunk = min(limit, chunk * 4)


def snapshot_info(rec: Any) -> dict[str, Any]:
    """One SnapshotInfo object of `qemu-img info --output=json`."""
    clock = int(rec.vm_clock_nsec)
    d: dict[str, Any] = {
        "id": str(rec.id),
        "name": str(rec.name),
        "vm-state-size": int(rec.vm_state_size),
        "date-sec": int(rec.date_sec),
        "date-nsec": int(rec.date_nsec),
        "vm-clock-sec": clock // 1_000_000_000,
        "vm-clock-nsec": clock % 1_000_000_000,
    }
    icount = getattr(rec, "icount", None)
    if icount is not None and icount != 0xFFFFFFFFFFFFFFFF and icount != -1:
        d["icount"] = int(icount)
    return d


def tree_parents(img: Any) -> dict[str, str] | None:
    """Each snapshot's parent, for a mode with a snapshot tree (else None). A standard
    image has none: it is answered without the mode registry, which imports numpy."""
    mode = mode_of(img.header)
    if mode == "standard":
        return None
    from .modes import MODES

    return MODES[mode].parents(img)


def _bitmaps(img: Any) -> list[dict[str, Any]]:
    """Persistent dirty bitmaps listed in the bitmaps extension."""
    _ext, entries = read_directory(img.storage, img.layout.bitmaps_ext,
                                   img.header.autoclear_features, img.storage.size())
    return [info_dict(e) for e in entries]


def image_info(img: Any, filename: str | None = None) -> dict[str, Any]:
    """ImageInfo of an open qcow2 Image, as `qemu-img info --output=json` gives it.

    filename is the name to report (qemu-img reports the name as given); backing file
    names are resolved against it the way QEMU does.
    """
    name = img.path if filename is None else filename
    h = img.header
    info: dict[str, Any] = {
        "filename": name,
        "format": "qcow2",
        "dirty-flag": bool(h.incompatible_features & INCOMPAT_DIRTY),
        "actual-size": img.storage.allocated_bytes(),
        # QEMU keeps the size in whole sectors and drops a partial last sector
        "virtual-size": h.size // 512 * 512,
        "cluster-size": h.cluster_size,
    }
    bfile = img.layout.backing_file
    if bfile:
        info["backing-filename"] = bfile
        info["full-backing-filename"] = path_combine(name, bfile)
        if img.layout.backing_format:
            info["backing-filename-format"] = img.layout.backing_format
    snaps = _snapshot_records(img)
    if snaps:
        info["snapshots"] = [snapshot_info(s) for s in snaps]
        parents = tree_parents(img)
        if parents:  # a mode with a snapshot tree (owner): each snapshot's parent
            for d in info["snapshots"]:
                if d["id"] in parents:
                    d["parent"] = parents[d["id"]]
    data: dict[str, Any] = {
        "compat": "1.1" if h.version == 3 else "0.10",
        "compression-type": COMPRESSION_NAMES.get(h.compression_type, str(h.compression_type)),
    }
    if h.version == 3:
        data["lazy-refcounts"] = bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)
        bitmaps = _bitmaps(img)
        if bitmaps:
            data["bitmaps"] = bitmaps
    data["refcount-bits"] = h.refcount_bits
    if h.version == 3:
        data["corrupt"] = bool(h.incompatible_features & INCOMPAT_CORRUPT)
        data["extended-l2"] = bool(h.incompatible_features & INCOMPAT_EXTL2)
        mode = mode_of(h)
        if mode != "standard":  # ours; a standard image shows exactly qemu-img's fields
            data["refcount-mode"] = mode
    info["format-specific"] = {"type": "qcow2", "data": data}
    return info


def raw_info(raw: RawFile, filename: str) -> dict[str, Any]:
    """ImageInfo of a raw backing file."""
    st = os.fstat(raw.fd)
    return {
        "filename": filename,
        "format": "raw",
        "dirty-flag": False,
        "actual-size": st.st_blocks * 512,
        "virtual-size": raw.size,
    }


def chain_info(img: Any, filename: str | None = None) -> list[dict[str, Any]]:
    """ImageInfo of every layer of an image opened with its backing chain."""
    name = img.path if filename is None else filename
    out = []
    layer: Any = img
    while layer is not None:
        if isinstance(layer, RawFile):
            out.append(raw_info(layer, name))
            break
        out.append(image_info(layer, name))
        if layer.layout.backing_file:
            name = path_combine(name, layer.layout.backing_file)
        layer = getattr(layer, "backing", None)
    return out


def _open_error(name: str, exc: BaseException) -> str:
    """qemu-img's "Could not open 'NAME': REASON" line for an image that cannot be opened."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOENT:  # qemu-img names the file twice for this one
            return f"Could not open '{name}': Could not open '{name}': {reason}"
        return f"Could not open '{name}': {reason}"
    text = str(exc)
    if text.startswith(f"Could not open '{name}'"):
        return text
    return f"Could not open '{name}': {text}"


def info_list(filename: str, fmt: str | None = None, *,
              backing_chain: bool = False) -> list[dict[str, Any]]:
    """ImageInfo of an image (and with backing_chain of every image below it), as
    `qemu-img info [--backing-chain]` collects them: each layer is opened on its own
    (without its backing file), by the name the layer above reports as its full backing
    filename and in the format it records, probed when it records none. qcow2 and raw
    files; errors are one line with qemu-img's wording."""
    from .backing import probe_format, resolve_backing_name
    from .meta import open_metadata  # records only: no Image, no numpy (start-up time)

    out: list[dict[str, Any]] = []
    seen_names: set[str] = set()
    seen_files: set[str] = set()
    name: str | None = filename
    path = filename
    while name is not None:
        # qemu-img spots a loop by the name; the real path also catches a loop through
        # names that keep growing (sub/../sub/x), where qemu-img would go on until the
        # name is too long
        real = os.path.realpath(path)
        if name in seen_names or real in seen_files:
            raise BackingFileError(f"Backing file '{name}' creates an infinite loop.")
        seen_names.add(name)
        seen_files.add(real)
        if fmt is not None and fmt not in ("qcow2", "raw"):
            raise InvalidArgumentError(f"Could not open '{name}': Unknown driver '{fmt}'")
        try:
            st = os.stat(path)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise Qcow2Error(f"'file' driver requires '{name}' to be a regular file")
            layer_fmt = fmt or probe_format(path, "image")
            if layer_fmt == "raw":
                raw = RawFile(path)
                try:
                    out.append(raw_info(raw, name))
                finally:
                    raw.close()
                break
            with open_metadata(path, backing=False) as img:
                info = image_info(img, name)
        except Qcow2Error as exc:
            raise exc.__class__(_open_error(name, exc)) from None
        except OSError as exc:
            raise Qcow2Error(_open_error(name, exc)) from None
        out.append(info)
        if not backing_chain or "backing-filename" not in info:
            break
        resolved = resolve_backing_name(path, info["backing-filename"])  # plain paths only
        name, path = info["full-backing-filename"], resolved
        fmt = info.get("backing-filename-format")
    return out


def layer_names(img: Any, filename: str | None = None) -> list[str]:
    """Display name of each layer of the chain, by depth (as `qemu-img map` shows them)."""
    names = [img.path if filename is None else filename]
    layer: Any = img
    while not isinstance(layer, RawFile) and getattr(layer, "backing", None) is not None:
        names.append(path_combine(names[-1], layer.layout.backing_file))
        layer = layer.backing
    return names


# ----------------------------------------------------------------------------- human --
def _clock_str(nsec: int) -> str:
    secs = nsec // 1_000_000_000
    return f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{nsec // 1_000_000 % 1000:03d}"


def _cpad(text: str, width: int) -> str:
    """printf("%-*s"): C pads by bytes, so a non-ASCII name gets fewer pad characters."""
    return text + " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))


def snapshot_table_lines(snaps: Sequence[dict[str, Any]]) -> list[str]:
    """The "ID TAG VM SIZE DATE VM CLOCK ICOUNT" table of qemu-img (info and snapshot -l)."""
    lines = [f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        clock = _clock_str(s["vm-clock-sec"] * 1_000_000_000 + s["vm-clock-nsec"])
        icount = str(s["icount"]) if "icount" in s else ""
        size = size_to_str(s["vm-state-size"])
        lines.append(f"{_cpad(s['id'], 9)} {_cpad(s['name'], 16)} "
                     f"{size:>8}{date:>20}{clock:>13}{icount:>11}")
    return lines


def format_snapshot_list(entries: Sequence[SnapshotEntry]) -> str:
    """`qemu-img snapshot -l` text (empty when there is no snapshot): the table
    `qemu-img info` prints too, from the one printer (names padded by bytes, as C's
    printf pads them)."""
    if not entries:
        return ""
    recs = []
    for e in entries:
        d = snapshot_info(e)
        if "icount" in d and d["icount"] >= 1 << 63:
            d["icount"] -= 1 << 64  # QEMU prints it signed
        recs.append(d)
    return "\n".join(["Snapshot list:", *snapshot_table_lines(recs)]) + "\n"


def _dump_value(value: Any, indent: int, lines: list[str], prefix: str) -> None:
    pad = " " * (4 * indent)
    if isinstance(value, dict):
        lines.append(f"{pad}{prefix}:")
        _dump_dict(value, indent + 1, lines)
    elif isinstance(value, list):
        lines.append(f"{pad}{prefix}:")
        for i, v in enumerate(value):
            _dump_value(v, indent + 1, lines, f"[{i}]")
    else:
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        lines.append(f"{pad}{prefix}: {text}")


def _dump_dict(d: dict[str, Any], indent: int, lines: list[str]) -> None:
    for k in qdict_order(d):
        _dump_value(d[k], indent, lines, k.replace("-", " "))


def human_info(info: dict[str, Any]) -> str:
    """One image's block of `qemu-img info` human output (no trailing newline)."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is not None and full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.extend(snapshot_table_lines(info["snapshots"]))
    spec = info.get("format-specific")
    if spec is not None:
        lines.append("Format specific information:")
        _dump_dict(spec["data"], 1, lines)
    return "\n".join(lines)
