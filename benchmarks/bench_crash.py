"""Writes right after an internal snapshot: ours (standard refcounts, no dirty bit,
batched crash-safe syncs) side by side with QEMU with and without lazy refcounts.

Workloads (the image is fully written, then `qemu-img snapshot -c` shares every
cluster with the snapshot, so every first write to a cluster copies it):

* sequential: 4 KiB writes from offset 0 to the end of the disk;
* random: 4 KiB writes hopping over the disk with a large odd stride of 4 KiB blocks
  (`qemu-img bench -S`; it wraps modulo the image size, so every block is written
  once, in scattered order); ours replays exactly the same offsets. Every cluster gets
  16 writes: one copies it, 15 overwrite the copy in place;
* sparse random: the first 1/16 of those writes (as many as there are clusters), so
  that most writes are first writes that copy a cluster;
* the same two with a flush every 1 MiB of writes (a guest that flushes):
  `qemu-img bench --flush-interval=256`, and img.flush() every 256 writes for ours.

Time: ours from open to the end of close (the final flush and sync included). QEMU:
the wall time of the `qemu-img bench` process minus that of the same command with one
request (process start, open and close), so that its final flush at close is counted
(its own "Run completed" figure excludes it) but its start-up is not. QEMU runs with
its default queue depth (64) and cache=writeback. Best of QCOW2_BENCH_REPEAT
interleaved runs, each on a fresh copy of the same prepared image.

Syncs: ours from img.stats; QEMU's counted with `strace -f -c -e trace=fdatasync,fsync`
in a separate, untimed run.

Goals (issue 5): without flushes, ours takes no longer than QEMU with
lazy_refcounts=on and at least 5x less than QEMU in standard mode.

Size: 32 MiB x QCOW2_BENCH_SCALE (QCOW2_BENCH_SCALE=8 is the full 256 MiB).
Run: python benchmarks/bench_crash.py
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    QEMU_IMG,
    QEMU_IO,
    KiB,
    MiB,
    Result,
    best_of,
    run_cmd,
    standalone,
    workdir,
)

import qcow2  # noqa: E402

BENCH = "crash"
BLOCK = 4 * KiB
CLUSTER = 64 * KiB  # qemu-img create's default, used by both sides
FLUSH_EVERY = 256  # writes: 1 MiB
STRACE = shutil.which("strace")


def _size(s: float) -> int:
    return max(8 * MiB, int(32 * MiB * s) // (8 * MiB) * (8 * MiB))


def _stride(blocks: int) -> int:
    """An odd number of blocks near blocks * 0.618: with a power-of-two block count it is
    coprime, so offset = i * stride mod size visits every block once, scattered."""
    k = int(blocks * 0.6180339887) | 1
    return k if blocks > 1 else 1


def prepare(d: Path, size: int, lazy: bool) -> Path:
    p = d / f"template-{'lazy' if lazy else 'std'}.qcow2"
    run_cmd([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
             f"lazy_refcounts={'on' if lazy else 'off'}", str(p), str(size)])
    run_cmd([QEMU_IO, "-f", "qcow2", "-c", f"write -q -P 0x5a 0 {size}", str(p)])
    run_cmd([QEMU_IMG, "snapshot", "-c", "base", str(p)])
    return p


def _fresh(template: Path, d: Path) -> Path:
    """A copy of the template, synced (so no run pays for writing back the copy)."""
    p = d / "run.qcow2"
    shutil.copyfile(template, p)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return p


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


# CPU seconds of the last run of each side (user + system; for QEMU its whole process)
CPU: dict[str, float] = {}


def ours(template: Path, d: Path, offsets: list[int], flush_every: int) -> tuple[float, int]:
    p = _fresh(template, d)
    data = bytes([0xA5]) * BLOCK
    c0 = _cpu(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    img = qcow2.open(p, "r+")
    pwrite = img.pwrite
    if flush_every:
        for i, off in enumerate(offsets, 1):
            pwrite(data, off)
            if i % flush_every == 0:
                img.flush()
    else:
        for off in offsets:
            pwrite(data, off)
    img.close()
    t = time.perf_counter() - t0
    CPU["ours"] = _cpu(resource.RUSAGE_SELF) - c0
    return t, img.stats.syncs


def _qemu_args(p: Path, count: int, step: int, flush_every: int) -> list[str]:
    args = [QEMU_IMG, "bench", "-f", "qcow2", "-t", "writeback", "-w", "-s", str(BLOCK),
            "-c", str(count), "-S", str(step), "--pattern=165"]
    if flush_every:
        args.append(f"--flush-interval={flush_every}")
    return [*args, str(p)]


def qemu(template: Path, d: Path, count: int, step: int, flush_every: int) -> float:
    p = _fresh(template, d)
    c0 = _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    run_cmd(_qemu_args(p, count, step, flush_every))
    t = time.perf_counter() - t0
    CPU["qemu"] = _cpu(resource.RUSAGE_CHILDREN) - c0
    return t


def qemu_syncs(template: Path, d: Path, count: int, step: int, flush_every: int) -> int | None:
    if STRACE is None:
        return None
    p = _fresh(template, d)
    out = d / "strace.txt"
    subprocess.run([STRACE, "-f", "-c", "-o", str(out), "-e", "trace=fdatasync,fsync",
                    *_qemu_args(p, count, step, flush_every)], check=True, capture_output=True)
    total = 0
    for line in out.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fdatasync|fsync)\s*$", line)
        if m:
            total += int(m.group(1))
    return total


def _check(template: Path, d: Path, offsets: list[int]) -> None:
    """Ours wrote what it should and left a clean image (once, outside the timings)."""
    ours(template, d, offsets, 0)
    p = d / "run.qcow2"
    rep = subprocess.run([QEMU_IMG, "check", str(p)], capture_output=True, text=True)
    if rep.returncode != 0:
        raise RuntimeError(f"qemu-img check after our run: {rep.stdout}{rep.stderr}")
    with qcow2.open(p) as img:
        for off in offsets[:: max(1, len(offsets) // 64)]:
            if img.pread(BLOCK, off) != bytes([0xA5]) * BLOCK:
                raise RuntimeError(f"our run did not write offset {off:#x}")
        snap = img.snapshot("base")
        if snap.pread(BLOCK, offsets[-1]) != bytes([0x5A]) * BLOCK:
            raise RuntimeError("the snapshot changed")


def run(s: float) -> list[Result]:
    size = _size(s)
    blocks = size // BLOCK
    results: list[Result] = []
    with workdir("crash") as d:
        std = prepare(d, size, lazy=False)
        lazy = prepare(d, size, lazy=True)
        stride = _stride(blocks)
        scattered = [(i * stride % blocks) * BLOCK for i in range(blocks)]
        patterns = {
            "sequential": (BLOCK, [i * BLOCK for i in range(blocks)]),
            "random": (stride * BLOCK, scattered),
            # as many writes as clusters: mostly first writes, each copying a cluster
            "sparse random": (stride * BLOCK, scattered[: blocks // (CLUSTER // BLOCK)]),
        }
        for label, (step, offsets) in patterns.items():
            _check(std, d, offsets)
            count = len(offsets)
            for flush_every in (0, FLUSH_EVERY):
                if flush_every and label == "sparse random":
                    continue
                syncs: dict[str, int | None] = {}
                cpu: dict[str, float] = {"ours": 1e9, "lazy": 1e9, "std": 1e9}

                def ours_run(fe: int = flush_every, offs: list[int] = offsets,
                             out: dict[str, int | None] = syncs,
                             c: dict[str, float] = cpu) -> float:
                    t, n = ours(std, d, offs, fe)
                    out["ours"] = n
                    c["ours"] = min(c["ours"], CPU["ours"])
                    return t

                def qemu_run(tpl: Path, key: str, st: int = step, fe: int = flush_every,
                             c: dict[str, float] = cpu, k: int = count) -> float:
                    t = qemu(tpl, d, k, st, fe)
                    c[key] = min(c[key], CPU["qemu"])
                    return t

                times = best_of({
                    "ours": ours_run,
                    "lazy": lambda: qemu_run(lazy, "lazy"),
                    "std": lambda: qemu_run(std, "std"),
                    "lazy0": lambda st=step: qemu(lazy, d, 1, st, 0),
                    "std0": lambda st=step: qemu(std, d, 1, st, 0),
                })
                start = {k: times[k + "0"] for k in ("lazy", "std")}
                walls = {k: times[k] for k in ("lazy", "std")}
                for k in start:
                    times[k] = max(1e-6, times[k] - start[k])
                syncs["lazy"] = qemu_syncs(lazy, d, count, step, flush_every)
                syncs["std"] = qemu_syncs(std, d, count, step, flush_every)
                what = (f"{count} 4K {label} writes over a {size // MiB} MiB disk "
                        "after a snapshot")
                if flush_every:
                    what += ", flush every 1 MiB"
                note = (f"syncs: ours {syncs['ours']}, QEMU lazy_refcounts=on {syncs['lazy']}, "
                        f"QEMU standard {syncs['std']}; QEMU process wall time lazy "
                        f"{walls['lazy']:.3f} s / standard {walls['std']:.3f} s, of which "
                        f"start-up+open+close {start['lazy']:.3f} s / {start['std']:.3f} s; "
                        f"CPU time (user+sys, best run): ours {cpu['ours']:.3f} s, QEMU lazy "
                        f"{cpu['lazy']:.3f} s, QEMU standard {cpu['std']:.3f} s")
                cmd = " ".join(_qemu_args(Path("IMG"), count, step, flush_every)[1:])
                goal_lazy = None if flush_every else 1.0
                goal_std = None if flush_every else 5.0
                results.append(Result(
                    BENCH, f"{what} (vs QEMU lazy_refcounts=on)", "s", ours=times["ours"],
                    qemu=times["lazy"], baseline="qemu", goal=goal_lazy, lower_is_better=True,
                    commands=[f"qemu-img {cmd}  (image created with -o lazy_refcounts=on)"],
                    notes=note))
                results.append(Result(
                    BENCH, f"{what} (vs QEMU standard refcounts)", "s", ours=times["ours"],
                    qemu=times["std"], baseline="qemu", goal=goal_std, lower_is_better=True,
                    commands=[f"qemu-img {cmd}"], notes=note))
    return results


if __name__ == "__main__":
    sys.exit(standalone(run, BENCH))
