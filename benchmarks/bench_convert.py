"""`qcow2 convert` against `qemu-img convert`, both as commands (process start-up included
on both sides), both ending with the output durable: qemu-img runs with `-t writeback`,
which flushes at the end, as ours always does (its default for convert, `-t unsafe`, does
not sync at all).

Inputs (128 MiB x QCOW2_BENCH_SCALE): a fully written qcow2 image (64 KiB clusters) and
the same content as a raw file; half of every 4 MiB stretch is zeros, so zero detection
has work to do. A 4 GiB mostly sparse image (1 MiB of data every 64 MiB, x scale), as
qcow2 and as a sparse raw file. Cases: qcow2 -> raw, raw -> qcow2, qcow2 -> qcow2, the
sparse ones, raw -> qcow2 with -c (zlib; the data is a repeated byte, so the codec
itself is cheap; ours compresses in a thread pool, QEMU in its thread pool too).

Ours runs as the installed `qcow2` script with compiled bytecode, as a user runs it
(PYTHONDONTWRITEBYTECODE is dropped for it, as in bench_startup.py). Plain converts take
the numpy-free fast path (fastconvert.py: reads, zero grains found with memcmp, writes in
a writer thread, the data synced behind it by another).

Goals (issue 12): plain converts within 1.2x of qemu-img whole-process (ratio
qemu / ours >= 0.83), -c faster than qemu-img's (ratio >= 1). Start-up counts: it is
reported in the notes (`--help` of each tool), since on small inputs it is most of ours.

Run: python benchmarks/bench_convert.py
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_startup import _ENV, qcow2_cli  # noqa: E402
from common import (  # noqa: E402
    QEMU_IMG,
    MiB,
    Result,
    best_of,
    run_cmd,
    standalone,
    workdir,
)

BENCH = "convert"
PLAIN_GOAL = 1 / 1.2  # within 1.2x of qemu-img (ratio = qemu-img's time / ours)
COMPRESS_GOAL = 1.0  # -c: faster than qemu-img -c
OURS = qcow2_cli()  # the installed `qcow2` script, as a user runs it


def _prepare(d: Path, size: int) -> tuple[Path, Path]:
    raw = d / "in.raw"
    with open(raw, "wb") as f:
        for i in range(0, size, 4 * MiB):
            f.write(bytes([0x5A + i // (4 * MiB) % 7]) * (2 * MiB) + bytes(2 * MiB))
    img = d / "in.qcow2"
    run_cmd([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)])
    return raw, img


def _prepare_sparse(d: Path, size: int) -> tuple[Path, Path]:
    raw = d / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in range(0, size, 64 * MiB):
            f.seek(i)
            f.write(bytes([0x30 + i // (64 * MiB) % 50]) * MiB)
    img = d / "sparse.qcow2"
    run_cmd([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)])
    return raw, img


def _timed(args: list[str], out: Path, cpu: dict[str, float], side: str) -> float:
    """Wall time of one run; the least CPU time (user + system) of the side's runs goes
    to cpu[side] (on a loaded machine it says more than the wall time)."""
    out.unlink(missing_ok=True)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env=_ENV)
    t = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    cpu[side] = min(cpu.get(side, float("inf")), used)
    out.unlink()
    return t


def _startup(args: list[str], cpu: dict[str, float], side: str) -> float:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env=_ENV)
    t = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    cpu[side] = min(cpu.get(side, float("inf")), used)
    return t


def run(s: float) -> list[Result]:
    import compileall

    import qcow2

    # the bytecode an installed package has (pip compiles it), whatever the shell says
    compileall.compile_dir(Path(qcow2.__file__).parent, quiet=1)
    size = max(8 * MiB, int(128 * MiB * s) // (4 * MiB) * (4 * MiB))
    results: list[Result] = []
    with workdir(BENCH) as d:
        raw, img = _prepare(d, size)
        sparse = max(256 * MiB, int(4096 * MiB * s) // (64 * MiB) * (64 * MiB))
        sraw, simg = _prepare_sparse(d, sparse)
        start_cpu: dict[str, float] = {}
        startup = best_of({"ours": lambda: _startup([*OURS, "--help"], start_cpu, "ours"),
                           "qemu": lambda: _startup([QEMU_IMG, "--help"], start_cpu, "qemu")})
        half = f"{size // MiB} MiB (half zeros)"
        sp = f"{sparse // MiB // 1024} GiB (1/64 data)" if sparse >= 1024 * MiB else \
            f"{sparse // MiB} MiB (1/64 data)"
        cases = [
            ("qcow2 -> raw", half, ["-O", "raw", str(img)], PLAIN_GOAL),
            ("raw -> qcow2", half, ["-f", "raw", "-O", "qcow2", str(raw)], PLAIN_GOAL),
            ("qcow2 -> qcow2", half, ["-O", "qcow2", str(img)], PLAIN_GOAL),
            ("sparse qcow2 -> qcow2", sp, ["-O", "qcow2", str(simg)], PLAIN_GOAL),
            ("sparse raw -> qcow2", sp, ["-f", "raw", "-O", "qcow2", str(sraw)], PLAIN_GOAL),
            ("raw -> compressed qcow2", half, ["-c", "-f", "raw", "-O", "qcow2", str(raw)],
             COMPRESS_GOAL),
        ]
        for label, what, args, goal in cases:
            out = d / "out.img"
            ours = [*OURS, "convert", *args, str(out)]
            theirs = [QEMU_IMG, "convert", "-t", "writeback", *args, str(out)]
            cpu: dict[str, float] = {}
            t = best_of({"ours": lambda a=ours, o=out, c=cpu: _timed(a, o, c, "ours"),
                         "qemu": lambda a=theirs, o=out, c=cpu: _timed(a, o, c, "qemu")})
            results.append(Result(
                BENCH, f"{label}, {what}", "s", ours=t["ours"],
                qemu=t["qemu"], lower_is_better=True, goal=goal,
                commands=[" ".join(["qcow2", "convert", *args, "OUT"]),
                          " ".join(["qemu-img", "convert", "-t", "writeback", *args, "OUT"])],
                notes=f"process wall time on both sides, output durable at the end; of it, "
                      f"start-up (`--help`): ours {startup['ours']:.3f} s (Python; "
                      f"CPU {start_cpu['ours']:.3f} s), qemu-img {startup['qemu']:.3f} s; "
                      f"CPU time (user + system) of the convert: ours {cpu['ours']:.3f} s, "
                      f"qemu-img {cpu['qemu']:.3f} s",
            ))
    return results


if __name__ == "__main__":
    sys.exit(standalone(run, BENCH))
