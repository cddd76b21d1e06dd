"""docs/benchmarks.md and its plots, rendered from the raw figures (the JSON of a run).

Every number in the document comes from the JSON; the prose of the answer is written
around them, and where it compares (faster, larger, dominates) the comparison is made
from the figures, not assumed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
from harness import fmt_fig, fmt_ratio, fmt_s, fmt_size

PHASE_NAMES = {"before": "before", "after": "right after", "steady": "steady after"}


# ---------------------------------------------------------------------- environment --
def _first(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def environment(cfg: harness.Config) -> dict[str, Any]:
    import matplotlib
    import numpy
    import tqdm

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    fs = _first(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", str(cfg.tmp)])
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "quick": cfg.quick, "runs": cfg.runs, "modes": cfg.modes,
        "command": "make bench-quick" if cfg.quick else "make bench",
        "cpu": cpu, "cpus": os.cpu_count(), "memory": mem, "kernel": platform.release(),
        "filesystem": fs, "python": platform.python_version(), "numpy": numpy.__version__,
        "matplotlib": matplotlib.__version__, "tqdm": tqdm.__version__,
        "qemu_img": harness.qemu_version(), "strace": _first(["strace", "-V"]),
        "commit": _first(["git", "-C", str(harness.ROOT), "rev-parse", "--short", "HEAD"]),
        "load_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------- helpers --
def _med(f: dict[str, Any] | None) -> float | None:
    return None if not f else f.get("median")


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e6:.3g} µs" if abs(v) < 1e-3 else fmt_s(v)


def _n(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> str:
    al = align or ("l" + "r" * (len(head) - 1))
    sep = ["---:" if a == "r" else "---" for a in al]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(name: str) -> str:
    """A configuration's name broken into lines for an axis."""
    return name.replace("qemu ", "qemu\n").replace(" + ", "\n+ ").replace(" (", "\n(")


