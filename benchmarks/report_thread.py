"""Items 1 and 3 of the report: the thread's experiment and Kevin's counter-claim.

1. Kevin's timing: an image of 8 GiB virtual size with 4 GiB of data written by QEMU,
   64 KiB clusters; `qemu-img snapshot -c test` and `-d test`, whole process, against
   `qcow2 snapshot -c/-d` (whole process: interpreter start-up included) and the same
   operations in-process (open, operation, close) in every refcount mode. QEMU and our
   standard mode work on the very same file, the other modes on converted copies.
2. VM state: creating a snapshot that saves VM state of 256 MiB, 1 GiB and 4 GiB against
   the refcount work of the same snapshot create (the disk-only snapshot). qemu-img cannot
   save VM state, so QEMU's part is the raw write throughput of the same file system
   (pwrite + fdatasync of the same bytes), next to `qemu-img snapshot -c`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import (
    QCOW2_CLI,
    QEMU_IMG,
    Config,
    GiB,
    MiB,
    interleave,
    pair_ratio,
    qemu_check,
    qemu_create,
    qemu_fill,
    settle,
    sh,
    show_cmd,
    stats_counts,
    strace_run,
    summ,
    timed_cmd,
    to_mode,
)

import qcow2

OPS = ("create", "delete")


def sizes(cfg: Config) -> tuple[int, int]:
    """(virtual, data) of the thread's image."""
    return (256 * MiB, 128 * MiB) if cfg.quick else (8 * GiB, 4 * GiB)


def vm_sizes(cfg: Config) -> list[int]:
    return [8 * MiB, 32 * MiB, 128 * MiB] if cfg.quick else [256 * MiB, 1 * GiB, 4 * GiB]


def side_names(cfg: Config) -> list[str]:
    out = ["qemu-img (process)"]
    for m in cfg.modes:
        out += [f"qcow2 {m} (process)", f"qcow2 {m} (in-process)"]
    return out


def steps_thread(cfg: Config) -> int:
    return cfg.runs * (len(side_names(cfg)) * len(OPS) + 1) + 2 + len(cfg.modes)


def vm_runs(cfg: Config, size: int) -> int:
    """Runs per VM state size: at most 3 from 1 GiB up (each writes the size 2 + modes
    times)."""
    return cfg.runs if size < GiB else min(cfg.runs, 3)


def steps_vm(cfg: Config) -> int:
    return sum(vm_runs(cfg, s) for s in vm_sizes(cfg)) * (2 + 2 * len(cfg.modes))


