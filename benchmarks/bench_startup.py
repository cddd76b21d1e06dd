"""Start-up: whole-process `qcow2 info`, `qcow2 snapshot -l` and `qcow2 measure --size`
against the same `qemu-img` commands, on the same image in the same run (issue 12).

These commands need no table pass, so their time is mostly process start-up: Python,
and whatever the command imports (numpy alone would cost several times the goal).
Each command runs N times per side, interleaved (ours, qemu-img, ours, ...), and the
median, min and max are reported; the ratio is qemu-img's median / ours (below 1: we are
slower). The goal held: `qcow2 info IMG` median under 0.08 s on this machine.

`qcow2` is the installed console script next to this Python (`.venv/bin/qcow2`), else
`python -m qcow2`. N is 10 x QCOW2_BENCH_REPEAT (default 3: 30 runs per side). The
first run of each side is not counted (it writes the .pyc files, warms the page cache).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import QEMU_IMG, Result, repeats, run_cmd, standalone, workdir  # noqa: E402

BENCH = "startup"
INFO_GOAL_S = 0.08


def qcow2_cli() -> list[str]:
    script = Path(sys.executable).parent / "qcow2"
    return [str(script)] if script.exists() else [sys.executable, "-m", "qcow2"]


# Compiled bytecode is used as an installed package uses it (PYTHONDONTWRITEBYTECODE, set
# in some shells, would make every run compile every module again).
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed_run(args: list[str]) -> float:
    """Seconds of one whole-process run (also the report's `info` row, report_tools.py)."""
    t0 = time.perf_counter()
    p = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.decode()[-300:]}")
    return dt


def _same_output(ours: list[str], theirs: list[str]) -> None:
    """Both sides must print the same text, or the timing compares different work."""
    a = subprocess.run(ours, capture_output=True, text=True, env=_ENV).stdout
    b = subprocess.run(theirs, capture_output=True, text=True).stdout
    if a != b:
        raise RuntimeError(f"outputs differ:\n{' '.join(ours)}:\n{a}\n{' '.join(theirs)}:\n{b}")


def interleaved(sides: dict[str, list[str]], n: int) -> dict[str, list[float]]:
    """n whole-process runs of each command line, alternating between the sides."""
    samples: dict[str, list[float]] = {k: [] for k in sides}
    for args in sides.values():  # one unmeasured run each: page cache, .pyc files
        timed_run(args)
    for _ in range(n):
        for k, args in sides.items():
            samples[k].append(timed_run(args))
    return samples


def _stats(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.4f} s, min {min(xs):.4f}, max {max(xs):.4f}"


def run(scale: float) -> list[Result]:
    del scale  # start-up does not depend on sizes
    n = 10 * repeats()
    ours = qcow2_cli()
    results: list[Result] = []
    with workdir(BENCH) as d:
        img = d / "disk.qcow2"
        run_cmd([QEMU_IMG, "create", "-q", "-f", "qcow2", str(img), "10G"])
        run_cmd([QEMU_IMG, "snapshot", "-c", "first", str(img)])
        run_cmd([QEMU_IMG, "snapshot", "-c", "second", str(img)])
        cases = {
            "info": ["info", str(img)],
            "snapshot -l": ["snapshot", "-l", str(img)],
            "measure --size": ["measure", "--size", "10G", "-O", "qcow2"],
        }
        for name, args in cases.items():
            sides = {"ours": [*ours, *args], "qemu": [QEMU_IMG, *args]}
            _same_output(sides["ours"], sides["qemu"])
            s = interleaved(sides, n)
            med_o, med_q = statistics.median(s["ours"]), statistics.median(s["qemu"])
            cmds = [" ".join(["qcow2", *args]).replace(str(d) + "/", ""),
                    " ".join(["qemu-img", *args]).replace(str(d) + "/", "")]
            results.append(Result(
                BENCH, f"{name} (whole process, median of {n})", "s", med_o, qemu=med_q,
                lower_is_better=True, commands=cmds,
                notes=f"ours {_stats(s['ours'])}; qemu-img {_stats(s['qemu'])}; "
                      f"ours run as {' '.join(ours)}"))
            if name == "info":
                results.append(Result(
                    BENCH, "info under the goal (median)", "s", med_o, baseline="limit",
                    goal=INFO_GOAL_S, lower_is_better=True,
                    notes="issue 12: qcow2 info whole-process under 0.08 s on this machine"))
    return results


if __name__ == "__main__":
    sys.exit(standalone(run, BENCH))
