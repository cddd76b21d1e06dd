"""`qcow2 rebase` and `qcow2 commit` against `qemu-img rebase` / `qemu-img commit` run on
copies of the same chains: same exit codes and messages, the same guest content before
and after (qemu-img compare), the same allocation map for a safe rebase (only the
clusters where the old and new chains differ are copied), qemu-img check clean."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import assert_clean, progress_values, qemu_img, qemu_info, qemu_io, run

from qcow2.cli import main
from qcow2.rebase import RateLimit, commit, rebase

MiB = 1 << 20


def _chain(tmp: Path, prefix: str, opts: str = "") -> list[Path]:
    """base <- mid <- top, each with some data and zeros of its own."""
    o = ["-o", opts] if opts else []
    b, m, t = (tmp / f"{prefix}{n}.qcow2" for n in ("base", "mid", "top"))
    qemu_img("create", "-q", "-f", "qcow2", *o, str(b), "4M")
    qemu_io(b, "write -P 1 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", *o, "-b", b.name, "-F", "qcow2", str(m))
    qemu_io(m, "write -P 2 1M 1M", "write -z 2560k 64k", "write -P 1 3M 64k")
    qemu_img("create", "-q", "-f", "qcow2", *o, "-b", m.name, "-F", "qcow2", str(t))
    qemu_io(t, "write -P 3 1500k 100k", "write -z 3200k 64k", "write -P 4 5000 100")
    return [b, m, t]


def _copy_chain(chain: list[Path], prefix: str) -> list[Path]:
    out = []
    for p in chain:
        q = p.with_name(prefix + p.name)
        shutil.copyfile(p, q)
        out.append(q)
    for lower, upper in zip(out, out[1:]):  # point the copies at each other
        qemu_img("rebase", "-u", "-b", lower.name, "-F", "qcow2", str(upper))
    return out


def _map(p: Path) -> list[tuple[int, int, int, bool, bool]]:
    entries = json.loads(qemu_img("map", "--output=json", str(p)).stdout)
    return [(e["start"], e["length"], e["depth"], e["zero"], e["data"]) for e in entries]


def _copied(p: Path) -> list[tuple[int, int]]:
    """The ranges the top image holds itself (qemu-img writes copied zeros as data, we
    as zero clusters: both count as held)."""
    out: list[tuple[int, int]] = []
    for start, length, depth, _zero, _data in _map(p):
        if depth == 0:
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((start, length))
    return out


def _raw(p: Path, tmp: Path) -> bytes:
    out = tmp / (p.name + ".raw")
    qemu_img("convert", "-O", "raw", str(p), str(out))
    return out.read_bytes()


@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "cluster_size=32k,extended_l2=on",
                                  "compat=0.10"])
def test_safe_rebase_like_qemu(tmp: Path, opts: str) -> None:
    ours = _chain(tmp, "o", opts)
    theirs = _copy_chain(ours, "q-")
    before = _raw(ours[2], tmp)
    rebase(ours[2], ours[0].name, "qcow2")
    qemu_img("rebase", "-b", theirs[0].name, "-F", "qcow2", str(theirs[2]))
    assert_clean(ours[2])
    assert qemu_info(ours[2])["backing-filename"] == ours[0].name
    assert _raw(ours[2], tmp) == before
    assert _copied(ours[2]) == _copied(theirs[2])  # the same clusters copied
    # flatten: no backing file, the content kept
    rebase(ours[2], "", None)
    qemu_img("rebase", "-b", "", str(theirs[2]))
    assert_clean(ours[2])
    assert "backing-filename" not in qemu_info(ours[2])
    assert _raw(ours[2], tmp) == before
    assert _copied(ours[2]) == _copied(theirs[2])


def test_rebase_cli(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    b, m, t = _chain(tmp, "c")
    cases = [([str(t)], 1), (["-b", b.name, str(t)], 1), (["-b", "nonexist", "-F", "qcow2", str(t)], 1),
             (["-b", b.name, "-F", "foo", str(t)], 1), (["-f", "raw", "-b", b.name, "-F", "qcow2", str(t)], 1),
             (["-u", "-b", "elsewhere.qcow2", "-F", "qcow2", str(t)], 0),
             (["-u", "-b", m.name, "-F", "qcow2", str(t)], 0),
             (["-p", "-b", b.name, "-F", "qcow2", str(t)], 0)]
    for args, want in cases:
        ref = t.with_name("ref.qcow2")
        shutil.copyfile(t, ref)
        theirs = run("qemu-img", "rebase", *[str(ref) if a == str(t) else a for a in args],
                     check=False)
        rc = main(["rebase", *args])
        cap = capsys.readouterr()
        assert rc == theirs.returncode == want, (args, cap.err, theirs.stderr)
        if rc:
            first = theirs.stderr.splitlines()[0].replace("qemu-img:", "qcow2:")
            assert cap.err.startswith(first.replace(str(ref), str(t))), (args, cap.err)
        elif "-p" in args:
            # the steps in between depend on each tool's chunking: first and last agree
            for out in (cap.out, theirs.stdout):
                assert out.startswith("    (0.00/100%)") and out.rstrip().endswith(
                    "    (100.00/100%)"), out
        else:
            assert cap.out == theirs.stdout
    assert qemu_info(t)["backing-filename"] == b.name
    assert_clean(t)


@pytest.mark.parametrize("cmd", [["commit", "-p"], ["rebase", "-p", "-b", "cbase.qcow2",
                                                         "-F", "qcow2"]], ids=["commit", "rebase"])
def test_progress_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path, cmd: list[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """-p: qemu-img's progress lines on stdout, as programs parse them, from 0.00 to
    100.00 then one newline (how many in between depends on each tool's chunking)."""
    monkeypatch.chdir(tmp)
    ours = _chain(tmp, "c")
    theirs = _copy_chain(ours, "r")
    if cmd[0] == "rebase":
        theirs[2].unlink()
        shutil.copyfile(ours[2], theirs[2])  # the same names: onto cbase, from rtop
    rc = main([*cmd, str(ours[2])])
    out = capsys.readouterr().out
    q = subprocess.run(["qemu-img", *cmd, str(theirs[2])], capture_output=True, check=True)
    assert rc == 0
    for text in (out, q.stdout.decode()):
        progress_values(text)
        tail = "Image committed.\n" if cmd[0] == "commit" else ""
        assert text.endswith("(100.00/100%)\r\n" + tail) and text.count("\n") == 1 + bool(tail)
    assert out.partition("\n")[2] == q.stdout.decode().partition("\n")[2]


def test_rebase_errors_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache modes checked before anything is opened, one file name, and a missing new
    backing file named as qemu-img combines it with the image name as given."""
    monkeypatch.chdir(tmp)
    (tmp / "d").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "d/b.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "d/t.qcow2")
    before = (tmp / "d/t.qcow2").read_bytes()
    for args in (["-b", "gone.qcow2", "-F", "qcow2"], ["-t", "bad", "-b", "b.qcow2", "-F", "qcow2"],
                 ["-T", "bad", "-u", "-b", ""], ["-b", "b.qcow2", "-F", "qcow2", "d/b.qcow2"]):
        theirs = run("qemu-img", "rebase", *args, "d/t.qcow2", check=False)
        assert main(["rebase", *args, "d/t.qcow2"]) == theirs.returncode == 1
        first = theirs.stderr.splitlines()[0].replace("qemu-img:", "qcow2:")
        assert capsys.readouterr().err == first + "\n", args
    assert (tmp / "d/t.qcow2").read_bytes() == before


@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "cluster_size=32k,extended_l2=on",
                                  "compat=0.10"])
def test_commit_like_qemu(tmp: Path, opts: str) -> None:
    ours = _chain(tmp, "o", opts)
    theirs = _copy_chain(ours, "q-")
    before = _raw(ours[2], tmp)
    commit(ours[2])
    qemu_img("commit", str(theirs[2]))
    for a, b in zip(ours, theirs):
        assert_clean(a)
        assert qemu_img("compare", str(a), str(b), check=False).returncode == 0, a.name
    assert _raw(ours[1], tmp) == before and _raw(ours[2], tmp) == before
    assert all(e[2] > 0 for e in _map(ours[2]))  # emptied: everything from below
    # into the base, through the middle image
    qemu_io(ours[2], "write -P 7 0 64k")
    qemu_io(theirs[2], "write -P 7 0 64k")
    before = _raw(ours[2], tmp)
    assert main(["commit", "-q", "-b", ours[0].name, str(ours[2])]) == 0
    qemu_img("commit", "-q", "-b", theirs[0].name, str(theirs[2]))
    for a in ours:
        assert_clean(a)
    assert _raw(ours[0], tmp) == before == _raw(theirs[0], tmp)


def test_commit_keep_and_raw_base(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    base = tmp / "base.raw"
    base.write_bytes(b"\x01" * (2 * MiB))
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", str(top))
    qemu_io(top, "write -P 2 4096 8192", "write -z 1M 64k")
    before = _raw(top, tmp)
    assert main(["commit", "-d", str(top)]) == 0
    assert capsys.readouterr().out == "Image committed.\n"
    assert base.read_bytes() == before
    assert any(e[2] == 0 and e[4] for e in _map(top))  # -d: the overlay kept its data
    assert_clean(top)
    alone = tmp / "alone.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(alone), "1M")
    theirs = run("qemu-img", "commit", str(alone), check=False)
    assert main(["commit", str(alone)]) == theirs.returncode == 1
    assert capsys.readouterr().err == theirs.stderr.replace("qemu-img:", "qcow2:")
    assert main(["commit", "-b", "nonexist", str(top)]) == 1
    assert "Did not find 'nonexist' in the backing chain" in capsys.readouterr().err


class _FakeClock:
    """Time that only moves when the job sleeps: the pacing is checked exactly."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_commit_rate_limit(tmp: Path) -> None:
    """-r paces the data written: the sleeps add up to data bytes / rate, in steps of at
    most one 512 KiB piece; zeros are not counted (as QEMU's job does not count them)."""
    ours = _chain(tmp, "o")
    theirs = _copy_chain(ours, "q-")
    qemu_io(ours[2], "write -P 5 2M 1M")  # 2 pieces of 512 KiB
    qemu_io(theirs[2], "write -P 5 2M 1M")
    data = sum(n for start, n, depth, zero, is_data in _map(ours[2])
               if depth == 0 and is_data and not zero)
    fake = _FakeClock()
    rate = 256 << 10
    commit(ours[2], rate=RateLimit(rate, fake.clock, fake.sleep))
    qemu_img("commit", "-r", "256k", str(theirs[2]))
    assert data > (1 << 20) and sum(fake.sleeps) == pytest.approx(data / rate)
    assert max(fake.sleeps) <= (512 << 10) / rate + 1e-9
    for a, b in zip(ours, theirs):
        assert_clean(a)
        assert qemu_img("compare", str(a), str(b), check=False).returncode == 0, a.name
    fake = _FakeClock()  # unlimited: no sleeps
    qemu_io(ours[2], "write -P 6 0 1M")
    commit(ours[2], rate=RateLimit(0, fake.clock, fake.sleep))
    assert fake.sleeps == []


@pytest.mark.parametrize("args", [
    ["-r", "-1"], ["-r", ""], ["-r", "8E"], ["-t", "foo"], ["-r", "foo", "-t", "foo"],
    ["-f", "foo"], ["-f", "raw"], ["-b", "x", "-t", "bad"], ["-r", "0"], ["-r", "1G", "-q"],
    ["-t", "none", "-d"], ["-t", "unsafe", "-b", "obase.qcow2"], ["-r", "0x100000000", "-f", "qcow2"],
])
def test_commit_options_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path,
                                  args: list[str]) -> None:
    """Same exit code, output and message as qemu-img commit (qemu-img splits the
    invalid rate message over two lines, ours is one)."""
    ours = _chain(tmp, "o")
    theirs = _copy_chain(ours, "q-")
    want = run("qemu-img", "commit", *[a.replace("obase", "q-obase") for a in args],
               str(theirs[2]), check=False)
    rc = main(["commit", *args, str(ours[2])])
    cap = capsys.readouterr()
    assert rc == want.returncode and cap.out == want.stdout, (cap, want.stderr)
    assert cap.err == want.stderr.replace("\nqemu-img: ", " ").replace("qemu-img:", "qcow2:") \
        .replace(str(theirs[2]), str(ours[2]))
    if not rc:
        for a, b in zip(ours, theirs):
            assert qemu_img("compare", str(a), str(b), check=False).returncode == 0, a.name


