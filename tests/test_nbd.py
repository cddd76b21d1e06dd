"""`qcow2 nbd` against real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-io, libnbd, and
qemu-nbd serving the same file as the reference. Servers listen on Unix sockets in tmp
dirs and stop by themselves (SIGTERM at teardown, or when their only client leaves)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import crashsim
import pytest
from conftest import assert_clean, qemu_img, qemu_io, raw_bytes

# libnbd's binding is a Debian package (python3-libnbd, installed by `make test`) in the
# system's dist-packages. The venv's interpreter is not Debian's python (so
# --system-site-packages would not reach it), but it is the same 3.11 ABI: the folder is
# appended, last, so that nothing in it can shadow the venv's own packages.
if "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")
import nbd  # noqa: E402

import qcow2  # noqa: E402
from qcow2 import nbd as qnbd  # noqa: E402

for tool in ("nbdinfo", "nbdcopy", "qemu-nbd"):
    if shutil.which(tool) is None:  # never skipped: `make test` installs them
        raise RuntimeError(f"{tool} is required for the NBD tests (run `make test`)")

MiB = 1 << 20


@contextmanager
def server(path: Path, *args: str, name: str = "", sock: Path | None = None,
           expect_rc: int = 0) -> Iterator[Path]:
    """`qcow2 nbd -k SOCK ARGS FILE` running; stopped with SIGTERM afterwards."""
    sock = sock or path.parent / f"{path.name}.sock"
    cmd = [sys.executable, "-m", "qcow2", "nbd", "-k", str(sock), *args]
    if name:
        cmd += ["-x", name]
    proc = subprocess.Popen(cmd + [str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {proc.communicate()}")
            time.sleep(0.02)
        yield sock
    finally:
        if proc.poll() is None and sock.exists():  # else it is leaving by itself
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == expect_rc, err
    assert "Traceback" not in err, err
    assert not sock.exists()


@contextmanager
def qemu_nbd(path: Path, *args: str, name: str = "") -> Iterator[Path]:
    sock = path.parent / f"{path.name}.qemu.sock"
    proc = subprocess.Popen(["qemu-nbd", "-k", str(sock), "-t", "-e", "8", "-x", name, *args,
                             str(path)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def uri(sock: Path, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def nbdinfo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, check=check,
                          timeout=60)


def handle(sock: Path, name: str = "", structured: bool = True,
           contexts: tuple[str, ...] = ("base:allocation",)) -> nbd.NBD:
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    h.set_export_name(name)
    h.connect_unix(str(sock))
    return h


def make_image(path: Path, size: int = 64 * MiB, *args: str) -> Path:
    qemu_img("create", "-f", "qcow2", *args, str(path), str(size))
    qemu_io(path, "write -P 0xab 0 1M", "write -z 4M 1M", "write -P 1 10M 64k",
            "write -P 7 20000000 12345")
    return path


def _map(sock: Path, ctx: str = "base:allocation", name: str = "") -> list[dict]:
    p = nbdinfo("--json", f"--map={ctx}", uri(sock, name))
    return json.loads(p.stdout)


def _merged(extents: list[dict]) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for e in extents:
        if out and out[-1][2] == e["type"] and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["offset"], e["length"], e["type"]])
    return [tuple(x) for x in out]  # type: ignore[misc]


# ------------------------------------------------------------------ nbdinfo --
def test_nbdinfo_json(tmp: Path) -> None:
    img = make_image(tmp / "a.qcow2", 64 * MiB, "-o", "cluster_size=128k")
    with server(img, "-t", "-D", "my disk", name="disk") as sock:
        info = json.loads(nbdinfo("--json", uri(sock, "disk")).stdout)
        ex = info["exports"][0]
        assert info["structured"] is True and info["protocol"] == "newstyle-fixed"
        assert ex["export-name"] == "disk" and ex["description"] == "my disk"
        assert ex["export-size"] == 64 * MiB
        assert (ex["block_size_minimum"], ex["block_size_preferred"],
                ex["block_size_maximum"]) == (1, 128 * 1024, 32 * MiB)
        assert ex["contexts"] == ["base:allocation"]  # qemu:allocation-depth with -A only
        assert ex["is_read_only"] is False
        for what in ("flush", "trim", "zero", "fua", "multi-conn", "fast-zero", "df", "cache"):
            assert nbdinfo("--can", what, uri(sock, "disk"), check=False).returncode == 0, what
        assert nbdinfo("--is", "read-only", uri(sock, "disk"), check=False).returncode == 2
        listing = json.loads(nbdinfo("--list", "--json", uri(sock)).stdout)
        assert [(e["export-name"], e.get("description")) for e in listing["exports"]] == \
            [("disk", "my disk")]
        # an unknown export is refused, "" too when the export has a name (as
        # qemu-nbd: "" is not a shortcut to the first export); the server keeps serving
        assert nbdinfo(uri(sock, "nope"), check=False).returncode != 0
        assert "No such file" in nbdinfo(uri(sock, ""), check=False).stderr
        assert nbdinfo("--size", uri(sock, "disk")).stdout.strip() == str(64 * MiB)


def test_nbdinfo_read_only_matches_qemu_nbd(tmp: Path) -> None:
    img = make_image(tmp / "a.qcow2")
    with server(img, "-r", "-t") as ours, qemu_nbd(img, "-r") as ref:
        for what in ("flush", "trim", "zero", "fua", "multi-conn", "fast-zero", "df", "cache"):
            got = nbdinfo("--can", what, uri(ours), check=False).returncode
            want = nbdinfo("--can", what, uri(ref), check=False).returncode
            assert got == want, what
        assert nbdinfo("--is", "read-only", uri(ours), check=False).returncode == 0
        assert _map(ours) == _map(ref)


@pytest.mark.parametrize("args", [(), ("-A",), ("-A", "-B", "b1", "-B", "b2"), ("-B", "b1")])
def test_contexts_listed_as_qemu_nbd_lists_them(tmp: Path, args: tuple[str, ...]) -> None:
    """qemu:allocation-depth only with -A, bitmaps after it, in qemu-nbd's order: the same
    lists from `nbdinfo --json` and `nbdinfo --list --json`, and the same answer to a
    client that asks for a context the server does not offer."""
    img = make_image(tmp / "a.qcow2")
    qemu_img("bitmap", "--add", str(img), "b1")
    qemu_img("bitmap", "--add", str(img), "b2")

    def listing(sock: Path) -> tuple[list[str], list[list[str]], bool]:
        one = json.loads(nbdinfo("--json", uri(sock)).stdout)["exports"][0]["contexts"]
        every = [e["contexts"] for e in
                 json.loads(nbdinfo("--list", "--json", uri(sock)).stdout)["exports"]]
        h = handle(sock, contexts=("qemu:allocation-depth",))
        depth = h.can_meta_context("qemu:allocation-depth")
        h.shutdown()
        return one, every, depth

    with server(img, "-t", "-r", *args) as ours, qemu_nbd(img, "-r", *args) as ref:
        got, want = listing(ours), listing(ref)
    assert got == want
    assert ("qemu:allocation-depth" in got[0]) == ("-A" in args)


def test_map_matches_qemu_nbd_and_our_map(tmp: Path) -> None:
    """base:allocation and qemu:allocation-depth across a backing chain, extended L2 too."""
    base = make_image(tmp / "base.qcow2", 32 * MiB)
    top = tmp / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", "-b", str(base), "-F", "qcow2",
             str(top))
    qemu_io(top, "write -P 5 512k 8k", "write -z 10M 32k", "discard 4M 64k",
            "write -P 9 30M 3k")
    with server(top, "-r", "-t", "-A") as ours, qemu_nbd(top, "-r", "-A") as ref:
        for ctx in ("base:allocation", "qemu:allocation-depth"):
            assert _merged(_map(ours, ctx)) == _merged(_map(ref, ctx)), ctx
        ours_map = _merged(_map(ours))
    with qcow2.open(top) as img:
        want = [{"offset": e["start"], "length": e["length"],
                 "type": (0 if e["data"] else 1) | (2 if e["zero"] else 0)} for e in img.map()]
    assert ours_map == _merged(want)


# ------------------------------------------------------------------ copies --
@pytest.mark.parametrize("conns", [1, 4])
def test_nbdcopy_both_directions(tmp: Path, conns: int) -> None:
    img = make_image(tmp / "a.qcow2")
    want = raw_bytes(img, tmp)
    out = tmp / "out.raw"
    with server(img, "-r", "-t", "-e", "8") as sock:
        subprocess.run(["nbdcopy", "-C", str(conns), uri(sock), str(out)], check=True,
                       timeout=120)
    assert out.read_bytes() == want
    # into a fresh image: data equal, zero areas not written (left unallocated)
    dst = tmp / "dst.qcow2"
    qemu_img("create", "-f", "qcow2", str(dst), str(64 * MiB))
    with server(dst, "-t", "-e", "8") as sock:
        subprocess.run(["nbdcopy", "-C", str(conns), str(out), uri(sock)], check=True,
                       timeout=120)
    assert_clean(dst)
    assert qemu_img("compare", str(img), str(dst), check=False).returncode == 0
    info = json.loads(qemu_img("info", "--output=json", str(dst)).stdout)
    assert info["actual-size"] < 8 * MiB  # 1 MiB + 64k + 12k of data in a 64 MiB disk


def test_qemu_img_and_qemu_io_over_nbd(tmp: Path) -> None:
    img = make_image(tmp / "a.qcow2")
    with server(img, "-t", "-e", "4", name="d") as sock:
        u = uri(sock, "d")
        # qemu-img map over NBD reports the allocation qemu-img map reports for the file
        over = json.loads(qemu_img("map", "--output=json", "-f", "raw", u).stdout)
        local = json.loads(qemu_img("map", "--output=json", str(img)).stdout)
        def kinds(m: list[dict]) -> list[tuple[int, int, int]]:
            return _merged([{"offset": e["start"], "length": e["length"],
                             "type": (e["zero"], e["data"])} for e in m])

        assert kinds(over) == kinds(local)
        copy = tmp / "copy.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", u, str(copy))
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 3M 70000",
                            "-c", "write -z 512 4096", "-c", "read -P 0x5a 3M 70000",
                            "-c", "discard 10M 64k", u], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
    assert qemu_img("compare", str(copy), str(tmp / "a.qcow2"), "-f", "qcow2", "-F", "qcow2",
                    check=False).returncode == 1  # the writes came after the copy
    assert_clean(img)
    qemu_io(img, "read -P 0x5a 3M 70000", "read -P 0 512 4096", "read -P 0 10M 64k",
            "read -P 0xab 4608 1043968")


# ------------------------------------------------------------------ libnbd details --
@pytest.mark.parametrize("structured", [True, False])
def test_libnbd_reads_writes_errors(tmp: Path, structured: bool) -> None:
    img = make_image(tmp / "a.qcow2")
    model = bytearray(raw_bytes(img, tmp))
    with server(img, "-t") as sock:
        h = handle(sock, structured=structured)
        assert h.get_structured_replies_negotiated() is structured
        size = h.get_size()
        assert size == len(model)
        assert h.pread(2 * MiB, 0) == bytes(model[: 2 * MiB])
        h.pwrite(b"x" * 5000, 1000, nbd.CMD_FLAG_FUA)
        model[1000:6000] = b"x" * 5000
        h.zero(65536, 65536 * 3 + 100, nbd.CMD_FLAG_NO_HOLE)
        model[65536 * 3 + 100:65536 * 4 + 100] = bytes(65536)
        h.trim(11 * MiB, MiB)  # advisory: whole clusters read as zeros afterwards
        model[MiB:12 * MiB] = bytes(11 * MiB)
        h.flush()
        assert h.pread(13 * MiB, 0) == bytes(model[: 13 * MiB])
        h.set_strict_mode(0)  # let libnbd send what a broken client would
        cases = [
            (lambda: h.pread(4096, size - 100), "EINVAL"),
            (lambda: h.pwrite(b"a" * 4096, size - 100), "EINVAL"),
            (lambda: h.pread(48 * MiB, 0), "EINVAL"),  # over the maximum block size
            (lambda: h.pwrite(bytes(40 * MiB), 0), "EINVAL"),  # payload read and dropped
            (lambda: h.trim(4096, size), "EINVAL"),
            (lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE), "EINVAL"),  # flag not for READ
        ]
        if structured:
            # unaligned: fast zeroing would need written data
            cases.append((lambda: h.zero(1000, 300, nbd.CMD_FLAG_FAST_ZERO), "ENOTSUP"))
        for fn, name in cases:
            with pytest.raises(nbd.Error) as ei:
                fn()
            assert ei.value.errno == name, name
        assert h.pread(6000, 0) == bytes(model[:6000])  # the connection is still good
        h.shutdown()
    assert_clean(img)
    assert raw_bytes(img, tmp) == bytes(model)


def _bad_requests(h: nbd.NBD) -> list[str | None]:
    h.set_strict_mode(0)
    size = h.get_size()
    cases = [lambda: h.pread(4096, size - 100), lambda: h.pwrite(b"a" * 4096, size - 100),
             lambda: h.trim(4096, size), lambda: h.zero(4096, size - 100),
             lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE), lambda: h.pread(48 * MiB, 0),
             lambda: h.zero(1000, 300, nbd.CMD_FLAG_FAST_ZERO), lambda: h.pread(0, size + 1)]
    out: list[str | None] = []
    for fn in cases:
        try:
            fn()
            out.append(None)
        except nbd.Error as exc:
            out.append(exc.errno)
    return out


def test_bad_requests_answered_as_qemu_nbd_does(tmp: Path) -> None:
    img = make_image(tmp / "a.qcow2")
    ref_img = tmp / "ref.qcow2"  # two writers never share a file
    shutil.copyfile(img, ref_img)
    with server(img, "-t", name="d") as ours, qemu_nbd(ref_img, name="d") as ref:
        got = _bad_requests(handle(ours, "d"))
        want = _bad_requests(handle(ref, "d"))
    assert got == want and all(got[:7]), got


def test_structured_read_chunks_and_block_status(tmp: Path) -> None:
    img = make_image(tmp / "a.qcow2")
    with server(img, "-t", "-A") as sock:
        h = handle(sock, contexts=("base:allocation", "qemu:allocation-depth"))
        chunks: list[tuple[int, int, int]] = []

        def chunk(buf: bytes, offset: int, status: int, err: list[int]) -> int:
            chunks.append((offset, len(buf), status))
            return 0

        data = h.pread_structured(6 * MiB, 0, chunk)
        assert data == b"\xab" * MiB + bytes(5 * MiB)
        assert (0, MiB, nbd.READ_DATA) in chunks
        assert any(s == nbd.READ_HOLE for _o, _n, s in chunks)
        assert sum(n for _o, n, _s in chunks) == 6 * MiB
        # DF: one data chunk
        chunks.clear()
        h.pread_structured(6 * MiB, 0, chunk, nbd.CMD_FLAG_DF)
        assert chunks == [(0, 6 * MiB, nbd.READ_DATA)]
        seen: dict[str, list[int]] = {}

        def extents(ctx: str, offset: int, entries: list[int], err: list[int]) -> int:
            seen[ctx] = entries
            return 0

        h.block_status(12 * MiB, 0, extents)
        assert seen["base:allocation"][:4] == [MiB, 0, 9 * MiB, 3]
        assert seen["qemu:allocation-depth"][:2] == [MiB, 1]
        seen.clear()
        h.block_status(12 * MiB, 0, extents, nbd.CMD_FLAG_REQ_ONE)
        assert seen["base:allocation"] == [MiB, 0]
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as ei:
            h.block_status(4096, 64 * MiB, extents)
        assert ei.value.errno == "EINVAL"
        h.shutdown()


def test_read_only_export_and_snapshot(tmp: Path) -> None:
    img = make_image(tmp / "a.qcow2")
    qemu_img("snapshot", "-c", "s1", str(img))
    before = raw_bytes(img, tmp)
    qemu_io(img, "write -P 0x33 0 2M")
    for args in (["-r"], ["-l", "snapshot.name=s1"], ["-l", "1"]):
        with server(img, "-t", *args) as sock:
            h = handle(sock)
            assert h.is_read_only()
            want = before if args[0] == "-l" else raw_bytes(img, tmp)
            assert h.pread(3 * MiB, 0) == want[: 3 * MiB]
            h.set_strict_mode(0)
            for fn in (lambda h=h: h.pwrite(b"a", 0), lambda h=h: h.trim(65536, 0),
                       lambda h=h: h.zero(65536, 0)):
                with pytest.raises(nbd.Error) as ei:
                    fn()
                assert ei.value.errno == "EPERM"
            h.shutdown()
    assert_clean(img)
    p = subprocess.run([sys.executable, "-m", "qcow2", "nbd", "-k", str(tmp / "x.sock"),
                        "-l", "snapshot.name=nope", str(img)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_raw_export(tmp: Path) -> None:
    raw = tmp / "d.raw"
    raw.write_bytes(bytes(MiB) + b"\x11" * MiB)
    with server(raw, "-t", "-f", "raw") as sock:
        h = handle(sock)
        assert h.get_size() == 2 * MiB
        h.pwrite(b"\x22" * 4096, 8192)
        h.zero(MiB, 4096)
        h.flush()
        assert h.pread(4096, 8192) == bytes(4096)
        assert h.pread(4096, MiB + 4096) == b"\x11" * 4096
        h.shutdown()
    data = raw.read_bytes()
    assert data[:MiB + 4096] == bytes(MiB + 4096) and data[MiB + 4096:] == b"\x11" * (MiB - 4096)


def test_several_exports_from_the_library(tmp: Path) -> None:
    """The library serves several exports at once (the CLI, as qemu-nbd, serves one): an
    image read-write, a snapshot of the same image object read-only and a raw file, each
    listed by `nbdinfo --list` with its description, size and read-only flag, each read
    by qemu-img as qemu-img reads the file itself."""
    p = make_image(tmp / "a.qcow2")
    qemu_img("snapshot", "-c", "base", str(p))
    qemu_io(p, "write -P 0x33 0 64k")
    raw = tmp / "r.raw"
    raw.write_bytes(b"\x44" * MiB)
    want = {"disk": raw_bytes(p, tmp), "base": raw_bytes(p, tmp, "base"),
            "raw": raw.read_bytes()}
    img = qcow2.open(p, "r+")
    exports = [qnbd.Export(img, "disk", "the disk", close_image=True),
               qnbd.Export(img.snapshot("base"), "base", "before the upgrade"),
               qnbd.open_export(str(raw), fmt="raw", name="raw", readonly=True)]
    sock = tmp / "m.sock"
    listener = qnbd.listen_unix(str(sock))
    t = threading.Thread(target=qnbd.serve, args=(exports,),
                         kwargs={"sock": listener, "socket_path": str(sock), "shared": 0,
                                 "handle_signals": False})
    t.start()  # not persistent: it stops when h, connected throughout, leaves
    try:
        h = handle(sock, "disk")
        listing = json.loads(nbdinfo("--list", "--json", uri(sock)).stdout)["exports"]
        assert [(e["export-name"], e.get("description"), e["export-size"], e["is_read_only"])
                for e in listing] == [("disk", "the disk", 64 * MiB, False),
                                      ("base", "before the upgrade", 64 * MiB, True),
                                      ("raw", None, MiB, True)]
        for name, data in want.items():
            out = tmp / f"got-{name}.raw"
            qemu_img("convert", "-f", "raw", "-O", "raw", uri(sock, name), str(out))
            assert out.read_bytes() == data, name
        h.pwrite(b"\x55" * 4096, 0)  # the active disk changes, its snapshot does not
        h.flush()
        assert handle(sock, "base").pread(4096, 0) == want["base"][:4096]
        h.shutdown()
    finally:
        t.join(timeout=30)
    assert not t.is_alive() and not sock.exists()
    assert_clean(p)
    assert raw_bytes(p, tmp)[:4096] == b"\x55" * 4096


# ------------------------------------------------------------------ handshake, raw bytes --
def _opt(s: socket.socket, opt: int, data: bytes = b"") -> tuple[int, bytes]:
    s.sendall(struct.pack(">QII", qnbd.IHAVEOPT, opt, len(data)) + data)
    magic, ropt, rep, n = struct.unpack(">QIII", _recv(s, 20))
    assert magic == qnbd.REPLY_MAGIC and ropt == opt
    return rep, _recv(s, n)


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return buf


def _connect(sock: Path, cflags: int = 3) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(sock))
    magic, opt, flags = struct.unpack(">QQH", _recv(s, 18))
    assert (magic, opt, flags) == (qnbd.NBDMAGIC, qnbd.IHAVEOPT, 3)
    s.sendall(struct.pack(">I", cflags))
    return s


def test_handshake_options_and_garbage(tmp: Path) -> None:
    img = make_image(tmp / "a.qcow2")
    with server(img, "-t", "-e", "0", name="d") as sock:
        s = _connect(sock)
        assert _opt(s, qnbd.OPT_STARTTLS)[0] == qnbd.REP_ERR_POLICY
        assert _opt(s, 99)[0] == qnbd.REP_ERR_UNSUP
        assert _opt(s, qnbd.OPT_LIST, b"x")[0] == qnbd.REP_ERR_INVALID
        assert _opt(s, qnbd.OPT_INFO, b"\0\0")[0] == qnbd.REP_ERR_INVALID
        assert _opt(s, qnbd.OPT_GO, struct.pack(">I", 4) + b"nope\0\0")[0] == \
            qnbd.REP_ERR_UNKNOWN
        assert _opt(s, qnbd.OPT_GO, struct.pack(">I", 1000) + b"d\0\0")[0] == \
            qnbd.REP_ERR_INVALID
        assert _opt(s, qnbd.OPT_LIST, bytes(qnbd.MAX_OPTION + 1))[0] == qnbd.REP_ERR_TOO_BIG
        # SET_META_CONTEXT needs structured replies first
        q = struct.pack(">I", 1) + b"d" + struct.pack(">II", 1, 15) + b"base:allocation"
        assert _opt(s, qnbd.OPT_SET_META_CONTEXT, q)[0] == qnbd.REP_ERR_INVALID
        assert _opt(s, qnbd.OPT_STRUCTURED_REPLY) == (qnbd.REP_ACK, b"")
        assert _opt(s, qnbd.OPT_STRUCTURED_REPLY)[0] == qnbd.REP_ERR_INVALID
        assert _opt(s, qnbd.OPT_ABORT)[0] == qnbd.REP_ACK
        s.close()
        # old-style EXPORT_NAME without NO_ZEROES: size, flags and 124 zero bytes
        s = _connect(sock, cflags=1)
        s.sendall(struct.pack(">QII", qnbd.IHAVEOPT, qnbd.OPT_EXPORT_NAME, 1) + b"d")
        size, flags = struct.unpack(">QH", _recv(s, 10))
        assert size == 64 * MiB and flags & qnbd.TF_HAS_FLAGS
        assert _recv(s, 124) == bytes(124)
        # simple reply to a read, then garbage ends this connection only
        s.sendall(struct.pack(">IHHQQI", qnbd.REQUEST_MAGIC, 0, qnbd.CMD_READ, 7, 0, 16))
        magic, err, cookie = struct.unpack(">IIQ", _recv(s, 16))
        assert (magic, err, cookie) == (qnbd.SIMPLE_REPLY_MAGIC, 0, 7)
        assert _recv(s, 16) == b"\xab" * 16
        s.sendall(b"\xff" * 28)
        with pytest.raises((EOFError, ConnectionError)):
            _recv(s, 1)
        s.close()
        # bad client flags, a bad option magic and a client gone mid-request
        for junk in (None, b"\0" * 16):
            s = _connect(sock, cflags=0xF0 if junk is None else 3)
            if junk:
                s.sendall(junk)
            with pytest.raises((EOFError, ConnectionError)):
                _recv(s, 1)
            s.close()
        h = handle(sock, "d")
        h.aio_pwrite(b"z" * 4096, 0)  # never waited for
        del h
        h = handle(sock, "d")
        assert h.pread(16, 65536 * 2) == b"\xab" * 16  # the server still serves
        h.shutdown()
    assert_clean(img)


def test_pipelined_requests_in_one_send(tmp: Path) -> None:
    """Requests and payloads that arrive together in one send (headers, a 300 KiB and a
    small payload, a flush, a read of both, then a request cut in the middle): each gets
    its reply in order, the data lands where it belongs, and the cut request only ends
    this connection."""
    img = make_image(tmp / "a.qcow2")
    big, small = random.Random(5).randbytes(300 * 1024), b"s" * 777

    def req(cmd: int, cookie: int, off: int, n: int) -> bytes:
        return struct.pack(">IHHQQI", qnbd.REQUEST_MAGIC, 0, cmd, cookie, off, n)

    with server(img, "-t", name="d") as sock:
        s = _connect(sock)
        s.sendall(struct.pack(">QII", qnbd.IHAVEOPT, qnbd.OPT_EXPORT_NAME, 1) + b"d")
        _recv(s, 10)
        s.sendall(req(qnbd.CMD_WRITE, 1, 3 * MiB + 5, len(big)) + big
                  + req(qnbd.CMD_WRITE, 2, 7, len(small)) + small
                  + req(qnbd.CMD_FLUSH, 3, 0, 0)
                  + req(qnbd.CMD_READ, 4, 3 * MiB + 5, len(big))
                  + req(qnbd.CMD_READ, 5, 0, 1000))
        for cookie in (1, 2, 3):
            assert struct.unpack(">IIQ", _recv(s, 16)) == (qnbd.SIMPLE_REPLY_MAGIC, 0, cookie)
        assert struct.unpack(">IIQ", _recv(s, 16)) == (qnbd.SIMPLE_REPLY_MAGIC, 0, 4)
        assert _recv(s, len(big)) == big
        assert struct.unpack(">IIQ", _recv(s, 16)) == (qnbd.SIMPLE_REPLY_MAGIC, 0, 5)
        assert _recv(s, 1000) == b"\xab" * 7 + small + b"\xab" * (1000 - 7 - len(small))
        s.sendall(req(qnbd.CMD_WRITE, 6, 0, 65536) + b"x" * 1000)
        s.close()
        assert handle(sock, "d").pread(8, 0) == b"\xab" * 7 + b"s"  # the cut write: none
    assert_clean(img)
    assert raw_bytes(img, tmp)[3 * MiB + 5:3 * MiB + 5 + len(big)] == big


def test_shutdown_signals_pid_file_and_non_persistent(tmp: Path) -> None:
    img = make_image(tmp / "a.qcow2")
    pid = tmp / "pid"
    # without -t the server leaves once its client left
    with server(img, "--pid-file", str(pid)) as sock:
        deadline = time.monotonic() + 10
        while not pid.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert int(pid.read_text()) > 0
        h = handle(sock)
        h.pwrite(b"q" * 512, 0)
        h.shutdown()
        deadline = time.monotonic() + 10
        while sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not sock.exists() and not pid.exists()
    # SIGINT: unflushed writes are flushed, the socket removed
    sock = tmp / "b.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qcow2", "nbd", "-t", "-k", str(sock),
                             str(img)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    h = handle(sock)
    h.pwrite(b"w" * 4096, 8192)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
    assert not sock.exists()
    assert_clean(img)
    qemu_io(img, "read -P 0x71 0 512", "read -P 0x77 8192 4096")


def test_socket_activation_and_fork(tmp: Path) -> None:
    img = make_image(tmp / "a.qcow2")
    p = nbdinfo("--json", "--", "[", sys.executable, "-m", "qcow2", "nbd", "-r", str(img), "]")
    assert json.loads(p.stdout)["exports"][0]["export-size"] == 64 * MiB
    sock, pid = tmp / "f.sock", tmp / "f.pid"
    subprocess.run([sys.executable, "-m", "qcow2", "nbd", "--fork", "-r", "-k", str(sock),
                    "--pid-file", str(pid), str(img)], check=True, timeout=60)
    assert sock.exists() and pid.exists()  # listening when the parent returned
    server_pid = int(pid.read_text())
    assert nbdinfo("--size", uri(sock)).stdout.strip() == str(64 * MiB)
    deadline = time.monotonic() + 20  # not persistent: gone after its client
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sock.exists()
    with pytest.raises(ProcessLookupError):
        for _ in range(200):
            os.kill(server_pid, 0)
            time.sleep(0.05)


def test_io_error_reaches_client_as_eio(tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The library server in a thread over an image whose file fails: EIO and ENOSPC with
    the errno kept, and the connection goes on being served."""
    from qcow2.faults import FaultBackend
    from qcow2.storage import FileBackend

    img_path = make_image(tmp / "a.qcow2")
    backend = FaultBackend(FileBackend(str(img_path), True))
    img = qcow2.open(img_path, "r+", backend=backend)
    sock = tmp / "e.sock"
    listener = qnbd.listen_unix(str(sock))
    t = threading.Thread(target=qnbd.serve, args=(qnbd.Export(img, close_image=True),),
                         kwargs={"sock": listener, "socket_path": str(sock), "shared": 0,
                                 "handle_signals": False})
    t.start()  # not persistent: it stops once the client below has left
    try:
        h = handle(sock)
        for err, name in ((5, "EIO"), (28, "ENOSPC"), (5, "EIO")):
            backend.err = err
            backend.fail_write, backend.fail_sync = backend.writes + 1, backend.syncs + 1
            with pytest.raises(nbd.Error) as ei:
                h.pwrite(b"e" * 65536, 30 * MiB + err * MiB)
                h.flush()
            assert ei.value.errno == name
            backend.fail_write = backend.fail_sync = None
        assert h.pread(16, 0) == b"\xab" * 16
        h.shutdown()
    finally:
        t.join(timeout=30)
    assert not t.is_alive() and not sock.exists()
    assert_clean(img_path)
    # each kind of error is logged once, however often it happens
    logged = [r.getMessage() for r in caplog.records if r.name == "qcow2.nbd"]
    assert len(logged) == 2 and "(EIO)" in logged[0] and "(ENOSPC)" in logged[1], logged


