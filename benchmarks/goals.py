"""`make bench-goals`: run every benchmarks/bench_*.py (each held to a goal) and write
benchmarks/out/results.{json,md}. The report of `make bench` (run_all.py) is separate.

Each module defines `run(scale: float) -> list[common.Result]`. Usage:

    python benchmarks/goals.py [NAME ...]     # e.g. `io snapshot`; default: all

QCOW2_BENCH_SCALE (default 1) makes the runs bigger; QCOW2_BENCH_REPEAT (default 3) sets
how many interleaved runs per side are taken (best kept). Exit status: 0 when every
benchmark ran (goals are reported, not enforced), 1 when one crashed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, OUT_DIR, Result, markdown_table, save, scale  # noqa: E402


def discover(names: list[str]) -> list[Path]:
    found = sorted(BENCH_DIR.glob("bench_*.py"))
    if names:
        wanted = {n.removeprefix("bench_").removesuffix(".py") for n in names}
        unknown = wanted - {p.stem.removeprefix("bench_") for p in found}
        if unknown:
            raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        found = [p for p in found if p.stem.removeprefix("bench_") in wanted]
    return found


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def previous(rerun: set[str]) -> list[Result]:
    """Results of the last full or partial report from modules not run this time."""
    path = OUT_DIR / "results.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    names = {f.name for f in dataclasses.fields(Result)}
    out = []
    for d in doc.get("results", []):
        if d.get("module", d.get("bench")) in rerun:
            continue
        out.append(Result(**{k: v for k, v in d.items() if k in names}))
    return out


def main(argv: list[str]) -> int:
    s = scale()
    results: list[Result] = []
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}
    for path in discover(argv):
        name = path.stem.removeprefix("bench_")
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            mod = load(path)
            res = list(mod.run(s))
        except Exception:
            errors[name] = traceback.format_exc()
            print(errors[name], file=sys.stderr)
            continue
        finally:
            timings[name] = time.perf_counter() - t0
        for r in res:
            r.module = name
        results += res
        print(markdown_table(res), flush=True)
        print(f"({timings[name]:.1f} s)", flush=True)
    # a partial run (names given) keeps the other modules' last results in the report
    kept = previous(set(timings)) if argv else []
    out = save(kept + results, extra={"seconds": timings, "errors": errors})
    print(f"wrote {out} and {out.with_suffix('.json')}")
    failed = [r for r in results if r.passed is False]
    if failed:
        print(f"{len(failed)} result(s) below their goal: " + "; ".join(r.name for r in failed))
    if errors:
        print(f"benchmark(s) crashed: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
