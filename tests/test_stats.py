"""img.stats: deterministic counts of writes (by kind) and syncs, asserted from the
design (pool reservations, ordering barriers, write combining), and proof that every
byte of image I/O goes through the storage layer."""

from __future__ import annotations

import ast
import errno
import os
import sys
from pathlib import Path

import pytest
from conftest import assert_clean, qemu_img, qemu_io, raw_bytes

import qcow2
from qcow2.faults import FaultBackend, MemoryBackend, RecordingBackend
from qcow2.refcount import POOL_GROWTH, POOL_MAX, POOL_MIN
from qcow2.storage import COMBINE_MAX, FileBackend, Storage

# every test here runs once per refcount mode (conftest.py's `mode` fixture)
pytestmark = pytest.mark.usefixtures("mode")

SRC = Path(qcow2.__file__).resolve().parent


def test_stats_are_attributes_counted_since_open(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    qcow2.create(p, 1 << 20)
    with qcow2.open(p, "r+") as img:
        s = img.stats
        for kind in ("data", "l1", "l2", "refcount", "header", "snapshot_table"):
            assert getattr(s, f"{kind}_writes") == 0 and getattr(s, f"{kind}_writes_bytes") == 0
        assert s.syncs == 0
        img.pwrite(b"a", 0)
        before = img.stats.copy()
        img.flush()
        delta = img.stats - before
        assert delta.syncs >= 1 and before.syncs == img.stats.syncs - delta.syncs
    with qcow2.open(p, "r+") as img:  # a new open starts from zero
        assert img.stats.syncs == 0 and img.stats.data_writes == 0


def test_first_write_and_flush_counts(tmp_path: Path) -> None:
    """A 4 KiB write into a fresh image with 64 KiB clusters:
    - the allocation reserves a pool: one refcount block write, and no sync yet (the
      reservation only has to be durable before reachable metadata is written);
    - the data (the whole new cluster, zero-filled around the 4 KiB) is combined in
      memory and reaches the file at flush;
    - flush: the new L2 table (no on-disk L1 entry points at it yet) is written, one
      sync makes it, the data and the reservation durable, then the L1 entry, then the
      final sync.
    In lazy-count mode the live state counts 0: no reservation is written, nothing is
    handed back at close, and the flush needs the same two syncs (data and fresh L2
    table, then L1 entry); `w` (the live weight, 1 or 0) says which."""
    p = tmp_path / "a.qcow2"
    qcow2.create(p, 64 << 20)
    with qcow2.open(p, "r+") as img:
        w = img.refcounts.live_weight
        img.pwrite(b"x" * 4096, 0)
        s = img.stats
        assert (s.refcount_writes, s.syncs, s.data_writes, s.l2_writes, s.l1_writes) == (w, 0, 0, 0, 0)
        img.flush()
        s = img.stats
        assert (s.data_writes, s.data_writes_bytes) == (1, 65536)
        assert (s.l2_writes, s.l2_writes_bytes, s.l1_writes) == (1, 65536, 1)
        assert s.l1_writes_bytes == 8 and s.syncs == 2 and s.header_writes == 0
        # nothing written since: a flush needs no sync
        img.flush()
        assert img.stats.syncs == 2
        # an overwrite in place changes no metadata: one data write, one sync
        before = img.stats.copy()
        img.pwrite(b"y" * 4096, 8192)
        img.flush()
        d = img.stats - before
        assert (d.data_writes, d.syncs, d.l1_writes, d.l2_writes, d.refcount_writes) == (1, 1, 0, 0, 0)
        # a new cluster under an L2 table that the disk already reaches: its data must be
        # durable before the table is written (a barrier sync), then the final sync
        before = img.stats.copy()
        img.pwrite(b"z" * 4096, 65536)
        img.flush()
        d = img.stats - before
        assert (d.data_writes, d.l2_writes, d.l1_writes, d.syncs, d.refcount_writes) == (1, 1, 0, 2, 0)
        before = img.stats.copy()
    d = img.stats - before
    # close hands the unused pool back: one refcount block write and a sync
    assert (d.refcount_writes, d.syncs, d.data_writes, d.l2_writes) == (w, w, 0, 0)
    assert_clean(p)


def _reservations(allocations: int) -> int:
    """Pool reservations needed for n single-cluster allocations (refcount.py design)."""
    k = got = 0
    batch = POOL_MIN
    while got < allocations:
        got += batch
        batch = min(batch * POOL_GROWTH, POOL_MAX)
        k += 1
    return k


def test_writes_after_snapshot_take_a_bounded_number_of_syncs(tmp_path: Path) -> None:
    """4,096 first writes to clusters shared with a snapshot (each needs a new cluster;
    the 8 shared L2 tables need copies too) sync once per pool reservation, plus once
    per refcount block the growing file needs: a small number fixed by the design, not
    one (or two, as QEMU without lazy refcounts) per write."""
    cs = 4096
    n = 4096
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs}", str(p), str(n * cs))
    qemu_io(p, f"write -P 0x11 0 {n * cs}")
    qemu_img("snapshot", "-c", "base", str(p))
    l2_tables = n // (cs // 8)
    allocations = n + l2_tables
    file_clusters = 2 * n + 2 * l2_tables + 16  # old + new data and tables, metadata
    refblocks = -(-file_clusters // (cs * 8 // 16))  # 16-bit refcounts
    bound = _reservations(allocations) + refblocks
    # what "O(1)" means here: 3 reservations (64 + 512 + 4096 clusters) + 4 new blocks
    assert _reservations(allocations) == 3 and bound <= 8
    with qcow2.open(p, "r+") as img:
        for i in range(n):
            img.pwrite(b"\x22" * cs, ((i * 2749) % n) * cs)  # every cluster, shuffled
        during = img.stats.copy()
        img.flush()
        after = img.stats.copy()
    assert during.syncs <= bound, during
    assert during.l2_writes == 0 and during.l1_writes == 0  # metadata waits for flush
    assert after.l2_writes == l2_tables and after.l1_writes == 1
    assert after.data_writes_bytes == n * cs  # each new cluster written exactly once
    assert after.syncs - during.syncs == 2  # flush: one barrier, one final sync
    assert_clean(p)
    assert raw_bytes(p, tmp_path) == b"\x22" * (n * cs)
    assert raw_bytes(p, tmp_path, snapshot="base") == b"\x11" * (n * cs)


def test_sequential_small_writes_are_combined(tmp_path: Path) -> None:
    """16 sequential 4 KiB writes into an allocated 64 KiB cluster are one file write,
    read back before it reaches the file, and reach it at flush."""
    p = tmp_path / "a.qcow2"
    qcow2.create(p, 4 << 20)
    with qcow2.open(p, "r+") as img:
        img.pwrite(b"\0" * 65536, 0)
        img.flush()
        host = img.map()[0]["offset"]
        before = img.stats.copy()
        for i in range(16):
            img.pwrite(bytes([i + 1]) * 4096, i * 4096)
        assert (img.stats - before).data_writes == 0
        with open(p, "rb") as f:  # the file does not have it yet ...
            f.seek(host)
            assert f.read(4096) == bytes(4096)
        assert img.pread(4096, 5 * 4096) == b"\x06" * 4096  # ... but reads see it
        img.flush()
        d = img.stats - before
        assert (d.data_writes, d.data_writes_bytes, d.syncs) == (1, 65536, 1)
    assert raw_bytes(p, tmp_path)[:65536] == b"".join(bytes([i + 1]) * 4096 for i in range(16))


def test_combining_is_bounded_and_ordered(tmp_path: Path) -> None:
    mem = MemoryBackend(bytes(8192))
    st = Storage(mem, True)
    chunk = b"\x01" * 65536
    for i in range(COMBINE_MAX // len(chunk) + 1):
        st.pwrite(chunk, i * len(chunk), "data")
    assert st.stats.data_writes == 1  # the buffer went out when it was full
    assert len(mem.data) == COMBINE_MAX
    st.pwrite(b"\x02" * 10, 5, "l2")  # other kinds are written at once ...
    assert mem.data[5:15] == b"\x02" * 10 and st.stats.l2_writes == 1
    st.pwrite(b"\x03" * 10, COMBINE_MAX + 5, "refcount")  # ... overlapping ones after it
    assert mem.data[COMBINE_MAX + 5 : COMBINE_MAX + 15] == b"\x03" * 10
    st.sync()
    assert st.unsynced_writes == 0 and st.unsynced_data_writes == 0


def test_failed_combined_write_is_kept_and_retried() -> None:
    """A combined write that fails (at the next sync) raises with its errno and stays
    buffered: reads still see it and the next sync writes it."""
    mem = MemoryBackend(bytes(4096))
    st = Storage(FaultBackend(mem, fail_write=1, err=errno.ENOSPC), True)
    st.pwrite(b"\x07" * 100, 50, "data")
    with pytest.raises(qcow2.Qcow2IOError) as info:
        st.sync()
    assert info.value.errno == errno.ENOSPC
    assert mem.data[50:150] == bytes(100)
    assert st.pread(100, 50) == b"\x07" * 100
    st.sync()
    assert mem.data[50:150] == b"\x07" * 100 and st.unsynced_writes == 0


# ------------------------------------------------------ nothing bypasses Storage --
_IO_CALLS = {("os", n) for n in ("pwrite", "pwritev", "write", "writev", "fsync", "fdatasync",
                                 "ftruncate", "truncate", "sync_file_range", "sendfile")}


def test_no_image_io_outside_the_storage_layer() -> None:
    """Only storage.py calls the os functions that write or sync a file or maps a file
    (read-only: storage.map_for_reading); nothing opens files for writing with buffered
    file objects."""
    offenders = []
    for path in sorted(SRC.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if (node.value.id, node.attr) in _IO_CALLS and path.name != "storage.py":
                    offenders.append(f"{path.name}:{node.lineno} os.{node.attr}")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                if ("mmap" in names or getattr(node, "module", None) == "mmap") \
                        and path.name != "storage.py":
                    offenders.append(f"{path.name}:{node.lineno} mmap")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                mode = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "mode"), None)
                text = mode.value if isinstance(mode, ast.Constant) else "r"
                if not isinstance(text, str) or set(text) & set("wa+x"):
                    offenders.append(f"{path.name}:{node.lineno} open(mode={text!r})")
    assert not offenders, offenders


def test_every_write_and_sync_is_counted(tmp_path: Path) -> None:
    """Run writes, zeroing, discard, a snapshot, a check and close through a recording
    backend: the storage layer's counters match the backend's operations one for one,
    and the image file is opened once, by the backend."""
    p = tmp_path / "a.qcow2"
    qcow2.create(p, 8 << 20, cluster_size=16384)
    opened: list[str] = []
    target = os.path.realpath(p)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
            if os.path.realpath(os.fsdecode(args[0])) == target:
                opened.append(event)

    sys.addaudithook(hook)
    rec_backend = RecordingBackend(FileBackend(p, writable=True))
    img = qcow2.open(p, "r+", backend=rec_backend)
    img.pwrite(os.urandom(100000), 12345)
    img.write_zeroes(1 << 20, 1 << 20)
    img.discard(0, 32768)
    img.create_snapshot("s")
    img.pwrite(b"q" * 5000, 70000)
    img.check()
    stats = img.stats
    img.close()
    ops = rec_backend.recording.ops
    writes = sum(1 for o in ops if o.kind == "write")
    syncs = sum(1 for o in ops if o.kind == "sync")
    counted = sum(getattr(stats, f"{k}_writes") for k in
                  ("data", "l1", "l2", "refcount", "header", "snapshot_table"))
    nbytes = sum(len(o.data) for o in ops if o.kind == "write")
    counted_bytes = sum(getattr(stats, f"{k}_writes_bytes") for k in
                        ("data", "l1", "l2", "refcount", "header", "snapshot_table"))
    assert (writes, syncs, nbytes) == (counted, stats.syncs, counted_bytes)
    assert opened == ["open"]  # FileBackend's os.open, nothing else
    assert_clean(p)
