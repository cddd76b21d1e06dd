"""`make demo`: a short version of the benchmark report's first two parts (under a minute).

1. The 2011 thread's experiment, scaled down: `qemu-img snapshot -c/-d` on an image QEMU
   filled, against the same operations through this library in every refcount mode.
2. The thread's complaint: scattered 4 KiB writes before, right after and steady after a
   snapshot, QEMU (standard, lazy_refcounts=on) against this library in every mode, with
   the syncs and refcount writes each one costs (QEMU's counted with strace).

The full measurement, with VM state, scale, tools and the answer to the thread, is
`make bench` -> docs/benchmarks.md.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402
import report_writes as rw  # noqa: E402
from harness import QEMU_IMG, MiB, fmt_s, summ  # noqa: E402
from tqdm import tqdm  # noqa: E402

import qcow2  # noqa: E402
from qcow2.modes import MODES  # noqa: E402

RUNS = 3
VIRTUAL, DATA = 1024 * MiB, 512 * MiB
WRITES, SIZE = 512, 64 * MiB


def _us(v: float) -> str:
    return f"{v * 1e6:8.1f} µs"


def main() -> int:
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is required for the demo (make demo installs it)")
    d = Path(tempfile.mkdtemp(prefix="qcow2-demo-"))
    modes = list(MODES)
    bar = tqdm(total=2 + len(modes) + RUNS * (1 + len(modes)) * 2 + 2 + len(modes)
               + RUNS * (2 + len(modes)) + 2, file=sys.stderr, unit="step",
               desc="demo")
    try:
        # 1. the thread's experiment
        bar.set_postfix_str("image with data")
        q = d / "thread.qcow2"
        harness.qemu_create(q, VIRTUAL)
        harness.qemu_fill(q, 0, DATA)
        harness.settle(q)
        bar.update(2)
        paths = {}
        for m in modes:
            if m == "standard":
                paths[m] = q
            else:
                paths[m] = d / f"thread-{m}.qcow2"
                harness.copy(q, paths[m])
                harness.to_mode(paths[m], m)
            bar.update()
        times: dict[str, dict[str, list[float]]] = {}
        bar.set_postfix_str("snapshot -c / -d")
        for _ in range(RUNS):
            for op, flag in (("create", "-c"), ("delete", "-d")):
                t = harness.timed_cmd([QEMU_IMG, "snapshot", flag, "t", str(q)])
                times.setdefault("qemu-img (whole process)", {}).setdefault(op, []).append(t)
                bar.update()
                for m in modes:
                    def one(p: Path = paths[m], op: str = op) -> None:
                        with qcow2.open(p, "r+") as img:
                            (img.create_snapshot if op == "create" else img.delete_snapshot)("t")

                    t = harness.timed(one)
                    times.setdefault(f"qcow2 {m} (in-process)", {}).setdefault(op, []).append(t)
                    bar.update()
        harness.qemu_check(q)
        for p in set(paths.values()):
            p.unlink()

        # 2. the thread's complaint
        bar.set_postfix_str("4K writes around a snapshot")
        bases = {}
        for name, opts in (("qemu standard", ""), ("qemu lazy_refcounts=on", "lazy_refcounts=on")):
            p = d / f"w-{len(bases)}.qcow2"
            harness.qemu_create(p, SIZE, opts)
            harness.qemu_fill(p, 0, SIZE)
            bases[name] = p
            bar.update()
        for m in modes:
            p = d / f"w-{len(bases)}.qcow2"
            harness.copy(bases["qemu standard"], p)
            harness.to_mode(p, m)
            bases[f"qcow2 {m}"] = p
            bar.update()
        step = rw.PRIME * 4096
        work = d / "work.qcow2"
        wt: dict[str, dict[str, list[float]]] = {}
        counts: dict[str, dict[str, float]] = {}
        for _ in range(RUNS):
            for name, base in bases.items():
                harness.copy(base, work)
                ph = wt.setdefault(name, {k: [] for k in rw.PHASES})
                if name.startswith("qemu"):
                    ph["before"].append(rw.qemu_pass(work, WRITES, 4096, step))
                    harness.sh([QEMU_IMG, "snapshot", "-c", "s", str(work)])
                    ph["after"].append(rw.qemu_pass(work, WRITES, 4096, step))
                    ph["steady"].append(rw.qemu_pass(work, WRITES, 4096, step))
                else:
                    ph["before"].append(rw.our_pass(work, WRITES, 4096, step)[0])
                    with qcow2.open(work, "r+") as img:
                        img.create_snapshot("s")
                    dt, c = rw.our_pass(work, WRITES, 4096, step)
                    ph["after"].append(dt)
                    counts[name] = {k: v / WRITES for k, v in c.items()}
                    ph["steady"].append(rw.our_pass(work, WRITES, 4096, step)[0])
                bar.update()
        bar.set_postfix_str("strace qemu-img")
        for name in ("qemu standard", "qemu lazy_refcounts=on"):
            harness.copy(bases[name], work)
            harness.sh([QEMU_IMG, "snapshot", "-c", "s", str(work)])
            c = harness.strace_run(rw.qemu_bench_args(work, WRITES, 4096, step), work)
            counts[name] = {k: v / WRITES for k, v in c.items()}
            bar.update()
        harness.copy(bases["qcow2 standard"], work)
        with qcow2.open(work, "r+") as img:
            img.create_snapshot("s")
        rw.our_pass(work, WRITES, 4096, step)
        harness.qemu_check(work)
        bar.close()

        print(f"\n1. The thread's experiment, scaled down: {VIRTUAL // MiB} MiB virtual, "
              f"{DATA // MiB} MiB of data, 64 KiB clusters; median of {RUNS} interleaved runs "
              "[min-max]")
        print(f"   {'':34} {'snapshot -c':>26} {'snapshot -d':>26}")
        for name, ops in times.items():
            cells = []
            for op in ("create", "delete"):
                f = summ(ops[op])
                cells.append(f"{fmt_s(f['median'])} [{fmt_s(f['min'])}-{fmt_s(f['max'])}]")
            print(f"   {name:34} {cells[0]:>26} {cells[1]:>26}")
        print(f"\n2. {WRITES} scattered 4 KiB writes on a {SIZE // MiB} MiB image QEMU filled: "
              "time per write (median), and right after the snapshot the syncs and refcount "
              "writes per write")
        print(f"   {'':26} {'before':>11} {'right after':>11} {'steady':>11} {'syncs':>7} "
              f"{'refcount':>9}")
        for name, ph in wt.items():
            c = counts.get(name, {})
            med = {k: summ(v)["median"] / WRITES for k, v in ph.items()}
            print(f"   {name:26} {_us(med['before']):>11} {_us(med['after']):>11} "
                  f"{_us(med['steady']):>11} {c.get('syncs', 0):7.3f} "
                  f"{c.get('refcount_writes', 0):9.3f}")
        print("\nqemu-img check passed on the images this library wrote. The full report: "
              "make bench -> docs/benchmarks.md")
    finally:
        bar.close()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
