"""Item 4 of the report: how snapshot create / apply / delete scale.

* against allocated clusters: images created with `qemu-img create -o
  preallocation=metadata` (every cluster allocated, no data written, so the disk is not
  filled) from 1 GiB to 1 TiB;
* against the number of snapshots already in the image (1 to 1,000), on a 1 GiB
  metadata-preallocated image;
* open time and memory of each mode on the same images (lazy-count builds a live map on
  open).

Each run is one cycle `snapshot -c s`, `-a s`, `-d s` on the same image (it ends where it
started). QEMU: `qemu-img snapshot`, whole process; ours: in-process, open to close.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

from harness import (
    CLUSTER,
    QEMU_IMG,
    Config,
    GiB,
    MiB,
    copy,
    interleave,
    pair_ratio,
    qemu_check,
    qemu_create,
    summ,
    timed_cmd,
    to_mode,
)

import qcow2

OPS = ("create", "apply", "delete")
FLAG = {"create": "-c", "apply": "-a", "delete": "-d"}


def cluster_sizes(cfg: Config) -> list[int]:
    if cfg.quick:
        return [256 * MiB, 1 * GiB, 4 * GiB]
    return [g * GiB for g in (1, 4, 16, 64, 256, 1024)]


def snapshot_counts(cfg: Config) -> tuple[int, list[int]]:
    return (256 * MiB, [1, 10, 30]) if cfg.quick else (1 * GiB, [1, 10, 100, 1000])


def sides(cfg: Config) -> list[str]:
    return ["qemu-img", *(f"qcow2 {m}" for m in cfg.modes)]


def steps(cfg: Config) -> int:
    per_point = cfg.runs * len(sides(cfg)) * len(OPS) + cfg.runs * len(cfg.modes) + 1
    return per_point * (len(cluster_sizes(cfg)) + len(snapshot_counts(cfg)[1]))


def _ours_op(path: Path, op: str, name: str) -> float:
    t0 = time.perf_counter()
    with qcow2.open(path, "r+") as img:
        if op == "create":
            img.create_snapshot(name)
        elif op == "apply":
            img.apply_snapshot(name)
        else:
            img.delete_snapshot(name)
    return time.perf_counter() - t0


def _open_close(path: Path) -> float:
    t0 = time.perf_counter()
    img = qcow2.open(path, "r+")
    img.close()
    return time.perf_counter() - t0


def _open_memory(path: Path) -> dict[str, int]:
    """Python heap (numpy included) held by an open image, and the peak while opening."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        img = qcow2.open(path, "r+")
        cur, peak = tracemalloc.get_traced_memory()
        img.close()
    finally:
        tracemalloc.stop()
    return {"retained": cur - base, "peak": peak - base}


def _measure(cfg: Config, images: dict[str, Path], name: str,
             refused: dict[str, str]) -> dict[str, Any]:
    fns: dict[str, Any] = {}
    for side, p in images.items():
        for op in OPS:
            if side == "qemu-img":
                fns[f"{side}|{op}"] = lambda p=p, op=op: timed_cmd(
                    [QEMU_IMG, "snapshot", FLAG[op], name, str(p)])
            else:
                fns[f"{side}|{op}"] = lambda p=p, op=op: _ours_op(p, op, name)
    errors: dict[str, str] = dict(refused)
    raw = interleave(cfg, fns, errors=errors)
    opens = interleave(cfg, {s: (lambda p=p: _open_close(p)) for s, p in images.items()
                             if s != "qemu-img"})
    figs: dict[str, dict[str, Any]] = {}
    ratios: dict[str, dict[str, Any]] = {}
    for key, xs in raw.items():
        side, op = key.split("|")
        figs.setdefault(side, {})[op] = summ(xs)
        if side != "qemu-img":
            ratios.setdefault(side, {})[op] = pair_ratio(xs, raw[f"qemu-img|{op}"])
    mem = {s: _open_memory(p) for s, p in images.items() if s != "qemu-img"}
    cfg.tick()
    return {"figures": figs, "ratio_to_qemu": ratios, "errors": errors,
            "open": {s: summ(v) for s, v in opens.items()}, "memory": mem}


def _build(cfg: Config, tag: str, make_standard: Any, fresh: bool,
           refused: dict[str, str]) -> dict[str, Path]:
    """One image per side, each made by make_standard (fresh: a big sparse image is not
    copied) or copied from QEMU's; the other modes then converted (a mode refusing the
    conversion is recorded in refused and left out)."""
    base = cfg.tmp / f"s-{tag}-qemu.qcow2"
    make_standard(base)
    images: dict[str, Path] = {"qemu-img": base}
    for m in cfg.modes:
        p = cfg.tmp / f"s-{tag}-{m}.qcow2"
        if fresh:
            make_standard(p)
        else:
            copy(base, p)
        try:
            to_mode(p, m)
        except Exception as exc:
            refused[f"qcow2 {m}"] = f"conversion refused: {exc}".splitlines()[0]
            p.unlink(missing_ok=True)
            continue
        images[f"qcow2 {m}"] = p
    return images


def run(cfg: Config) -> dict[str, Any]:
    by_clusters = []
    for size in cluster_sizes(cfg):
        cfg.note(f"scale: {size >> 30 or size >> 20} {'GiB' if size >= GiB else 'MiB'}")
        refused: dict[str, str] = {}
        images = _build(cfg, f"c{size >> 20}",
                        lambda p, size=size: qemu_create(p, size, "preallocation=metadata"),
                        fresh=True, refused=refused)
        row = _measure(cfg, images, "s", refused)
        if "qcow2 standard" in images:
            qemu_check(images["qcow2 standard"])
        row.update(size=size, clusters=size // CLUSTER)
        by_clusters.append(row)
        for p in images.values():
            p.unlink(missing_ok=True)
    img_size, counts = snapshot_counts(cfg)
    by_snapshots = []
    for k in counts:
        cfg.note(f"scale: {k} snapshots")

        def make(p: Path, k: int = k) -> None:
            qemu_create(p, img_size, "preallocation=metadata")
            with qcow2.open(p, "r+") as img:
                for i in range(k):
                    img.create_snapshot(f"pre{i}")
            qemu_check(p)

        refused = {}
        images = _build(cfg, f"k{k}", make, fresh=False, refused=refused)
        row = _measure(cfg, images, "x", refused)
        row.update(snapshots=k, size=img_size, clusters=img_size // CLUSTER)
        by_snapshots.append(row)
        for p in images.values():
            p.unlink(missing_ok=True)
    return {
        "quick": cfg.quick, "by_clusters": by_clusters, "by_snapshots": by_snapshots,
        "sides": sides(cfg), "snapshot_image": img_size,
        "commands": [
            "qemu-img create -f qcow2 -o cluster_size=65536,preallocation=metadata IMG SIZE",
            "snapshots: K x img.create_snapshot('preI') (ours, in-process; qemu-img check after)",
            "qcow2 amend -o refcount_mode=MODE COPY (the other modes)",
            "each run: qemu-img snapshot -c s IMG; -a s; -d s (whole process) | ours: "
            "qcow2.open(IMG, 'r+') + create_snapshot / apply_snapshot / delete_snapshot + close",
            "open: qcow2.open(IMG, 'r+') + close; memory: tracemalloc around the open "
            "(Python heap incl. numpy arrays)",
        ],
    }

