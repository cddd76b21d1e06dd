"""Crash simulation for qcow2 images (used by tests/test_crash.py and benchmarks).

1. `record()` runs a workload on an image through a RecordingBackend. The workload
   drives the image through a `Driver`, which keeps a model of what a power cut must
   preserve at every point (an `Expect`, stored as a MARK in the operation log).
2. `crash_states()` rebuilds file contents a power cut could leave: every prefix of
   the write sequence, and at a crash point, any subset of the writes issued since the
   last sync (a write followed by a sync is persisted). Subsets are taken either of
   whole writes or of 512-byte sectors (torn writes). Overlapping writes that are both
   kept keep program order: a device persists the last version it received.
3. `check_with_library()` opens each state with our library (it must open), compares
   guest content and snapshots with the model, and runs our check (no corruption; no
   leak either after a clean close); `qemu_verdicts()` runs `qemu-img check` (exit 0
   or 3 only) and `qemu-img convert` (QEMU reads old or new content) on states;
   `check_writable()` opens a state read-write, writes and repairs leaks. `simulate()`
   does all of it for a recorded run: every state through our library, a seeded half
   through qemu-img check (a quarter of those through convert) and a tenth read-write.
4. `run_faulted()` runs a workload through a FaultBackend (EIO/ENOSPC at the Nth write
   or sync) for tests/test_faults.py. `WORKLOADS` are the workloads both use.

The model: bytes not written since the last completed flush must read back exactly;
a range written since may read, byte by byte, as its old content or as any content
written to it since (`Expect.pending`). A snapshot whose creation completed must be
intact, one being created or deleted may be present (then intact) or absent.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import qcow2
from qcow2.errors import Qcow2Error
from qcow2.faults import MARK, SYNC, TRUNCATE, WRITE, MemoryBackend, Op, Recording, RecordingBackend

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
SECTOR = 512


class CrashSimError(AssertionError):
    """A crash state (or a faulted run) violates the model."""


# ------------------------------------------------------------------------- model --
@dataclass(frozen=True)
class SnapExpect:
    content: bytes
    vm_state: bytes = b""


@dataclass(frozen=True)
class Expect:
    """What a crash at this point must preserve."""

    flushed: bytes  # guest content as of the last completed flush
    pending: tuple[tuple[int, bytes], ...] = ()  # (offset, data) written since then
    sizes: frozenset[int] = frozenset()  # allowed virtual sizes
    snapshots: Mapping[str, SnapExpect] = field(default_factory=dict)  # must be present
    maybe: Mapping[str, SnapExpect] = field(default_factory=dict)  # may be present
    clean: bool = False  # after a clean close: no leaks either


def first_bad_byte(got: bytes, e: Expect) -> int:
    """Index of the first byte of got that is neither flushed nor pending content, or -1."""
    if got == e.flushed:
        return -1
    g = np.frombuffer(got, dtype=np.uint8)
    n = len(g)
    base = np.frombuffer(e.flushed, dtype=np.uint8)
    m = min(n, len(base))
    # positions that differ from the flushed content (past its end: from zeros)
    pos = np.flatnonzero(g[:m] != base[:m])
    if n > m:
        pos = np.concatenate([pos, m + np.flatnonzero(g[m:] != 0)])
    ok = np.zeros(len(pos), dtype=bool)
    for off, data in e.pending:
        lo, hi = np.searchsorted(pos, [off, off + len(data)])
        if lo < hi:
            p = pos[lo:hi]
            ok[lo:hi] |= g[p] == np.frombuffer(data, dtype=np.uint8)[p - off]
    bad = pos[~ok]
    return int(bad[0]) if len(bad) else -1


def old_or_new(got: bytes, old: bytes, new: bytes) -> bool:
    g = np.frombuffer(got, dtype=np.uint8)
    return bool(((g == np.frombuffer(old, dtype=np.uint8)) |
                 (g == np.frombuffer(new, dtype=np.uint8))).all())


class CheckFailed(Qcow2Error):
    """A check that could not complete (its result carries the reason)."""

    def __init__(self, result: Any) -> None:
        super().__init__(result.failure)
        self.result = result


class _Stop(Exception):
    """Ends a workload after a fault (sticky faults: the device is gone)."""


class Driver:
    """Runs operations on an image and keeps the model of their durability.

    With a recording, every model change is logged as a MARK before the operation
    (so a crash during it may show it or not) and after it completes. With
    tolerate_errors, a Qcow2Error from an operation is recorded instead of raised and
    the model adopts what the image now reads (which must be old or new content); with
    stop_on_error the workload ends there.
    """

    def __init__(self, img: Any, recording: Recording | None, content: bytes,
                 snapshots: Mapping[str, SnapExpect], *, tolerate_errors: bool = False,
                 stop_on_error: bool = False) -> None:
        self.img = img
        self.rec = recording
        self.content = bytearray(content)
        self.flushed = bytes(content)
        self.pending: list[tuple[int, bytes]] = []
        self.sizes = {len(content)}
        self.snapshots = dict(snapshots)
        self.maybe: dict[str, SnapExpect] = {}
        self.tolerate = tolerate_errors or stop_on_error
        self.stop_on_error = stop_on_error
        self.errors: list[Qcow2Error] = []
        self._mark()

    # -- model ---------------------------------------------------------------------
    def expect(self, clean: bool = False) -> Expect:
        return Expect(self.flushed, tuple(self.pending), frozenset(self.sizes),
                      dict(self.snapshots), dict(self.maybe), clean)

    def _mark(self) -> None:
        if self.rec is not None:
            self.rec.mark(self.expect())

    def _durable(self) -> None:
        """Everything the image holds in memory is durable now."""
        self.flushed = bytes(self.content)
        self.pending.clear()
        self.sizes = {len(self.content)}
        if self.maybe:
            names = {s.name for s in self.img.snapshots}
            for name, snap in self.maybe.items():
                if name in names:
                    self.snapshots[name] = snap
        self.maybe = {}
        self._mark()

    def _failed(self, exc: Qcow2Error) -> None:
        if not isinstance(exc, Qcow2Error):
            raise exc
        self.errors.append(exc)
        if self.stop_on_error:
            raise _Stop from exc

    @property
    def size(self) -> int:
        return len(self.content)

    # -- operations ------------------------------------------------------------------
    def _data_op(self, off: int, n: int, new: bytes | None, fn: Callable[[], object]) -> bool:
        """Run an operation changing [off, off+n); new None: read the result back.
        False if it failed (tolerated)."""
        if self.tolerate and off + n > self.size:
            return False  # an earlier failure (a snapshot apply) left the disk smaller
        old = bytes(self.content[off : off + n])
        if new is not None:
            self.pending.append((off, new))
            self._mark()
        try:
            fn()
        except Qcow2Error as exc:
            if not self.tolerate:
                raise
            self._failed(exc)
            got = self.img.pread(n, off)
            if not old_or_new(got, old, new if new is not None else bytes(n)):
                raise CrashSimError(f"after a failed operation at {off:#x}+{n:#x} the image "
                                    "reads neither old nor new content") from exc
            self.pending.append((off, got))
            self.content[off : off + n] = got
            self._mark()
            return False
        if new is None:
            new = self.img.pread(n, off)
            if not old_or_new(new, old, bytes(n)):
                raise CrashSimError(f"discard at {off:#x}+{n:#x} left data that is neither old nor zero")
            self.pending.append((off, new))
            self._mark()
        self.content[off : off + n] = new
        return True

    def write(self, off: int, data: bytes) -> None:
        data = bytes(data)
        self._data_op(off, len(data), data, lambda: self.img.pwrite(data, off))

    def write_fua(self, off: int, data: bytes) -> None:
        """A write that is durable once it returns (NBD's FUA flag: `img.pwrite_fua`);
        the rest of what is pending stays pending."""
        data = bytes(data)
        if self._data_op(off, len(data), data, lambda: self.img.pwrite_fua(data, off)):
            self._durable_range(off, len(data))

    def _durable_range(self, off: int, n: int) -> None:
        """[off, off+n) reads as the model's content after any crash from now on: older
        pending writes keep only their parts outside it."""
        end = off + n
        flushed = bytearray(self.flushed)
        flushed[off:end] = self.content[off:end]
        self.flushed = bytes(flushed)
        clipped: list[tuple[int, bytes]] = []
        for o, data in self.pending:
            if o < off:
                clipped.append((o, data[: off - o]))
            if o + len(data) > end:
                clipped.append((max(o, end), data[max(0, end - o):]))
        self.pending = [(o, d) for o, d in clipped if d]
        self._mark()

    def write_compressed(self, off: int, data: bytes) -> None:
        data = bytes(data)
        self._data_op(off, len(data), data, lambda: self.img.write_compressed(off, data))

    def write_zeroes(self, off: int, n: int) -> None:
        self._data_op(off, n, bytes(n), lambda: self.img.write_zeroes(off, n))

    def discard(self, off: int, n: int) -> None:
        # discard is advisory: what it leaves is read back (it must be old or zeros)
        self._data_op(off, n, None, lambda: self.img.discard(off, n))

    def flush(self) -> None:
        try:
            self.img.flush()
        except Qcow2Error as exc:
            if not self.tolerate:
                raise
            self._failed(exc)
            return
        self._durable()

    def create_snapshot(self, name: str, vm_state: bytes = b"") -> None:
        snap = SnapExpect(bytes(self.content), bytes(vm_state))
        self.maybe[name] = snap
        self._mark()
        try:
            self.img.create_snapshot(name, vm_state or None)
        except Qcow2Error as exc:
            if not self.tolerate:
                raise
            self._failed(exc)
            self._adopt_snapshots()
            return
        self.snapshots[name] = snap
        del self.maybe[name]
        self._durable()  # create_snapshot flushes and commits

    def delete_snapshot(self, name: str) -> None:
        if self.tolerate and name not in self.snapshots:
            return  # its creation failed
        self.maybe[name] = self.snapshots.pop(name)
        self._mark()
        try:
            self.img.delete_snapshot(name)
        except Qcow2Error as exc:
            if not self.tolerate:
                raise
            self._failed(exc)
            self._adopt_snapshots()
            return
        del self.maybe[name]
        self._durable()

    def apply_snapshot(self, name: str) -> None:
        if self.tolerate and name not in self.snapshots:
            return  # its creation failed
        new = self.snapshots[name].content
        old = bytes(self.content)
        self.pending.append((0, new))
        self.sizes.add(len(new))
        self._mark()
        try:
            self.img.apply_snapshot(name)
        except Qcow2Error as exc:
            if not self.tolerate:
                raise
            self._failed(exc)
            got = self.img.pread(self.img.size, 0)
            if got not in (old, new):
                raise CrashSimError("after a failed snapshot apply the image is neither "
                                    "the old state nor the snapshot") from exc
            self.content = bytearray(got)
            self._mark()
            return
        self.content = bytearray(new)
        self._durable()

    def share_from_snapshot(self, name: str, off: int, n: int) -> None:
        """Revert [off, off+n) to the snapshot by sharing its clusters, or, where the
        mode cannot (img.share_from_snapshot says False), by writing its data (as
        convert --snapshots does)."""
        if self.tolerate and name not in self.snapshots:
            return  # its creation failed
        new = self.snapshots[name].content[off : off + n]
        img = self.img
        self._data_op(off, n, new,
                      lambda: img.share_from_snapshot(name, off, n) or img.pwrite(new, off))

    def resize(self, size: int, shrink: bool = False, preallocation: str = "off") -> None:
        """qcow2.resize.resize_image. Until it completes a crash may show the old size
        or the new one; past the new end of a shrink, old content or zeros."""
        from qcow2.resize import resize_image

        old = len(self.content)
        if size < old:
            self.pending.append((size, bytes(old - size)))
        self.sizes.add(size)
        self._mark()
        try:
            resize_image(self.img, size, shrink=shrink, preallocation=preallocation)
        except Qcow2Error as exc:
            if not self.tolerate:
                raise
            self._failed(exc)
            now = self.img.size
            got = self.img.pread(now, 0)
            keep = min(old, size)
            tail_ok = (got[old:] == bytes(now - old)) if now > old else \
                old_or_new(got[keep:], bytes(self.content[keep:now]), bytes(now - keep))
            if now not in (old, size) or got[:keep] != bytes(self.content[:keep]) or not tail_ok:
                raise CrashSimError("after a failed resize the image is neither the old "
                                    "nor the new size with its content") from exc
            self.content = bytearray(got)
            self._mark()
            return
        if size < old:
            del self.content[size:]
        else:
            self.content.extend(bytes(size - old))
        self._durable()  # resize flushes and commits with the header write

    def amend(self, **options: Any) -> None:
        """qcow2.amend.amend_image (no size change): the guest content stays as it is
        at every point, flushed by the amend."""
        from qcow2.amend import amend_image

        self._mark()
        try:
            amend_image(self.img, options)
        except Qcow2Error as exc:
            if not self.tolerate:
                raise
            self._failed(exc)
            if self.img.pread(self.size, 0) != bytes(self.content):
                raise CrashSimError("a failed amend changed the guest content") from exc
            return
        self._durable()

    def rebase(self, backing_file: str, backing_format: str | None) -> None:
        """qcow2.rebase.rebase_image, safe mode: the guest content never changes."""
        from qcow2.rebase import rebase_image

        self._mark()
        try:
            rebase_image(self.img, backing_file, backing_format)
        except Qcow2Error as exc:
            if not self.tolerate:
                raise
            self._failed(exc)
            if self.img.pread(self.size, 0) != bytes(self.content):
                raise CrashSimError("a failed rebase changed the guest content") from exc
            return
        self._durable()

    def check_repair(self, repair: str = "all") -> Any:
        try:
            res = self.img.check(repair=repair)
        except Qcow2Error as exc:
            if not self.tolerate:
                raise
            self._failed(exc)
            return None
        if self.tolerate and res.failure is not None:
            # check reports I/O errors in its result (as qemu-img check does)
            self._failed(CheckFailed(res))
            return res
        if res.corruptions or res.check_errors:
            raise CrashSimError(f"check -r {repair} left corruptions: {res.to_dict()}")
        self._durable()
        return res

    def _adopt_snapshots(self) -> None:
        """After a failed snapshot operation, the image's own list is the truth; any
        listed snapshot must be intact (checked at the end), so keep them in the model."""
        names = {s.name for s in self.img.snapshots}
        for name in list(self.maybe):
            if name in names:
                self.snapshots[name] = self.maybe[name]
        for name in list(self.snapshots):
            if name not in names:
                self.maybe[name] = self.snapshots.pop(name)
        self._mark()

    def verify_live(self) -> None:
        """The open image reads back what the model says it holds."""
        got = self.img.pread(self.img.size, 0)
        if got != bytes(self.content):
            bad = next(i for i in range(min(len(got), len(self.content)))
                       if got[i] != self.content[i]) if len(got) == len(self.content) else -1
            raise CrashSimError(f"live image differs from the model (first at {bad:#x})")


# ------------------------------------------------------------------------- qemu --
def qemu_check(path: str | Path) -> dict[str, Any]:
    p = subprocess.run([QEMU_IMG, "check", "--output=json", str(path)],
                       capture_output=True, text=True)
    try:
        rep = json.loads(p.stdout)
    except json.JSONDecodeError:
        rep = {"stdout": p.stdout}
    rep["returncode"] = p.returncode
    rep["stderr"] = p.stderr[-2000:]
    return rep


def qemu_raw(path: str | Path, snapshot: str | None = None) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "raw")
        args = [QEMU_IMG, "convert", "-U", "-O", "raw"]
        if snapshot is not None:
            args += ["-l", f"snapshot.name={snapshot}"]
        subprocess.run([*args, str(path), out], check=True, capture_output=True)
        with open(out, "rb") as f:
            return f.read()


def qemu_snapshot_names(path: str | Path) -> list[str]:
    p = subprocess.run([QEMU_IMG, "info", "-U", "--output=json", str(path)],
                       capture_output=True, text=True, check=True)
    return [s["name"] for s in json.loads(p.stdout).get("snapshots", [])]


# ------------------------------------------------------------------------- record --
@dataclass
class Run:
    """A recorded workload: the file it started from and the operation log."""

    name: str
    path: Path  # the base image (its directory holds backing files)
    base: bytes
    ops: list[Op]
    final: Expect
    stats: dict[str, int]  # img.stats at the end of the workload (before close)
    # extra checks of each crash state (state, image opened on it), from the workload
    verify: Callable[[Any, Any], None] | None = None

    @property
    def writes(self) -> int:
        return sum(1 for o in self.ops if o.kind in (WRITE, TRUNCATE))

    @property
    def syncs(self) -> int:
        return sum(1 for o in self.ops if o.kind == SYNC)


def initial_model(path: Path) -> tuple[bytes, dict[str, SnapExpect]]:
    """Guest content and snapshots of an image, as our library reads them, checked
    against QEMU's reading (QEMU 7.2 reads a snapshot with the active disk's size, so
    only that much of a snapshot can be compared)."""
    snaps: dict[str, SnapExpect] = {}
    with qcow2.open(path) as img:
        content = img.pread(img.size, 0)
        for s in img.snapshots:
            view = img.snapshot(s.name)
            snaps[s.name] = SnapExpect(view.pread(view.size, 0), img.read_vm_state(s.name))
        mode = img.refcount_mode
    if mode != "standard":  # QEMU reads a standard copy
        copy = path.with_name(f".std-{path.name}")
        shutil.copyfile(path, copy)
        _to_standard(copy)
        try:
            initial_model(copy)  # QEMU agrees with us on the copy...
        finally:
            copy.unlink()
        return content, snaps  # ...and our reading of the original is the same
    if qemu_raw(path) != content:
        raise CrashSimError(f"{path}: QEMU and our library read different guest data")
    if sorted(qemu_snapshot_names(path)) != sorted(snaps):
        raise CrashSimError(f"{path}: QEMU and our library list different snapshots")
    for name, snap in snaps.items():
        q = qemu_raw(path, name)
        if q[: len(snap.content)] != snap.content[: len(q)]:
            raise CrashSimError(f"{path}: QEMU and our library read snapshot {name!r} differently")
    return content, snaps


def record(name: str, path: Path, workload: Callable[[Driver], None],
           model: tuple[bytes, dict[str, SnapExpect]] | None = None,
           **open_options: Any) -> Run:
    """Run workload on (an in-memory copy of) the image at path, recording its I/O."""
    base = path.read_bytes()
    content, snaps = model if model is not None else initial_model(path)
    rec = Recording()
    mem = MemoryBackend(base, path=str(path))
    img = qcow2.open(path, "r+", backend=RecordingBackend(mem, rec), **open_options)
    try:
        d = Driver(img, rec, content, snaps)
        workload(d)
        d.verify_live()
        stats = img.stats.as_dict()
    except BaseException:
        img._abandon()
        raise
    img.close()
    final = Expect(bytes(d.content), (), frozenset({len(d.content)}), dict(d.snapshots), {}, True)
    rec.mark(final)
    return Run(name, path, base, rec.ops, final, stats)


# ------------------------------------------------------------------- crash states --
@dataclass
class CrashState:
    run: Run
    point: int  # crash after this many operations of the log
    mode: str  # "prefix", "writes" (subset of whole writes) or "sectors" (torn writes)
    seed: int
    data: bytearray
    expect: Expect

    @property
    def label(self) -> str:
        return f"{self.run.name}@{self.point}/{len(self.run.ops)}:{self.mode}:{self.seed}"


def _apply(buf: bytearray, op: Op) -> None:
    if op.kind == WRITE:
        end = op.offset + len(op.data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[op.offset : end] = op.data
    elif op.kind == TRUNCATE:
        if op.offset < len(buf):
            del buf[op.offset :]
        else:
            buf.extend(bytes(op.offset - len(buf)))


def _sectors(op: Op) -> list[Op]:
    """A write split into the 512-byte sectors it touches (each may persist alone)."""
    if op.kind != WRITE:
        return [op]
    out = []
    pos = op.offset
    end = op.offset + len(op.data)
    while pos < end:
        stop = min(end, (pos // SECTOR + 1) * SECTOR)
        out.append(Op(WRITE, pos, op.data[pos - op.offset : stop - op.offset]))
        pos = stop
    return out


def plan_states(run: Run, budget: int, seed: int) -> list[tuple[int, str, int]]:
    """(crash point, mode, seed) of the states to build: every prefix when they fit in
    half the budget (else a seeded sample), and the rest as random subsets of the
    unsynced writes at seeded crash points, favouring the points just before a sync."""
    rng = random.Random(seed)
    ops = run.ops
    points = [i + 1 for i, o in enumerate(ops) if o.kind in (WRITE, TRUNCATE)]
    plan: list[tuple[int, str, int]] = [(0, "prefix", 0)]
    if len(points) <= budget // 2:
        chosen = points
    else:
        chosen = sorted(rng.sample(points, budget // 2))
    plan += [(p, "prefix", 0) for p in chosen]
    # crash points with unsynced writes
    unsynced: list[int] = []
    before_sync: list[int] = []
    pending = 0
    for i, o in enumerate(ops):
        if o.kind in (WRITE, TRUNCATE):
            pending += 1
            if pending >= 2:
                unsynced.append(i + 1)
        elif o.kind == SYNC:
            if pending >= 2:
                before_sync.append(i)
            pending = 0
    rest = budget - len(plan)
    if unsynced and rest > 0:
        for _ in range(rest):
            pool = before_sync if before_sync and rng.random() < 0.6 else unsynced
            p = rng.choice(pool)
            plan.append((p, rng.choice(("writes", "sectors")), rng.randrange(1 << 30)))
    plan.append((len(ops), "prefix", 0))  # the clean close
    return sorted(set(plan))


def crash_states(run: Run, plan: list[tuple[int, str, int]]) -> Iterator[CrashState]:
    """Build the planned states in one pass over the log (memory: one durable copy)."""
    durable = bytearray(run.base)
    volatile: list[Op] = []
    # before the first mark (opening may write): the model as the workload started
    expect: Expect = next(o.payload for o in run.ops if o.kind == MARK)
    it = iter(plan)
    nxt = next(it, None)
    for i in range(len(run.ops) + 1):
        while nxt is not None and nxt[0] == i:
            point, mode, s = nxt
            buf = bytearray(durable)
            if mode == "prefix":
                for op in volatile:
                    _apply(buf, op)
            else:
                rng = random.Random(s)
                pieces = [p for op in volatile for p in (_sectors(op) if mode == "sectors" else [op])]
                keep = rng.uniform(0.1, 0.9)
                for op in pieces:
                    if rng.random() < keep:
                        _apply(buf, op)
            yield CrashState(run, point, mode, s, buf, expect)
            nxt = next(it, None)
        if i == len(run.ops):
            break
        op = run.ops[i]
        if op.kind == MARK:
            expect = op.payload
        elif op.kind == SYNC:
            for v in volatile:
                _apply(durable, v)
            volatile = []
        else:
            volatile.append(op)


# ------------------------------------------------------------------------ checking --
def header_states(run: Run, cluster_size: int, limit: int = 10) -> Iterator[CrashState]:
    """Exhaustive torn writes of cluster 0: at every sync that follows writes to it,
    every subset of the sectors of cluster 0 written since the previous sync (up to
    2**limit), with the other unsynced writes all kept and all lost."""
    durable = bytearray(run.base)
    volatile: list[Op] = []
    expect: Expect = next(o.payload for o in run.ops if o.kind == MARK)
    for i, op in enumerate(run.ops):
        if op.kind == MARK:
            expect = op.payload
        elif op.kind != SYNC:
            volatile.append(op)
            continue
        pieces = [p for v in volatile for p in _sectors(v)]
        head = [p for p in pieces if p.kind == WRITE and p.offset < cluster_size]
        rest = [p for p in pieces if not (p.kind == WRITE and p.offset < cluster_size)]
        if head:
            k = min(len(head), limit)
            for others in ((), rest) if rest else ((),):
                for mask in range(1 << k):
                    buf = bytearray(durable)
                    for p in (*others, *(h for j, h in enumerate(head) if mask >> j & 1)):
                        _apply(buf, p)
                    yield CrashState(run, i, "sectors", mask, buf, expect)
        for v in volatile:
            _apply(durable, v)
        volatile = []


def check_with_library(state: CrashState) -> Any:
    """Open the state with our library and compare it with the model; returns our
    check's result. Raises CrashSimError on any violation."""
    path = state.run.path
    try:
        img = qcow2.open(path, "r", backend=MemoryBackend(state.data, path=str(path)))
    except Qcow2Error as exc:
        raise CrashSimError(f"{state.label}: our library cannot open the crash state: {exc}") from exc
    try:
        with img:
            return _compare(state, img)
    except Qcow2Error as exc:
        raise CrashSimError(f"{state.label}: our library fails on the crash state: {exc}") from exc


