# ruff: noqa: B023 - the closures run at once, inside their loop iteration
"""Refcount modes side by side with qemu-img: snapshot create/delete and 4K writes
right after a snapshot, per mode (standard, lazy-count) and for QEMU, in one run.

    python benchmarks/bench_modes.py [--data-mib 256] [--writes 4096]

QEMU's figures are whole-process (`qemu-img snapshot -c/-d`, `qemu-io -c "write ..."`);
ours are in-process. Ratios are QEMU time / our time (>1: we are faster). Counters
(refcount writes, syncs) come from img.stats.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import qcow2  # noqa: E402

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"


def _make(path: Path, size: int, data: int) -> None:
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    subprocess.run([QEMU_IO, "-c", f"write -P 0xab 0 {data}", str(path)], check=True,
                   capture_output=True)


def _settle(path: Path) -> None:
    """Write the fresh copy's page cache back before timing: otherwise the first sync of
    whoever is timed pays for the copy (a conversion before it would hide that cost)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _open_cost(gib: int, runs: int) -> None:
    """Open (read-write) and close of a metadata-preallocated image in each mode:
    lazy-count builds its live map on open. Reported per TiB of allocated data."""
    d = Path(tempfile.mkdtemp(prefix="bench-open-"))
    try:
        p = d / "p.qcow2"
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
                        str(p), f"{gib}G"], check=True)
        print(f"open + close, {gib} GiB metadata-preallocated image, 64 KiB clusters, "
              f"median of {runs}:")
        for mode in ("standard", "lazy-count"):
            qcow2.amend(p, {"refcount_mode": mode})
            _settle(p)
            times, mem = [], 0
            for _ in range(runs):
                t = time.perf_counter()
                with qcow2.open(p, "r+") as img:
                    mem = int(getattr(img.refcounts, "live", b"").nbytes) if mode != "standard" else 0
                times.append(time.perf_counter() - t)
            med = sorted(times)[len(times) // 2]
            per_tib = 1024 / gib
            print(f"  {mode:12} {med * 1000:8.1f} ms ({med * 1000 * per_tib:8.0f} ms/TiB), "
                  f"live map {mem / 2**20:6.1f} MiB ({mem / 2**20 * per_tib:6.0f} MiB/TiB)")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-mib", type=int, default=256)
    ap.add_argument("--writes", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--open-gib", type=int, default=64,
                    help="metadata-preallocated image for the open-cost figures (0: skip)")
    a = ap.parse_args()
    if a.open_gib:
        _open_cost(a.open_gib, a.runs)
    size, data = 2 * a.data_mib << 20, a.data_mib << 20
    rng = random.Random(1)
    offsets = [rng.randrange(0, data // 4096) * 4096 for _ in range(a.writes)]
    d = Path(tempfile.mkdtemp(prefix="bench-modes-"))
    rows: dict[str, dict[str, list[float]]] = {}
    counters: dict[str, dict[str, int]] = {}
    try:
        base = d / "base.qcow2"
        _make(base, size, data)
        for _ in range(a.runs):
            # QEMU: whole process
            q = d / "q.qcow2"
            shutil.copyfile(base, q)
            _settle(q)
            r = rows.setdefault("qemu-img", {})
            r.setdefault("create", []).append(_timed(lambda: subprocess.run(
                [QEMU_IMG, "snapshot", "-c", "s1", str(q)], check=True)))
            script = " ".join(f"-c 'write -P 1 {o} 4k'" for o in offsets[:512])
            t = _timed(lambda: subprocess.run(f"{QEMU_IO} {script} {q}", shell=True, check=True,
                                              capture_output=True))
            r.setdefault("4k-after-snap", []).append(t * a.writes / 512)
            r.setdefault("delete", []).append(_timed(lambda: subprocess.run(
                [QEMU_IMG, "snapshot", "-d", "s1", str(q)], check=True)))
            for mode in ("standard", "lazy-count"):
                p = d / f"{mode}.qcow2"
                shutil.copyfile(base, p)
                if mode != "standard":
                    qcow2.amend(p, {"refcount_mode": mode})
                _settle(p)
                r = rows.setdefault(mode, {})
                with qcow2.open(p, "r+") as img:
                    r.setdefault("create", []).append(_timed(lambda: img.create_snapshot("s1")))
                    before = img.stats.copy()
                    buf = b"\1" * 4096

                    def writes() -> None:
                        for o in offsets:
                            img.pwrite(buf, o)
                        img.flush()

                    r.setdefault("4k-after-snap", []).append(_timed(writes))
                    delta = img.stats - before
                    counters[mode] = {"refcount_writes": delta.refcount_writes, "syncs": delta.syncs}
                    r.setdefault("delete", []).append(_timed(lambda: img.delete_snapshot("s1")))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    med = {k: {op: sorted(v)[len(v) // 2] for op, v in ops.items()} for k, ops in rows.items()}
    print(f"{a.data_mib} MiB data, {2 * a.data_mib} MiB virtual, 64 KiB clusters; "
          f"{a.writes} random 4K writes after the snapshot (qemu-io: 512 of them, scaled); "
          f"median of {a.runs}")
    print(f"{'':12} {'create s':>10} {'4K writes s':>12} {'delete s':>10}  {'ratio create':>12} {'ratio writes':>12}")
    for k, ops in med.items():
        rc = med["qemu-img"]["create"] / ops["create"]
        rw = med["qemu-img"]["4k-after-snap"] / ops["4k-after-snap"]
        print(f"{k:12} {ops['create']:10.4f} {ops['4k-after-snap']:12.4f} {ops['delete']:10.4f}  "
              f"{rc:12.2f} {rw:12.2f}")
    for mode, c in counters.items():
        print(f"{mode}: {c['refcount_writes']} refcount writes, {c['syncs']} syncs over the writes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
