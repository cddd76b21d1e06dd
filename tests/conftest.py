"""Shared test helpers: run the reference tools (qemu-img, qemu-io) on our images."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcow2

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

if QEMU_IMG is None or QEMU_IO is None:  # never skip interop: `make test` installs qemu-utils
    raise RuntimeError("qemu-img and qemu-io are required for the test suite (run `make test`)")


# Every refcount mode; suites that use the `mode` fixture run once per mode.
MODES = ("standard", "lazy-count", "owner")
_MODE_BITS = {"lazy-count": 1 << 59, "owner": 1 << 58}
# the narrowest refcount entries each mode can hold its values in
_MODE_MIN_BITS = {"owner": 8}


def image_mode(path: str | Path) -> str:
    """The refcount mode of a qcow2 file ("standard" for anything else), from its header."""
    try:
        with open(path, "rb") as f:
            head = f.read(80)
    except OSError:
        return "standard"
    if len(head) < 80 or head[:4] != b"QFI\xfb" or struct.unpack(">I", head[4:8])[0] < 3:
        return "standard"
    bits = struct.unpack(">Q", head[72:80])[0]
    return next((m for m, b in _MODE_BITS.items() if bits & b), "standard")


def standard_copy(path: str | Path) -> Path:
    """QEMU reads only standard images: a standard copy of a non-standard one (beside
    it, so relative backing file names resolve), converted by our library."""
    path = Path(path)
    if image_mode(path) == "standard":
        return path
    copy = path.with_name(f".std-{path.name}")
    shutil.copyfile(path, copy)
    with qcow2.open(copy, "r+", backing=False) as img:
        img.set_refcount_mode("standard")
    return copy


@contextlib.contextmanager
def as_standard(path: str | Path) -> Iterator[None]:
    """Let QEMU modify a non-standard image: converted to standard in place, and back
    to its mode afterwards (both conversions are part of what the tests prove)."""
    mode = image_mode(path)
    if mode != "standard":
        with qcow2.open(path, "r+", backing=False) as img:
            img.set_refcount_mode("standard")
    try:
        yield
    finally:
        if mode != "standard" and image_mode(path) == "standard":
            with qcow2.open(path, "r+", backing=False) as img:
                img.set_refcount_mode(mode)


def _backing_chain(path: str | Path) -> list[Path]:
    """The qcow2 backing files below an image (by our library, without opening them)."""
    chain: list[Path] = []
    cur = Path(path)
    for _ in range(16):
        try:
            with qcow2.open(cur, backing=False) as img:
                name = img.backing_file
        except qcow2.Qcow2Error:
            break
        if not name:
            break
        cur = (cur.parent / name) if not os.path.isabs(name) else Path(name)
        if not cur.exists():
            break
        chain.append(cur)
    return chain


# qemu-img sub-commands that only read the images named on their command line
_READING = {"check", "info", "map", "compare", "convert", "measure", "dd"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    reading = bool(args) and (args[0] in _READING or (args[0] == "snapshot" and "-l" in args))
    files = [a for a in args[1:] if not a.startswith("-") and os.path.isfile(a)]
    below = [b for a in files for b in _backing_chain(a) if image_mode(b) != "standard"]
    ours = [a for a in files if image_mode(a) != "standard"]
    if not ours and not below:
        return run(QEMU_IMG, *args, check=check)  # type: ignore[arg-type]
    with contextlib.ExitStack() as stack:
        for b in dict.fromkeys(below):  # QEMU opens backing files itself: convert in place
            stack.enter_context(as_standard(b))
        if reading:
            copies = {a: str(standard_copy(a)) for a in ours}
            return run(QEMU_IMG, *[copies.get(a, a) for a in args], check=check)  # type: ignore[arg-type]
        for a in ours:
            stack.enter_context(as_standard(a))
        return run(QEMU_IMG, *args, check=check)  # type: ignore[arg-type]


def qemu_io(path: str | Path, *commands: str, fmt: str = "qcow2", check: bool = True) -> str:
    args = [QEMU_IO, "-f", fmt]
    for c in commands:
        args += ["-c", c]
    with contextlib.ExitStack() as stack:
        if fmt == "qcow2":
            for b in [*_backing_chain(path), Path(path)]:
                stack.enter_context(as_standard(b))
        p = run(*args, str(path), check=check)  # type: ignore[arg-type]
    if check and ("error" in p.stdout.lower() or "failed" in p.stdout.lower()):
        raise AssertionError(f"qemu-io failed: {p.stdout}{p.stderr}")
    return p.stdout


def qemu_check(path: str | Path) -> dict:
    """qemu-img check --output=json; returns the parsed report plus 'returncode'
    (of a standard copy, for an image in another refcount mode)."""
    p = qemu_img("check", "--output=json", str(path), check=False)
    try:
        rep = json.loads(p.stdout)
    except json.JSONDecodeError:
        rep = {"stdout": p.stdout, "stderr": p.stderr}
    rep["returncode"] = p.returncode
    return rep


_PROGRESS = re.compile(r"    \((\d+\.\d\d)/100%\)\r")


def progress_values(out: str) -> list[float]:
    """The percentages of qemu-img -p output, parsed as oVirt's vdsm parses them (the
    regex (\\d+\\.\\d+)/100%): nothing but progress lines ended by \\r, from 0.00 up to
    100.00, then a newline (and what the command prints after it, cut off here)."""
    body, nl, _ = out.partition("\n")
    assert nl and _PROGRESS.sub("", body) == "", repr(out[:200])
    vals = [float(v) for v in _PROGRESS.findall(body)]
    assert vals[0] == 0.0 and vals[-1] == 100.0 and vals == sorted(vals), vals
    return vals


def assert_clean(path: str | Path) -> None:
    rep = qemu_check(path)
    assert rep["returncode"] == 0, rep
    assert rep.get("corruptions", 0) == 0 and rep.get("leaks", 0) == 0, rep


def raw_bytes(path: str | Path, tmp: Path, snapshot: str | None = None) -> bytes:
    """Guest content as QEMU sees it (qemu-img convert -O raw)."""
    out = tmp / f"raw-{Path(path).name}-{snapshot or 'active'}.img"
    args = ["convert", "-O", "raw"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    qemu_img(*args, str(path), str(out))
    return out.read_bytes()


def qemu_info(path: str | Path, *extra: str) -> dict:
    return json.loads(qemu_img("info", "--output=json", *extra, str(path)).stdout)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per refcount mode: images the test makes with qcow2.create are
    in that mode (v2 ones stay standard: the modes need compat 1.1; so do ones whose
    refcount entries are too narrow for the mode)."""
    name = request.param
    if name != "standard":
        real = qcow2.create

        def create(*args: object, **kwargs: object) -> None:
            if str(kwargs.get("compat", "1.1")) not in ("0.10", "v2") and \
                    int(kwargs.get("refcount_bits", 16)) >= _MODE_MIN_BITS.get(name, 1):
                kwargs.setdefault("refcount_mode", name)
            real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(qcow2, "create", create)
    return name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked standard_only (they edit standard metadata by hand or count standard
    refcounts) run in the standard mode only: deselected, not skipped, elsewhere."""
    keep, drop = [], []
    for item in items:
        cs = getattr(item, "callspec", None)
        m = cs.params.get("mode", "standard") if cs is not None else "standard"
        (drop if m != "standard" and item.get_closest_marker("standard_only") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    # long tests (the quick benchmark report) start first, so that they do not finish last
    items.sort(key=lambda item: item.get_closest_marker("run_first") is None)
