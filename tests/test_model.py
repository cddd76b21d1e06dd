"""Model-based testing: random sequences of pwrite / write_zeroes / discard / flush /
close-and-reopen against a bytearray model (hypothesis RuleBasedStateMachine).

At teardown the image must pass `qemu-img check` with no corruption and no leak, QEMU must
read exactly the model, and the same operations replayed through qemu-io on an image QEMU
created with the same options must give the model too (which ties our model of discard
and write-zeroes semantics to QEMU's behaviour).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from conftest import assert_clean, qemu_img
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from test_interop import (
    apply_model,
    first_diff,
    is_v3,
    our_create,
    qemu_create,
    qemu_replay,
    raw_bytes,
)

import qcow2

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class ImageMachine(RuleBasedStateMachine):
    """One geometry per subclass: GEO (create options), SIZE, BACKING (bytes or None)."""

    GEO: dict[str, Any] = {}
    SIZE = 0
    BACKING_SIZE = 0  # > 0: a QEMU-made qcow2 backing file of this size (smaller than SIZE)
    OPEN_KW: dict[str, Any] = {}

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="qcow2-model-"))
        self.path = self.dir / "img.qcow2"
        self.ops: list[tuple] = []
        self.img: qcow2.Image | None = None
        cs = self.GEO["cluster_size"]
        self.cs = cs
        self.scs = cs // 32 if self.GEO.get("extended_l2") else cs
        self.v3 = is_v3(self.GEO)

    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed: int) -> None:
        self.model = bytearray(self.SIZE)
        kw: dict[str, Any] = {}
        if self.BACKING_SIZE:
            base_raw = self.dir / "base.raw"
            data = random.Random(seed).randbytes(self.BACKING_SIZE)
            base_raw.write_bytes(data)
            qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
                     str(base_raw), str(self.dir / "base.qcow2"))
            base_raw.unlink()
            self.model[: len(data)] = data
            kw = dict(backing_file="base.qcow2", backing_format="qcow2")
        our_create(self.path, self.SIZE, self.GEO, **kw)
        self.initial = bytes(self.model)
        self.img = qcow2.open(self.path, "r+", **self.OPEN_KW)

    # -- strategies: offsets near cluster/subcluster/L2 boundaries, or anywhere ---------
    @staticmethod
    def _pick(data: st.DataObject, size: int, cs: int, scs: int) -> tuple[int, int]:
        if data.draw(st.booleans()):
            unit = data.draw(st.sampled_from([cs, scs, cs * (cs // 8)]))
            off = unit * data.draw(st.integers(0, max(0, size // unit)))
            off += data.draw(st.sampled_from([0, 0, -1, 1, 512, -512, scs // 2]))
        else:
            off = data.draw(st.integers(0, size - 1))
        off = min(max(off, 0), size - 1)
        n = data.draw(st.one_of(
            st.integers(1, 600), st.integers(1, 3 * cs),
            st.sampled_from([cs, 2 * cs, scs, 3 * scs, cs - 1, cs + 1]),
        ))
        return off, max(1, min(n, size - off))

    def _do(self, op: tuple) -> None:
        assert self.img is not None
        self.ops.append(op)
        apply_model(self.model, op, self.cs, self.v3, bool(self.BACKING_SIZE))
        kind = op[0]
        if kind == "write":
            assert self.img.pwrite(op[2], op[1]) == len(op[2])
        elif kind == "zero":
            self.img.write_zeroes(op[1], op[2])
        elif kind == "discard":
            self.img.discard(op[1], op[2])

    @rule(data=st.data(), pattern=st.integers(0, 255))
    def pwrite(self, data: st.DataObject, pattern: int) -> None:
        off, n = self._pick(data, self.SIZE, self.cs, self.scs)
        if pattern < 128:
            buf = random.Random(pattern * 7919 + off).randbytes(n)
        else:
            buf = bytes([pattern]) * n
        self._do(("write", off, buf))

    @rule(data=st.data())
    def write_zeroes(self, data: st.DataObject) -> None:
        off, n = self._pick(data, self.SIZE, self.cs, self.scs)
        self._do(("zero", off, n))

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        off, n = self._pick(data, self.SIZE, self.cs, self.scs)
        if data.draw(st.booleans()):
            off = (off // self.cs) * self.cs  # whole clusters, so that it has an effect
            n = min(n + self.cs, self.SIZE - off)
        self._do(("discard", off, n))

    @rule()
    def flush(self) -> None:
        assert self.img is not None
        self.img.flush()
        self.ops.append(("flush",))

    @rule()
    def reopen(self) -> None:
        assert self.img is not None
        self.img.close()
        self.img = qcow2.open(self.path, "r+", **self.OPEN_KW)
        self.ops.append(("reopen",))

    @rule(data=st.data())
    def read_back(self, data: st.DataObject) -> None:
        assert self.img is not None
        off, n = self._pick(data, self.SIZE, self.cs, self.scs)
        assert self.img.pread(n, off) == bytes(self.model[off : off + n])

    @invariant()
    def size_unchanged(self) -> None:
        if self.img is not None:
            assert self.img.size == self.SIZE

    def teardown(self) -> None:
        try:
            if self.img is None:
                return
            self.img.close()
            assert_clean(self.path)
            got = raw_bytes(self.path, self.dir)
            assert got == bytes(self.model), "QEMU reading our image: " + first_diff(got, bytes(self.model))
            with qcow2.open(self.path) as img:
                assert img.pread(self.SIZE, 0) == bytes(self.model)
            self.final_checks()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def final_checks(self) -> None:
        """QEMU doing the same operations agrees with the model."""
        theirs = self.dir / "theirs.qcow2"
        extra = ("-b", "base.qcow2", "-F", "qcow2") if self.BACKING_SIZE else ()
        qemu_create(theirs, self.SIZE, self.GEO, *extra)
        qemu_replay(theirs, self.ops, self.dir)
        got = raw_bytes(theirs, self.dir)
        assert got == bytes(self.model), "QEMU replay vs model: " + first_diff(got, bytes(self.model))


def _machine(name: str, geo: dict[str, Any], size: int, backing_size: int = 0,
             **open_kw: Any) -> Any:
    cls = type(name, (ImageMachine,), {"GEO": geo, "SIZE": size, "BACKING_SIZE": backing_size,
                                       "OPEN_KW": open_kw})
    return _as_test(cls)


def _as_test(cls: type) -> Any:
    """A pytest test running the machine once per refcount mode (the `mode` fixture
    makes qcow2.create build images in that mode)."""

    def test(mode: str) -> None:
        run_state_machine_as_test(cls, settings=SETTINGS)

    test.__name__ = test.__qualname__ = f"test_{cls.__name__}"
    return test


# 512-byte clusters: one L2 table covers 32 KiB, so ~100 KiB spans four tables and many
# refcount blocks (64-bit refcounts: 64 clusters per block); caches of 4 tables force
# write-back on eviction all the time
test_SmallClusters = _machine("SmallClusters", dict(cluster_size=512, refcount_bits=64), 100 * 1024 + 512,
                             cache_size=2048, refcount_cache_size=2048)
test_V2 = _machine("V2", dict(cluster_size=4096, compat="0.10"), 300 * 1024 + 1536)
test_ExtendedL2 = _machine("ExtendedL2", dict(cluster_size=16384, extended_l2=True), 20 * 16384 + 2048)
test_Backing = _machine("Backing", dict(cluster_size=4096, refcount_bits=4), 200 * 1024 + 512, 120 * 1024)
test_ExtendedL2Backing = _machine("ExtendedL2Backing", dict(cluster_size=32768, extended_l2=True),
                                 12 * 32768 + 512, 5 * 32768 + 4096)
test_V2Backing = _machine("V2Backing", dict(cluster_size=1024, compat="0.10"), 64 * 1024, 40 * 1024 + 512)


class SnapshotMachine(ImageMachine):
    """The same operations plus internal snapshots: create, apply (revert the active
    state to it) and delete, each checked against a model of every snapshot's content.
    Small in-place overwrites are remembered by the image as writable in place; a
    snapshot makes those clusters shared again, which this machine exercises (a write
    that skipped the copy would change a snapshot). No qemu-io replay (qemu-io takes
    no snapshot commands); QEMU reads the active state and every snapshot at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.snaps: dict[str, bytes] = {}
        self.serial = 0
        self.hot: list[int] = []

    @rule(data=st.data(), pattern=st.integers(0, 255))
    def small_overwrite(self, data: st.DataObject, pattern: int) -> None:
        # within one cluster, often the one written just before: the in-place path
        # (a cluster written before, mostly: the case where a remembered cluster may
        # have become shared or moved since)
        if self.hot and data.draw(st.integers(0, 3)):
            base = data.draw(st.sampled_from(self.hot))
        else:
            base, _ = self._pick(data, self.SIZE, self.cs, self.scs)
            self.hot = [*self.hot[-3:], base // self.cs * self.cs]
        n = data.draw(st.integers(1, min(4096, self.cs)))
        off = min((base // self.cs) * self.cs + data.draw(st.integers(0, self.cs - 1)),
                  self.SIZE - 1)
        n = min(n, self.cs - off % self.cs, self.SIZE - off)
        self._do(("write", off, bytes([pattern]) * n))
        self._do(("write", off, bytes([pattern ^ 0xFF]) * n))

    @rule()
    def create_snapshot(self) -> None:
        assert self.img is not None
        if len(self.snaps) >= 3:
            return
        self.serial += 1
        name = f"s{self.serial}"
        self.img.create_snapshot(name)
        self.snaps[name] = bytes(self.model)

    @rule(data=st.data())
    def apply_snapshot(self, data: st.DataObject) -> None:
        assert self.img is not None
        if not self.snaps:
            return
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.apply_snapshot(name)
        self.model[:] = self.snaps[name]

    @rule(data=st.data())
    def delete_snapshot(self, data: st.DataObject) -> None:
        assert self.img is not None
        if not self.snaps:
            return
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.delete_snapshot(name)
        del self.snaps[name]

    @rule(data=st.data())
    def read_snapshot(self, data: st.DataObject) -> None:
        assert self.img is not None
        if not self.snaps:
            return
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        off, n = self._pick(data, self.SIZE, self.cs, self.scs)
        assert self.img.snapshot(name).pread(n, off) == self.snaps[name][off : off + n]

    def final_checks(self) -> None:
        """QEMU reads every snapshot as the model has it."""
        for name, content in self.snaps.items():
            got = raw_bytes(self.path, self.dir, snapshot=name)
            assert got == content, f"QEMU reading snapshot {name}: " + first_diff(got, content)


def _snapshot_machine(name: str, geo: dict[str, Any], size: int, **open_kw: Any) -> Any:
    cls = type(name, (SnapshotMachine,), {"GEO": geo, "SIZE": size, "OPEN_KW": open_kw})
    return _as_test(cls)


test_Snapshots = _snapshot_machine("Snapshots", dict(cluster_size=4096), 96 * 1024 + 512)
test_SnapshotsSmallCache = _snapshot_machine(
    "SnapshotsSmallCache", dict(cluster_size=512, refcount_bits=16), 40 * 1024,
    cache_size=2048, refcount_cache_size=2048)
test_SnapshotsExtendedL2 = _snapshot_machine(
    "SnapshotsExtendedL2", dict(cluster_size=16384, extended_l2=True), 8 * 16384 + 1024)
