"""Cost of keeping persistent dirty bitmaps true on the write path, side by side with
QEMU's cost for the same thing.

4K random overwrites of allocated clusters on an image with two enabled bitmaps
(granularity 64 KiB and 512 bytes), against the same image without bitmaps: ours (a loop
of img.pwrite, then close, which stores the bitmaps) and `qemu-img bench -w` (which
loads, maintains and stores them the same way). Reported: our IOPS with bitmaps against
qemu-img's with bitmaps, and each side's slowdown from the bitmaps in the notes.

Run: python benchmarks/bench_bitmaps.py (QCOW2_BENCH_SCALE=4 for bigger runs).
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    QEMU_IMG,
    KiB,
    MiB,
    Result,
    best_of,
    print_results,
    qemu_img_bench,
    run_cmd,
    scale,
    warm,
    workdir,
)

import qcow2  # noqa: E402

BENCH = "bitmaps"
BLOCK = 4 * KiB
STEP_BLOCKS = 7919


def run(s: float | None = None) -> list[Result]:
    s = scale() if s is None else s
    size = 256 * MiB
    count = max(2000, int(20_000 * s))
    with workdir(BENCH) as d:
        plain = d / "plain.qcow2"
        run_cmd([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
                 str(plain), str(size)])
        with qcow2.open(plain, "r+") as img:  # allocated clusters: overwrites in place
            for off in range(0, size, MiB):
                img.pwrite(bytes([1]) * MiB, off)
        marked = d / "bitmaps.qcow2"
        shutil.copyfile(plain, marked)
        run_cmd([QEMU_IMG, "bitmap", "--add", "-g", "64k", str(marked), "b64k"])
        run_cmd([QEMU_IMG, "bitmap", "--add", "-g", "512", str(marked), "b512"])
        rng = random.Random(42)
        offs = [rng.randrange(size // BLOCK) * BLOCK for _ in range(count)]
        data = bytes([0xA5]) * BLOCK

        def ours(path: Path) -> float:
            warm(path)
            t0 = time.perf_counter()
            with qcow2.open(path, "r+") as img:
                pwrite = img.pwrite
                for o in offs:
                    pwrite(data, o)
            return time.perf_counter() - t0

        def qemu(path: Path) -> float:
            warm(path)
            return qemu_img_bench(path, count=count, size=BLOCK, step=STEP_BLOCKS * BLOCK,
                                  write=True, pattern=0xA5)[0]

        t = best_of({"ours-plain": lambda: ours(plain), "ours-bitmaps": lambda: ours(marked),
                     "qemu-plain": lambda: qemu(plain), "qemu-bitmaps": lambda: qemu(marked)})
        cmd = qemu_img_bench(marked, count=1, size=BLOCK, write=True)[1]
    ours_cost = t["ours-bitmaps"] / t["ours-plain"]
    qemu_cost = t["qemu-bitmaps"] / t["qemu-plain"]
    return [Result(
        BENCH, f"4K random overwrites with 2 enabled bitmaps ({size // MiB} MiB, {count} "
               "requests)", "IOPS",
        ours=count / t["ours-bitmaps"], qemu=count / t["qemu-bitmaps"], baseline="qemu", goal=0.5,
        commands=[cmd.replace("-c 1", f"-c {count}") + f" -S {STEP_BLOCKS * BLOCK}",
                  "ours: open r+, loop of img.pwrite(4K) at random 4K-aligned offsets, close "
                  "(the close stores the bitmaps; qemu-img bench's time excludes its close)"],
        notes=f"slowdown from the bitmaps: ours x{ours_cost:.2f} "
              f"({count / t['ours-plain']:.0f} -> {count / t['ours-bitmaps']:.0f} IOPS), "
              f"qemu-img x{qemu_cost:.2f} ({count / t['qemu-plain']:.0f} -> "
              f"{count / t['qemu-bitmaps']:.0f} IOPS)",
    )]


if __name__ == "__main__":
    print_results(run())