def _compare(state: CrashState, img: Any) -> Any:
    e = state.expect
    if img.size not in e.sizes:
        raise CrashSimError(f"{state.label}: virtual size {img.size} not in {set(e.sizes)}")
    bad = first_bad_byte(img.pread(img.size, 0), e)
    if bad >= 0:
        raise CrashSimError(f"{state.label}: guest byte {bad:#x} is neither flushed nor "
                            "newly written content")
    names = {s.name for s in img.snapshots}
    for name in e.snapshots:
        if name not in names:
            raise CrashSimError(f"{state.label}: completed snapshot {name!r} is missing")
    for name in names:
        snap = e.snapshots.get(name) or e.maybe.get(name)
        if snap is None:
            raise CrashSimError(f"{state.label}: unexpected snapshot {name!r}")
        view = img.snapshot(name)
        if view.size != len(snap.content) or view.pread(view.size, 0) != snap.content:
            raise CrashSimError(f"{state.label}: snapshot {name!r} content differs")
        if snap.vm_state and img.read_vm_state(name) != snap.vm_state:
            raise CrashSimError(f"{state.label}: snapshot {name!r} VM state differs")
    if state.run.verify is not None:
        state.run.verify(state, img)
    res = img.check()
    if res.corruptions or res.check_errors or (e.clean and res.leaks):
        raise CrashSimError(f"{state.label}: our check: {res.to_dict()} {res.messages[:5]}")
    return res