class Images:
    """The thread's image (QEMU's, shared with our standard mode) and one converted
    copy per other mode; built once for items 1 and 3, removed after them."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        virt, data = sizes(cfg)
        d = cfg.tmp
        self.qemu = d / "thread.qcow2"
        self.create_cmd = qemu_create(self.qemu, virt)
        cfg.note("thread image: writing data")
        qemu_fill(self.qemu, 0, data)
        settle(self.qemu)
        cfg.tick()
        self.path: dict[str, Path] = {}
        self.refused: dict[str, str] = {}
        for m in cfg.modes:
            if m == "standard":
                self.path[m] = self.qemu
            else:
                p = d / f"thread-{m}.qcow2"
                sh(["cp", "--sparse=always", str(self.qemu), str(p)])
                try:
                    to_mode(p, m)
                except Exception as exc:  # a mode refusing the image is a finding
                    self.refused[m] = f"conversion refused: {exc}".splitlines()[0]
                    p.unlink()
                    cfg.tick()
                    continue
                settle(p)
                self.path[m] = p
            cfg.tick()

    def remove(self) -> None:
        for p in {self.qemu, *self.path.values()}:
            p.unlink(missing_ok=True)


def _ours(path: Path, op: str, name: str, vm: Any = None) -> float:
    t0 = time.perf_counter()
    with qcow2.open(path, "r+") as img:
        if op == "create":
            img.create_snapshot(name, vm_state=vm)
        else:
            img.delete_snapshot(name)
    return time.perf_counter() - t0


def run_thread(cfg: Config, imgs: Images) -> dict[str, Any]:
    virt, data = sizes(cfg)
    sides: dict[str, Any] = {}
    q = str(imgs.qemu)
    sides["qemu-img (process)|create"] = lambda: timed_cmd([QEMU_IMG, "snapshot", "-c", "test", q])
    sides["qemu-img (process)|delete"] = lambda: timed_cmd([QEMU_IMG, "snapshot", "-d", "test", q])
    for m in imgs.path:
        p = str(imgs.path[m])
        sides[f"qcow2 {m} (process)|create"] = \
            lambda p=p: timed_cmd([*QCOW2_CLI, "snapshot", "-c", "test", p])
        sides[f"qcow2 {m} (process)|delete"] = \
            lambda p=p: timed_cmd([*QCOW2_CLI, "snapshot", "-d", "test", p])
        sides[f"qcow2 {m} (in-process)|create"] = lambda p=p: _ours(Path(p), "create", "test")
        sides[f"qcow2 {m} (in-process)|delete"] = lambda p=p: _ours(Path(p), "delete", "test")
    cfg.note("thread: snapshot -c/-d")
    errors: dict[str, str] = {f"qcow2 {m}": e for m, e in imgs.refused.items()}
    raw = interleave(cfg, sides, errors=errors)
    qemu_check(imgs.qemu)
    # interpreter start-up alone, to read the whole-process figures against
    startup = interleave(cfg, {"import": lambda: timed_cmd(
        [QCOW2_CLI[0], "-c", "import qcow2.cli"])})["import"]
    # deterministic counters: writes and syncs of one create and one delete
    counts: dict[str, dict[str, Any]] = {}
    counts["qemu-img (process)"] = {
        "create": strace_run([QEMU_IMG, "snapshot", "-c", "test", q], imgs.qemu),
        "delete": strace_run([QEMU_IMG, "snapshot", "-d", "test", q], imgs.qemu)}
    for m in imgs.path:
        c: dict[str, Any] = {}
        for op in OPS:
            try:
                with qcow2.open(imgs.path[m], "r+") as img:
                    before = img.stats.copy()
                    if op == "create":
                        img.create_snapshot("test")
                    else:
                        img.delete_snapshot("test")
                    img.flush()
                    c[op] = stats_counts(img.stats - before)
            except qcow2.Qcow2Error as exc:
                c[op] = {"error": str(exc)}
        counts[f"qcow2 {m} (in-process)"] = c
    cfg.tick()
    figs: dict[str, dict[str, Any]] = {}
    for key, xs in raw.items():
        side, op = key.split("|")
        figs.setdefault(side, {})[op] = summ(xs)
    ratios: dict[str, dict[str, Any]] = {}
    for side in figs:
        if side.startswith("qemu-img"):
            continue
        ratios[side] = {op: pair_ratio(raw[f"{side}|{op}"], raw[f"qemu-img (process)|{op}"])
                        for op in OPS}
    names = {q: "IMG"}
    return {
        "virtual": virt, "data": data, "cluster": 65536, "quick": cfg.quick,
        "figures": figs, "ratio_to_qemu": ratios, "counts": counts, "errors": errors,
        "startup": summ(startup),
        "commands": [
            show_cmd(imgs.create_cmd, names),
            f"qemu-io -c 'write -P 0xab OFF 256M' ... (the first {data >> 20} MiB, in 256 MiB pieces)",
            "qcow2 amend -o refcount_mode=MODE COPY (each other mode, on a copy)",
            "time qemu-img snapshot -c test IMG; time qemu-img snapshot -d test IMG",
            "time python -m qcow2 snapshot -c test IMG; ... -d test IMG",
            "in-process: with qcow2.open(IMG, 'r+') as img: img.create_snapshot('test') "
            "(resp. delete_snapshot), timed from open to close",
            "counters: strace -ff -e trace=pwrite64,pwritev,fdatasync,... qemu-img ...; img.stats",
        ],
    }


def run_vmstate(cfg: Config, imgs: Images) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    block = np.random.default_rng(1).integers(0, 256, MiB, dtype=np.uint8)
    raw_path = cfg.tmp / "vmstate.raw"
    q = str(imgs.qemu)
    for size in vm_sizes(cfg):
        buf = np.tile(block, size // MiB)
        mv = memoryview(buf)
        cfg.note(f"VM state {size >> 20} MiB")

        def raw_write(mv: memoryview = mv) -> float:
            raw_path.unlink(missing_ok=True)
            t0 = time.perf_counter()
            fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for pos in range(0, len(mv), 64 * MiB):
                    os.pwrite(fd, mv[pos : pos + 64 * MiB], pos)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            dt = time.perf_counter() - t0
            raw_path.unlink()
            return dt

        def qemu_create_only() -> float:
            dt = timed_cmd([QEMU_IMG, "snapshot", "-c", "vm", q])
            sh([QEMU_IMG, "snapshot", "-d", "vm", q])
            return dt

        sides: dict[str, Any] = {"raw write + fdatasync": raw_write,
                                 "qemu-img snapshot -c (disk only)": qemu_create_only}
        for m in imgs.path:
            p = imgs.path[m]

            def with_vm(p: Path = p, mv: memoryview = mv) -> float:
                dt = _ours(p, "create", "vm", mv)
                _ours(p, "delete", "vm")
                return dt

            def disk_only(p: Path = p) -> float:
                dt = _ours(p, "create", "vm")
                _ours(p, "delete", "vm")
                return dt

            sides[f"qcow2 {m}, with VM state"] = with_vm
            sides[f"qcow2 {m}, disk only"] = disk_only
        errors: dict[str, str] = {f"qcow2 {m}": e for m, e in imgs.refused.items()}
        raw = interleave(cfg, sides, runs=vm_runs(cfg, size), errors=errors)
        row: dict[str, Any] = {"vm_state": size, "runs": vm_runs(cfg, size), "figures": {k: summ(v) for k, v in raw.items()},
                               "errors": errors}
        # how much longer the snapshot takes with the VM state than without, per run
        rq = [a + b for a, b in zip(raw["raw write + fdatasync"],
                                    raw["qemu-img snapshot -c (disk only)"])]
        row["total_over_disk_only"] = {
            "QEMU (raw write + qemu-img snapshot -c)":
                pair_ratio(rq, raw["qemu-img snapshot -c (disk only)"])}
        row["vm_over_refcount"] = {
            "QEMU": pair_ratio(raw["raw write + fdatasync"], raw["qemu-img snapshot -c (disk only)"])}
        for m in imgs.path:
            w, d = raw[f"qcow2 {m}, with VM state"], raw[f"qcow2 {m}, disk only"]
            row["total_over_disk_only"][f"qcow2 {m}"] = pair_ratio(w, d)
            row["vm_over_refcount"][f"qcow2 {m}"] = pair_ratio(
                [max(0.0, a - b) for a, b in zip(w, d)], d)
        row["throughput_mib_s"] = {
            "raw write + fdatasync": summ([size / MiB / x for x in raw["raw write + fdatasync"]])}
        for m in imgs.path:
            xs = raw[f"qcow2 {m}, with VM state"]
            row["throughput_mib_s"][f"qcow2 {m}"] = summ([size / MiB / x for x in xs])
        rows.append(row)
        del mv, buf
    with qcow2.open(imgs.qemu, "r+") as img:  # what was measured is also correct
        img.create_snapshot("vm", vm_state=np.tile(block, 4))
    qemu_check(imgs.qemu)
    sh([QEMU_IMG, "snapshot", "-d", "vm", q])
    return {
        "rows": rows, "quick": cfg.quick,
        "image": {"virtual": sizes(cfg)[0], "data": sizes(cfg)[1]},
        "commands": [
            "raw: os.pwrite of the VM state in 64 MiB pieces to a new file beside the image, "
            "then os.fdatasync (QEMU's VM state part: qemu-img cannot save VM state)",
            "qemu-img snapshot -c vm IMG (the refcount work of the same snapshot create)",
            "ours: with qcow2.open(IMG, 'r+') as img: img.create_snapshot('vm', vm_state=BUF), "
            "open to close; and the same without vm_state",
            "each sample is followed by an untimed delete of the snapshot",
        ],
    }


def run(cfg: Config) -> dict[str, dict[str, Any]]:
    imgs = Images(cfg)
    try:
        thread = run_thread(cfg, imgs)
        vm = run_vmstate(cfg, imgs)
    finally:
        imgs.remove()
    return {"thread": thread, "vmstate": vm}


def steps(cfg: Config) -> int:
    return steps_thread(cfg) + steps_vm(cfg) + 1