def test_commit_file_arguments_like_qemu(capsys: pytest.CaptureFixture[str], tmp: Path) -> None:
    raw = tmp / "r.raw"
    raw.write_bytes(bytes(1 << 20))
    top = tmp / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(top), "1M")
    for args in (["-f", "qcow2", str(raw)], ["-f", "raw", str(raw)], [str(tmp / "nonexist")],
                 [], [str(top), str(top)], [str(top)]):
        want = run("qemu-img", "commit", *args, check=False)
        assert main(["commit", *args]) == want.returncode == 1
        first = [ln for ln in want.stderr.splitlines() if ln.startswith("qemu-img:")][0]
        assert capsys.readouterr().err == first.replace("qemu-img:", "qcow2:") + "\n", args


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_commit_grows_smaller_base_like_qemu(tmp: Path, fmt: str) -> None:
    """An overlay larger than its base: qemu-img's commit job grows the base to the
    overlay's size before it copies (data past the base's old end included)."""
    pair = []
    for prefix in ("o-", "q-"):
        base, top = tmp / f"{prefix}base.{fmt}", tmp / f"{prefix}top.qcow2"
        qemu_img("create", "-q", "-f", fmt, str(base), "1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", fmt, str(top), "4M")
        qemu_io(top, "write -P 2 512k 1M", "write -P 3 3M 64k")
        pair.append((base, top))
    (ob, ot), (qb, qt) = pair
    before = _raw(ot, tmp)
    commit(ot)
    qemu_img("commit", "-q", str(qt))
    assert qemu_info(ob)["virtual-size"] == qemu_info(qb)["virtual-size"] == 4 * MiB
    assert _raw(ob, tmp) == before
    assert qemu_img("compare", "-f", fmt, "-F", fmt, str(ob), str(qb), check=False).returncode == 0
    if fmt == "qcow2":
        assert_clean(ob)