def check_writable(state: CrashState) -> None:
    """The state opens read-write, takes a write, closes; a leak repair then leaves it
    clean (crash leftovers are leaks only)."""
    path = state.run.path
    mem = MemoryBackend(state.data, path=str(path))
    try:
        with qcow2.open(path, "r+", backend=mem) as img:
            img.pwrite(b"\xa5" * 4096, 0)
            res = img.check(repair="leaks")
    except Qcow2Error as exc:
        raise CrashSimError(f"{state.label}: read-write open/write/repair failed: {exc}") from exc
    if res.exit_code != 0:
        raise CrashSimError(f"{state.label}: not clean after check -r leaks: {res.to_dict()}")


def qemu_verdicts(states: list[CrashState], workdir: Path, convert_every: int = 4,
                  jobs: int = 2) -> None:
    """qemu-img check each state (exit 0, or 3 = leaks only; no corruption); for every
    convert_every-th one also compare QEMU's reading of the guest with the model."""
    paths = []
    for n, st in enumerate(states):
        # in the base image's directory so relative backing file names resolve
        p = st.run.path.parent / f".crash-{os.getpid()}-{n}.qcow2"
        p.write_bytes(st.data)
        paths.append(p)

    def one(n: int) -> str | None:
        st, p = states[n], paths[n]
        try:
            _to_standard(p)
        except Qcow2Error as exc:
            return f"{st.label}: conversion to standard for QEMU failed: {exc}"
        rep = qemu_check(p)
        if rep["returncode"] not in (0, 3) or rep.get("corruptions", 0) or rep.get("check-errors", 0):
            return f"{st.label}: qemu-img check: {rep}"
        if st.expect.clean and (rep["returncode"] != 0 or rep.get("leaks", 0)):
            return f"{st.label}: leaks after a clean close: {rep}"
        if convert_every and n % convert_every == 0:
            got = qemu_raw(p)
            bad = first_bad_byte(got, st.expect) if len(got) in st.expect.sizes else 0
            if bad >= 0:
                return f"{st.label}: QEMU reads guest byte {bad:#x} as neither old nor new content"
        return None

    try:
        with ThreadPoolExecutor(jobs) as ex:
            errors = [r for r in ex.map(one, range(len(states))) if r]
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
    if errors:
        raise CrashSimError(f"{len(errors)} states failed; first: {errors[0]}")


