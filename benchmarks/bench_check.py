"""`qcow2 check` against `qemu-img check`, on the same files in the same run.

* (a) 256 GiB image with preallocation=metadata (4 Mi allocated clusters, 512 L2
  tables): the goal is ours <= 0.5x qemu-img's time. "ours" is Image.check in this
  process (open + check + close); the CLI line adds the Python start-up (informational).
* (b) 16 GiB image with 16 Ki scattered 4 KiB writes (fragmented) and two internal
  snapshots sharing most clusters: ours must not be slower than qemu-img.
* (c) repair: `-r leaks` on a copy of an image with 20,000 leaked clusters, each side on
  its own fresh copy (copying is not timed).

QCOW2_BENCH_SCALE multiplies the sizes; QCOW2_BENCH_REPEAT sets the interleaved runs per
side (best kept). Writes benchmarks/out/check.{md,json} when run on its own.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    QEMU_IMG,
    GiB,
    KiB,
    Result,
    best_of,
    run_cmd,
    standalone,
    warm,
    workdir,
)

import qcow2  # noqa: E402
from qcow2.checkcmd import check_file  # noqa: E402

BENCH = "check"


def _qemu_check(path: Path, *extra: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([QEMU_IMG, "check", *extra, str(path)], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode not in (0, 3):
        raise RuntimeError(f"qemu-img check failed ({p.returncode}): {p.stderr[-500:]}")
    return dt


def _ours(path: Path, repair: str | None = None) -> float:
    t0 = time.perf_counter()
    res = check_file(path, repair)
    dt = time.perf_counter() - t0
    if res.exit_code not in (0, 3):
        raise RuntimeError(f"our check failed: {res.to_dict()} {res.messages[:5]}")
    return dt


def _ours_cli(path: Path) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qcow2", "check", str(path)], capture_output=True,
                       text=True)
    dt = time.perf_counter() - t0
    if p.returncode not in (0, 3):
        raise RuntimeError(f"qcow2 check failed ({p.returncode}): {p.stderr[-500:]}")
    return dt


def _same_report(path: Path) -> None:
    """Both tools must say the same thing, or the timing compares different work."""
    q = subprocess.run([QEMU_IMG, "check", "--output=json", str(path)], capture_output=True,
                       text=True)
    ours = check_file(path)
    import json

    theirs = json.loads(q.stdout)
    mine = ours.to_dict()
    for d in (theirs, mine):
        d.pop("filename", None)
    if theirs != mine:
        raise RuntimeError(f"reports differ: qemu-img {theirs} ours {mine}")


def bench_prealloc(d: Path, s: float) -> list[Result]:
    size = max(GiB, int(256 * GiB * s) // GiB * GiB)
    p = d / "prealloc.qcow2"
    qcow2.create(p, size, preallocation="metadata")
    _same_report(p)
    warm_meta(p)
    best = best_of({"ours": lambda: _ours(p), "qemu": lambda: _qemu_check(p),
                    "cli": lambda: _ours_cli(p)})
    label = f"{size // GiB} GiB preallocation=metadata"
    return [
        Result(BENCH, f"check, {label}", "s", best["ours"], qemu=best["qemu"], goal=2.0,
               lower_is_better=True,
               commands=[f"qcow2.create(p, {size}, preallocation='metadata')",
                         "Image.check() in process (open + check + close)",
                         "qemu-img check IMG"],
               notes="goal: ours <= 0.5x qemu-img"),
        Result(BENCH, f"check CLI incl. Python start-up, {label}", "s", best["cli"],
               qemu=best["qemu"], lower_is_better=True,
               commands=["python -m qcow2 check IMG", "qemu-img check IMG"]),
    ]


def warm_meta(path: Path) -> None:
    """Warm the page cache over the metadata (the data clusters of a preallocated image
    are holes; reading them would only cost time)."""
    with qcow2.open(path) as img:
        img.check()


def bench_fragmented(d: Path, s: float) -> list[Result]:
    size = 16 * GiB
    n = max(256, int(16384 * s))
    p = d / "frag.qcow2"
    qcow2.create(p, size)
    rng = random.Random(5)
    cs = 64 * KiB
    clusters = rng.sample(range(size // cs), n)
    with qcow2.open(p, "r+") as img:
        for i, c in enumerate(clusters):
            img.pwrite(bytes([i & 0xFF]) * 4096, c * cs)
            if i == n // 3:
                img.flush()
    run_cmd([QEMU_IMG, "snapshot", "-c", "s1", str(p)])
    with qcow2.open(p, "r+") as img:
        for c in clusters[: n // 4]:
            img.pwrite(b"\x5a" * 4096, c * cs + 8192)
    run_cmd([QEMU_IMG, "snapshot", "-c", "s2", str(p)])
    _same_report(p)
    warm(p)
    best = best_of({"ours": lambda: _ours(p), "qemu": lambda: _qemu_check(p)})
    return [Result(BENCH, f"check, 16 GiB, {n} scattered clusters, 2 snapshots", "s",
                   best["ours"], qemu=best["qemu"], goal=1.0, lower_is_better=True,
                   commands=["random 4 KiB writes, qemu-img snapshot -c (twice)",
                             "Image.check() in process", "qemu-img check IMG"])]


def bench_repair(d: Path, s: float) -> list[Result]:
    n = max(1000, int(20000 * s))
    p = d / "leaky.qcow2"
    run_cmd([QEMU_IMG, "create", "-q", "-f", "qcow2", str(p), "4G"])
    run_cmd(["qemu-io", "-c", "write -q -P 0x11 0 16M", str(p)])
    # leak n clusters after the end of the data: refcount 1, referenced by nothing
    cs = 64 * KiB
    with open(p, "r+b") as f:
        head = f.read(64)
        rt = struct.unpack(">Q", head[48:56])[0]
        f.seek(rt)
        blk = struct.unpack(">Q", f.read(8))[0]
        first = -(-p.stat().st_size // cs)
        f.truncate((first + n) * cs)  # sparse
        f.seek(blk + 2 * first)
        f.write(b"\x00\x01" * n)

    def fresh(name: str) -> Path:
        q = d / name
        shutil.copyfile(p, q)
        return q

    def ours() -> float:
        q = fresh("a.qcow2")
        return _ours(q, "leaks")

    def theirs() -> float:
        q = fresh("b.qcow2")
        return _qemu_check(q, "-r", "leaks")

    best = best_of({"ours": ours, "qemu": theirs})
    return [Result(BENCH, f"repair -r leaks, {n} leaked clusters", "s", best["ours"],
                   qemu=best["qemu"], goal=1.0, lower_is_better=True,
                   commands=["check -r leaks (then the re-check), fresh copy each run"])]


def run(s: float) -> list[Result]:
    out: list[Result] = []
    with workdir("check") as d:
        out += bench_prealloc(d, s)
        out += bench_fragmented(d, s)
        out += bench_repair(d, s)
    return out


if __name__ == "__main__":
    sys.exit(standalone(run, "check"))