def test_flush_does_not_stall_other_connections(tmp: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """While a FLUSH's fdatasync is held up, another connection reads the same export
    (what the first one wrote too) and a new client connects: the sync runs off the event
    loop. Ordering, not timing: were the sync on the loop, those requests would wait for
    the hold to time out and the test would see it."""
    img_path = make_image(tmp / "a.qcow2")
    started, release = threading.Event(), threading.Event()
    timed_out: list[bool] = []
    real = qnbd._early_sync

    def held_sync(storage: object) -> None:
        started.set()
        timed_out.append(not release.wait(timeout=20))
        real(storage)

    monkeypatch.setattr(qnbd, "_early_sync", held_sync)
    sock = tmp / "f.sock"
    listener = qnbd.listen_unix(str(sock))
    t = threading.Thread(target=qnbd.serve, args=(qnbd.open_export(str(img_path)),),
                         kwargs={"sock": listener, "socket_path": str(sock), "shared": 0,
                                 "handle_signals": False})
    t.start()
    try:
        a, b = handle(sock), handle(sock)
        a.pwrite(b"w" * 65536, 30 * MiB)
        cookie = a.aio_flush()
        assert started.wait(timeout=30)
        assert b.pread(65536, 30 * MiB) == b"w" * 65536
        assert b.pread(16, 0) == b"\xab" * 16
        assert nbdinfo("--size", uri(sock)).stdout.strip() == str(64 * MiB)
        assert not release.is_set() and not timed_out  # all that while the sync was held
        release.set()
        while not a.aio_command_completed(cookie):
            a.poll(-1)
        a.shutdown()
        b.shutdown()
    finally:
        release.set()
        t.join(timeout=30)
    assert not t.is_alive() and timed_out == [False]
    assert_clean(img_path)
    assert raw_bytes(img_path, tmp)[30 * MiB:30 * MiB + 65536] == b"w" * 65536


# ------------------------------------------------------------------ load --
def test_load_several_clients_then_check(tmp: Path) -> None:
    """4 clients x ~2 s of pipelined random reads and writes in their own quarter of the
    disk; then qemu-img check is clean and every written byte reads back."""
    size = 32 * MiB
    img = tmp / "load.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", str(img), str(size))
    model = bytearray(size)
    quarter = size // 4
    errors: list[BaseException] = []
    with server(img, "-t", "-e", "4") as sock:
        def client(i: int) -> None:
            try:
                rng = random.Random(i)
                h = handle(sock)
                base = i * quarter
                deadline = time.monotonic() + 2
                ops = 0
                while time.monotonic() < deadline and ops < 20000:
                    ops += 1
                    n = rng.choice((512, 4096, 7000, 65536, 200000))
                    off = base + rng.randrange(0, quarter - n)
                    r = rng.random()
                    if r < 0.5:
                        data = bytes([rng.randrange(256)]) * n
                        h.pwrite(data, off, nbd.CMD_FLAG_FUA if r < 0.05 else 0)
                        model[off:off + n] = data
                    elif r < 0.6:
                        h.zero(n, off)
                        model[off:off + n] = bytes(n)
                    else:
                        assert h.pread(n, off) == bytes(model[off:off + n])
                h.flush()
                h.shutdown()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert_clean(img)
    assert raw_bytes(img, tmp) == bytes(model)