def to_mode(path: Path, mode: str) -> None:
    """Convert a (QEMU-made) v3 image to a refcount mode with our library; v2 images
    stay standard (the modes need compat 1.1)."""
    with qcow2.open(path, "r", backing=False) as img:
        if img.header.version < 3 or img.refcount_mode == mode:
            return
    with qcow2.open(path, "r+", backing=False) as img:
        img.set_refcount_mode(mode)


def _to_standard(path: Path) -> None:
    """QEMU reads standard images only: a state in another refcount mode is converted
    (by our library, which is part of what is checked) before qemu-img sees it."""
    with qcow2.open(path, "r", backing=False) as img:
        if img.refcount_mode == "standard":
            return
    with qcow2.open(path, "r+", backing=False) as img:
        img.set_refcount_mode("standard")


@dataclass
class Report:
    states: int = 0
    qemu_checked: int = 0
    writable_checked: int = 0
    leaky: int = 0
    modes: dict[str, int] = field(default_factory=dict)


def simulate(run: Run, budget: int, seed: int, qemu_fraction: float = 0.5,
             writable_fraction: float = 0.1, batch: int = 32) -> Report:
    """Build and check the planned crash states of a run; raises CrashSimError."""
    rng = random.Random(seed ^ 0x5EED)
    rep = Report()
    qbatch: list[CrashState] = []
    for st in crash_states(run, plan_states(run, budget, seed)):
        res = check_with_library(st)
        rep.states += 1
        rep.modes[st.mode] = rep.modes.get(st.mode, 0) + 1
        rep.leaky += bool(res.leaks)
        if st.expect.clean or rng.random() < qemu_fraction:
            qbatch.append(st)
        if rng.random() < writable_fraction:
            check_writable(st)
            rep.writable_checked += 1
        if len(qbatch) >= batch:
            qemu_verdicts(qbatch, run.path)
            rep.qemu_checked += len(qbatch)
            qbatch = []
    if qbatch:
        qemu_verdicts(qbatch, run.path)
        rep.qemu_checked += len(qbatch)
    return rep


