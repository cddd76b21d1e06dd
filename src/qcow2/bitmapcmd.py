"""`qcow2 bitmap`: manage persistent dirty bitmaps, with qemu-img bitmap's syntax,
messages and exit codes. The operations run in the order given, as qemu-img's do."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .errors import InvalidArgumentError, Qcow2Error

_OPS = ("add", "remove", "clear", "enable", "disable", "merge")


class _Act(argparse.Action):
    """Collect the operations in command-line order."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        ops = list(getattr(namespace, "ops", None) or [])
        ops.append((self.const, values))
        namespace.ops = ops


def _open(path: str, fmt: str | None, writable: bool) -> Any:
    from .backing import probe_format
    from .errors import FormatError
    from .image import open_image as qopen

    if not os.path.exists(path):
        raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                         "No such file or directory")
    fmt = fmt or probe_format(path, what="image")
    if fmt != "qcow2":
        raise InvalidArgumentError(f"Could not open '{path}': Unknown driver '{fmt}'"
                                   if fmt != "raw" else
                                   f"Could not open '{path}': raw images have no bitmaps")
    try:
        # bitmaps live in the image itself: like qemu-img bitmap, do not open the backing
        # chain, so that a missing or broken backing file does not stop bitmap management
        return qopen(path, "r+" if writable else "r", backing=False)
    except FormatError as exc:
        raise FormatError(f"Could not open '{path}': {exc}") from None


def cmd_bitmap(args: argparse.Namespace) -> int:
    from .commands import parse_size

    ops: list[tuple[str, Any]] = args.ops or []
    granularity = None
    if args.granularity is not None:
        try:
            granularity = parse_size(args.granularity)
        except ValueError:
            raise InvalidArgumentError(
                "Invalid granularity specified. You may use k, M, G, T, P or E suffixes for"
                "\nqcow2: kilobytes, megabytes, gigabytes, terabytes, petabytes and "
                "exabytes.") from None
    if not ops:
        raise InvalidArgumentError(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    kinds = {k for k, _ in ops}
    if granularity and "add" not in kinds:
        raise InvalidArgumentError("granularity only supported with --add")
    if args.source_fmt and not args.source_file:
        raise InvalidArgumentError("-F only supported with -b")
    if args.source_file and "merge" not in kinds:
        raise InvalidArgumentError("Merge bitmap source file only supported with --merge")
    if len(args.args) != 2:
        raise InvalidArgumentError("Expecting filename and bitmap name")
    path, name = args.args
    with _open(path, args.fmt, True) as img:
        src = _open(args.source_file, args.source_fmt, False) if args.source_file else None
        try:
            for kind, value in ops:
                try:
                    _run(img, kind, value, name, granularity, src)
                except Qcow2Error as exc:
                    raise type(exc)(f"Operation {kind} on bitmap {name} failed: {exc}") \
                        from None
        finally:
            if src is not None:
                src.close()
    return 0


def _run(img: Any, kind: str, value: Any, name: str, granularity: int | None,
         src: Any) -> None:
    if kind == "add":
        img.add_bitmap(name, granularity or None)
    elif kind == "remove":
        img.remove_bitmap(name)
    elif kind == "clear":
        img.clear_bitmap(name)
    elif kind == "enable":
        img.enable_bitmap(name)
    elif kind == "disable":
        img.disable_bitmap(name)
    else:
        img.merge_bitmap(name, value, src)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bitmap", help="manage persistent dirty bitmaps",
        description="Add, remove, clear, enable, disable or merge persistent dirty bitmaps "
                    "(operations run in the order given)",
        usage="qcow2 bitmap (--add | --remove | --clear | --enable | --disable | "
              "--merge SOURCE [-b FILE [-F FMT]]) [-g GRANULARITY] [-f FMT] FILE BITMAP")
    for op in _OPS[:-1]:
        p.add_argument(f"--{op}", action=_Act, const=op, nargs=0, help=f"{op} the bitmap")
    p.add_argument("--disabled", action=_Act, const="disable", nargs=0,
                   help="(with --add) create it disabled")
    p.add_argument("--merge", action=_Act, const="merge", metavar="SOURCE",
                   help="merge bitmap SOURCE into BITMAP")
    p.add_argument("-g", "--granularity", metavar="GRANULARITY",
                   help="granularity of a new bitmap (default: the cluster size, >= 4k)")
    p.add_argument("-b", "--source-file", metavar="FILE", help="image holding SOURCE")
    p.add_argument("-F", "--source-format", dest="source_fmt", metavar="FMT")
    p.add_argument("-f", dest="fmt", metavar="FMT")
    p.add_argument("args", nargs="*", metavar="FILE BITMAP")
    p.set_defaults(func=cmd_bitmap, ops=None)
