"""The `qcow2 snapshot` command (qemu-img snapshot): -l lists from the snapshot table
alone (meta.py, no numpy), -c/-a/-d open the image read-write."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import Qcow2Error, SnapshotNotFoundError
from .info import format_snapshot_list, tree_parents
from .meta import open_metadata


class _Op(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        ops = list(getattr(namespace, "ops", None) or [])
        ops.append((self.const, values))
        namespace.ops = ops


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "snapshot", help="list, create, apply or delete internal snapshots",
        description="qcow2 snapshot [-l | -a NAME | -c NAME | -d NAME] [-q] FILE",
    )
    p.add_argument("-l", dest="ops", action=_Op, nargs=0, const="l", help="list snapshots")
    p.add_argument("-c", dest="ops", action=_Op, const="c", metavar="NAME", help="create a snapshot")
    p.add_argument("-a", dest="ops", action=_Op, const="a", metavar="NAME",
                   help="apply a snapshot (revert the disk to it)")
    p.add_argument("-d", dest="ops", action=_Op, const="d", metavar="NAME", help="delete a snapshot")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("--tree", action="store_true",
                   help="with -l: draw the snapshot tree (refcount_mode=owner), deleted nodes "
                   "kept for their children included")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="accepted for compatibility")
    p.add_argument("-f", dest="fmt", default=None, help="image format (qcow2 only)")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_snapshot, ops=None)


def _cmd_snapshot(args: argparse.Namespace) -> int:
    ops = args.ops or [("l", None)]
    if len(ops) > 1:
        print("qcow2: Cannot mix '-l', '-a', '-c', '-d'", file=sys.stderr)
        print("Try 'qcow2 --help' for more information", file=sys.stderr)
        return 1
    if args.fmt not in (None, "qcow2"):
        print(f"qcow2: Unsupported image format '{args.fmt}' (only qcow2)", file=sys.stderr)
        return 1
    op, name = ops[0]
    path = args.filename
    try:
        if op == "l":  # listing reads the snapshot table only: no Image (and no numpy)
            img: Any = open_metadata(path, backing=True)
        else:
            from .image import open_image

            img = open_image(path, "r+")
    except OSError as exc:
        print(f"qcow2: Could not open '{path}': {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Qcow2Error as exc:
        msg = str(exc)  # a missing backing file's message already names the image
        if not msg.startswith(f"Could not open '{path}': "):
            msg = f"Could not open '{path}': {msg}"
        print(f"qcow2: {msg}", file=sys.stderr)
        return 1
    try:
        with img:
            if op == "l":
                if args.tree:
                    if tree_parents(img) is None:
                        print("qcow2: --tree needs an image with a snapshot tree "
                              "(refcount_mode=owner)", file=sys.stderr)
                        return 1
                    from .owner import tree_lines

                    sys.stdout.write("".join(line + "\n" for line in tree_lines(img._snapshots)))
                    return 0
                sys.stdout.write(format_snapshot_list(img.snapshots))
                return 0
            if op == "c":
                # qemu-img keeps at most 255 bytes of the name (QEMUSnapshotInfo.name)
                raw = name.encode("utf-8", "surrogateescape")[:255]
                try:
                    img.create_snapshot(raw.decode("utf-8", "surrogateescape"))
                except Qcow2Error as exc:
                    print(f"qcow2: Could not create snapshot '{name}': {exc}", file=sys.stderr)
                    return 1
                return 0
            if op == "a":
                try:
                    img.apply_snapshot(name)
                except SnapshotNotFoundError:
                    print(f"qcow2: Could not apply snapshot '{name}': Failed to load snapshot: "
                          "No such file or directory", file=sys.stderr)
                    return 1
                except Qcow2Error as exc:
                    print(f"qcow2: Could not apply snapshot '{name}': {exc}", file=sys.stderr)
                    return 1
                return 0
            # qemu-img 7.2 looks a snapshot up by name only for -d
            entries = img.snapshots
            match = [e for e in entries if e.name == name]
            if not match:
                print(f"qcow2: Could not delete snapshot '{name}': snapshot not found",
                      file=sys.stderr)
                return 1
            try:
                img.delete_snapshot(match[0].id)
            except Qcow2Error as exc:
                print(f"qcow2: Could not delete snapshot '{name}': {exc}", file=sys.stderr)
                return 1
            return 0
    except Qcow2Error as exc:
        print(f"qcow2: {exc}", file=sys.stderr)
        return 1

