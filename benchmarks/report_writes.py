"""Item 2 of the report: the thread's complaint, decomposed.

An image of S bytes, fully written by QEMU (64 KiB clusters). N writes of 4 KiB or 64 KiB,
sequential or "random" (qemu-img bench has no random mode: its offsets advance by a step
modulo the image size, so the step is a prime number of blocks, which visits each block at
most once in scattered order), in three passes over the same offsets:

* before: no snapshot; the writes overwrite clusters the image owns;
* right after: `snapshot -c` first, then the same writes hit shared clusters (copy on
  write: new cluster, refcount updates, and for 4 KiB the rest of the cluster copied);
* steady after: the same writes again, now to clusters owned again.

QEMU runs `qemu-img bench -w -d 1 --flush-interval=N` (one flush at the end, inside its
timing) for its standard format, lazy_refcounts=on and extended_l2=on; we run the same
requests in-process (`qcow2.bench.bench`, the code behind `qcow2 bench`) in every refcount
mode, with and without extended L2. Each sample starts from a fresh, settled copy.

Counters per pass: ours from img.stats; QEMU's from strace (write calls classified by the
metadata cluster they hit, fdatasync calls), in one extra untimed run.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from harness import (
    KINDS,
    MODES,
    QEMU_IMG,
    Config,
    MiB,
    copy,
    pair_ratio,
    qemu_check,
    qemu_create,
    qemu_fill,
    settle,
    sh,
    stats_counts,
    strace_run,
    summ,
    to_mode,
)

import qcow2
from qcow2.bench import BenchOptions, bench
from qcow2.storage import FileBackend

PRIME = 7919
PHASES = ("before", "after", "steady")
# the after pass once more without syncs (qemu-img -t unsafe; ours NoSyncBackend)
TIMED = (*PHASES, "after_nosync")
QEMU_CONFIGS = {"qemu standard": "", "qemu lazy_refcounts=on": "lazy_refcounts=on",
                "qemu extended_l2=on": "extended_l2=on"}


def shape(cfg: Config) -> tuple[int, int]:
    """(image size S, writes per pass N)"""
    return (32 * MiB, 256) if cfg.quick else (128 * MiB, 1024)


def workloads() -> dict[str, tuple[int, int]]:
    """name -> (request size, step)"""
    return {"4K sequential": (4096, 4096), "4K random": (4096, PRIME * 4096),
            "64K sequential": (65536, 65536), "64K random": (65536, PRIME * 65536)}


def our_configs(cfg: Config) -> dict[str, tuple[str, bool]]:
    out = {}
    for m in cfg.modes:
        out[f"qcow2 {m}"] = (m, False)
        out[f"qcow2 {m} + extended_l2"] = (m, True)
    return out


def configs(cfg: Config) -> list[str]:
    return [*QEMU_CONFIGS, *our_configs(cfg)]


def steps(cfg: Config) -> int:
    n = len(configs(cfg)) * len(workloads())
    return 3 + len(our_configs(cfg)) + 2 * cfg.runs * n + len(QEMU_CONFIGS) * len(workloads()) + 1


def qemu_bench_args(path: Path, n: int, size: int, step: int, cache: str = "writeback"
                    ) -> list[str]:
    return [QEMU_IMG, "bench", "-w", "-f", "qcow2", "-t", cache, "-d", "1", "-c", str(n),
            "-s", str(size), "-S", str(step), f"--flush-interval={n}", "--pattern=171",
            str(path)]


def qemu_pass(path: Path, n: int, size: int, step: int, cache: str = "writeback") -> float:
    p = sh(qemu_bench_args(path, n, size, step, cache))
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {p.stdout!r}")
    return float(m.group(1))


class NoSyncBackend(FileBackend):
    """The file without its syncs: what our passes cost when nothing waits for the disk
    (the counterpart of qemu-img's -t unsafe, which ignores flushes)."""

    def sync(self) -> None:
        pass


def our_pass(path: Path, n: int, size: int, step: int, unsafe: bool = False
             ) -> tuple[float, dict[str, int]]:
    kw = {"backend": NoSyncBackend(path, True)} if unsafe else {}
    with qcow2.open(path, "r+", **kw) as img:
        before = img.stats.copy()
        dt = bench(img, BenchOptions(count=n, depth=1, size=size, step=step, write=True,
                                     pattern=171, flush_interval=n))
        counts = stats_counts(img.stats - before)
    return dt, counts


def unit_costs(cfg: Config) -> dict[str, Any]:
    """What the causes cost on this file system, measured on a raw file in the same run:
    a sync after a 4 KiB write, a 4 KiB overwrite and a 64 KiB append/overwrite/read in
    the page cache."""
    p = cfg.tmp / "unit.raw"
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    buf4, buf64 = b"\x5a" * 4096, b"\x5a" * 65536
    out: dict[str, list[float]] = {k: [] for k in ("sync", "write_4k", "write_64k",
                                                   "append_64k", "read_64k")}
    try:
        os.pwrite(fd, bytes(16 * MiB), 0)
        os.fdatasync(fd)
        reps = 20 if cfg.quick else 60
        for i in range(reps):
            off = (i * 7919 * 4096) % (16 * MiB)
            os.pwrite(fd, buf4, off)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            out["sync"].append(time.perf_counter() - t0)
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(256):
                os.pwrite(fd, buf4, i * 65536)
            out["write_4k"].append((time.perf_counter() - t0) / 256)
            t0 = time.perf_counter()
            for i in range(256):
                os.pwrite(fd, buf64, i * 65536)
            out["write_64k"].append((time.perf_counter() - t0) / 256)
            t0 = time.perf_counter()
            for i in range(256):
                os.pread(fd, 65536, i * 65536)
            out["read_64k"].append((time.perf_counter() - t0) / 256)
            end = os.fstat(fd).st_size
            t0 = time.perf_counter()
            for i in range(256):
                os.pwrite(fd, buf64, end + i * 65536)
            out["append_64k"].append((time.perf_counter() - t0) / 256)
        os.fdatasync(fd)
    finally:
        os.close(fd)
        p.unlink()
    return {k: summ(v) for k, v in out.items()}


def attribute(counts: dict[str, dict[str, int]], penalty: float, syncs: float, n: int,
              grown: int, unit: dict[str, Any]) -> dict[str, float]:
    """Split the after-snapshot penalty of one write (seconds, median after - before)
    into the thread's causes. syncs is measured (the after pass with and without syncs,
    run by run); the rest by counters x page-cache unit costs; 'other' is what is left
    (CPU in the driver, bookkeeping; negative when the estimate overshoots)."""
    a, b = counts["after"], counts["before"]

    def d(k: str) -> float:
        return (a.get(k, 0) - b.get(k, 0)) / n

    u = {k: v["median"] for k, v in unit.items()}
    # the before pass writes exactly the guest's bytes in place: what the after pass
    # writes beyond them is the copied rest of each cluster
    cow = max(0.0, d("data_writes_bytes"))
    parts = {
        "refcount updates": max(0.0, d("refcount_writes")) * u["write_4k"],
        "allocation + growth": max(0.0, d("l2_writes") + d("l1_writes")) * u["write_4k"]
        + grown / n / 65536 * max(0.0, u["append_64k"] - u["write_64k"]),
        "read-modify-write": cow / 65536 * (u["read_64k"] + u["write_64k"]),
        "syncs": syncs,
    }
    parts["other"] = penalty - sum(parts.values())
    return parts


def run(cfg: Config) -> dict[str, Any]:
    S, N = shape(cfg)
    d = cfg.tmp
    cfg.note("writes: base images")
    errors: dict[str, str] = {}
    bases: dict[str, Path] = {}
    for name, opts in QEMU_CONFIGS.items():
        p = d / f"w-{len(bases)}.qcow2"
        qemu_create(p, S, opts)
        qemu_fill(p, 0, S)
        settle(p)
        bases[name] = p
        cfg.tick()
    ours = our_configs(cfg)
    for name, (mode, ext) in ours.items():
        p = d / f"w-{len(bases)}.qcow2"
        copy(bases["qemu extended_l2=on" if ext else "qemu standard"], p)
        try:
            to_mode(p, mode)
        except Exception as exc:  # a mode refusing the image is a finding
            errors[name] = f"conversion refused: {exc}".splitlines()[0]
        settle(p)
        bases[name] = p
        cfg.tick()
    unit = unit_costs(cfg)
    work = d / "w-work.qcow2"
    times: dict[tuple[str, str], dict[str, list[float]]] = {}
    growth: dict[tuple[str, str], int] = {}
    counts: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
    for _ in range(cfg.runs):
        for wname, (size, step) in workloads().items():
            for c in configs(cfg):
                key = (c, wname)
                cfg.note(f"{c}, {wname}")
                t = times.setdefault(key, {ph: [] for ph in TIMED})
                if c in errors:
                    cfg.tick(2)
                    continue
                copy(bases[c], work)
                try:
                    if c in QEMU_CONFIGS:
                        t["before"].append(qemu_pass(work, N, size, step))
                        s0 = work.stat().st_size
                        sh([QEMU_IMG, "snapshot", "-c", "s", str(work)])
                        t["after"].append(qemu_pass(work, N, size, step))
                        growth[key] = work.stat().st_size - s0
                        t["steady"].append(qemu_pass(work, N, size, step))
                        cfg.tick()
                        copy(bases[c], work)
                        sh([QEMU_IMG, "snapshot", "-c", "s", str(work)])
                        t["after_nosync"].append(qemu_pass(work, N, size, step, "unsafe"))
                    else:
                        cs: dict[str, dict[str, int]] = {}
                        dt, cs["before"] = our_pass(work, N, size, step)
                        t["before"].append(dt)
                        s0 = work.stat().st_size
                        with qcow2.open(work, "r+") as img:
                            img.create_snapshot("s")
                        dt, cs["after"] = our_pass(work, N, size, step)
                        t["after"].append(dt)
                        growth[key] = work.stat().st_size - s0
                        dt, cs["steady"] = our_pass(work, N, size, step)
                        t["steady"].append(dt)
                        counts.setdefault(key, cs)
                        cfg.tick()
                        copy(bases[c], work)
                        with qcow2.open(work, "r+") as img:
                            img.create_snapshot("s")
                        t["after_nosync"].append(our_pass(work, N, size, step, unsafe=True)[0])
                except Exception as exc:  # a mode refusing the workload is a finding
                    errors[c] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    cfg.tick()
                cfg.tick()
    # the last sample of each standard-format configuration: QEMU must accept it
    for c in ("qcow2 standard", "qcow2 standard + extended_l2"):
        if c in ours and c not in errors:
            copy(bases[c], work)
            our_pass(work, N, 4096, PRIME * 4096)
            with qcow2.open(work, "r+") as img:
                img.create_snapshot("s")
            our_pass(work, N, 4096, PRIME * 4096)
            qemu_check(work)
    cfg.tick()
    # QEMU's counters: one more run of each under strace
    for c in QEMU_CONFIGS:
        for wname, (size, step) in workloads().items():
            cfg.note(f"strace {c}, {wname}")
            copy(bases[c], work)
            cs = {"before": strace_run(qemu_bench_args(work, N, size, step), work)}
            sh([QEMU_IMG, "snapshot", "-c", "s", str(work)])
            cs["after"] = strace_run(qemu_bench_args(work, N, size, step), work)
            cs["steady"] = strace_run(qemu_bench_args(work, N, size, step), work)
            counts[(c, wname)] = cs
            cfg.tick()
    work.unlink(missing_ok=True)
    for p in bases.values():
        p.unlink(missing_ok=True)

    results = []
    for (c, wname), t in times.items():
        if not t["before"]:
            continue
        size = workloads()[wname][0]
        q = times[("qemu standard", wname)]
        pen = [(a - b) / N for a, b in zip(t["after"], t["before"])]
        pen_med = summ(pen)["median"]
        sync_part = summ([(a - b) / N for a, b in zip(t["after"], t["after_nosync"])])
        row: dict[str, Any] = {
            "config": c, "workload": wname,
            "seconds": {ph: summ(t[ph]) for ph in TIMED},
            "per_write": {ph: summ([x / N for x in t[ph]]) for ph in TIMED},
            "sync_time_per_write": sync_part,
            "penalty_per_write": summ(pen),
            "after_over_before": pair_ratio(t["after"], t["before"]),
            "qemu_standard_over_this": {ph: pair_ratio(q[ph], t[ph]) for ph in PHASES},
            "counts": counts.get((c, wname)), "grown_bytes": growth.get((c, wname), 0),
        }
        if row["counts"]:
            row["per_write_counts"] = {
                ph: {k: v / N for k, v in row["counts"][ph].items()} for ph in PHASES}
            row["cow_bytes_per_write"] = {
                ph: max(0.0, row["counts"][ph].get("data_writes_bytes", 0) / N - size)
                for ph in PHASES}
            row["attribution"] = attribute(row["counts"], pen_med, sync_part["median"] or 0.0,
                                           N, growth.get((c, wname), 0), unit)
        results.append(row)
    return {"image": S, "writes": N, "cluster": 65536, "quick": cfg.quick,
            "workloads": {k: {"size": v[0], "step": v[1]} for k, v in workloads().items()},
            "configs": configs(cfg), "modes": list(MODES), "unit_costs": unit,
            "rows": results, "errors": errors, "kinds": list(KINDS),
            "commands": [
                f"qemu-img create -f qcow2 -o cluster_size=65536[,lazy_refcounts=on|,extended_l2=on] "
                f"IMG {S}; qemu-io -c 'write -P 0xab 0 {S}' IMG",
                "qcow2 amend -o refcount_mode=MODE (a copy, for each of our modes)",
                f"qemu-img bench -w -f qcow2 -t writeback -d 1 -c {N} -s SIZE -S STEP "
                f"--flush-interval={N} --pattern=171 IMG  (before; after `qemu-img snapshot -c s IMG`;"
                " again: steady)",
                f"ours: qcow2.bench.bench(img, BenchOptions(count={N}, depth=1, size=SIZE, "
                f"step=STEP, write=True, flush_interval={N})) between open and close",
                "STEP = SIZE (sequential) or 7919 x SIZE (random)",
                "after without syncs: a fresh copy, snapshot, the after pass with qemu-img bench "
                "-t unsafe (flushes ignored) / ours with a file backend whose sync does nothing",
                "strace -ff -y -e trace=pwrite64,pwritev,pwritev2,write,fdatasync,fsync qemu-img bench ...",
            ]}