def state_budget(default: int, workloads: int = 1) -> int:
    """States per workload: QCOW2_CRASH_STATES sets the total over all workloads."""
    total = os.environ.get("QCOW2_CRASH_STATES")
    if total:
        return max(8, int(total) // max(1, workloads))
    return default


# ------------------------------------------------------------------------ workloads --
def qemu_img(*args: str) -> None:
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)


def random_image(path: Path, size: int, seed: int, *, opts: str = "", compress: bool = False,
                 fill: float = 1.0) -> None:
    """A qcow2 image whose guest data is random (fill: fraction of 64K chunks written)."""
    rng = random.Random(seed)
    raw = path.with_suffix(".raw")
    data = bytearray(size)
    for pos in range(0, size, 65536):
        if rng.random() < fill:
            data[pos : pos + 65536] = rng.randbytes(min(65536, size - pos))
    raw.write_bytes(data)
    args = ["convert", "-f", "raw", "-O", "qcow2"]
    if compress:
        args.append("-c")
    if opts:
        args += ["-o", opts]
    qemu_img(*args, str(raw), str(path))
    raw.unlink()


def _sizes(rng: random.Random, size: int, cluster: int) -> tuple[int, int]:
    n = rng.choice([1, 511, 4096, cluster // 2 + 3, cluster, 2 * cluster + 1000, 5 * cluster])
    off = rng.randrange(0, size)
    if rng.random() < 0.4:
        off -= off % cluster
    return off, max(1, min(n, size - off))


@dataclass
class Workload:
    name: str
    setup: Callable[[Path], Path]
    body: Callable[[Driver, random.Random], None]
    weight: float = 1.0  # share of the state budget (slow-to-check images get less)
    open_options: dict[str, Any] = field(default_factory=dict)  # for qcow2.open
    verify: Callable[[Any, Any], None] | None = None  # extra check of each crash state

    def record(self, directory: Path, seed: int = 1, mode: str = "standard") -> Run:
        """Set up (QEMU-made images are converted to the refcount mode by our library,
        where the mode allows it), then run and record the body."""
        directory.mkdir(parents=True, exist_ok=True)
        path = self.setup(directory)
        model = initial_model(path)  # QEMU's reading, before any conversion
        to_mode(path, mode)
        run = record(self.name, path, lambda d: self.body(d, random.Random(seed)),
                     model, **self.open_options)
        run.verify = self.verify
        return run


def _random_writes(d: Driver, rng: random.Random, n: int, cluster: int, flush_every: int) -> None:
    for i in range(n):
        off, k = _sizes(rng, d.size, cluster)
        d.write(off, rng.randbytes(k))
        if flush_every and i % flush_every == flush_every - 1:
            d.flush()


def _setup_alloc(tmp: Path) -> Path:
    p = tmp / "alloc.qcow2"
    qcow2.create(p, 4 << 20, cluster_size=4096)
    return p


def _body_alloc(d: Driver, rng: random.Random) -> None:
    _random_writes(d, rng, 28, 4096, 7)
    d.write(0, rng.randbytes(3000))  # unflushed at close


def _setup_extl2(tmp: Path) -> Path:
    p = tmp / "extl2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=32k,extended_l2=on", str(p), "4M")
    return p


def _body_extl2(d: Driver, rng: random.Random) -> None:
    _random_writes(d, rng, 20, 32768, 5)
    d.write_zeroes(1 << 20, 40000)
    d.discard(0, 1 << 20)
    d.flush()
    _random_writes(d, rng, 6, 32768, 0)


def _setup_cow_backing(tmp: Path) -> Path:
    rng = random.Random(7)
    raw = tmp / "backing.raw"
    raw.write_bytes(rng.randbytes(3 << 20))
    p = tmp / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k", "-b", "backing.raw",
             "-F", "raw", str(p))
    return p


