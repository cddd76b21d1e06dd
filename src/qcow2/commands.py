"""Sub-commands create, info and map: qemu-img syntax, output and exit codes."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from .errors import BackingFileError, InvalidArgumentError, Qcow2Error

INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1


# ------------------------------------------------------------------ number parsing --
_SUFFIX_POWER = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_LEADING_INT = re.compile(r"[ \t\n\v\f\r]*[+-]?([0-9]+)")
_LEADING_HEX = re.compile(r"[ \t\n\v\f\r]*[+-]?0[xX]([0-9a-fA-F]+)")
_FRACTION = re.compile(r"\.[0-9]+([eE][+-]?[0-9]+)?")


class SizeRangeError(ValueError):
    """The number is well formed but does not fit in 64 bits."""


def parse_image_size(text: str) -> int:
    """An image size argument, with qemu-img's messages for a malformed or too large one."""
    try:
        size = parse_size(text)
    except SizeRangeError:
        size = INT64_MAX + 1
    except ValueError:
        raise InvalidArgumentError(
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None
    if size > INT64_MAX:
        raise InvalidArgumentError(
            f"Invalid image size specified. Must be between 0 and {INT64_MAX}.")
    return size


def parse_size(text: str) -> int:
    """A size with an optional k/M/G/T/P/E suffix (powers of 1024) or b for bytes, like
    qemu_strtosz: "64k", "1.5G", "0x1000", "512". Raises ValueError (SizeRangeError when
    too large)."""
    m = _LEADING_INT.match(text)
    if m is None or "-" in text[: m.end()]:
        raise ValueError(text)
    val = int(m.group(1))
    pos = m.end()
    valf = 0  # fraction as 0.64 fixed point
    if val == 0 and text[pos : pos + 1] in ("x", "X"):
        h = _LEADING_HEX.match(text)
        if h is None:
            raise ValueError(text)
        val, pos = int(h.group(1), 16), h.end()
        if text[pos : pos + 1] == ".":
            raise ValueError(text)
    elif text[pos : pos + 1] == ".":
        f = _FRACTION.match(text, pos)
        if f is None:
            pos += 1  # "5.M": a dot without digits
        elif f.group(1):
            raise ValueError(text)  # no exponents
        else:
            fraction = float(f.group(0))
            valf = int(fraction * 2.0**64) if fraction < 1.0 else 0
            pos = f.end()
    if val > UINT64_MAX:
        raise SizeRangeError(text)
    power = _SUFFIX_POWER.get(text[pos : pos + 1].upper()) if pos < len(text) else None
    if power is not None:
        pos += 1
    else:
        power = 0
    if pos != len(text):
        raise ValueError(text)
    mul = 1 << (10 * power)
    if mul == 1:
        if valf:
            raise ValueError(text)  # a fraction needs a unit
        return val
    frac = valf * mul
    result = val * mul + (frac >> 64) + ((frac >> 63) & 1)  # round half up
    if result > UINT64_MAX:
        raise SizeRangeError(text)
    return result


def parse_number(text: str) -> int:
    """An unsigned integer in C notation (decimal, 0x hex, 0 octal), like strtoull base 0."""
    m = re.fullmatch(r"[ \t\n\v\f\r]*\+?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if m is None:
        raise ValueError(text)
    s = m.group(1)
    val = int(s, 16) if s[:2] in ("0x", "0X") else int(s, 8) if s.startswith("0") else int(s)
    if val > UINT64_MAX:
        raise SizeRangeError(text)
    return val


_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def parse_bool(text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(text)


# ------------------------------------------------------------------ -o options --
# Creation options in the order qemu-img prints them on its "Formatting" line:
# (name, type, default printed when not given, help text of `-o help`)
_CREATE_OPTS: list[tuple[str, str, str | None, str]] = [
    ("cluster_size", "size", "65536", "qcow2 cluster size"),
    ("extended_l2", "bool", "off", "Extended L2 tables"),
    ("preallocation", "str", None,
     "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    ("compression_type", "str", "zlib", "Compression method used for image cluster compression"),
    ("size", "size", None, "Virtual disk size"),
    ("compat", "str", None, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("backing_file", "str", None, "File name of a base image"),
    ("backing_fmt", "str", None, "Image format of the base image"),
    ("lazy_refcounts", "bool", "off", "Postpone refcount updates"),
    ("refcount_bits", "num", "16", "Width of a reference count entry in bits"),
    ("refcount_mode", "str", None,
     "What refcounts count (allowed values: standard, lazy-count, owner; not qemu-img's)"),
]
_OPT_TYPES = {name: typ for name, typ, _, _ in _CREATE_OPTS}
# the -o options that are qcow2.create() arguments of the same name
CREATE_KWARGS = ("cluster_size", "extended_l2", "preallocation", "compression_type", "compat",
                 "lazy_refcounts", "refcount_bits", "refcount_mode")
# qemu-img knows these but this implementation does not create such images
_UNSUPPORTED_OPTS = ("data_file", "data_file_raw", "encryption", "encrypt.format",
                     "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
                     "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg",
                     "encrypt.iter-time", "nocow", "extent_size_hint")
_TYPE_NAMES = {"size": "size", "bool": "bool (on/off)", "str": "str", "num": "num"}


def options_help() -> str:
    lines = ["Supported qcow2 options:"]
    for name, typ, _, text in sorted(_CREATE_OPTS):
        head = f"  {name}=<{_TYPE_NAMES[typ]}>"
        lines.append(f"{head:<24} - {text}")
    return "\n".join(lines)


def split_option_list(text: str) -> list[str]:
    """Split "a=1,b=2" at single commas; ",," stands for a literal comma."""
    items, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return items


def valid_option_list(text: str) -> bool:
    """qemu-img refuses an empty list, a leading comma and an unescaped trailing comma."""
    if not text or text.startswith(","):
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def is_help_list(text: str) -> bool:
    return any(item in ("help", "?") for item in split_option_list(text))


def option_item(item: str) -> tuple[str, str]:
    """(name, value) of one -o item as QEMU reads it: a bare name means name=on, a bare
    noNAME means NAME=off (so "nolazy_refcounts" is lazy_refcounts=off)."""
    key, sep, raw = item.partition("=")
    if sep:
        return key, raw
    if key.startswith("no"):
        return key[2:], "off"
    return key, "on"


def parse_create_options(text: str) -> dict[str, tuple[str, Any]]:
    """-o list -> {name: (text as given, parsed value)}; the last of a repeated name wins."""
    out: dict[str, tuple[str, Any]] = {}
    for item in split_option_list(text):
        key, raw = option_item(item)
        typ = _OPT_TYPES.get(key)
        if typ is None:
            if key in _UNSUPPORTED_OPTS:
                raise InvalidArgumentError(f"Parameter '{key}' is not supported by this implementation")
            raise InvalidArgumentError(f"Invalid parameter '{key}'")
        try:
            if typ == "size":
                value: Any = parse_size(raw)
            elif typ == "num":
                value = parse_number(raw)
            elif typ == "bool":
                value = parse_bool(raw)
            else:
                value = raw
        except SizeRangeError:
            raise InvalidArgumentError(
                f"Value '{raw}' is out of range for parameter '{key}'") from None
        except ValueError:
            what = {"size": "a non-negative number below 2^64 (optional suffix k, M, G, T, P or E)",
                    "num": "a number", "bool": "'on' or 'off'"}[typ]
            raise InvalidArgumentError(f"Parameter '{key}' expects {what}") from None
        out[key] = (raw, value)
    return out


def formatting_line(filename: str, opts: dict[str, tuple[str, Any]]) -> str:
    """qemu-img create's "Formatting 'FILE', fmt=qcow2 ..." line."""
    parts = [f"Formatting '{filename}', fmt=qcow2"]
    for name, typ, default, _ in _CREATE_OPTS:
        if name in opts:
            raw, value = opts[name]
            text = str(value) if typ in ("size", "num") else raw
            if typ == "str":
                text = text.replace(",", ",,")
        elif default is not None:
            text = default
        else:
            continue
        parts.append(f"{name}={text}")
    return " ".join(parts)


# ------------------------------------------------------------------ create --
def cmd_create(args: argparse.Namespace) -> int:
    from .backing import open_backing, probe_format, resolve_backing_name
    from .create import create
    from .image import open_backing_image
    from .info import path_combine
    from .mapping import guest_size

    if args.options and all(valid_option_list(c) for c in args.options) \
            and is_help_list(",".join(args.options)):
        print(options_help())
        return 0
    if args.filename is None:
        raise InvalidArgumentError("Expecting image file name")
    filename: str = args.filename
    if args.fmt != "qcow2":
        raise InvalidArgumentError(f"{filename}: Unknown file format '{args.fmt}' (only qcow2 is supported)")
    text = ",".join(args.options)
    for chunk in args.options:
        if not valid_option_list(chunk):
            raise InvalidArgumentError(f"Invalid option list: {chunk}")
    try:
        opts = parse_create_options(text) if text else {}
    except Qcow2Error as exc:
        raise InvalidArgumentError(f"{filename}: {exc}") from None
    size: int | None = None
    if args.size is not None:
        size = parse_image_size(args.size)
        if "size" in opts:
            raise InvalidArgumentError(f"{filename}: The image size must be specified only once")
        opts["size"] = (args.size, size)
    elif "size" in opts:
        size = opts["size"][1]
    if args.backing is not None:
        opts["backing_file"] = (args.backing, args.backing)
    if args.backing_fmt is not None:
        opts["backing_fmt"] = (args.backing_fmt, args.backing_fmt)

    def fail(msg: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{filename}: {msg}")

    backing = opts.get("backing_file", (None, None))[1]
    backing_fmt = opts.get("backing_fmt", (None, None))[1]
    if backing is not None:
        if backing == filename:
            raise fail("Error: Trying to create an image with the same filename as the backing file")
        if backing == "":
            raise fail("Expected backing file name, got empty string")
    if backing_fmt is not None and backing_fmt not in ("qcow2", "raw"):
        raise fail(f"Unknown or unsupported backing file format '{backing_fmt}'")
    if backing and not args.unsafe:
        shown = path_combine(filename, backing)
        try:
            path = resolve_backing_name(filename, backing)
            if not os.path.exists(path):
                raise BackingFileError(f"Could not open '{shown}': No such file or directory")
            detected = probe_format(path)
            if backing_fmt is None:
                raise fail("Backing file specified without backing format "
                           f"(detected format of {detected}; use -F {detected})")
            bk: Any = open_backing(filename, backing, backing_fmt, (), open_backing_image)
            try:
                if size is None:
                    size = guest_size(bk)  # in whole sectors, as QEMU sizes it
                    opts["size"] = (str(size), size)
            finally:
                bk.close()
        except BackingFileError as exc:
            raise fail(f"{exc}; could not open backing image") from None
    if size is None:
        raise fail("Image creation needs a size parameter")

    if not args.quiet:
        print(formatting_line(filename, opts), flush=True)

    kw = {name: opts[name][1] for name in CREATE_KWARGS if name in opts}
    if backing_fmt is not None and not backing:
        raise fail("Backing format cannot be used without backing file")
    try:
        create(filename, size, backing_file=backing, backing_format=backing_fmt, **kw)
    except Qcow2Error as exc:
        raise fail(str(exc)) from None
    return 0


# ------------------------------------------------------------------ info --
def _output_format(value: str | None) -> str:
    if value is None:
        return "human"
    if value not in ("human", "json"):
        raise InvalidArgumentError("--output must be used with human or json as argument.")
    return value


def _check_fmt(fmt: str | None) -> None:
    if fmt is not None and fmt != "qcow2":
        raise InvalidArgumentError(f"Unknown or unsupported format '{fmt}' (only qcow2 is supported)")


def cmd_info(args: argparse.Namespace) -> int:
    from .info import human_info, info_list, to_json

    out = _output_format(args.output)
    infos = info_list(args.filename, args.fmt, backing_chain=args.backing_chain)
    if out == "json":
        print(to_json(infos if args.backing_chain else infos[0]))
    else:
        print("\n\n".join(human_info(i) for i in infos))
    return 0


# ------------------------------------------------------------------ map --
def _hex16(value: int) -> str:
    """printf("%#-16" PRIx64): no 0x prefix for zero."""
    return f"{value:#x}".ljust(16) if value else "0".ljust(16)


def map_json_text(entries: list[dict[str, Any]]) -> str:
    """`qemu-img map --output=json` text, one extent per line."""
    lines = []
    for e in entries:
        s = (f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]}, '
             f'"present": {_tf(e["present"])}, "zero": {_tf(e["zero"])}, "data": {_tf(e["data"])}')
        if "offset" in e:
            s += f', "offset": {e["offset"]}'
        lines.append(s + "}")
    return "[" + ",\n".join(lines) + "]"


def _tf(b: bool) -> str:
    return "true" if b else "false"


def cmd_map(args: argparse.Namespace) -> int:
    from .image import open_image as qopen
    from .info import layer_names
    from .mapping import guest_size, image_map

    out = _output_format(args.output)
    _check_fmt(args.fmt)
    start = _map_number("start offset", args.start_offset, 0)
    max_len = _map_number("max length", args.max_length, -1)
    with qopen(args.filename) as img:
        size = guest_size(img)
        end = size if max_len < 0 else min(start + max_len, size)
        entries = image_map(img, start, max(0, end - start))
        names = layer_names(img, args.filename)
    if out == "json":
        print(map_json_text(entries))
        return 0
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for e in entries:
        if e["data"] and "offset" not in e:
            sys.stdout.flush()
            raise Qcow2Error("File contains external, encrypted or compressed clusters.")
        if e["data"] and not e["zero"]:
            print(_hex16(e["start"]) + _hex16(e["length"]) + _hex16(e["offset"]) + names[e["depth"]])
    return 0


def _map_number(what: str, text: str | None, default: int) -> int:
    if text is None:
        return default
    try:
        value = parse_size(text)
    except SizeRangeError:
        value = INT64_MAX + 1
    except ValueError:
        raise InvalidArgumentError(
            f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None
    if value > INT64_MAX:
        raise InvalidArgumentError(f"Invalid {what} specified. Must be between 0 and {INT64_MAX}.")
    return value


# ------------------------------------------------------------------ registration --
def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
            usage: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text,
                                                    usage=usage)
        p.set_defaults(func=func)
        return p

    p = add("create", cmd_create, "Create a new qcow2 image",
            "qcow2 create [-f qcow2] [-o opt=val,...] [-b BACKING -F FMT] [-u] [-q] FILE [SIZE]")
    p.add_argument("-f", dest="fmt", default="qcow2", metavar="FMT", help="image format (qcow2)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated creation options; '-o help' lists them")
    p.add_argument("-b", dest="backing", metavar="BACKING", help="backing file")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="backing file format (qcow2|raw)")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (the size must be given)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename", metavar="FILE", nargs="?")
    p.add_argument("size", metavar="SIZE", nargs="?",
                   help="virtual size, with optional suffix k, M, G, T, P or E")

    p = add("info", cmd_info, "Show information about an image",
            "qcow2 info [-f qcow2|raw] [--output=human|json] [--backing-chain] [-U] FILE")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("--output", metavar="FMT", help="human (default) or json")
    p.add_argument("--backing-chain", action="store_true", help="also show every backing file")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility")
    p.add_argument("filename", metavar="FILE")

    p = add("map", cmd_map, "Show the allocation map of an image (and its backing chain)",
            "qcow2 map [-f qcow2] [--output=human|json] [-s START] [-l LENGTH] [-U] FILE")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("--output", metavar="FMT", help="human (default) or json")
    p.add_argument("-s", "--start-offset", metavar="START")
    p.add_argument("-l", "--max-length", metavar="LENGTH")
    p.add_argument("-U", "--force-share", action="store_true", help="accepted for compatibility")
    p.add_argument("filename", metavar="FILE")
