"""Item 5 of the report: basic I/O and the tools against QEMU and a raw file.

* 4 KiB random read / overwrite of allocated clusters: `qemu-img bench` (depth 1, writeback
  cache, step of a prime number of blocks: scattered offsets) against the same requests
  in-process through `qcow2.bench.bench`;
* 1 MiB sequential read / overwrite: ours (img.pread / img.pwrite + flush) against
  os.pread / os.pwrite (+ fdatasync) on a raw file of the same size;
* `check`, `convert -O qcow2` (plain and `-c`) and `info`: `qcow2 ...` against
  `qemu-img ...`, whole process each.

The speed ratio is baseline time / our time, per run (above 1: we are faster).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_startup import qcow2_cli, timed_run
from harness import (
    QEMU_IMG,
    Config,
    GiB,
    MiB,
    interleave,
    pair_ratio,
    qemu_check,
    qemu_create,
    qemu_fill,
    settle,
    sh,
    summ,
)
from report_writes import PRIME, qemu_pass

import qcow2
from qcow2.bench import BenchOptions, bench


def shape(cfg: Config) -> dict[str, int]:
    if cfg.quick:
        return {"image": 64 * MiB, "ops": 2000, "convert": 16 * MiB, "prealloc": 4 * GiB}
    return {"image": 1 * GiB, "ops": 20000, "convert": 64 * MiB, "prealloc": 64 * GiB}


TESTS = ["4K random read", "4K random overwrite", "1M sequential read", "1M sequential overwrite",
         "check (data image)", "check (metadata-preallocated)", "convert -O qcow2",
         "convert -c -O qcow2", "info"]


def steps(cfg: Config) -> int:
    return 3 + 2 * cfg.runs * len(TESTS)


def _qemu_read(path: Path, n: int) -> float:
    p = sh([QEMU_IMG, "bench", "-f", "qcow2", "-t", "writeback", "-d", "1", "-c", str(n),
            "-s", "4096", "-S", str(PRIME * 4096), str(path)])
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    assert m, p.stdout
    return float(m.group(1))


def _ours_bench(path: Path, n: int, write: bool) -> float:
    with qcow2.open(path, "r+" if write else "r") as img:
        return bench(img, BenchOptions(count=n, depth=1, size=4096, step=PRIME * 4096,
                                       write=write, pattern=171, flush_interval=n if write else 0))


def _ours_seq(path: Path, size: int, write: bool) -> float:
    buf = b"\xcd" * MiB
    with qcow2.open(path, "r+" if write else "r") as img:
        t0 = time.perf_counter()
        for off in range(0, size, MiB):
            if write:
                img.pwrite(buf, off)
            else:
                img.pread(MiB, off)
        if write:
            img.flush()
        return time.perf_counter() - t0


def _raw_seq(path: Path, size: int, write: bool) -> float:
    buf = b"\xcd" * MiB
    fd = os.open(path, os.O_RDWR)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, MiB):
            if write:
                os.pwrite(fd, buf, off)
            else:
                os.pread(fd, MiB, off)
        if write:
            os.fdatasync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def run(cfg: Config) -> dict[str, Any]:
    sz = shape(cfg)
    d = cfg.tmp
    img = d / "t-data.qcow2"
    raw = d / "t-data.raw"
    qemu_create(img, sz["image"])
    qemu_fill(img, 0, sz["image"])
    settle(img)
    with open(raw, "wb") as f:
        f.truncate(sz["image"])
    _raw_seq(raw, sz["image"], True)
    cfg.tick()
    pre = d / "t-prealloc.qcow2"
    qemu_create(pre, sz["prealloc"], "preallocation=metadata")
    # the convert source: half random bytes, half repeated text (so -c has work to do)
    src_raw = d / "t-src.raw"
    rng = np.random.default_rng(7)
    with open(src_raw, "wb") as f:
        text = (b"The quick brown fox jumps over the lazy dog. " * 30000)[:MiB]
        for i in range(sz["convert"] // MiB):
            f.write(rng.integers(0, 256, MiB, dtype=np.uint8).tobytes() if i % 2 else text)
    src = d / "t-src.qcow2"
    sh([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", str(src_raw), str(src)])
    src_raw.unlink()
    cfg.tick()
    n = sz["ops"]
    rows: list[dict[str, Any]] = []

    def add(name: str, unit: str, baseline: str, fns: dict[str, Any], work: float,
            commands: list[str]) -> None:
        cfg.note(name)
        raw_t = interleave(cfg, fns)
        ours_t, base_t = raw_t["ours"], raw_t["baseline"]
        row = {"name": name, "unit": unit, "baseline": baseline, "commands": commands,
               "seconds": {"ours": summ(ours_t), "baseline": summ(base_t)},
               "speed_ratio": pair_ratio(base_t, ours_t)}
        if work:
            row["rate"] = {"ours": summ([work / t for t in ours_t]),
                           "baseline": summ([work / t for t in base_t])}
        rows.append(row)

    _warm(img)
    add("4K random read", "IOPS", "qemu-img bench",
        {"ours": lambda: _ours_bench(img, n, False), "baseline": lambda: _qemu_read(img, n)}, n,
        [f"qemu-img bench -f qcow2 -t writeback -d 1 -c {n} -s 4096 -S {PRIME * 4096} IMG",
         f"ours: qcow2.bench.bench(img, BenchOptions(count={n}, size=4096, step={PRIME * 4096}))"])
    add("4K random overwrite", "IOPS", "qemu-img bench",
        {"ours": lambda: _ours_bench(img, n, True),
         "baseline": lambda: qemu_pass(img, n, 4096, PRIME * 4096)}, n,
        [f"qemu-img bench -w -f qcow2 -t writeback -d 1 -c {n} -s 4096 -S {PRIME * 4096} "
         f"--flush-interval={n} --pattern=171 IMG", "ours: the same through qcow2.bench.bench"])
    mib = sz["image"] / MiB
    add("1M sequential read", "MiB/s", "raw file",
        {"ours": lambda: _ours_seq(img, sz["image"], False),
         "baseline": lambda: _raw_seq(raw, sz["image"], False)}, mib,
        ["ours: img.pread(1 MiB) over the whole image", "raw: os.pread(1 MiB) over a raw file"])
    add("1M sequential overwrite", "MiB/s", "raw file",
        {"ours": lambda: _ours_seq(img, sz["image"], True),
         "baseline": lambda: _raw_seq(raw, sz["image"], True)}, mib,
        ["ours: img.pwrite(1 MiB) over the whole image, img.flush()",
         "raw: os.pwrite(1 MiB) over a raw file, os.fdatasync"])
    for name, path in (("check (data image)", img), ("check (metadata-preallocated)", pre)):
        add(name, "s", "qemu-img",
            {"ours": lambda path=path: timed_run([*qcow2_cli(), "check", str(path)]),
             "baseline": lambda path=path: timed_run([QEMU_IMG, "check", str(path)])}, 0,
            ["qemu-img check IMG", "qcow2 check IMG"])
    dst = d / "t-dst.qcow2"

    def conv(convert: list[str], compress: bool) -> float:
        dst.unlink(missing_ok=True)
        return timed_run([*convert, *(["-c"] if compress else []), "-O", "qcow2",
                          str(src), str(dst)])

    # both sides end with the output durable: qemu-img with -t writeback (its default
    # for convert, unsafe, never syncs), ours always; ours run as bench_startup.py does
    ours, theirs = [*qcow2_cli(), "convert"], [QEMU_IMG, "convert", "-t", "writeback"]
    for name, c in (("convert -O qcow2", False), ("convert -c -O qcow2", True)):
        add(name, "MiB/s", "qemu-img",
            {"ours": lambda c=c: conv(ours, c), "baseline": lambda c=c: conv(theirs, c)},
            sz["convert"] / MiB,
            [f"qemu-img convert -t writeback {'-c ' if c else ''}-O qcow2 SRC DST",
             f"qcow2 convert {'-c ' if c else ''}-O qcow2 SRC DST"])
        conv(ours, c)
        qemu_check(dst)
        sh([QEMU_IMG, "compare", str(src), str(dst)])
    # start-up as bench_startup.py measures it: the console script, compiled bytecode
    add("info", "s", "qemu-img",
        {"ours": lambda: timed_run([*qcow2_cli(), "info", str(img)]),
         "baseline": lambda: timed_run([QEMU_IMG, "info", str(img)])}, 0,
        ["qemu-img info IMG", "qcow2 info IMG"])
    qemu_check(img)
    cfg.tick()
    for p in (img, raw, pre, src, dst):
        p.unlink(missing_ok=True)
    return {"quick": cfg.quick, "shape": sz, "rows": rows}
