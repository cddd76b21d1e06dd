"""`make bench`: every benchmark of the report, side by side with QEMU, in one run.

    python benchmarks/run_all.py [--quick] [--out DIR] [--json FILE] [--render FILE]

Writes docs/benchmarks.md with its PNG plots beside it, and the raw figures to
benchmarks/results/latest.json. BENCH_QUICK=1 (or --quick, `make bench-quick`) runs the
same report at a small scale in under 3 minutes. --render FILE rewrites the document
and plots from a saved JSON without measuring. QCOW2_BENCH_TMP: where scratch images go
(default: the system temp dir). BENCH_RUNS: interleaved runs per figure (default 5, quick 3).
A progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import report_doc  # noqa: E402
import report_scale  # noqa: E402
import report_thread  # noqa: E402
import report_tools  # noqa: E402
import report_writes  # noqa: E402
from tqdm import tqdm  # noqa: E402

# (section names in the JSON, module); the order of the run
PARTS = [(("thread", "vmstate"), report_thread), (("writes",), report_writes),
         (("scale",), report_scale), (("tools",), report_tools)]


def measure(cfg: harness.Config) -> dict[str, Any]:
    env = report_doc.environment(cfg)
    total = sum(mod.steps(cfg) for _, mod in PARTS)
    doc: dict[str, Any] = {"environment": env, "sections": {}, "seconds": {}}
    t_all = time.perf_counter()
    with tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True,
              desc="bench-quick" if cfg.quick else "bench") as bar:
        cfg.bar = bar
        for names, mod in PARTS:
            t0 = time.perf_counter()
            out = mod.run(cfg)
            if len(names) == 1:
                out = {names[0]: out}
            doc["sections"].update(out)
            doc["seconds"]["+".join(names)] = time.perf_counter() - t0
        cfg.bar = None
    doc["seconds"]["total"] = time.perf_counter() - t_all
    doc["environment"]["load_end"] = os.getloadavg()
    doc["environment"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return doc


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=harness.quick_from_env())
    ap.add_argument("--out", type=Path, default=harness.ROOT / "docs",
                    help="directory of benchmarks.md and its plots (default: docs)")
    ap.add_argument("--json", type=Path, default=None,
                    help="raw figures (default: benchmarks/results/latest.json, or "
                         "OUT/latest.json with --out)")
    ap.add_argument("--render", type=Path, default=None,
                    help="render the document from this JSON instead of measuring")
    a = ap.parse_args(argv)
    default_out = a.out == harness.ROOT / "docs"
    js = a.json or (harness.BENCH_DIR / "results" / "latest.json" if default_out
                    else a.out / "latest.json")
    if a.render:
        js = a.json or a.render
        doc = json.loads(a.render.read_text())
    else:
        runs = int(os.environ.get("BENCH_RUNS", "3" if a.quick else "5"))
        with harness.workdir() as tmp:
            cfg = harness.Config(quick=a.quick, runs=max(2, runs), tmp=tmp)
            doc = measure(cfg)
        js.parent.mkdir(parents=True, exist_ok=True)
        js.write_text(json.dumps(doc, indent=1) + "\n")
    a.out.mkdir(parents=True, exist_ok=True)
    md = report_doc.write(doc, a.out, json_path=js)
    print(f"wrote {md}, its plots and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