def _body_partial_cow(d: Driver, rng: random.Random) -> None:
    for i in range(24):
        off = rng.randrange(0, d.size - 20000)
        d.write(off, rng.randbytes(rng.choice([1, 700, 4096, 9000])))
        if i % 6 == 5:
            d.flush()
    d.write(d.size - 5, b"tail!")


def _setup_cow_compressed(tmp: Path) -> Path:
    p = tmp / "compressed.qcow2"
    random_image(p, 2 << 20, 11, opts="cluster_size=16k", compress=True, fill=0.8)
    return p


def _body_snapshot_tree(d: Driver, rng: random.Random) -> None:
    """Deletes with one and with several children (owner mode hides the node, then
    reclaims it when one child is left), applies that make siblings."""
    d.write(3000, rng.randbytes(40000))
    d.create_snapshot("a")
    _random_writes(d, rng, 5, 16384, 3)
    d.create_snapshot("b", rng.randbytes(20000))
    d.apply_snapshot("a")
    _random_writes(d, rng, 4, 16384, 2)
    d.delete_snapshot("a")  # children b and the live state
    d.write(1 << 19, rng.randbytes(20000))
    d.delete_snapshot("b")  # a hidden "a" now has one child left
    d.create_snapshot("c")
    d.write(100, rng.randbytes(5000))
    d.apply_snapshot("c")
    d.delete_snapshot("c")  # one child: the live state
    d.write(0, rng.randbytes(300))


def _setup_snapshotted(tmp: Path) -> Path:
    p = tmp / "snapshotted.qcow2"
    random_image(p, 4 << 20, 13, opts="cluster_size=8k", fill=0.9)
    qemu_img("snapshot", "-c", "base", str(p))
    return p


def _body_after_snapshot(d: Driver, rng: random.Random) -> None:
    _random_writes(d, rng, 30, 8192, 6)
    d.write(8192 * 7 + 100, rng.randbytes(50))


def _setup_data(tmp: Path) -> Path:
    p = tmp / "data.qcow2"
    random_image(p, 4 << 20, 17, opts="cluster_size=16k", fill=0.9)
    return p


def _body_zeroes(d: Driver, rng: random.Random) -> None:
    for i in range(14):
        off, k = _sizes(rng, d.size, 16384)
        d.write_zeroes(off, k)
        if i % 4 == 3:
            d.flush()
        if i % 3 == 0:
            off, k = _sizes(rng, d.size, 16384)
            d.write(off, rng.randbytes(k))
    d.write_zeroes(0, d.size)


