"""`qcow2 check` (qemu-img check) and check_file: open an image for checking, check it.

Apart from check.py (the checker) because opening needs image.py, which imports the
checker: the checker does not import the image back.
"""

from __future__ import annotations

import argparse
import os
import sys

from .check import REPAIR_MODES, CheckResult, check_image
from .errors import InvalidArgumentError


def check_file(path: str | os.PathLike[str], repair: str | None = None) -> CheckResult:
    """Check (and repair) the image at path. Unlike a normal read-write open, a repair
    open accepts images marked corrupt or dirty: fixing them is the point."""
    from .image import Image

    if repair not in REPAIR_MODES:
        raise InvalidArgumentError(f"Invalid repair mode {repair!r}: use 'leaks' or 'all'")
    img = Image._open(path, writable=bool(repair), backing=False, _check_open=True)
    try:
        return check_image(img, repair)
    finally:
        img.close()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("check", help="check an image for consistency (and repair it)",
                       description="Check a qcow2 image like `qemu-img check`. Exit codes: "
                       "0 clean, 1 check not completed, 2 corruptions, 3 leaks only.")
    p.add_argument("-r", dest="repair", choices=("leaks", "all"),
                   help="repair leaks, or everything that can be repaired")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (only qcow2)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet mode")
    p.add_argument("filename", metavar="FILE")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    if args.fmt not in (None, "qcow2"):
        print(f"qcow2: Unsupported image format '{args.fmt}' (only qcow2)", file=sys.stderr)
        return 1
    res = check_file(args.filename, args.repair)
    res.filename = args.filename
    for line in res.all_messages():
        print(line, file=sys.stderr)
    if res.failure is not None:
        print(f"qcow2: Check failed: {res.failure}", file=sys.stderr)
        return 1
    if not args.quiet:
        if args.output == "json":
            print(res.to_json())
        else:
            if res.repaired:
                sys.stdout.write(res.repair_preamble())
            sys.stdout.write(res.human())
    if res.check_errors:
        print("qcow2: Check failed", file=sys.stderr)
        return 1
    return res.exit_code
