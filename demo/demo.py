"""Headline demonstration.

1. Create an image with our library, write to it, show `qcow2 info` and `qcow2 map`.
2. Take an internal snapshot and list it; qemu-img checks the image and reads the snapshot.
3. The thread's complaint, measured: 4K writes right after a snapshot, ours (standard
   refcounts, no dirty bit) against `qemu-img bench` with standard and lazy refcounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import qcow2
from qcow2.cli import main as qcow2_cli

MiB = 1 << 20


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)))


def qemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def after_snapshot_writes(base: str, work: str, total: int) -> None:
    count = total // 4096
    rows = []
    for label, opts in (("qemu-img, standard refcounts", ""), ("qemu-img, lazy_refcounts=on", "lazy")):
        p = os.path.join(work, f"q-{opts or 'std'}.qcow2")
        shutil.copy(base, p)
        if opts:
            qemu("amend", "-f", "qcow2", "-o", "lazy_refcounts=on", p)
        qemu("snapshot", "-c", "before", p)
        t0 = time.perf_counter()
        r = qemu("bench", "-f", "qcow2", "-w", "-t", "writeback", "-s", "4k", "-c", str(count), "-d", "1", p)
        dt = time.perf_counter() - t0
        if r.returncode:
            print(r.stderr.strip())
            continue
        rows.append((label, dt, "n/a (see benchmarks/bench_crash.py)"))
    p = os.path.join(work, "ours.qcow2")
    shutil.copy(base, p)
    with qcow2.open(p, "r+") as img:
        img.create_snapshot("before")
        start = img.stats.copy()
        buf = os.urandom(4096)
        t0 = time.perf_counter()
        for off in range(0, total, 4096):
            img.pwrite(buf, off)
        img.flush()
        dt = time.perf_counter() - t0
        syncs = (img.stats - start).syncs
    rows.append(("qcow2 (this project), standard refcounts", dt, str(syncs)))
    check = qemu("check", p)
    print(f"{count} sequential 4K writes ({total // MiB} MiB) right after a snapshot:")
    print(f"  {'implementation':<42} {'seconds':>8}  syncs")
    for label, dt, syncs in rows:
        print(f"  {label:<42} {dt:8.2f}  {syncs}")
    print("qemu-img check of our image:", check.stdout.strip().splitlines()[0])


def main() -> None:
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is required for the demo (make demo installs it)")
    work = tempfile.mkdtemp(prefix="qcow2-demo-")
    try:
        path = os.path.join(work, "demo.qcow2")
        banner("create and write with the library")
        qcow2.create(path, 256 * MiB)
        with qcow2.open(path, "r+") as img:
            img.pwrite(b"hello qcow2 " * 10000, 0)
            img.write_zeroes(4 * MiB, MiB)
            img.pwrite(os.urandom(64 * MiB), 16 * MiB)
            print("writes since open:", img.stats)
        banner("qcow2 info")
        qcow2_cli(["info", path])
        banner("qcow2 map")
        qcow2_cli(["map", path])
        banner("internal snapshot")
        qcow2_cli(["snapshot", "-c", "first", path])
        with qcow2.open(path, "r+") as img:
            img.pwrite(b"changed after the snapshot", 0)
        qcow2_cli(["snapshot", "-l", path])
        banner("qemu-img check and read-back")
        print(qemu("check", path).stdout.strip())
        raw = os.path.join(work, "snap.raw")
        qemu("convert", "-O", "raw", "-l", "snapshot.name=first", path, raw)
        with open(raw, "rb") as f:
            print("snapshot 'first' as read by qemu-img starts with:", f.read(24))
        banner("4K writes right after a snapshot")
        base = os.path.join(work, "base.qcow2")
        qemu("create", "-f", "qcow2", base, "256M")
        qemu("bench", "-f", "qcow2", "-w", "-t", "writeback", "-s", "64k", "-c", "1024", "-d", "1", base)
        after_snapshot_writes(base, work, int(os.environ.get("QCOW2_DEMO_MIB", "16")) * MiB)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
