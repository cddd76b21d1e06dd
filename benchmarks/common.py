"""Shared helpers for the benchmarks.

Every `benchmarks/bench_*.py` module defines

    def run(scale: float) -> list[Result]: ...

and may be run on its own (`python benchmarks/bench_io.py`); `benchmarks/goals.py`
discovers the modules, runs them and writes benchmarks/out/results.{json,md}.

Rules (DEVELOPERS.md): ours is measured side by side with the reference (qemu-img) or
with a plain-file baseline in the same run, and the ratio is what is reported. Timings
are noisy on a shared machine, so each side is measured several times, interleaved, and
the best run of each side is kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
ROOT = BENCH_DIR.parent

# make `import qcow2` work from a checkout without an install
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


def scale() -> float:
    """QCOW2_BENCH_SCALE (default 1): multiplies request counts and data sizes."""
    try:
        s = float(os.environ.get("QCOW2_BENCH_SCALE", "1"))
    except ValueError as exc:
        raise SystemExit(f"QCOW2_BENCH_SCALE must be a number: {exc}") from exc
    if s <= 0:
        raise SystemExit("QCOW2_BENCH_SCALE must be positive")
    return s


def repeats() -> int:
    """QCOW2_BENCH_REPEAT (default 3): interleaved runs per side; the best is kept."""
    return max(1, int(os.environ.get("QCOW2_BENCH_REPEAT", "3")))


@dataclass
class Result:
    """One benchmark line: ours against a baseline, with the goal it is held to.

    ratio = ours / baseline for throughput-like metrics (higher is better), and
    baseline / ours when lower_is_better (so a ratio >= goal always means pass)."""

    bench: str  # module, e.g. "io"
    name: str  # what was measured
    unit: str  # "IOPS", "MiB/s", "s", "MiB", ...
    ours: float
    qemu: float | None = None
    raw: float | None = None
    baseline: str = "qemu"  # "qemu", "raw" or "limit"
    goal: float | None = None  # minimum ratio (or, with baseline "limit", the limit)
    lower_is_better: bool = False
    commands: list[str] = field(default_factory=list)
    notes: str = ""
    module: str = ""  # the bench_*.py it came from (set by goals.py)

    @property
    def base_value(self) -> float | None:
        if self.baseline == "qemu":
            return self.qemu
        if self.baseline == "raw":
            return self.raw
        return self.goal

    @property
    def ratio(self) -> float | None:
        b = self.base_value
        if b is None or self.baseline == "limit":
            return None
        if self.lower_is_better:
            return b / self.ours if self.ours else float("inf")
        return self.ours / b if b else None

    @property
    def passed(self) -> bool | None:
        if self.goal is None:
            return None
        if self.baseline == "limit":
            return self.ours <= self.goal if self.lower_is_better else self.ours >= self.goal
        r = self.ratio
        return None if r is None else r >= self.goal

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["passed"] = self.passed
        d["module"] = self.module or self.bench
        return d


# ---------------------------------------------------------------------------- timing --
def best_of(fns: dict[str, Callable[[], float]], n: int | None = None) -> dict[str, float]:
    """Run each callable n times, interleaved (a, b, a, b, ...), so that background load
    hits every side alike. Each returns its own measured seconds; the minimum is kept."""
    n = repeats() if n is None else n
    best = {k: float("inf") for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            best[k] = min(best[k], fn())
    return best


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t: ...` then t[0] is the elapsed seconds."""
    box: list[float] = []
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - t0)


