"""Shared test helpers: run the reference tools (qemu-img, qemu-io) on our images."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

if QEMU_IMG is None or QEMU_IO is None:  # never skip interop: `make test` installs qemu-utils
    raise RuntimeError("qemu-img and qemu-io are required for the test suite (run `make test`)")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(QEMU_IMG, *args, check=check)  # type: ignore[arg-type]


def qemu_io(path: str | Path, *commands: str, fmt: str = "qcow2", check: bool = True) -> str:
    args = [QEMU_IO, "-f", fmt]
    for c in commands:
        args += ["-c", c]
    p = run(*args, str(path), check=check)  # type: ignore[arg-type]
    if check and ("error" in p.stdout.lower() or "failed" in p.stdout.lower()):
        raise AssertionError(f"qemu-io failed: {p.stdout}{p.stderr}")
    return p.stdout


def qemu_check(path: str | Path) -> dict:
    """qemu-img check --output=json; returns the parsed report plus 'returncode'."""
    p = qemu_img("check", "--output=json", str(path), check=False)
    try:
        rep = json.loads(p.stdout)
    except json.JSONDecodeError:
        rep = {"stdout": p.stdout, "stderr": p.stderr}
    rep["returncode"] = p.returncode
    return rep


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
