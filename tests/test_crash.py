"""Crash safety by simulation: every prefix of a workload's writes, and random subsets of
the writes since the last sync (whole or torn into sectors), must open with our library,
read back what the model guarantees, and pass our check and `qemu-img check` with at
most leaks. See tests/crashsim.py for the model.

States per workload: QCOW2_CRASH_STATES (total over all workloads; default ~2,000).
Every state is opened and checked with our library; a seeded half also goes through
`qemu-img check` (a quarter of those through `qemu-img convert` as well), and a tenth is
opened read-write, written and leak-repaired.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import crashsim
import pytest
from crashsim import (
    MARK,
    SYNC,
    WORKLOADS,
    WRITE,
    CrashSimError,
    Expect,
    Op,
    Run,
    check_with_library,
    crash_states,
    first_bad_byte,
    plan_states,
    simulate,
    state_budget,
)

import qcow2
from qcow2.cluster import ClusterMap
from qcow2.format import encode_table
from qcow2.image import Image

DEFAULT_STATES = 180


# standard only: amend, which downgrades to v2 (refcount modes need compat 1.1)
_STANDARD_ONLY = ("amend",)
_PARAMS = [pytest.param(w, id=w.name,
                        marks=[pytest.mark.standard_only] if w.name in _STANDARD_ONLY else [])
           for w in WORKLOADS]


@pytest.mark.parametrize("workload", _PARAMS)
def test_crash_states(tmp_path: Path, workload: crashsim.Workload, mode: str) -> None:
    run = workload.record(tmp_path, seed=1, mode=mode)
    budget = max(8, int(state_budget(DEFAULT_STATES, len(WORKLOADS)) * workload.weight))
    rep = simulate(run, budget, seed=len(workload.name))
    assert rep.states >= min(budget, run.writes) // 2
    assert rep.qemu_checked > 0
    # the run really exercised crash windows: some state had something to leak (in
    # standard mode; lazy-count allocates in memory only, so its crashes leak nothing)
    assert rep.leaky > 0 or mode != "standard"


# ------------------------------------------------------------- the simulator itself --
def _synthetic_run(tmp_path: Path) -> Run:
    e0 = Expect(b"", (), frozenset({0}))
    ops = [Op(MARK, payload=e0), Op(WRITE, 0, b"a" * 1024), Op(SYNC),
           Op(WRITE, 1024, b"b" * 1024), Op(WRITE, 0, b"c" * 512), Op(SYNC),
           Op(WRITE, 2048, b"d" * 700)]
    return Run("synthetic", tmp_path / "x", b"\0" * 4096, ops, e0, {})


def test_states_respect_syncs(tmp_path: Path) -> None:
    """A write followed by a sync is in every later state; unsynced writes come and go,
    sector by sector in torn states; overlapping kept writes keep program order."""
    run = _synthetic_run(tmp_path)
    plan = [(p, m, s) for p in range(len(run.ops) + 1) for m, s in
            [("prefix", 0)] + [(m, s) for m in ("writes", "sectors") for s in range(40)]]
    seen: dict[int, set[bytes]] = {}
    for st in crash_states(run, sorted(plan)):
        d = bytes(st.data)
        seen.setdefault(st.point, set()).add(d)
        if st.point >= 3:  # after the first sync
            assert d[:512] in (b"a" * 512, b"c" * 512) and d[512:1024] == b"a" * 512
        if st.point >= 6:  # after the second sync
            assert d[:1536] == b"c" * 512 + b"a" * 512 + b"b" * 512
        if st.point <= 3:
            assert d[1024:2048].strip(b"\0") == b""
    # between the syncs: "b" and "c" may each persist or not, "b" may be torn
    mids = seen[5]
    assert any(s[:512] == b"a" * 512 and s[1024:1536] == b"b" * 512 for s in mids)
    assert any(s[:512] == b"c" * 512 and s[1024:1536] == b"\0" * 512 for s in mids)
    assert any(s[1024:1536] == b"b" * 512 and s[1536:2048] == b"\0" * 512 for s in mids)


def test_plan_covers_every_prefix_of_small_runs(tmp_path: Path) -> None:
    run = _synthetic_run(tmp_path)
    plan = plan_states(run, 50, 1)
    prefixes = {p for p, m, _ in plan if m == "prefix"}
    assert prefixes == {0, 2, 4, 5, 7}
    assert any(m != "prefix" for _, m, _ in plan)


def test_model_old_or_new_bytes() -> None:
    rng = random.Random(5)
    flushed = rng.randbytes(5000)
    new = rng.randbytes(300)
    e = Expect(flushed, ((1000, new),), frozenset({5000}))
    got = bytearray(flushed)
    got[1000:1150] = new[:150]  # torn: half new, half old
    assert first_bad_byte(bytes(got), e) == -1
    got[1200] ^= 0xFF
    assert first_bad_byte(bytes(got), e) == 1200
    got = bytearray(flushed)
    got[3000] ^= 1  # never written since the flush: must be exact
    assert first_bad_byte(bytes(got), e) == 3000


# ---------------------------------------------- the simulator catches ordering bugs --
def _workload(name: str) -> crashsim.Workload:
    return next(w for w in WORKLOADS if w.name == name)


def _flush_l1_first(self: Image) -> None:
    """Bug: the L1 table is written before the new L2 tables are durable."""
    cmap, rc = self.clusters, self.refcounts
    cmap.write_l1()
    cmap.flush_l2()
    rc.write_back()
    self.storage.sync()
    rc.apply_releases()


def _flush_release_early(self: Image) -> None:
    """Bug: dropped references are released (and written) before the metadata that
    dropped them is durable."""
    self.refcounts.apply_releases()
    self.refcounts.write_back()
    _ORIGINAL_FLUSH(self)


def _flush_without_data_barrier(self: Image) -> None:
    """Bug (the engine's flush before this work): reachable L2 tables go out together
    with the data their new entries point at, with no sync in between."""
    cmap, rc = self.clusters, self.refcounts
    cmap.flush_l2()
    rc.write_back()
    if cmap.l1_dirty:
        self.storage.sync()
        cmap.write_l1()
    self.storage.sync()
    rc.apply_releases()


def _write_l2_unordered(self: ClusterMap, offset: int, table) -> None:
    self.storage.pwrite(encode_table(table), offset, "l2")


_ORIGINAL_FLUSH = Image.flush


@pytest.mark.parametrize("bug,workload", [
    (_flush_l1_first, "writes-after-snapshot"),
    (_flush_release_early, "writes-after-snapshot"),
    (_flush_without_data_barrier, "partial-cow-backing"),
])
def test_simulator_catches_ordering_bugs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         bug, workload: str) -> None:
    monkeypatch.setattr(Image, "flush", bug)
    monkeypatch.setattr(ClusterMap, "_write_l2", _write_l2_unordered)
    run = _workload(workload).record(tmp_path, seed=1)
    with pytest.raises(CrashSimError):
        simulate(run, 120, seed=3, qemu_fraction=1.0, writable_fraction=0.0)


def test_clean_close_leaks_nothing(tmp_path: Path) -> None:
    """After the workloads' clean close, qemu-img check reports no leaks at all (the
    reserved pool is returned, queued releases applied)."""
    run = _workload("writes-after-snapshot").record(tmp_path, seed=2)
    final = next(crash_states(run, [(len(run.ops), "prefix", 0)]))
    assert final.expect.clean
    crashsim.qemu_verdicts([final], tmp_path)
    p = tmp_path / "final.qcow2"
    p.write_bytes(final.data)
    rep = crashsim.qemu_check(p)
    assert rep["returncode"] == 0 and rep.get("leaks", 0) == 0, rep
    with qcow2.open(p) as img:
        assert img.check().exit_code == 0


def _header_fields(run: Run) -> list[tuple[int, int]]:
    """(l1_size, refcount_table_clusters) of every header the run wrote."""
    out = []
    for op in run.ops:
        if op.kind == WRITE and op.offset == 0 and len(op.data) >= 72:
            out.append((struct.unpack_from(">I", op.data, 36)[0],
                        struct.unpack_from(">I", op.data, 56)[0]))
    return out


def test_workloads_reach_the_growth_paths(tmp_path: Path) -> None:
    """The growth workloads really grow the tables they are meant to (else their crash
    states would prove nothing about those paths)."""
    rt = _workload("reftable-growth").record(tmp_path / "rt", seed=1)
    assert max(c for _, c in _header_fields(rt)) > 1  # the refcount table moved and grew
    l1 = _workload("l1-growth").record(tmp_path / "l1", seed=1)
    sizes = [s for s, _ in _header_fields(l1)]
    assert 80 in sizes and sizes[-1] == 16  # 512 KiB -> 2.5 MiB disk (512-byte clusters) and back


@pytest.mark.parametrize("name", ["bitmap-management", "amend", "rebase", "refcount-mode-switch"])
def test_header_switches_survive_every_torn_subset(tmp_path: Path, name: str) -> None:
    """Every change of cluster 0 (bitmaps extension removed with another extension after
    it, added, switched; amend's version switch; rebase; the refcount-mode extension),
    torn into every subset of its sectors at every sync: each state opens, reads what
    the model allows, keeps the extensions (the workload's verify) and passes our check
    and qemu-img's."""
    wl = _workload(name)
    run = wl.record(tmp_path / "w", seed=3)
    cs = qcow2.open(run.path).cluster_size
    states = list(crashsim.header_states(run, cs))
    if name == "bitmap-management":  # the two-switch path, with the backing name moved
        far = [o.offset for o in run.ops if o.kind == WRITE and o.offset >= crashsim.SECTOR
               and o.offset < cs]
        assert any(f > cs - 300 for f in far) and any(f < 2 * crashsim.SECTOR for f in far)
    assert len(states) >= 8  # (the header really changes in several torn ways)
    sample = []
    for i, st in enumerate(states):
        check_with_library(st)
        if i % 3 == 0:
            sample.append(st)
    crashsim.qemu_verdicts(sample, run.path, convert_every=0)
