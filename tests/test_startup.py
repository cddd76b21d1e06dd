"""Start-up (issue 12): the commands that need no table pass import nothing heavy.

`qcow2 info`, `snapshot -l`, `measure --size`, `resize` of a raw file and `--help` run
in a fresh interpreter, which then must not hold numpy (nor tqdm, zstandard, asyncio):
their time is start-up, and numpy's import alone costs several times qemu-img's whole
`info`. Their output is compared with qemu-img's on the same files (test_cli.py and
the others compare the rest). The timing itself is benchmarks/bench_startup.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import qemu_img

from qcow2.cli import COMMANDS, build_parser

HEAVY = ("numpy", "tqdm", "zstandard", "asyncio", "qcow2.image", "qcow2.nbd")

# Runs qcow2.cli.main in this fresh interpreter, then prints what it imported (last line).
_PROBE = """
import json, sys
from qcow2.cli import main
rc = main(sys.argv[1:])
sys.stdout.flush()
print()
print(json.dumps({"rc": rc, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def light_run(*args: str) -> tuple[int, str]:
    """(exit code, stdout) of `qcow2 ARGS` in a fresh interpreter; asserts no heavy module
    was imported."""
    p = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True)
    body, _, last = p.stdout.rstrip("\n").rpartition("\n")
    probe = json.loads(last)
    assert probe["heavy"] == [], f"qcow2 {' '.join(args)} imported {probe['heavy']}\n{p.stderr}"
    return probe["rc"], body[:-1] if body.endswith("\n") else body


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """raw <- qcow2 base (a snapshot, a bitmap) <- qcow2 overlay, written by qemu-img."""
    raw = tmp_path / "base.raw"
    raw.write_bytes(bytes(1 << 20))
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(base), "1M")
    qemu_img("snapshot", "-c", "s\u00e91", str(base))
    qemu_img("bitmap", "--add", str(base), "b0")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    return top


@pytest.mark.parametrize("args", [
    ("info", "{base}"),
    ("info", "--output=json", "{base}"),
    ("info", "--backing-chain", "{top}"),
    ("info", "--backing-chain", "--output=json", "{top}"),
    ("snapshot", "-l", "{base}"),
    ("measure", "--size", "10G", "-O", "qcow2"),
    ("measure", "--output=json", "--size", "1T", "-O", "qcow2", "-o", "cluster_size=4k"),
])
def test_light_commands_print_what_qemu_img_prints(chain: Path, args: tuple[str, ...]) -> None:
    names = {"base": str(chain.parent / "base.qcow2"), "top": str(chain)}
    argv = [a.format(**names) for a in args]
    rc, out = light_run(*argv)
    q = qemu_img(*argv)
    assert (rc, out) == (0, q.stdout.rstrip("\n"))


def test_light_errors_and_resize_of_a_raw_file(tmp_path: Path) -> None:
    rc, _ = light_run("info", str(tmp_path / "missing.qcow2"))
    assert rc == 1
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"x" * 4096)
    rc, _ = light_run("resize", "-f", "raw", str(raw), "1M")
    assert rc == 0 and raw.stat().st_size == 1 << 20
    assert qemu_img("info", "--output=json", str(raw)).stdout.count('"virtual-size": 1048576')


def test_help_and_python_dash_m_are_light() -> None:
    rc, out = light_run("--help")
    assert rc == 0 and "snapshot" in out
    rc, out = light_run("--version")  # qemu-img's --version, -V: one line, exit code 0
    assert rc == 0 and out.startswith("qcow2 version ")
    # `python -m qcow2` (the console script imports qcow2.cli the same way)
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qcow2", "measure", "--size", "1G"],
                       capture_output=True, text=True)
    assert p.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines()}
    assert "qcow2.cli" in imported and not imported & set(HEAVY)


def test_the_lazy_parser_is_the_full_parser() -> None:
    """Stub sub-parsers stand in for the commands not run: the top-level help, and each
    command's own parser, must be what the parser with every module gives."""
    full = build_parser(full=True)
    assert build_parser(None).format_help() == full.format_help()
    sub_full = full._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    names = [name for _, group in COMMANDS for name, _ in group]
    assert names == list(sub_full)
    for name in names:
        for only in (False, True):
            lazy = build_parser(name, only=only)._subparsers._group_actions[0].choices  # type: ignore[union-attr]
            assert lazy[name].format_help() == sub_full[name].format_help(), name
