"""What every part of the report (benchmarks/report_*.py) shares: the run configuration
(full or BENCH_QUICK), interleaved sampling with min/median/max, ratios taken pair by pair,
the progress bar, qemu-img helpers, and counting a process's writes and syncs with strace.

A figure is a dict {"median", "min", "max", "n", "samples"} (see `summ`). Sides of one
comparison are measured interleaved (a, b, c, a, b, c, ...) so that load from other work
on the machine hits every side alike, and a ratio is the median of the per-run ratios
(run i of side a against run i of side b), not a ratio of medians.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from qcow2.modes import MODES  # noqa: E402

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
STRACE = shutil.which("strace")
# our command line, as a user runs it: the interpreter of this environment
QCOW2_CLI = [sys.executable, "-m", "qcow2"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
CLUSTER = 64 * KiB


def quick_from_env() -> bool:
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


@dataclass
class Config:
    quick: bool
    runs: int  # interleaved runs per figure
    tmp: Path  # scratch directory for images
    modes: list[str] = field(default_factory=lambda: list(MODES))
    bar: Any = None  # the tqdm progress bar

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text[:40], refresh=True)


def mode_sides(extended_l2: bool = False) -> list[str]:
    return [f"qcow2 {m}" + (" + extended_l2" if extended_l2 else "") for m in MODES]


# ------------------------------------------------------------------------- figures --
def summ(xs: Sequence[float]) -> dict[str, Any]:
    xs = [float(x) for x in xs]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "samples": xs}


def pair_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """num[i] / den[i] for each run i, summarised."""
    return summ([a / b for a, b in zip(num, den) if b > 0])


def interleave(cfg: Config, sides: dict[str, Callable[[], float]], runs: int | None = None,
               errors: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Run each side `runs` times, interleaved; each callable returns its own seconds.
    With `errors`, a side that raises (a mode refusing an operation) is dropped from
    then on and its one-line message kept there; without it, the exception propagates."""
    runs = cfg.runs if runs is None else runs
    out: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(runs):
        for k, fn in sides.items():
            if errors is not None and k in errors:
                cfg.tick()
                continue
            try:
                out[k].append(fn())
            except Exception as exc:
                if errors is None:
                    raise
                errors[k] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            cfg.tick()
    return out


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------- processes --
def sh(args: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()}")
    return p


def timed_cmd(args: Sequence[str]) -> float:
    t0 = time.perf_counter()
    sh(args)
    return time.perf_counter() - t0


def show_cmd(args: Sequence[str], path_names: dict[str, str] | None = None) -> str:
    """A command line for the report, scratch paths replaced by short names."""
    out = []
    for a in args:
        a = str(a)
        if a == sys.executable:
            a = "python"
        for p, name in (path_names or {}).items():
            a = a.replace(p, name)
        out.append(a)
    return " ".join(out)


def qemu_version() -> str:
    p = subprocess.run([QEMU_IMG, "--version"], capture_output=True, text=True)
    return p.stdout.splitlines()[0] if p.stdout else "?"


