"""Wall time of `keizoku quickstart` from a cold start (a fresh --out, a new interpreter), as a user runs it.

    .venv/bin/python bench/quickstart/bench.py [--repeats 3] [--out /tmp/keizoku-qs-bench]

Prints each run's wall time, the per-step seconds recorded in quickstart.json, and the load average before
each run (other work on the machine makes the figure meaningless; run it on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/keizoku-qs-bench"))
    args = ap.parse_args()
    keizoku = Path(sys.executable).with_name("keizoku")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; python {platform.python_version()}")
    walls = []
    for i in range(args.repeats):
        shutil.rmtree(args.out, ignore_errors=True)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run([str(keizoku), "quickstart", "--out", str(args.out)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"run {i + 1} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        state = json.loads((args.out / "quickstart.json").read_text())
        steps = {k: v["seconds"] for k, v in state["steps"].items()}
        s = state["summary"]
        walls.append(wall)
        print(f"run {i + 1}: {wall:.1f} s wall (load avg before {load:.2f}); steps {steps}; "
              f"CPT {s['tokens_per_s']:,.0f} tokens/s; ja loss {s['validation_loss']['before']['ja']:.3f} -> "
              f"{s['validation_loss']['after']['ja']:.3f}, en {s['validation_loss']['before']['en']:.3f} -> "
              f"{s['validation_loss']['after']['en']:.3f}", flush=True)
    print(f"median wall time: {statistics.median(walls):.1f} s over {len(walls)} runs (target < 90 s)")


if __name__ == "__main__":
    main()