def _bars(ax: Any, groups: list[str], series: dict[str, list[dict[str, Any] | None]],
          scale: float = 1.0, log: bool = True) -> None:
    """Grouped bars: median with min-max error bars."""
    import numpy as np

    k = max(1, len(series))
    width = 0.8 / k
    x = np.arange(len(groups))
    for i, (name, figs) in enumerate(series.items()):
        med = [(_med(f) or 0) * scale for f in figs]
        lo = [max(0.0, ((_med(f) or 0) - (f or {}).get("min", 0)) * scale) if f else 0
              for f in figs]
        hi = [(((f or {}).get("max") or 0) - (_med(f) or 0)) * scale if f else 0 for f in figs]
        ax.bar(x + (i - (k - 1) / 2) * width, med, width, yerr=[lo, hi], capsize=2, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


# ---------------------------------------------------------------------- sections --
def sec_thread(doc: dict[str, Any], out: Path) -> str:
    s = doc["sections"]["thread"]
    figs, ratios, counts = s["figures"], s["ratio_to_qemu"], s["counts"]
    q = "(quick mode: the data scaled down from 4 GiB)" if s["quick"] else ""
    md = [f"## 1. The thread's experiment: `qemu-img snapshot -c` / `-d` {q}", "",
          f"Image: {fmt_size(s['virtual'])} virtual, {fmt_size(s['data'])} of data written by "
          f"qemu-io, 64 KiB clusters (Kevin Wolf's `scratch.qcow2`). QEMU and our standard mode "
          "work on the same file; the other modes on a converted copy. Whole process includes "
          f"the interpreter start-up: `python -c 'import qcow2.cli'` alone takes "
          f"{fmt_fig(s['startup'])}.", ""]
    rows = []
    for side, ops in figs.items():
        r = ratios.get(side, {})
        c = counts.get(side) or counts.get(side.replace("(process)", "(in-process)"), {})
        cc = []
        for op in ("create", "delete"):
            x = c.get(op) or {}
            if "error" in x:
                cc.append("refused")
                continue
            meta = sum(v for k, v in x.items() if k.endswith("_writes") and not
                       k.startswith("data"))
            cc.append(f"{x.get('syncs', '-')} / {meta}")
        rows.append([side, fmt_fig(ops.get("create")), fmt_fig(ops.get("delete")),
                     fmt_ratio(r.get("create")), fmt_ratio(r.get("delete")), *cc])
    md.append(_table(["", "create", "delete", "this / qemu-img, create",
                      "this / qemu-img, delete", "create: syncs / metadata writes",
                      "delete: syncs / metadata writes"], rows))
    for side, err in s.get("errors", {}).items():
        md.append(f"- {side}: {err}")
    md += ["", "Ratios are our time over qemu-img's, run by run (below 1: we are faster). "
           "Counters: qemu-img's from strace, ours from `img.stats` (the process and "
           "in-process sides run the same code).", "", "![thread](benchmarks-thread.png)", ""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    sides = list(figs)
    _bars(ax, [_label(sd) for sd in sides],
          {op: [figs[sd].get(op) for sd in sides] for op in ("create", "delete")})
    ax.set_ylabel("seconds (log)")
    ax.set_title(f"snapshot create/delete, {fmt_size(s['virtual'])} virtual, "
                 f"{fmt_size(s['data'])} data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "benchmarks-thread.png", dpi=90)
    plt.close(fig)
    return "\n".join(md)


def _row_counts(r: dict[str, Any], ph: str) -> list[str]:
    pc = (r.get("per_write_counts") or {}).get(ph)
    if not pc:
        return ["-", "-", "-"]
    meta = "/".join(_n(pc.get(f"{k}_writes", 0), 2) for k in ("refcount", "l2", "l1"))
    cow = (r.get("cow_bytes_per_write") or {}).get(ph, 0)
    return [_n(pc.get("syncs", 0), 3), meta, _n(cow / 1024, 3)]


def sec_writes(doc: dict[str, Any], out: Path) -> str:
    s = doc["sections"]["writes"]
    rows_by_w: dict[str, list[dict[str, Any]]] = {}
    for r in s["rows"]:
        rows_by_w.setdefault(r["workload"], []).append(r)
    q = " (quick mode: smaller image, fewer writes)" if s["quick"] else ""
    md = [f"## 2. Writes before, right after and steady after a snapshot{q}", "",
          f"Image {fmt_size(s['image'])}, fully written by QEMU, 64 KiB clusters; {s['writes']} "
          "writes per pass, one flush at the end of each pass (inside the timing). Time per "
          "write: median [min–max]. Counters per write (right after the snapshot): syncs, "
          "refcount / L2 / L1 writes, and KiB of old data copied for copy-on-write "
          "(read-modify-write). `qemu std ÷ this`: QEMU standard's time over this "
          "configuration's, run by run (above 1: this one is faster).", ""]
    for w, rows in rows_by_w.items():
        md += [f"### {w}", ""]
        t = []
        for r in rows:
            pw = r["per_write"]
            t.append([r["config"], *(fmt_fig(pw[ph], _us) for ph in
                                     ("before", "after", "steady", "after_nosync")),
                      fmt_ratio(r["after_over_before"]),
                      fmt_ratio(r["qemu_standard_over_this"]["after"]), *_row_counts(r, "after")])
        md.append(_table(["", "before", "right after", "steady after", "after, no syncs",
                          "after ÷ before",
                          "qemu std ÷ this (after)", "syncs", "rc/L2/L1 writes",
                          "COW KiB"], t))
    for c, err in s.get("errors", {}).items():
        md.append(f"- {c}: {err}")
    # attribution
    u = s["unit_costs"]
    md += ["### Where the after-snapshot penalty goes", "",
           "Penalty = (right after − before) per write, run by run, split into the thread's "
           "causes. **Syncs are measured**: the right-after pass once more on a fresh copy with "
           "syncs switched off (`qemu-img bench -t unsafe`, which ignores flushes; ours through a "
           "file backend whose sync does nothing), and the difference per write is what waiting "
           "for the disk cost. The rest is estimated from the counters and unit costs measured "
           "on the same file system in the same run (raw file, page cache): a 4 KiB write "
           f"{fmt_fig(u['write_4k'], _us)}, a 64 KiB overwrite {fmt_fig(u['write_64k'], _us)}, "
           f"a 64 KiB append (file growth) {fmt_fig(u['append_64k'], _us)}, a 64 KiB read "
           f"{fmt_fig(u['read_64k'], _us)} (for scale: one fdatasync after a 4 KiB write "
           f"{fmt_fig(u['sync'], _us)}). (a) refcount updates = refcount block writes; (b) "
           "allocation + growth = L2/L1 writes and the file's growth; (c) read-modify-write = "
           "the copied bytes, read and written again; syncs = the time spent waiting for the "
           "disk (the syncs that order (a) and (b) before the mapping, and the write-back of "
           "the copied data they wait for); other = the rest (CPU in the driver and its "
           "bookkeeping; negative when the estimate overshoots). The split is by measurement "
           "and counting, not a profile.", ""]
    for w in ("4K random", "4K sequential", "64K random"):
        rows = rows_by_w.get(w, [])
        if not rows:
            continue
        t = []
        for r in rows:
            a = r.get("attribution")
            if not a:
                continue
            t.append([r["config"], _us(_med(r["penalty_per_write"])),
                      *(_us(a[k]) for k in ("refcount updates", "allocation + growth",
                                             "read-modify-write", "syncs", "other"))])
        md += [f"**{w}**", "", _table(["", "penalty / write", "(a) refcount", "(b) alloc + growth",
                                       "(c) RMW", "syncs", "other"], t)]
    # differential refcount cost
    diff = _refcount_differential(s)
    if diff:
        md += ["The refcount share measured the other way: the penalty of a standard image "
               "minus that of the same writes where refcounts are not updated on writes "
               "(QEMU: `lazy_refcounts=on`; ours: `lazy-count`), per write:", "",
               _table(["workload", "QEMU: standard − lazy_refcounts", "ours: standard − lazy-count"],
                      diff)]
    md += ["![headline](benchmarks-headline.png)", "", "![writes](benchmarks-writes.png)", "",
           "![penalty](benchmarks-penalty.png)", ""]
    _plot_writes(s, rows_by_w, out)
    return "\n".join(md)


def _refcount_differential(s: dict[str, Any]) -> list[list[str]]:
    by = {(r["config"], r["workload"]): r for r in s["rows"]}
    out = []
    for w in s["workloads"]:
        cells = []
        for a, b in (("qemu standard", "qemu lazy_refcounts=on"),
                     ("qcow2 standard", "qcow2 lazy-count")):
            ra, rb = by.get((a, w)), by.get((b, w))
            if ra and rb:
                pa, pb = ra["penalty_per_write"]["samples"], rb["penalty_per_write"]["samples"]
                cells.append(_us(harness.summ([x - y for x, y in zip(pa, pb)])["median"]))
            else:
                cells.append("-")
        out.append([w, *cells])
    return out


def _plot_writes(s: dict[str, Any], rows_by_w: dict[str, list[dict[str, Any]]], out: Path) -> None:
    plt = _plt()
    ws = [w for w in ("4K random", "4K sequential", "64K random", "64K sequential") if w in rows_by_w]
    fig, axes = plt.subplots(len(ws), 1, figsize=(11, 3.2 * len(ws)), squeeze=False)
    for ax, w in zip(axes[:, 0], ws):
        rows = rows_by_w[w]
        _bars(ax, [_label(r["config"]) for r in rows],
              {PHASE_NAMES[ph]: [r["per_write"][ph] for r in rows] for ph in PHASE_NAMES},
              scale=1e6)
        ax.set_ylabel("µs per write (log)")
        ax.set_title(f"{w} writes before / right after / steady after a snapshot "
                     f"({s['writes']} writes, {fmt_size(s['image'])} image)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "benchmarks-writes.png", dpi=90)
    plt.close(fig)
    # the headline (README): scattered 4 KiB writes around a snapshot
    rows = rows_by_w.get("4K random", [])
    if rows:
        fig, ax = plt.subplots(figsize=(10, 3.8))
        _bars(ax, [_label(r["config"]) for r in rows],
              {PHASE_NAMES[ph]: [r["per_write"][ph] for r in rows] for ph in PHASE_NAMES},
              scale=1e6)
        ax.set_ylabel("µs per 4 KiB write (log)")
        ax.set_title("Scattered 4 KiB writes before, right after and steady after an internal "
                     "snapshot (median, min–max)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "benchmarks-headline.png", dpi=90)
        plt.close(fig)
    # the penalty, stacked by cause
    rows = [r for r in rows_by_w.get("4K random", []) if r.get("attribution")]
    if not rows:
        return
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    causes = ["refcount updates", "allocation + growth", "read-modify-write", "syncs", "other"]
    left = np.zeros(len(rows))
    for c in causes:
        v = np.array([max(0.0, r["attribution"][c]) * 1e6 for r in rows])
        ax.barh(range(len(rows)), v, left=left, label=c)
        left += v
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["config"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("µs per write added by the snapshot (4K random)")
    ax.set_title("Where the after-snapshot penalty goes: syncs measured (pass without syncs), "
                 "the rest counters × unit costs; negative parts drawn as 0", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "benchmarks-penalty.png", dpi=90)
    plt.close(fig)


def sec_vmstate(doc: dict[str, Any], out: Path) -> str:
    s = doc["sections"]["vmstate"]
    q = " (quick mode: smaller VM states and image)" if s["quick"] else ""
    md = [f"## 3. VM state against the refcount work of the same snapshot{q}", "",
          f"On the image of section 1 ({fmt_size(s['image']['virtual'])} virtual, "
          f"{fmt_size(s['image']['data'])} data). qemu-img cannot save VM state, so QEMU's part "
          "is the raw write of the same bytes to the same file system (pwrite + fdatasync), "
          "next to `qemu-img snapshot -c` for the refcount work. Ours: `create_snapshot` with "
          "and without `vm_state`, in-process, open to close. `VM state ÷ refcount work`: for "
          "QEMU raw write ÷ `snapshot -c`; for ours (with − without) ÷ without, run by run. Runs per "
          "size: " + ", ".join(f"{fmt_size(r['vm_state'])} {r.get('runs', '?')}"
                               for r in s["rows"]) + ".", ""]
    t = []
    for r in s["rows"]:
        for side, f in r["figures"].items():
            key = "QEMU" if side in ("raw write + fdatasync", "qemu-img snapshot -c (disk only)") \
                else side.split(",")[0]
            ratio = r["vm_over_refcount"].get(key) if "disk only" not in side else None
            tp = r["throughput_mib_s"].get("raw write + fdatasync" if side.startswith("raw")
                                           else key) if "disk only" not in side else None
            t.append([fmt_size(r["vm_state"]), side, fmt_fig(f),
                      fmt_fig(tp, lambda v: f"{v:.0f}") if tp else "", fmt_ratio(ratio)
                      if ratio else ""])
        for side, err in r.get("errors", {}).items():
            t.append([fmt_size(r["vm_state"]), side, f"refused: {err}", "", ""])
    md.append(_table(["VM state", "", "time", "MiB/s", "VM state ÷ refcount work"], t))
    md += ["![vmstate](benchmarks-vmstate.png)", ""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4))
    groups = [fmt_size(r["vm_state"]) for r in s["rows"]]
    names = list(s["rows"][0]["figures"]) if s["rows"] else []
    _bars(ax, groups, {n: [r["figures"].get(n) for r in s["rows"]] for n in names})
    ax.set_ylabel("seconds (log)")
    ax.set_xlabel("VM state size")
    ax.set_title("Saving VM state against the refcount work of the snapshot", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "benchmarks-vmstate.png", dpi=90)
    plt.close(fig)
    return "\n".join(md)


def sec_scale(doc: dict[str, Any], out: Path) -> str:
    s = doc["sections"]["scale"]
    q = " (quick mode: a small subset of the sizes and counts)" if s["quick"] else ""
    md = [f"## 4. Scale{q}", "",
          "Snapshot create / apply / delete: qemu-img whole process, ours in-process (open to "
          "close); median [min–max]. Images metadata-preallocated (`preallocation=metadata`): "
          "every cluster allocated, no data written.", "", "### Against allocated clusters", ""]
    ops = ("create", "apply", "delete")
    for key in ("by_clusters", "by_snapshots"):
        if key == "by_snapshots":
            md += [f"### Against existing snapshots ({fmt_size(s['snapshot_image'])} image)", ""]
        t = []
        for r in s[key]:
            for side, f in r["figures"].items():
                rat = r["ratio_to_qemu"].get(side, {})
                t.append([f"{fmt_size(r['size'])}" if key == "by_clusters" else str(r["snapshots"]),
                          _n(r["clusters"]) if key == "by_clusters" else side, *(
                              [side] if key == "by_clusters" else []),
                          *(fmt_fig(f.get(op)) for op in ops),
                          " / ".join(f"{_med(rat.get(op)):.2g}" if _med(rat.get(op)) else "-"
                                     for op in ops) if rat else ""])
            for side, err in r.get("errors", {}).items():
                t.append([str(r.get("snapshots", fmt_size(r["size"]))), side, f"refused: {err}",
                          "", "", ""])
        head = (["image", "clusters", ""] if key == "by_clusters" else ["snapshots", ""]) + \
            ["create", "apply", "delete", "÷ qemu-img (c/a/d)"]
        md.append(_table(head, t))
    md += ["![scale](benchmarks-scale.png)", "", "### Open time and memory per mode", "",
           "`qcow2.open(IMG, 'r+')` + close on the metadata-preallocated images; memory is the "
           "Python heap (numpy arrays included, tracemalloc) the open image holds, and the "
           "peak while opening.", ""]
    t = []
    for r in s["by_clusters"]:
        for side, f in r["open"].items():
            m = r["memory"].get(side, {})
            t.append([fmt_size(r["size"]), side, fmt_fig(f),
                      fmt_size(m.get("retained", 0)) if m else "-",
                      fmt_size(m.get("peak", 0)) if m else "-"])
    md.append(_table(["image", "", "open + close", "held", "peak"], t))
    md += ["![open](benchmarks-open.png)", ""]
    plt = _plt()
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for row_i, (key, xkey, xlabel) in enumerate((("by_clusters", "clusters", "allocated clusters"),
                                                 ("by_snapshots", "snapshots", "existing snapshots"))):
        for ax, op in zip(axes[row_i], ops):
            for side in s["sides"]:
                pts = [(r[xkey], r["figures"].get(side, {}).get(op)) for r in s[key]]
                pts = [(x, f) for x, f in pts if f and f.get("median")]
                if not pts:
                    continue
                xs = [x for x, _ in pts]
                med = [f["median"] for _, f in pts]
                err = [[f["median"] - f["min"] for _, f in pts], [f["max"] - f["median"] for _, f in pts]]
                ax.errorbar(xs, med, yerr=err, marker="o", capsize=2, label=side)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel("seconds")
            ax.set_title(f"snapshot {op}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "benchmarks-scale.png", dpi=90)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for side in s["by_clusters"][0]["open"] if s["by_clusters"] else []:
        xs = [r["clusters"] for r in s["by_clusters"]]
        f = [r["open"][side] for r in s["by_clusters"]]
        axes[0].errorbar(xs, [x["median"] for x in f],
                         yerr=[[x["median"] - x["min"] for x in f], [x["max"] - x["median"] for x in f]],
                         marker="o", capsize=2, label=side)
        axes[1].plot(xs, [max(1, r["memory"][side]["retained"]) / 2**20 for r in s["by_clusters"]],
                     marker="o", label=side)
    for ax, yl in zip(axes, ("open + close, seconds", "MiB held by the open image")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("allocated clusters")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "benchmarks-open.png", dpi=90)
    plt.close(fig)
    return "\n".join(md)


def sec_tools(doc: dict[str, Any], out: Path) -> str:
    s = doc["sections"]["tools"]
    sh = s["shape"]
    q = " (quick mode: smaller images)" if s["quick"] else ""
    md = [f"## 5. Basic I/O and tools{q}", "",
          f"Data image {fmt_size(sh['image'])} written by QEMU; {sh['ops']} requests for the 4K "
          f"tests; check also on a {fmt_size(sh['prealloc'])} metadata-preallocated image; "
          f"convert of a {fmt_size(sh['convert'])} image, half random bytes, half text. The "
          "tools run as whole processes on both sides (our interpreter start-up included). "
          "Speed ratio: baseline time ÷ ours, run by run (above 1: we are faster).", ""]
    t = []
    for r in s["rows"]:
        if "rate" in r:
            o, b = r["rate"]["ours"], r["rate"]["baseline"]
            def fmt(v: float | None) -> str:
                return f"{v:,.0f}"

            cells = [f"{fmt_fig(o, fmt)} {r['unit']}", f"{fmt_fig(b, fmt)} {r['unit']}"]
        else:
            cells = [fmt_fig(r["seconds"]["ours"]), fmt_fig(r["seconds"]["baseline"])]
        t.append([r["name"], *cells, r["baseline"], fmt_ratio(r["speed_ratio"])])
    md.append(_table(["", "ours", "baseline", "baseline is", "speed ratio"], t))
    md += ["Commands:", ""]
    for r in s["rows"]:
        md.append(f"- {r['name']}: " + "; ".join(f"`{c}`" for c in r["commands"]))
    md += ["", "![tools](benchmarks-tools.png)", ""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(s["rows"]) + 1.2))
    names = [r["name"] for r in s["rows"]]
    f = [r["speed_ratio"] for r in s["rows"]]
    ax.barh(range(len(names)), [x["median"] for x in f],
            xerr=[[x["median"] - x["min"] for x in f], [x["max"] - x["median"] for x in f]],
            capsize=2)
    ax.axvline(1, color="k", lw=0.8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed ratio: baseline time ÷ ours (log; > 1: we are faster)")
    fig.tight_layout()
    fig.savefig(out / "benchmarks-tools.png", dpi=90)
    plt.close(fig)
    return "\n".join(md)


def sec_env(doc: dict[str, Any], json_path: Path) -> str:
    e = doc["environment"]
    secs = doc.get("seconds", {})
    md = ["## Machine, versions, commands", "",
          f"- Run: `{e['command']}` ({'quick' if e['quick'] else 'full'}), started {e['started']}, "
          f"finished {e.get('finished', '?')}, {secs.get('total', 0) / 60:.1f} min; "
          f"commit {e['commit']}; {e['runs']} interleaved runs per figure.",
          f"- Machine: {e['cpu']}, {e['cpus']} CPUs, {e['memory']} RAM, Linux {e['kernel']}; "
          f"scratch file system: {e['filesystem']}.",
          f"- Load average (1/5/15 min) at the start {', '.join(f'{x:.2f}' for x in e['load_start'])}"
          f", at the end {', '.join(f'{x:.2f}' for x in e.get('load_end', []))}.",
          f"- Versions: {e['qemu_img']}; {e['strace']}; Python {e['python']}, numpy {e['numpy']}, "
          f"matplotlib {e['matplotlib']}, tqdm {e['tqdm']}.",
          f"- Refcount modes measured (from `qcow2.modes.MODES`): {', '.join(e['modes'])}.",
          f"- Raw figures: `{_rel(json_path)}` (every sample of every figure).",
          "- Time per part: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if k != "total"),
          ""]
    for name in ("thread", "vmstate", "writes", "scale"):
        cmds = doc["sections"].get(name, {}).get("commands", [])
        if cmds:
            md.append(f"Commands, {name}:")
            md.append("")
            md += [f"- `{c}`" for c in cmds]
            md.append("")
    return "\n".join(md)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(harness.ROOT))
    except ValueError:
        return str(p)


def _spread(doc: dict[str, Any]) -> tuple[float, float]:
    """Median and largest (max-min)/median over every timing figure of the run."""
    vals: list[float] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if {"median", "min", "max", "samples"} <= set(x) and x["median"] and x["n"] > 1:
                vals.append((x["max"] - x["min"]) / abs(x["median"]))
                return
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc["sections"])
    if not vals:
        return 0.0, 0.0
    vals.sort()
    return vals[len(vals) // 2], vals[-1]


def write(doc: dict[str, Any], out: Path, json_path: Path) -> Path:
    import report_answer

    e = doc["environment"]
    spread_med, spread_max = _spread(doc)
    head = ["# Benchmarks: how bad is the refcount work after a snapshot?", "",
            "Generated by `" + e["command"] + "` (`benchmarks/run_all.py`) from "
            f"`{_rel(json_path)}`; do not edit by hand. Every figure is the median of "
            f"{e['runs']} interleaved runs with [min–max]; comparisons are ratios taken run "
            "by run. The question comes from the 2011 qemu-devel thread in which Frediano Ziglio "
            "proposed two refcount schemes and Kevin Wolf asked: *have you checked how bad the "
            "refcount work really is?*", ""]
    if e["quick"]:
        head += ["**This is a quick run (`BENCH_QUICK=1`)**: every part has the full run's shape "
                 "at a reduced scale, so its absolute numbers are not the thread's; run "
                 "`make bench` for those.", ""]
    head += [f"**Noise.** The machine ({e['cpus']} CPUs) was shared with other work while this "
             f"ran (load average {e['load_start'][0]:.1f} at the start, "
             f"{e.get('load_end', [0])[0]:.1f} at the end). The spread (max − min) / median of a "
             f"figure is {spread_med:.0%} for the median figure and up to {spread_max:.0%}; read "
             "differences smaller than the [min–max] ranges as noise. The counters (syncs, "
             "writes) do not depend on load.", ""]
    parts = ["\n".join(head), sec_thread(doc, out), sec_writes(doc, out), sec_vmstate(doc, out),
             sec_scale(doc, out), sec_tools(doc, out), sec_env(doc, json_path),
             report_answer.answer(doc)]
    md = out / "benchmarks.md"
    md.write_text("\n".join(parts).rstrip() + "\n")
    return md


if __name__ == "__main__":
    print("render with: python benchmarks/run_all.py --render FILE", file=sys.stderr)
