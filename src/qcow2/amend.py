"""`qcow2 amend -o key=value[,...] FILE`: change image options in place (qemu-img amend).

Today: `refcount_mode` (our own option: standard <-> lazy-count, crash-atomic, see
modes.set_refcount_mode). Other creation options are accepted when they leave the image
as it is, and refused with one clear line otherwise.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .errors import InvalidArgumentError


def _current(img: Any) -> dict[str, Any]:
    h = img.header
    return {
        "compat": "1.1" if h.version >= 3 else "0.10",
        "cluster_size": img.cluster_size,
        "refcount_bits": h.refcount_bits,
        "lazy_refcounts": bool(img.lazy_refcounts),
        "extended_l2": bool(img.geo.extended_l2),
        "compression_type": img.compression_type,
        "size": img.size,
        "refcount_mode": img.refcount_mode,
    }


def amend(path: str | os.PathLike[str], **options: Any) -> None:
    """Change options of the image at path in place, as `qemu-img amend -o` does."""
    from .image import Image

    with Image._open(path, writable=True) as img:
        cur = _current(img)
        for key, value in options.items():
            if key not in cur:
                raise InvalidArgumentError(f"Invalid parameter '{key}'")
            if key == "compat":
                value = {"v2": "0.10", "v3": "1.1"}.get(str(value), str(value))
            if key != "refcount_mode" and value != cur[key]:
                raise InvalidArgumentError(
                    f"Changing the option '{key}' is not supported by this implementation")
        mode = options.get("refcount_mode")
        if mode is not None:
            img.set_refcount_mode(str(mode))


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("amend", help="Change options of an existing image",
                       description="Change options of an existing image",
                       usage="qcow2 amend [-f qcow2] [-p] [-q] -o OPTIONS FILE")
    p.set_defaults(func=_cmd_amend)
    p.add_argument("-f", dest="fmt", default="qcow2", metavar="FMT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-p", dest="progress", action="store_true", help="accepted (no progress yet)")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename", metavar="FILE")


def _cmd_amend(args: argparse.Namespace) -> int:
    from .commands import parse_create_options, valid_option_list

    if args.fmt != "qcow2":
        raise InvalidArgumentError(f"Unsupported format '{args.fmt}' for amend")
    if not args.options:
        raise InvalidArgumentError("Must specify options (-o)")
    opts: dict[str, Any] = {}
    for text in args.options:
        if not valid_option_list(text):
            raise InvalidArgumentError(f"Invalid option list: {text}")
        opts.update({k: v for k, (_t, v) in parse_create_options(text).items()})
    amend(args.filename, **opts)
    return 0
