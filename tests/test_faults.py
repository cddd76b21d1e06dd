"""I/O errors (EIO, ENOSPC) injected at every write and every sync of the crash
workloads, as QEMU's iotests 026 does with blkdebug: the operation raises
Qcow2IOError with the errno kept, the image keeps working (or fails cleanly), what it
reads is what the file holds once closed, and the file checks with leaks at most.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import crashsim
import pytest
from crashsim import WORKLOADS, CrashState, Expect, check_with_library, initial_model, run_faulted

import qcow2
from qcow2.errors import Qcow2Error, Qcow2IOError
from qcow2.faults import FaultBackend, MemoryBackend

# workloads and the open options that make them reach more code (a tiny metadata cache
# forces L2 and refcount block write-back by eviction in the middle of operations)
CASES = [
    ("allocating-writes", {}),
    ("partial-cow-backing", {"cache_size": 2 * 16384}),
    ("writes-after-snapshot", {"cache_size": 2 * 8192, "refcount_cache_size": 2 * 8192}),
    ("discard", {}),
    ("write-zeroes", {}),
    ("reftable-growth", {}),
    ("l1-growth", {}),
    ("snapshots", {}),
    ("share-from-snapshot", {"cache_size": 2 * 16384}),
    ("check-repair", {}),
    ("compressed-writes", {"cache_size": 64 * 4096}),
    ("resize", {"cache_size": 4 * 512}),
    ("amend", {}),
    ("rebase", {"cache_size": 2 * 16384}),
    ("bitmaps", {}),
]
# fault points per workload and kind: every write and sync up to this many, a seeded
# sample beyond; QCOW2_FAULT_POINTS raises it. The other refcount modes share the
# standard mode's write path and error handling, so by default they get half as many
# (each with its own seed), which keeps the suite within CI's time;
# QCOW2_FAULT_POINTS applies in full to every mode.
MAX_POINTS = int(os.environ.get("QCOW2_FAULT_POINTS", "64"))
_THINNER = "QCOW2_FAULT_POINTS" not in os.environ


def _workload(name: str) -> crashsim.Workload:
    return next(w for w in WORKLOADS if w.name == name)


def _points(total: int, rng: random.Random, mode: str) -> list[int]:
    limit = MAX_POINTS // 2 if _THINNER and mode != "standard" else MAX_POINTS
    pts = list(range(1, total + 1))
    if len(pts) > limit:
        pts = sorted(rng.sample(pts, limit))
    return pts


def _verify(out: crashsim.FaultOutcome, path: Path, err: int, sticky: bool, label: str) -> None:
    e = out.error
    assert e is not None, f"{label}: the injected fault was swallowed"
    if isinstance(e, crashsim.CheckFailed):  # check reports the error in its result
        assert errno.errorcode[err] in str(e), f"{label}: {e}"
    else:
        assert isinstance(e, Qcow2IOError) and e.errno == err, f"{label}: {e!r}"
    assert out.backend.tripped >= 1
    d = out.driver
    if sticky or out.close_error is not None:
        # the device failed for good (or close did): the file is what a crash leaves
        expect = d.expect()
    else:
        # a one-off fault: everything the image held in memory reached the file on close
        snaps = {n: s for n, s in {**d.maybe, **d.snapshots}.items() if n in out.names_at_close}
        expect = Expect(bytes(d.content), (), frozenset({len(d.content)}), snaps, {})
    st = CrashState(crashsim.Run(label, path, b"", [], expect, {}), 0, "fault", 0,
                    out.data, expect)
    check_with_library(st)
    crashsim.qemu_verdicts([st], path, convert_every=0)


@pytest.mark.parametrize("name,opts", [
    pytest.param(*c, id=c[0], marks=[pytest.mark.standard_only] if c[0] == "amend" else [])
    for c in CASES])  # (amend downgrades to v2, which the refcount modes cannot be)
@pytest.mark.parametrize("kind", ["write", "sync"])
def test_faults(tmp_path: Path, name: str, opts: dict, kind: str, mode: str) -> None:
    w = _workload(name)
    path = w.setup(tmp_path)
    model = initial_model(path)
    crashsim.to_mode(path, mode)
    base = path.read_bytes()
    # a clean pass counts the writes and syncs the workload issues
    clean = run_faulted(w, path, base, model, 1, **opts)
    assert clean.error is None
    total = clean.backend.writes if kind == "write" else clean.backend.syncs
    assert total > 0
    rng = random.Random(f"{name}-{mode}")
    for n in _points(total, rng, mode):
        err = (errno.EIO, errno.ENOSPC)[n % 2]
        sticky = n % 3 == 0
        fault = {"fail_write": n} if kind == "write" else {"fail_sync": n}
        out = run_faulted(w, path, base, model, 1, err=err, sticky=sticky, **fault, **opts)
        _verify(out, path, err, sticky, f"{name}: {kind} #{n}/{total} {errno.errorcode[err]}"
                f"{' sticky' if sticky else ''}")


def test_fault_on_first_write_with_bitmaps(tmp_path: Path) -> None:
    """Opening writes nothing; the first guest write marks the bitmaps in use first: a
    failure there is a clean error and leaves the file as it was."""
    p = tmp_path / "a.qcow2"
    qcow2.create(p, 1 << 20)
    crashsim.qemu_img("bitmap", "--add", str(p), "b0")
    base = p.read_bytes()
    mem = MemoryBackend(base, path=str(p))
    img = qcow2.open(p, "r+", backend=FaultBackend(mem, fail_write=1, err=errno.ENOSPC))
    with pytest.raises(Qcow2IOError) as info:
        img.pwrite(b"x" * 512, 0)
    img._abandon()
    assert info.value.errno == errno.ENOSPC
    assert "No space left" in str(info.value)
    assert bytes(mem.data) == base


def test_error_type_and_retry(tmp_path: Path) -> None:
    """The first sync (at flush: it makes the reservation, the data and the new L2 table
    durable) fails: flush fails with the errno, the data stays readable in memory, and a
    retried flush works."""
    p = tmp_path / "a.qcow2"
    qcow2.create(p, 1 << 20)
    mem = MemoryBackend(p.read_bytes(), path=str(p))
    img = qcow2.open(p, "r+", backend=FaultBackend(mem, fail_sync=1, err=errno.EIO))
    img.pwrite(b"x" * 100, 0)
    with pytest.raises(Qcow2IOError) as info:
        img.flush()
    assert info.value.errno == errno.EIO and isinstance(info.value, Qcow2Error)
    assert str(info.value) == "Sync failed: Input/output error (EIO)"
    assert img.pread(100, 0) == b"x" * 100
    img.pwrite(b"y" * 100, 0)
    img.flush()
    assert img.pread(100, 0) == b"y" * 100
    img.close()
    out = tmp_path / "b.qcow2"
    out.write_bytes(mem.data)
    rep = crashsim.qemu_check(out)
    assert rep["returncode"] in (0, 3) and rep.get("corruptions", 0) == 0, rep
    with qcow2.open(out) as img2:
        assert img2.pread(100, 0) == b"y" * 100
