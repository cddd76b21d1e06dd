"""`qcow2 check` (qemu-img check) and check_file: open an image for checking, check it.

Apart from check.py (the checker) because opening needs image.py, which imports the
checker: the checker does not import the image back.
"""

from __future__ import annotations

import argparse
import os
import sys

from .check import REPAIR_MODES, CheckResult, check_image
from .errors import BackingFileError, InvalidArgumentError, Qcow2Error
from .format import MAGIC


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


def _open_chain(path: str) -> None:
    """qemu-img check opens the backing chain: a missing backing file fails the check
    as it does there (other errors are the checker's to report)."""
    from .meta import open_metadata

    try:
        open_metadata(path, backing=True).close()
    except BackingFileError:
        raise
    except (Qcow2Error, OSError):
        pass


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("check", help="check an image for consistency (and repair it)",
                       description="Check a qcow2 image like `qemu-img check`. Exit codes: "
                       "0 clean, 1 check not completed, 2 corruptions, 3 leaks only.")
    p.add_argument("-r", dest="repair", metavar="{leaks,all}",
                   help="repair leaks, or everything that can be repaired")
    p.add_argument("--output", metavar="{human,json}", default="human")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (only qcow2)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet mode")
    p.add_argument("filename", metavar="FILE")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    # qemu-img's checks and messages, in its order
    if args.repair not in (None, "leaks", "all"):
        raise InvalidArgumentError("Unknown option value for -r (expecting 'leaks' or 'all'): "
                                   f"{args.repair}")
    if args.output not in ("human", "json"):
        raise InvalidArgumentError("--output must be used with human or json as argument.")
    path = args.filename
    if args.fmt not in (None, "qcow2", "raw"):
        raise Qcow2Error(f"Could not open '{path}': Unknown driver '{args.fmt}'")
    if not os.path.exists(path):
        raise Qcow2Error(f"Could not open '{path}': Could not open '{path}': "
                         "No such file or directory")
    with open(path, "rb") as f:
        is_qcow2 = f.read(4) == MAGIC
    if args.fmt == "raw" or (args.fmt is None and not is_qcow2):
        print("qcow2: This image format does not support checks", file=sys.stderr)
        return 63  # qemu-img's exit code for it
    if not is_qcow2:
        raise Qcow2Error(f"Could not open '{path}': Image is not in qcow2 format")
    _open_chain(path)
    res = check_file(path, args.repair)
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
