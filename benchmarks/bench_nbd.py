"""`qcow2 nbd` against `qemu-nbd` serving the same file, over a Unix socket, same run.

* 1 MiB sequential reads: `nbdcopy --request-size=1M -C 1 URI null:` from a fully
  written image (nbdcopy's default queue of requests in flight).
* 1 MiB sequential writes: `nbdcopy --request-size=1M -C 1 --flush RAW URI` of a file of
  non-zero data into a fresh image (so every cluster is allocated; --flush: the copy is
  durable when nbdcopy returns, on both sides).
* 4K random IOPS: `qemu-img bench -f raw -s 4K -d 1` (and -w) against the NBD URI, the
  strided offsets bench_io uses (qemu-img bench has no random mode).

Both servers serve with their defaults (qemu-nbd: writeback cache); the timed part is the
client's run only, the server is already listening. The best of QCOW2_BENCH_REPEAT
interleaved runs per side is kept.

Run: python benchmarks/bench_nbd.py (QCOW2_BENCH_SCALE=4 for bigger runs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    warm,
    workdir,
)

BENCH = "nbd"
NBDCOPY = shutil.which("nbdcopy") or "nbdcopy"
QEMU_NBD = shutil.which("qemu-nbd") or "qemu-nbd"
STEP_BLOCKS = 7919  # as bench_io: a prime number of 4K blocks between requests


@contextmanager
def serving(side: str, path: Path, sock: Path) -> Iterator[str]:
    if side == "ours":
        cmd = [sys.executable, "-m", "qcow2", "nbd", "-t", "-e", "4", "-k", str(sock), str(path)]
    else:
        cmd = [QEMU_NBD, "-t", "-e", "4", "-f", "qcow2", "-k", str(sock), str(path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start: {proc.communicate()[1]}")
            time.sleep(0.01)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    run_cmd(args)
    return time.perf_counter() - t0


def _bench_time(args: list[str]) -> float:
    p = run_cmd(args)
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {p.stdout!r}")
    return float(m.group(1))


def run(s: float) -> list[Result]:
    size = max(64 * MiB, int(256 * MiB * s) // (64 * MiB) * (64 * MiB))
    count = max(2000, int(20_000 * s))
    out: list[Result] = []
    with workdir("nbd") as d:
        full = d / "full.qcow2"
        run_cmd([QEMU_IMG, "create", "-q", "-f", "qcow2", str(full), str(size)])
        run_cmd([QEMU_IO, "-f", "qcow2", "-c", f"write -q -P 0x5a 0 {size}", str(full)])
        src = d / "src.raw"
        with open(src, "wb") as f:  # non-zero data, so nbdcopy writes every block
            block = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(block)
        warm(full)
        warm(src)
        copy = [NBDCOPY, "-C", "1", f"--request-size={MiB}"]

        # sequential reads: one server per side, kept running over the repeats
        with serving("ours", full, d / "o.sock") as ou, serving("qemu", full, d / "q.sock") as qu:
            t = best_of({"ours": lambda: _timed([*copy, ou, "null:"]),
                         "qemu": lambda: _timed([*copy, qu, "null:"])})
        out.append(Result(BENCH, f"1 MiB sequential reads, nbdcopy ({size // MiB} MiB)", "MiB/s",
                          ours=size / MiB / t["ours"], qemu=size / MiB / t["qemu"], goal=0.5,
                          commands=[" ".join([*copy[1:], "URI", "null:"])],
                          notes="fully written image, Unix socket; the qemu column is qemu-nbd on the same file"))

        # sequential writes into a fresh image each run (timed: the copy only)
        def write_run(side: str) -> float:
            img = d / f"w-{side}.qcow2"
            img.unlink(missing_ok=True)
            run_cmd([QEMU_IMG, "create", "-q", "-f", "qcow2", str(img), str(size)])
            with serving(side, img, d / f"w-{side}.sock") as u:
                return _timed([*copy, "--flush", str(src), u])

        t = best_of({"ours": lambda: write_run("ours"), "qemu": lambda: write_run("qemu")})
        out.append(Result(BENCH, f"1 MiB sequential writes, nbdcopy ({size // MiB} MiB, fresh "
                          "image)", "MiB/s", ours=size / MiB / t["ours"],
                          qemu=size / MiB / t["qemu"], goal=0.5,
                          commands=[" ".join([*copy[1:], "--flush", "RAW", "URI"])],
                          notes="durable at the end on both sides (NBD_CMD_FLUSH); qemu column: qemu-nbd"))

        # 4K random-ish IOPS with qemu-img bench as the client
        for write in (False, True):
            bench = [QEMU_IMG, "bench", "-f", "raw", "-c", str(count), "-d", "1", "-s", str(4 * KiB),
                     "-S", str(STEP_BLOCKS * 4 * KiB)]
            if write:
                bench += ["-w", "--pattern=165"]
            with serving("ours", full, d / "o.sock") as ou, \
                    serving("qemu", full, d / "q.sock") as qu:
                t = best_of({"ours": lambda b=bench, u=ou: _bench_time([*b, u]),
                             "qemu": lambda b=bench, u=qu: _bench_time([*b, u])})
            what = "writes" if write else "reads"
            out.append(Result(BENCH, f"4K random {what}, qemu-img bench over NBD ({count} requests)",
                              "IOPS", ours=count / t["ours"], qemu=count / t["qemu"], goal=0.5,
                              commands=[" ".join([*bench[1:], "URI"])],
                              notes="depth 1, overwrites of allocated clusters, strided offsets; qemu column: qemu-nbd"))
    return out


if __name__ == "__main__":
    raise SystemExit(standalone(run, "nbd"))