def _body_discard(d: Driver, rng: random.Random) -> None:
    for i in range(16):
        off, k = _sizes(rng, d.size, 16384)
        if i % 2:
            d.discard(off, k)
        else:
            d.write(off, rng.randbytes(k))
        if i % 5 == 4:
            d.flush()  # discarded clusters are free (and reused) only after this
    d.discard(0, d.size // 2)
    _random_writes(d, rng, 6, 16384, 3)


def _setup_reftable(tmp: Path) -> Path:
    # 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB and the
    # first refcount table 2 MiB of file, so writing 3 MiB grows the table
    p = tmp / "tiny.qcow2"
    qcow2.create(p, 4 << 20, cluster_size=512, refcount_bits=64)
    return p


def _body_reftable(d: Driver, rng: random.Random) -> None:
    for i in range(48):
        d.write(i * 65536, rng.randbytes(65536))
        if i % 12 == 11:
            d.flush()
    d.write(3 << 20, rng.randbytes(70000))


def _setup_l1_growth(tmp: Path) -> Path:
    # 512-byte clusters: an L1 entry covers 32 KiB. "small" has a 512 KiB disk (16 L1
    # entries, one cluster), "big" a 2.5 MiB one (80 entries, two clusters); applying
    # "big" grows the L1 table.
    p = tmp / "l1.qcow2"
    rng = random.Random(19)
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", str(p), "512K")
    with qcow2.open(p, "r+") as img:
        img.pwrite(rng.randbytes(512 << 10), 0)
    qemu_img("snapshot", "-c", "small", str(p))
    qemu_img("resize", str(p), "2560K")
    with qcow2.open(p, "r+") as img:
        img.pwrite(rng.randbytes(1 << 20), 1 << 20)
    qemu_img("snapshot", "-c", "big", str(p))
    qemu_img("snapshot", "-a", "small", str(p))
    return p


def _body_l1_growth(d: Driver, rng: random.Random) -> None:
    d.write(1000, rng.randbytes(5000))
    d.apply_snapshot("big")
    d.write(2 << 20, rng.randbytes(40000))
    d.flush()
    d.write(100, rng.randbytes(100))
    d.apply_snapshot("small")
    d.write(0, rng.randbytes(2000))


def _body_snapshots(d: Driver, rng: random.Random) -> None:
    d.write(5000, rng.randbytes(20000))
    d.create_snapshot("a", rng.randbytes(70000))
    _random_writes(d, rng, 6, 16384, 3)
    d.create_snapshot("b")
    _random_writes(d, rng, 4, 16384, 0)
    d.apply_snapshot("a")
    d.write(1 << 20, rng.randbytes(30000))
    d.delete_snapshot("b")
    _random_writes(d, rng, 3, 16384, 0)
    d.flush()
    d.delete_snapshot("a")
    d.write(0, rng.randbytes(100))


def _body_share(d: Driver, rng: random.Random) -> None:
    """Ranges reverted to a snapshot by sharing its clusters: the parent (shared in
    every mode) and a grandparent (copied in owner mode), then written over (copied on
    write), the snapshots deleted under them."""
    cs = 16384
    d.create_snapshot("a")
    _random_writes(d, rng, 5, cs, 0)
    d.write(0, rng.randbytes(12 * cs))
    d.create_snapshot("b")
    d.write(cs, rng.randbytes(20 * cs))
    d.share_from_snapshot("b", 2 * cs, 6 * cs)
    d.share_from_snapshot("a", 10 * cs, 4 * cs)
    d.flush()
    d.write(3 * cs + 100, rng.randbytes(cs))
    d.share_from_snapshot("a", 0, 3 * cs)
    d.delete_snapshot("a")
    d.share_from_snapshot("b", 16 * cs, 8 * cs)
    d.flush()
    d.delete_snapshot("b")
    d.write(17 * cs, rng.randbytes(5000))


def _setup_leaky(tmp: Path) -> Path:
    """An image with leaked clusters inside the file (data written to reserved clusters,
    never referenced: what a crash leaves)."""
    p = tmp / "leaky.qcow2"
    random_image(p, 2 << 20, 23, opts="cluster_size=8k", fill=0.5)
    img = qcow2.open(p, "r+")
    img.flush()
    for i in range(12):
        img.pwrite(b"\x77" * 8192, (1 << 20) + i * 8192)
    img._abandon()  # no flush, no close: the L2 update never reaches the file
    return p


def _body_check(d: Driver, rng: random.Random) -> None:
    d.check_repair("all")
    _random_writes(d, rng, 8, 8192, 4)
    d.check_repair("leaks")
    d.write(4096, rng.randbytes(9000))


def _setup_compressed_target(tmp: Path) -> Path:
    # sixteen L2 tables, four cached (the least the library keeps; see the workload):
    # reachable tables are written back on eviction, between flushes
    p = tmp / "ctarget.qcow2"
    qcow2.create(p, 32 << 20, cluster_size=4096)
    return p


def _compressible(rng: random.Random, n: int) -> bytes:
    """Data that compresses to a fraction of n (a varying share: packed clusters cross
    host cluster boundaries now and then)."""
    noise = rng.randbytes(rng.randrange(n // 16, n // 2))
    return (noise + bytes([rng.randrange(256)]) * n)[:n]


def _body_compressed(d: Driver, rng: random.Random) -> None:
    """Compressed clusters packed into shared host clusters (refcounts above 1 that must
    be durable before the L2 entries), then freed in part, overwritten and copied."""
    cs = 4096
    order = rng.sample(range(d.size // cs), 64)
    for i, c in enumerate(order[:40]):
        d.write_compressed(c * cs, _compressible(rng, cs))
        if i % 13 == 12:
            d.flush()
    d.discard(order[3] * cs, cs)  # one reference of a shared host cluster goes
    d.write(order[5] * cs + 100, rng.randbytes(300))  # copy-on-write from compressed
    d.flush()
    for c in order[40:52]:  # packing restarts after the flush: clusters freed meanwhile
        d.write_compressed(c * cs, _compressible(rng, cs))
    d.write(order[41] * cs, rng.randbytes(cs))


def _body_mode_switch(d: Driver, rng: random.Random) -> None:
    """Writes around in-place conversions through every other refcount mode and back."""
    from qcow2.modes import MODES

    first = d.img.refcount_mode
    cs = d.img.cluster_size
    _random_writes(d, rng, 12, cs, 4)
    for other in [m for m in MODES if m != first]:
        d.flush()
        d.img.set_refcount_mode(other)
        _random_writes(d, rng, 8, cs, 4)
    d.flush()
    d.img.set_refcount_mode(first)
    _random_writes(d, rng, 6, cs, 3)


def _setup_resize(tmp: Path) -> Path:
    # 512-byte clusters: an L1 entry covers 32 KiB, an L1 cluster 2 MiB of disk, so
    # growing from 1 MiB to 3 MiB moves the L1 table to a larger home
    p = tmp / "resize.qcow2"
    random_image(p, 1 << 20, 29, opts="cluster_size=512", fill=0.7)
    return p


def _body_resize(d: Driver, rng: random.Random) -> None:
    d.write(1000, rng.randbytes(3000))
    d.resize(3 << 20)  # L1 growth
    d.write((2 << 20) + 777, rng.randbytes(40000))
    d.flush()
    d.resize((1 << 20) + 1536, shrink=True)  # discards, L2 tables dropped, tail zeroed
    d.write(1 << 20, rng.randbytes(1000))
    d.resize(2 << 20)
    d.resize((2 << 20) + 65536, preallocation="metadata")
    d.write((2 << 20) + 100, rng.randbytes(700))


def _setup_amend(tmp: Path) -> Path:
    rng = random.Random(31)
    raw = tmp / "amend-backing.raw"
    raw.write_bytes(rng.randbytes(2 << 20))
    p = tmp / "amend.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k", "-b", "amend-backing.raw",
             "-F", "raw", str(p))
    qemu_img("snapshot", "-c", "base", str(p))
    return p


def _body_amend(d: Driver, rng: random.Random) -> None:
    d.write(5000, rng.randbytes(40000))
    d.write_zeroes(1 << 20, 5 * 16384)  # zero flags over the backing file
    d.flush()
    d.write(300000, rng.randbytes(20000))
    d.write_zeroes(300000, 16384)  # a zero flag that keeps its cluster
    d.amend(compat=2)  # zero clusters expanded, then the v2 header
    d.write(1 << 19, rng.randbytes(9000))
    d.amend(compat=3, lazy_refcounts=True)
    d.write_zeroes(0, 16384)
    d.amend(lazy_refcounts=False)
    d.amend(refcount_bits=4)  # new refcount structures, one header switch
    d.write(200000, rng.randbytes(30000))
    d.amend(refcount_bits=64)
    d.write(7, rng.randbytes(7))


def _setup_rebase(tmp: Path) -> Path:
    rng = random.Random(37)
    old = rng.randbytes(2 << 20)
    (tmp / "old.raw").write_bytes(old)
    new = bytearray(old)
    for i in range(0, len(new), 5 * 16384):  # every fifth cluster differs
        new[i : i + 700] = rng.randbytes(700)
    new[1 << 20 : (1 << 20) + 65536] = bytes(65536)
    (tmp / "new.raw").write_bytes(bytes(new))
    p = tmp / "rebase.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k", "-b", "old.raw", "-F", "raw",
             str(p))
    return p


def _body_rebase(d: Driver, rng: random.Random) -> None:
    d.write(3000, rng.randbytes(20000))
    d.write_zeroes(1 << 19, 32768)
    d.flush()
    d.write(900000, rng.randbytes(5000))
    d.rebase("new.raw", "raw")  # differing clusters copied, then the header switch
    d.write(1 << 20, rng.randbytes(3000))
    d.rebase("", None)  # flattened
    d.write(100, rng.randbytes(100))


def _setup_bitmaps(tmp: Path) -> Path:
    # 512-byte clusters: a bitmap data cluster covers 2 MiB at granularity 512, so the
    # 4 MiB disk has two per bitmap, and growing it moves the bitmap tables
    p = tmp / "bitmaps.qcow2"
    random_image(p, 4 << 20, 31, opts="cluster_size=512", fill=0.5)
    qemu_img("bitmap", "--add", "-g", "512", str(p), "fine")
    qemu_img("bitmap", "--add", "-g", "64k", str(p), "b0")
    qemu_img("bitmap", "--add", "--disable", str(p), "off")
    return p


def _body_bitmaps(d: Driver, rng: random.Random) -> None:
    _random_writes(d, rng, 8, 512, 4)
    d.write_zeroes(1 << 20, 70000)
    d.discard(3 << 20, 1 << 20)
    d.flush()
    d.resize(6 << 20)  # every bitmap table grows (and moves)
    d.write((5 << 20) + 100, rng.randbytes(3000))
    d.flush()
    d.create_snapshot("s")
    d.write(0, rng.randbytes(600))
    d.apply_snapshot("s")  # the whole disk is dirty
    d.write(4096, rng.randbytes(5000))  # unflushed at close


# an extension unknown to QEMU and to us: QEMU keeps it after the bitmaps extension,
# so removing the last bitmap moves it (a change of more than one sector of cluster 0)
OTHER_EXT = (0x7E57E7E0, b"kept verbatim, whatever happens to the bitmaps" * 3)


def _setup_bitmap_admin(tmp: Path) -> Path:
    from qcow2.header import set_extension

    p = tmp / "admin.qcow2"
    # 64 KiB clusters: QEMU writes its feature name table (not with 4 KiB ones), so the
    # extensions span two sectors and the bitmaps extension straddles them
    random_image(p, 2 << 20, 37, fill=0.5)
    # a backing file name too long to share the first sector with the extensions: the
    # intermediate layout of a switch copies it to the end of cluster 0 first
    base = "base-" + "x" * 230 + ".qcow2"
    qemu_img("create", "-f", "qcow2", str(tmp / base), str(2 << 20))
    qemu_img("rebase", "-u", "-b", base, "-F", "qcow2", str(p))
    with qcow2.open(p, "r+") as img:
        set_extension(img, *OTHER_EXT)
    qemu_img("bitmap", "--add", str(p), "old")  # (QEMU puts the bitmaps before it)
    return p


def _body_bitmap_admin(d: Driver, rng: random.Random) -> None:
    img = d.img
    img.remove_bitmap("old")  # the last one: the extension goes
    img.add_bitmap("a", 4096)  # a new extension
    d.write(rng.randrange(0, d.size - 9000), rng.randbytes(9000))
    img.add_bitmap("b", 65536, disabled=True)  # a new directory
    img.merge_bitmap("b", "a")
    img.clear_bitmap("a")
    img.enable_bitmap("b")
    d.write(0, rng.randbytes(5000))
    d.flush()
    img.disable_bitmap("a")
    img.remove_bitmap("a")
    d.write(70000, rng.randbytes(100))


def _verify_bitmap_admin(state: Any, img: Any) -> None:
    """Every state lists a subset of the bitmaps the workload had, each readable, and
    keeps the other extension."""
    if (OTHER_EXT[0], OTHER_EXT[1]) not in [(e.type, e.data) for e in
                                            img.layout.unknown_extensions]:
        raise CrashSimError(f"{state.label}: the unknown header extension is lost")
    for b in img.bitmaps:
        if b.name not in ("old", "a", "b"):
            raise CrashSimError(f"{state.label}: unexpected bitmap {b.name!r}")
        if not b.in_use:
            list(img.dirty_ranges(b.name))


def _verify_bitmaps(state: Any, img: Any) -> None:
    """No bitmap is lost; one not in use has every granule set whose content differs
    from the start of the workload (a disabled one none)."""
    names = {b.name: b for b in img.bitmaps}
    if set(names) != {"fine", "b0", "off"}:
        raise CrashSimError(f"{state.label}: bitmaps {sorted(names)}")
    base = qcow2.open(state.run.path, "r", backend=MemoryBackend(state.run.base))
    with base:
        old = base.pread(base.size, 0)
    cur = img.pread(img.size, 0)
    n = max(len(old), len(cur))
    a = np.frombuffer(old + bytes(n - len(old)), np.uint8)
    b = np.frombuffer(cur + bytes(n - len(cur)), np.uint8)
    changed = a[: len(cur)] != b[: len(cur)]
    for name, ent in names.items():
        if ent.in_use:
            continue
        dirty = np.zeros(len(cur), dtype=bool)
        for off, k in img.dirty_ranges(name):
            dirty[off : off + k] = True
        if name == "off" and dirty.any():
            raise CrashSimError(f"{state.label}: the disabled bitmap has dirty bits")
        if name != "off" and (changed & ~dirty).any():
            bad = int(np.flatnonzero(changed & ~dirty)[0])
            raise CrashSimError(f"{state.label}: bitmap {name!r} misses changed byte {bad:#x}")


WORKLOADS: list[Workload] = [
    Workload("allocating-writes", _setup_alloc, _body_alloc),
    Workload("extended-l2", _setup_extl2, _body_extl2),
    Workload("partial-cow-backing", _setup_cow_backing, _body_partial_cow),
    Workload("partial-cow-compressed", _setup_cow_compressed, _body_partial_cow),
    Workload("writes-after-snapshot", _setup_snapshotted, _body_after_snapshot),
    Workload("write-zeroes", _setup_snapshotted, _body_zeroes),
    Workload("discard", _setup_data, _body_discard),
    Workload("reftable-growth", _setup_reftable, _body_reftable, weight=0.7),
    Workload("l1-growth", _setup_l1_growth, _body_l1_growth, weight=0.6),
    Workload("snapshots", _setup_data, _body_snapshots),
    Workload("snapshot-tree", _setup_data, _body_snapshot_tree, weight=0.6),
    Workload("check-repair", _setup_leaky, _body_check),
    Workload("share-from-snapshot", _setup_data, _body_share, weight=0.5),
    Workload("compressed-writes", _setup_compressed_target, _body_compressed,
             open_options={"cache_size": 4 * 4096}),
    Workload("refcount-mode-switch", _setup_snapshotted, _body_mode_switch),
    Workload("resize", _setup_resize, _body_resize, weight=0.7),
    Workload("amend", _setup_amend, _body_amend, weight=0.7),
    Workload("rebase", _setup_rebase, _body_rebase, weight=0.7),
    Workload("bitmaps", _setup_bitmaps, _body_bitmaps, weight=0.5, verify=_verify_bitmaps),
    Workload("bitmap-management", _setup_bitmap_admin, _body_bitmap_admin, weight=0.4,
             verify=_verify_bitmap_admin),
]


# --------------------------------------------------------------------------- faults --
@dataclass
class FaultOutcome:
    driver: Driver
    backend: Any  # the FaultBackend
    data: bytearray  # the image file afterwards
    close_error: Qcow2Error | None
    names_at_close: set[str]

    @property
    def error(self) -> Qcow2Error | None:
        """The first error the fault caused (from an operation or from close)."""
        return self.driver.errors[0] if self.driver.errors else self.close_error


def run_faulted(workload: Workload, path: Path, base: bytes,
                model: tuple[bytes, dict[str, SnapExpect]], seed: int, *,
                fail_write: int | None = None, fail_sync: int | None = None,
                err: int = 5, sticky: bool = False, **open_options: Any) -> FaultOutcome:
    """Run a workload on an in-memory copy of base through a FaultBackend. Operations
    that fail are tolerated (the model adopts what the image then reads); with sticky
    faults the workload stops at the first one. The image is closed at the end."""
    from qcow2.faults import FaultBackend

    mem = MemoryBackend(base, path=str(path))
    fb = FaultBackend(mem, fail_write=fail_write, fail_sync=fail_sync, err=err, sticky=sticky)
    img = qcow2.open(path, "r+", backend=fb, **open_options)
    content, snaps = model
    d = Driver(img, None, content, snaps, tolerate_errors=True, stop_on_error=sticky)
    try:
        workload.body(d, random.Random(seed))
    except _Stop:
        pass
    names: set[str] = set()
    if not sticky:
        d.verify_live()  # the image reads what the model (adopting failures) says
        names = {s.name for s in img.snapshots}
    close_error = None
    try:
        img.close()
    except Qcow2Error as exc:
        close_error = exc
    return FaultOutcome(d, fb, mem.data, close_error, names)