def settle(path: Path) -> None:
    """Write a fresh copy back before timing: otherwise the first sync of whoever is
    timed pays for the copy."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy(src: Path, dst: Path) -> None:
    """Sparse copy (a metadata-preallocated image stays small), settled."""
    if dst.exists():
        dst.unlink()
    sh(["cp", "--sparse=always", str(src), str(dst)])
    settle(dst)


def qemu_create(path: Path, size: int, opts: str = "") -> list[str]:
    o = f"cluster_size={CLUSTER}" + (f",{opts}" if opts else "")
    args = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", o, str(path), str(size)]
    sh(args)
    return args


def qemu_fill(path: Path, start: int, length: int, pattern: int = 0xAB) -> None:
    """Write real data with qemu-io, in pieces of at most 256 MiB (sequentially, so
    the clusters are contiguous on the host as a guest's first fill would leave them)."""
    chunk = 256 * MiB
    cmds: list[str] = []
    for off in range(start, start + length, chunk):
        cmds += ["-c", f"write -q -P {pattern} {off} {min(chunk, start + length - off)}"]
        if len(cmds) >= 32:
            sh([QEMU_IO, "-f", "qcow2", *cmds, str(path)])
            cmds = []
    if cmds:
        sh([QEMU_IO, "-f", "qcow2", *cmds, str(path)])


def to_mode(path: Path, mode: str) -> None:
    if mode != "standard":
        import qcow2

        qcow2.amend(path, {"refcount_mode": mode})


def qemu_check(path: Path) -> None:
    """Every measured result must also be a correct one (standard images only: QEMU
    refuses the other modes)."""
    p = subprocess.run([QEMU_IMG, "check", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"qemu-img check failed on {path.name}: {p.stdout}{p.stderr}")


@contextmanager
def workdir(cfg_tmp: str | None = None) -> Iterator[Path]:
    base = cfg_tmp or os.environ.get("QCOW2_BENCH_TMP") or None
    d = Path(tempfile.mkdtemp(prefix="qcow2-report-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------- strace --
KINDS = ("data", "l2", "l1", "refcount", "header", "snapshot_table")
_SYSCALL = re.compile(r"^(\w+)\((\d+)<([^>]*)>(.*)\)\s+=\s+(-?\d+)")


def metadata_map(path: Path) -> dict[int, str]:
    """cluster index -> metadata kind, from the image as it is now (read with struct,
    independently of the library under test): header, active and snapshot L1 tables,
    the L2 tables they name, refcount table and blocks, snapshot table."""
    kinds: dict[int, str] = {0: "header"}
    with open(path, "rb") as f:
        def rd(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)

        h = rd(0, 104)
        cbits = struct.unpack_from(">I", h, 20)[0]
        cs = 1 << cbits
        l1_size, l1_off = struct.unpack_from(">IQ", h, 36)
        rt_off, rt_clusters, nb_snap, snap_off = struct.unpack_from(">QIIQ", h, 48)
        version = struct.unpack_from(">I", h, 4)[0]
        incompat = struct.unpack_from(">Q", h, 72)[0] if version >= 3 else 0
        mask = 0x00FF_FFFF_FFFF_FE00

        def mark(off: int, length: int, kind: str) -> None:
            for c in range(off >> cbits, (off + max(1, length) - 1 >> cbits) + 1):
                kinds[c] = kind

        l1s = [(l1_off, l1_size)]
        pos = snap_off
        for _ in range(nb_snap):
            e = rd(pos, 40)
            s_l1_off, s_l1_size, id_len, name_len = struct.unpack_from(">QIHH", e, 0)
            extra = struct.unpack_from(">I", e, 36)[0]
            l1s.append((s_l1_off, s_l1_size))
            pos += 40 + extra + id_len + name_len
            pos = (pos + 7) & ~7
        if nb_snap:
            mark(snap_off, pos - snap_off, "snapshot_table")
        del incompat  # an L2 table is one cluster whether its entries are 8 or 16 bytes
        for off, n in l1s:
            if not n:
                continue
            mark(off, n * 8, "l1")
            ents = struct.unpack(f">{n}Q", rd(off, n * 8))
            for e in ents:
                if e & mask:
                    kinds[(e & mask) >> cbits] = "l2"
        mark(rt_off, rt_clusters * cs, "refcount")
        n = rt_clusters * cs // 8
        for e in struct.unpack(f">{n}Q", rd(rt_off, n * 8)):
            if e & ~0x1FF:
                kinds[(e & ~0x1FF) >> cbits] = "refcount"
    return kinds


def strace_run(args: Sequence[str], image: Path) -> dict[str, int]:
    """Run a command under strace and count what it did to `image`: write calls and
    bytes by metadata kind (classified by the cluster they hit, from the image's metadata
    after the run) and fdatasync/fsync calls."""
    if STRACE is None:
        raise RuntimeError("strace is not installed (make bench installs it)")
    with tempfile.TemporaryDirectory(prefix="strace-") as d:
        prefix = os.path.join(d, "t")
        sh([STRACE, "-ff", "-y", "-s", "0", "-qq", "-o", prefix, "-e",
            "trace=pwrite64,pwritev,pwritev2,write,fdatasync,fsync", *args])
        real = os.path.realpath(image)
        calls: list[tuple[str, int, int]] = []
        for fn in glob.glob(prefix + ".*"):
            with open(fn, errors="replace") as f:
                for line in f:
                    m = _SYSCALL.match(line)
                    if not m or os.path.realpath(m.group(3)) != real:
                        continue
                    name, rest, ret = m.group(1), m.group(4), int(m.group(5))
                    if name in ("fdatasync", "fsync"):
                        calls.append(("sync", 0, 0))
                    elif name.startswith("pwrite") and ret >= 0:
                        nums = re.findall(r"(?<![\w\[])(\d+)(?![\w\]])", rest)
                        off = int(nums[-1]) if name != "pwritev2" else int(nums[-2])
                        calls.append(("write", off, ret))
    kinds = metadata_map(image)
    cbits = 16
    with open(image, "rb") as f:
        cbits = struct.unpack(">I", f.read(24)[20:24])[0]
    out = {"syncs": 0}
    for k in KINDS:
        out[f"{k}_writes"] = 0
        out[f"{k}_writes_bytes"] = 0
    for what, off, n in calls:
        if what == "sync":
            out["syncs"] += 1
            continue
        k = kinds.get(off >> cbits, "data")
        out[f"{k}_writes"] += 1
        out[f"{k}_writes_bytes"] += n
    return out


def stats_counts(delta: Any) -> dict[str, int]:
    """img.stats (a difference of two) in the same keys as strace_run."""
    d = delta.as_dict()
    return {k: int(v) for k, v in d.items() if k.endswith(("_writes", "_writes_bytes")) or k == "syncs"}


def fmt_s(v: float | None) -> str:
    """Seconds for a table: ms below a second, with 3 significant digits."""
    if v is None:
        return "-"
    if v < 1e-3:
        return f"{v * 1e6:.3g} µs"
    if v < 1:
        return f"{v * 1e3:.3g} ms"
    return f"{v:.3g} s"


def fmt_fig(f: dict[str, Any] | None, unit: Callable[[float | None], str] = fmt_s) -> str:
    """median [min–max]"""
    if not f or f.get("median") is None:
        return "-"
    return f"{unit(f['median'])} [{unit(f['min'])}–{unit(f['max'])}]"


def fmt_ratio(f: dict[str, Any] | None) -> str:
    if not f or f.get("median") is None:
        return "-"
    return f"{f['median']:.3g}× [{f['min']:.3g}–{f['max']:.3g}]"


def fmt_size(n: float) -> str:
    for unit, v in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= v:
            x = n / v
            return f"{x:g} {unit}" if x == int(x) else f"{x:.3g} {unit}"
    return f"{n:g} B"
