"""Refcount modes side by side, for the owner-mode issue (Method 2): snapshot create
against the image size, writes right after a snapshot, delete with one child, apply,
open, close, check, and space used, for every mode in qcow2.modes.MODES and qemu-img.

* create: in-process `create_snapshot` on an open image (median of runs, a fresh copy
  each run) on 1, 16 and 256 GiB metadata-preallocated images (64 KiB clusters), and
  `qemu-img snapshot -c` on the same standard image (whole process, as Kevin Wolf timed
  it in the thread).
* writes: 256 MiB of 4 KiB writes at random cluster-aligned offsets of a 1 GiB
  preallocated image right after a snapshot (every write copies a shared cluster), with
  the close that makes them durable; qemu-io the same writes in one process.
* delete (the snapshot has one child, the live state), apply, open + close, check.
* space: file size after 8 rounds of (snapshot, 512 random 4 KiB writes).

QCOW2_BENCH_SCALE scales the write volume and the largest image (0.1: 25.6 GiB).
Run: python benchmarks/bench_owner.py
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import QEMU_IMG, QEMU_IO, GiB, KiB, MiB, Result, run_cmd, standalone, workdir  # noqa: E402

import qcow2  # noqa: E402
from qcow2.modes import MODES  # noqa: E402

BENCH = "owner"
CLUSTER = 64 * KiB


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _make(path: Path, size: int, mode: str) -> None:
    qcow2.create(path, size, cluster_size=CLUSTER, preallocation="metadata", refcount_mode=mode)
    os.sync()  # the creation's dirty pages must not land in the timed syncs


def _create_time(size: int, mode: str, d: Path, runs: int) -> float:
    """Median in-process create_snapshot time, a fresh image each run (sparse files
    are not copied: a copy would read every byte of the hole)."""
    times = []
    p = d / f"c-{mode}.qcow2"
    for _ in range(runs):
        _make(p, size, mode)
        with qcow2.open(p, "r+") as img:
            t = time.perf_counter()
            img.create_snapshot("s")
            times.append(time.perf_counter() - t)
        p.unlink()
    return _median(times)


def _qemu_create_time(size: int, d: Path, runs: int) -> float:
    times = []
    p = d / "c-qemu.qcow2"
    for _ in range(runs):
        _make(p, size, "standard")
        t = time.perf_counter()
        run_cmd([QEMU_IMG, "snapshot", "-c", "s", str(p)])
        times.append(time.perf_counter() - t)
        p.unlink()
    return _median(times)


def run(scale: float) -> list[Result]:
    out: list[Result] = []
    runs = 3
    rng = random.Random(1)
    with workdir("owner") as d:
        # -- create against size -----------------------------------------------------------
        for gib in (1, 16, max(1, int(256 * min(scale, 1)))):
            size = gib * GiB
            q = _qemu_create_time(size, d, runs)
            for mode in MODES:
                t = _create_time(size, mode, d, runs)
                out.append(Result(BENCH, f"snapshot create, {gib} GiB preallocated, {mode}", "s",
                                  t, qemu=q, lower_is_better=True))
        # -- writes right after a snapshot (interleaved runs, medians) -------------------
        nwrites = int(256 * MiB * scale) // (4 * KiB)
        offs = [rng.randrange(GiB // CLUSTER) * CLUSTER for _ in range(nwrites)]
        buf = os.urandom(4 * KiB)
        script = d / "qemu-io.cmds"
        script.write_text("".join(f"write {o} 4k\n" for o in offs))
        times: dict[str, list[float]] = {m: [] for m in [*MODES, "qemu-io"]}
        counts: dict[str, qcow2.Stats] = {}
        for _ in range(runs):
            for mode in [*MODES, "qemu-io"]:
                p = d / f"w-{mode}.qcow2"
                _make(p, GiB, "standard" if mode == "qemu-io" else mode)
                with qcow2.open(p, "r+") as img:
                    img.create_snapshot("s")
                os.sync()
                t = time.perf_counter()
                if mode == "qemu-io":
                    with open(script) as cmds:  # qemu-io reads commands from stdin
                        run_cmd([QEMU_IO, "-t", "writeback", "-f", "qcow2", str(p)], stdin=cmds)
                else:
                    with qcow2.open(p, "r+") as img:
                        s0 = img.stats.copy()
                        for o in offs:
                            img.pwrite(buf, o)
                        img.flush()
                        counts[mode] = img.stats - s0
                times[mode].append(time.perf_counter() - t)
                p.unlink()
        qemu_w = _median(times["qemu-io"])
        std_write = _median(times["standard"])
        for mode in MODES:
            st = counts[mode]
            el = _median(times[mode])
            out.append(Result(BENCH, f"{nwrites} 4K writes after a snapshot, {mode} "
                              f"({st.refcount_writes} refcount writes, {st.syncs} syncs)", "s",
                              el, qemu=qemu_w, lower_is_better=True))
            if mode != "standard":
                out.append(Result(BENCH, f"4K writes after a snapshot, {mode} vs standard", "s",
                                  el, raw=std_write, baseline="raw", lower_is_better=True,
                                  goal=1.0 if mode == "owner" else None))
        # -- delete with one child, apply, open/close, check ----------------------------------
        for mode in MODES:
            p = d / f"o-{mode}.qcow2"
            _make(p, GiB, mode)
            with qcow2.open(p, "r+") as img:
                img.create_snapshot("s")
                img.create_snapshot("t")
                img.pwrite(buf, 0)
                t = time.perf_counter()
                img.delete_snapshot("t")
                dl = time.perf_counter() - t
                t = time.perf_counter()
                img.apply_snapshot("s")
                ap = time.perf_counter() - t
            t = time.perf_counter()
            with qcow2.open(p, "r+"):
                pass
            oc = time.perf_counter() - t
            t = time.perf_counter()
            with qcow2.open(p) as img:
                assert img.check().clean
            ck = time.perf_counter() - t
            for name, v in (("delete (one child)", dl), ("apply", ap), ("open+close r/w", oc),
                            ("check", ck)):
                out.append(Result(BENCH, f"{name}, 1 GiB preallocated, {mode}", "s", v,
                                  lower_is_better=True))
            p.unlink()
        # -- space ------------------------------------------------------------------------
        std_size = None
        for mode in MODES:
            p = d / f"space-{mode}.qcow2"
            qcow2.create(p, GiB, cluster_size=CLUSTER, refcount_mode=mode)
            r = random.Random(2)
            with qcow2.open(p, "r+") as img:
                img.pwrite(os.urandom(64 * MiB), 0)
                for k in range(8):
                    img.create_snapshot(f"s{k}")
                    for _ in range(512):
                        img.pwrite(buf, r.randrange(64 * MiB // (4 * KiB)) * 4 * KiB)
            size = p.stat().st_size / MiB
            if mode == "standard":
                std_size = size
            out.append(Result(BENCH, f"file size after 8 snapshots + writes, {mode}", "MiB",
                              size, raw=std_size, baseline="raw", lower_is_better=True))
            p.unlink()
    return out


if __name__ == "__main__":
    sys.exit(standalone(run, BENCH))