# ---------------------------------------------------------------------------- qemu --
def run_cmd(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(args, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def qemu_img_bench(path: str | Path, *, count: int, size: int, depth: int = 1, step: int | None = None,
                   write: bool = False, cache: str = "writeback", aio: str | None = None,
                   offset: int = 0, pattern: int | None = None) -> tuple[float, str]:
    """Run `qemu-img bench` and return (seconds it reports for the run, command line).
    The reported time excludes process start and image open (like our loops)."""
    args = [QEMU_IMG, "bench", "-f", "qcow2", "-t", cache, "-c", str(count), "-d", str(depth),
            "-s", str(size), "-o", str(offset)]
    if step is not None:
        args += ["-S", str(step)]
    if aio:
        args += ["-i", aio]
    if write:
        args.append("-w")
        if pattern is not None:
            args.append(f"--pattern={pattern}")
    args.append(str(path))
    p = run_cmd(args)
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {p.stdout!r}")
    return float(m.group(1)), " ".join(args[1:-1]) + " IMG"


def qemu_aio_modes(path: str | Path) -> list[str]:
    """aio back ends qemu-img accepts with the page cache on (threads always; io_uring
    where the kernel and the build have it)."""
    modes = ["threads"]
    try:
        qemu_img_bench(path, count=1, size=4096, aio="io_uring")
        modes.append("io_uring")
    except RuntimeError:
        pass
    return modes


# ---------------------------------------------------------------------------- files --
@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A scratch directory (QCOW2_BENCH_TMP or the system temp dir), removed afterwards."""
    base = os.environ.get("QCOW2_BENCH_TMP") or None
    d = Path(tempfile.mkdtemp(prefix=f"qcow2-bench-{prefix}-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def warm(path: str | Path) -> None:
    """Read a file once so that both sides start from a warm page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


# ---------------------------------------------------------------------------- output --
def fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def markdown_table(results: list[Result]) -> str:
    lines = [
        "| benchmark | unit | ours | qemu-img | raw file | ratio | goal | result |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        if r.goal is None:
            goal = "-"
        elif r.baseline == "limit":
            goal = f"{'<=' if r.lower_is_better else '>='} {fmt_num(r.goal)} {r.unit}"
        else:
            goal = f">= {r.goal:g}x {r.baseline}"
        res = {True: "PASS", False: "FAIL", None: "-"}[r.passed]
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.bench}: {r.name} | {r.unit} | {fmt_num(r.ours)} | {fmt_num(r.qemu)} | "
                     f"{fmt_num(r.raw)} | {ratio} | {goal} | {res} |")
    return "\n".join(lines) + "\n"


def details(results: list[Result]) -> str:
    out = []
    for r in results:
        if not (r.commands or r.notes):
            continue
        out.append(f"- **{r.bench}: {r.name}**" + (f": {r.notes}" if r.notes else ""))
        for c in r.commands:
            out.append(f"  - `{c}`")
    return "\n".join(out) + "\n" if out else ""


def print_results(results: list[Result]) -> None:
    print(markdown_table(results))
    d = details(results)
    if d:
        print(d)


def environment() -> dict[str, Any]:
    import platform

    import numpy

    qv = subprocess.run([QEMU_IMG, "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "qemu_img": qv[0] if qv else "?",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "scale": scale(),
        "repeats": repeats(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def save(results: list[Result], name: str = "results", extra: dict[str, Any] | None = None) -> Path:
    OUT_DIR.mkdir(exist_ok=True)
    env = environment()
    doc = {"environment": env, "results": [r.as_dict() for r in results], **(extra or {})}
    (OUT_DIR / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [f"# qcow2 benchmarks ({env['time']})", "",
          f"Python {env['python']}, numpy {env['numpy']}, {env['qemu_img']}, "
          f"{env['cpus']} CPUs, QCOW2_BENCH_SCALE={env['scale']:g}, "
          f"best of {env['repeats']} interleaved runs per side.", "",
          markdown_table(results)]
    d = details(results)
    if d:
        md += ["## Details and commands", "", d]
    path = OUT_DIR / f"{name}.md"
    path.write_text("\n".join(md))
    return path


def standalone(run: Callable[[float], list[Result]], name: str) -> int:
    """`python benchmarks/bench_NAME.py`: run at QCOW2_BENCH_SCALE, print, save."""
    results = run(scale())
    print_results(results)
    out = save(results, name=name)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