# ------------------------------------------------------------------ crashes --
class _OverNBD:
    """What the crash simulator's Driver calls on its image, sent through an NBD client
    to the server that holds the (recording) image; the rest is the image's own."""

    def __init__(self, h: nbd.NBD, img: qcow2.Image) -> None:
        self._h, self._img = h, img

    def pwrite(self, data: bytes, off: int) -> None:
        self._h.pwrite(data, off)

    def pwrite_fua(self, data: bytes, off: int) -> None:
        self._h.pwrite(data, off, nbd.CMD_FLAG_FUA)

    def write_zeroes(self, off: int, n: int) -> None:
        self._h.zero(n, off)

    def discard(self, off: int, n: int) -> None:
        self._h.trim(n, off)

    def flush(self) -> None:
        self._h.flush()

    def pread(self, n: int, off: int) -> bytes:
        return self._h.pread(n, off)

    def __getattr__(self, name: str) -> object:
        return getattr(self._img, name)


def _body_over_nbd(d: crashsim.Driver, rng: random.Random) -> None:
    img = d.img
    sock = Path(img.path).with_suffix(".sock")
    listener = qnbd.listen_unix(str(sock))
    t = threading.Thread(target=qnbd.serve, args=(qnbd.Export(img),),
                         kwargs={"sock": listener, "socket_path": str(sock),
                                 "handle_signals": False})
    t.start()  # it stops when the client below leaves (and flushes the image then)
    try:
        h = handle(sock)
        d.img = _OverNBD(h, img)
        for i in range(24):
            off, k = crashsim._sizes(rng, d.size, 4096)
            r = rng.random()
            if r < 0.15:
                d.write_fua(off, rng.randbytes(k))  # durable at its reply, the rest not
            elif r < 0.7:
                d.write(off, rng.randbytes(k))
            elif r < 0.85:
                d.write_zeroes(off, k)
            else:
                d.discard(off, k)
            if i % 6 == 5:
                d.flush()
        d.write(0, rng.randbytes(3000))  # acknowledged, never flushed by the client
        h.shutdown()
    finally:
        t.join(timeout=60)
        d.img = img
    assert not t.is_alive()


