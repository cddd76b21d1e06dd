"""The benchmark report (`make bench-quick`) runs end to end once per test run, so that
its code cannot rot. Its numbers are not asserted (speed is measured, not tested); what
is checked is the shape: every part, every refcount mode, every plot, min/median/max."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qcow2.modes import MODES

ROOT = Path(__file__).resolve().parents[1]


def _figures(x: object) -> list[dict]:
    if isinstance(x, dict):
        if {"median", "min", "max", "samples"} <= set(x):
            return [x]
        return [f for v in x.values() for f in _figures(v)]
    if isinstance(x, list):
        return [f for v in x for f in _figures(v)]
    return []


@pytest.mark.run_first
def test_quick_report(tmp_path: Path) -> None:
    out = tmp_path / "doc"
    env = {**os.environ, "BENCH_QUICK": "1", "QCOW2_BENCH_TMP": str(tmp_path)}
    env.pop("BENCH_RUNS", None)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "%|" in p.stderr  # the progress bar, on stderr
    doc = json.loads((out / "latest.json").read_text())
    assert doc["environment"]["quick"] is True
    sections = doc["sections"]
    assert set(sections) == {"thread", "vmstate", "writes", "scale", "tools"}
    runs = doc["environment"]["runs"]
    for f in _figures(sections):
        assert f["n"] == len(f["samples"]) and f["min"] <= f["median"] <= f["max"]
    # every mode appears in every part that compares modes
    for m in MODES:
        assert f"qcow2 {m} (in-process)" in sections["thread"]["figures"]
        assert {f"qcow2 {m}", f"qcow2 {m} + extended_l2"} <= set(sections["writes"]["configs"])
        assert any(r["config"] == f"qcow2 {m}" and r["counts"] for r in sections["writes"]["rows"])
        assert f"qcow2 {m}" in sections["scale"]["by_clusters"][0]["figures"]
        assert any(f"qcow2 {m}" in k for k in sections["vmstate"]["rows"][0]["figures"])
    fig = sections["thread"]["figures"]["qemu-img (process)"]["create"]
    assert fig["n"] == runs
    # QEMU's side was counted with strace
    q = next(r for r in sections["writes"]["rows"] if r["config"] == "qemu standard")
    assert q["counts"]["after"]["syncs"] > 0 and q["counts"]["after"]["data_writes"] > 0
    md = (out / "benchmarks.md").read_text()
    for head in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## Machine", "## The answer"):
        assert head in md
    assert "quick run" in md.lower()
    pngs = re.findall(r"\]\((benchmarks-[\w-]+\.png)\)", md)
    assert len(pngs) >= 6
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
