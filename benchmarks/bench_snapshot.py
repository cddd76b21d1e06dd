"""Internal snapshots: create and delete in-process against `qemu-img snapshot -c/-d`, and
saving VM state against a plain-file write.

Each side works on its own copy of the same image (copied before each run, not timed):

* (a) 8 GiB virtual with 4 GiB allocated (64 KiB clusters): `qemu-img create -o
  preallocation=metadata` for the first 4 GiB, then `qemu-img resize` to 8 GiB. Metadata
  preallocation gives allocated clusters without writing 4 GiB of data, so the default
  scale is the full size; QCOW2_BENCH_SCALE multiplies the sizes (0.25 makes it 2 GiB / 1 GiB).
* (b) 256 GiB with preallocation=metadata: 4 Mi allocated clusters.
* growth: create/delete time against the number of allocated clusters (1, 4, 16, 64 GiB
  preallocated) and against the number of snapshots already in the image (0-256).
* VM state: create_snapshot(vm_state=1 GiB) against writing the same bytes to a raw file
  and syncing it (both end with the data durable).

"ours" is open + operation + close in this process; "qemu-img" is the wall time of the
command (which also pays for process start-up, a few ms). Goals: ours <= 0.5x qemu-img's
time for create/delete on (a) and (b), VM state >= 0.8x raw write throughput.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    QEMU_IMG,
    GiB,
    KiB,
    MiB,
    Result,
    best_of,
    run_cmd,
    standalone,
    workdir,
)

import qcow2  # noqa: E402

BENCH = "snapshot"
CLUSTER = 64 * KiB


def _round(n: int) -> int:
    return max(CLUSTER, n // CLUSTER * CLUSTER)


def make_prealloc(path: Path, allocated: int, virtual: int) -> None:
    """An image whose first `allocated` bytes are preallocated (metadata only)."""
    run_cmd([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
             f"preallocation=metadata,cluster_size={CLUSTER}", str(path), str(allocated)])
    if virtual > allocated:
        run_cmd([QEMU_IMG, "resize", "-q", str(path), str(virtual)])


def copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def ours(path: Path, op: str, name: str) -> float:
    t0 = time.perf_counter()
    img = qcow2.open(path, "r+")
    if op == "create":
        img.create_snapshot(name)
    else:
        img.delete_snapshot(name)
    img.close()
    return time.perf_counter() - t0


def qemu(path: Path, op: str, name: str) -> float:
    flag = "-c" if op == "create" else "-d"
    t0 = time.perf_counter()
    run_cmd([QEMU_IMG, "snapshot", flag, name, str(path)])
    return time.perf_counter() - t0


def check_clean(path: Path) -> None:
    p = subprocess.run([QEMU_IMG, "check", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"qemu-img check failed after our operation: {p.stdout}{p.stderr}")


def compare(d: Path, template: Path, op: str, name: str) -> tuple[float, float]:
    """Best-of-N (interleaved) seconds of ours and qemu-img, each on a fresh copy."""
    a, b = d / "ours.qcow2", d / "qemu.qcow2"

    def run_ours() -> float:
        copy(template, a)
        return ours(a, op, name)

    def run_qemu() -> float:
        copy(template, b)
        return qemu(b, op, name)

    best = best_of({"ours": run_ours, "qemu": run_qemu})
    check_clean(a)  # every measured result must also be a correct one
    return best["ours"], best["qemu"]


def create_delete(d: Path, template: Path, label: str, goal: float | None,
                  notes: str = "") -> list[Result]:
    out = []
    o, q = compare(d, template, "create", "bench")
    out.append(Result(BENCH, f"create, {label}", "s", o, qemu=q, goal=goal, lower_is_better=True,
                      commands=["qemu-img snapshot -c bench IMG",
                                "qcow2.open(IMG, 'r+').create_snapshot('bench'); close()"],
                      notes=notes))
    with_snap = d / "with-snap.qcow2"
    copy(template, with_snap)
    run_cmd([QEMU_IMG, "snapshot", "-c", "old", str(with_snap)])
    o, q = compare(d, with_snap, "delete", "old")
    out.append(Result(BENCH, f"delete, {label}", "s", o, qemu=q, goal=goal, lower_is_better=True,
                      commands=["qemu-img snapshot -d old IMG",
                                "qcow2.open(IMG, 'r+').delete_snapshot('old'); close()"]))
    with_snap.unlink()
    return out


def vm_state(d: Path, size: int) -> Result:
    block = np.random.default_rng(1).integers(0, 256, MiB, dtype=np.uint8).tobytes()
    data = block * (size // MiB) + block[: size % MiB]
    base = d / "vm-base.qcow2"
    qcow2.create(base, 1 * GiB)
    img_path, raw_path = d / "vm.qcow2", d / "vm.raw"

    def run_ours() -> float:
        copy(base, img_path)
        t0 = time.perf_counter()
        with qcow2.open(img_path, "r+") as img:
            img.create_snapshot("vm", vm_state=data)
        dt = time.perf_counter() - t0
        img_path.unlink()
        return dt

    def run_raw() -> float:
        if raw_path.exists():
            raw_path.unlink()
        t0 = time.perf_counter()
        fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            mv = memoryview(data)
            for pos in range(0, len(mv), 256 * MiB):  # the chunking our writer uses
                os.pwrite(fd, mv[pos : pos + 256 * MiB], pos)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        dt = time.perf_counter() - t0
        raw_path.unlink()
        return dt

    best = best_of({"ours": run_ours, "raw": run_raw})
    # correctness of what was measured: write once more and read it back through qemu-img
    copy(base, img_path)
    with qcow2.open(img_path, "r+") as img:
        img.create_snapshot("vm", vm_state=data)
    check_clean(img_path)
    with qcow2.open(img_path) as img:
        if img.read_vm_state("vm") != data:
            raise RuntimeError("VM state read back differs")
    mib = size / MiB
    return Result(BENCH, f"save {size / GiB:g} GiB VM state", "MiB/s", mib / best["ours"],
                  raw=mib / best["raw"], baseline="raw", goal=0.8,
                  commands=["img.create_snapshot('vm', vm_state=DATA) (open..close)",
                            "raw: pwrite DATA in 256 MiB pieces + fdatasync"])


def run(s: float) -> list[Result]:
    results: list[Result] = []
    with workdir("snapshot") as d:
        # (a) 8 GiB virtual, 4 GiB allocated
        t = d / "a.qcow2"
        alloc, virt = _round(int(4 * GiB * s)), _round(int(8 * GiB * s))
        make_prealloc(t, alloc, virt)
        results += create_delete(
            d, t, f"{virt / GiB:g} GiB virtual, {alloc / GiB:g} GiB allocated", 2.0,
            notes="goal: ours <= 0.5x qemu-img's time (ratio = qemu-img / ours >= 2)")
        t.unlink()
        # (b) 256 GiB preallocated
        t = d / "b.qcow2"
        size = _round(int(256 * GiB * s))
        make_prealloc(t, size, size)
        results += create_delete(d, t, f"{size / GiB:g} GiB preallocated "
                                 f"({size // CLUSTER:,} clusters)", 2.0)
        t.unlink()
        # growth with allocated clusters
        for gib in (1, 4, 16, 64):
            size = _round(int(gib * GiB * s))
            t = d / f"g{gib}.qcow2"
            make_prealloc(t, size, size)
            results += create_delete(d, t, f"growth: {size // CLUSTER:,} clusters allocated", None)
            t.unlink()
        # growth with the number of snapshots already there
        size = _round(int(1 * GiB * s))
        for k in (0, 16, 64, 256):
            t = d / f"k{k}.qcow2"
            make_prealloc(t, size, size)
            with qcow2.open(t, "r+") as img:
                for i in range(k):
                    img.create_snapshot(f"pre{i}")
            results += create_delete(
                d, t, f"growth: {k} existing snapshots, {size // CLUSTER:,} clusters", None)
            t.unlink()
        results.append(vm_state(d, max(MiB, int(1 * GiB * s))))
    return results


if __name__ == "__main__":
    sys.exit(standalone(run, BENCH))