def test_crash_states_through_the_server(tmp: Path, mode: str) -> None:
    """Every crash state of a workload of writes, FUA writes, zeroing, trims and flushes
    sent over NBD opens, checks clean and holds everything a completed FLUSH covered and
    every FUA write acknowledged (in every refcount mode)."""
    def setup(directory: Path) -> Path:
        p = directory / "served.qcow2"
        qcow2.create(p, 4 << 20, cluster_size=4096)
        return p

    workload = crashsim.Workload("over-nbd", setup, _body_over_nbd)
    run = workload.record(tmp, seed=3, mode=mode)
    rep = crashsim.simulate(run, crashsim.state_budget(40), seed=3)
    assert rep.states >= min(40, run.writes) // 2 and rep.qemu_checked > 0


def test_shared_limit_queues_clients(tmp: Path) -> None:
    """-e 1 (the default): a second client waits for the first to leave, as with qemu-nbd."""
    img = make_image(tmp / "a.qcow2")
    with server(img, "-t") as sock:
        h = handle(sock)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(1)  # no greeting while the first client is served
        h.shutdown()
        s.settimeout(20)
        assert struct.unpack(">Q", _recv(s, 8))[0] == qnbd.NBDMAGIC
        s.close()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_replies_costs_bounded_memory(tmp: Path) -> None:
    """400 pipelined 1 MiB reads and nothing read back: the server stops reading requests
    once its reply buffer is full, instead of holding 400 MiB of replies."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), str(64 * MiB))
    qemu_io(img, "write -P 0x61 0 64M")
    pid_file = tmp / "pid"
    with server(img, "-t", "--pid-file", str(pid_file)) as sock:
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = int(pid_file.read_text())
        before = _rss(pid)
        s = _connect(sock, cflags=1)
        s.sendall(struct.pack(">QII", qnbd.IHAVEOPT, qnbd.OPT_EXPORT_NAME, 0))
        _recv(s, 10 + 124)
        s.setblocking(False)
        reqs = b"".join(struct.pack(">IHHQQI", qnbd.REQUEST_MAGIC, 0, qnbd.CMD_READ, i,
                                    (i % 64) * MiB, MiB) for i in range(400))
        sent = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # send what the server takes in 3 s
            try:
                sent += s.send(reqs[sent:])
            except BlockingIOError:
                time.sleep(0.05)
            if sent == len(reqs):
                time.sleep(0.5)
                break
        grown = _rss(pid) - before
        s.close()
        # a few replies in the socket and transport buffers, not 400 MiB
        assert grown < 96 * MiB, grown
        h = handle(sock)  # and it still serves the next client
        assert h.pread(4, 0) == b"aaaa"
        h.shutdown()


def test_tcp_on_loopback(tmp: Path) -> None:
    img = make_image(tmp / "a.qcow2")
    with socket.socket() as probe:  # a free port (the tiny race with others is harmless)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qcow2", "nbd", "-r", "-b", "127.0.0.1",
                             "-p", str(port), "-x", "d", str(img)], stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break  # this probe was the one client: the server now waits for a new one
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        assert proc.wait(timeout=20) == 0  # it served its (only) client and left
    proc = subprocess.Popen([sys.executable, "-m", "qcow2", "nbd", "-r", "-t", "-b", "127.0.0.1",
                             "-p", str(port), "-x", "d", str(img)], stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            p = nbdinfo("--size", f"nbd://127.0.0.1:{port}/d", check=False)
            if p.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert p.stdout.strip() == str(64 * MiB), p.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_unexpected_failure_is_eio_and_the_server_goes_on(tmp: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    class Broken(qnbd.RawImage):
        def pread(self, n: int, offset: int) -> bytes:
            if offset == 0:
                raise ValueError("boom")
            return super().pread(n, offset)

    raw = tmp / "d.raw"
    raw.write_bytes(b"r" * MiB)
    sock = tmp / "b.sock"
    t = threading.Thread(target=qnbd.serve, args=(qnbd.Export(Broken(str(raw), False),
                                                              close_image=True),),
                         kwargs={"socket_path": str(sock), "handle_signals": False,
                                 "shared": 0})
    t.start()  # it stops when both clients below have left
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        handles = [handle(sock, structured=structured) for structured in (True, False)]
        for h in handles:
            with pytest.raises(nbd.Error) as ei:
                h.pread(512, 0)
            assert ei.value.errno == "EIO"
            assert h.pread(512, 512) == b"r" * 512
        for h in handles:
            h.shutdown()
    finally:
        t.join(timeout=30)
    assert not t.is_alive()
    assert any("ValueError: boom" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ dirty bitmaps --
def test_dirty_bitmap_context_matches_qemu_nbd(tmp: Path) -> None:
    p = tmp / "d.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), str(64 * MiB))
    qemu_img("bitmap", "--add", "-g", "64k", str(p), "b0")
    qemu_img("bitmap", "--add", "-g", "4k", str(p), "fine")
    qemu_io(p, "write 0 1M", "write -z 4M 70000", "discard 10M 64k", "write 20000000 12345")
    ctxs = ("qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:fine")
    with qemu_nbd(p, "-r", "-B", "b0", "-B", "fine") as ref, \
            server(p, "-t", "-r", "-B", "b0", "-B", "fine") as ours:
        for ctx in ctxs:
            want = _merged(_map(ref, ctx))
            assert _merged(_map(ours, ctx)) == want, ctx
            assert (0, 1 << 20, 1) in want
        info = json.loads(nbdinfo("--json", uri(ours)).stdout)["exports"][0]
        ref_info = json.loads(nbdinfo("--json", uri(ref)).stdout)["exports"][0]
        def bitmaps(i: dict) -> list[str]:
            return [c for c in i["contexts"] if c.startswith("qemu:dirty-bitmap:")]

        assert bitmaps(info) == bitmaps(ref_info) == list(reversed(ctxs))
    err = subprocess.run([sys.executable, "-m", "qcow2", "nbd", "-k", str(tmp / "x.sock"),
                          "-B", "nope", str(p)], capture_output=True, text=True, timeout=60)
    assert err.returncode == 1 and err.stderr.strip() == "qcow2: Bitmap 'nope' is not found"
    assert_clean(p)


def test_writable_export_keeps_its_bitmap_current(tmp: Path) -> None:
    p = tmp / "w.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), str(16 * MiB))
    qemu_img("bitmap", "--add", str(p), "b0")
    with server(p, "-t", "-B", "b0") as sock:
        h = handle(sock, contexts=("qemu:dirty-bitmap:b0",))
        h.pwrite(b"x" * 4096, 12 * MiB)
        h.zero(65536 + 1, 8 * MiB)  # (count, offset)
        h.flush()
        h.shutdown()
        got = _merged(_map(sock, "qemu:dirty-bitmap:b0"))
        assert got == [
            (0, 8 * MiB, 0), (8 * MiB, 2 * 65536, 1), (8 * MiB + 2 * 65536, 4 * MiB - 2 * 65536, 0),
            (12 * MiB, 65536, 1), (12 * MiB + 65536, 4 * MiB - 65536, 0)], got
    assert_clean(p)
    with qcow2.open(p) as img:
        assert list(img.dirty_ranges("b0")) == [(8 * MiB, 2 * 65536), (12 * MiB, 65536)]
