"""Wall time and CPU work of `dreamdiff demo` against its targets (10 minutes, `--quick` 3 minutes).

Runs the README's command in a subprocess into a temporary run folder (or `--out`), reads the machine-wide CPU
counters of /proc/stat before and after, and prints one JSON line per stage (its seconds, from stages.json),
then one summary line:

- `wall_s`: the whole command, Ray's start-up and the report included;
- `cpu_busy_s` / `cpu_idle_s`: CPU-seconds every process on the machine spent busy / idle meanwhile (Ray's
  worker processes included, which a per-process timer would miss), and `busy_fraction`;
- `cpu_floor_s`: `cpu_busy_s / cores`, the wall time of the same work with every core busy all the time: no
  scheduling of the stages (running them side by side, say) can go below it; only less work can;
- `ratio_to_target` (wall / target) and `floor_to_target` (floor / target): a floor above 1 means the target
  cannot be met by overlapping stages, only by doing less;
- the headline n-way top-1 and its chance level, so a faster demo that stopped learning shows.

Meant for an otherwise idle machine: other processes' CPU counts as the demo's.

    python benchmarks/demo.py                 # dreamdiff demo --quick (target 180 s)
    python benchmarks/demo.py --full          # dreamdiff demo (target 600 s)
    python benchmarks/demo.py --out runs/bench -- finetune.epochs=8    # keep the run; extra overrides
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_S = {"quick": 180.0, "full": 600.0}  # the targets: `--quick` under 3 minutes, the whole demo under 10


def cpu_seconds() -> tuple[float, float]:
    """(busy, idle) CPU-seconds of the whole machine since boot, summed over cores (Linux /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / hz, (idle + iowait) / hz


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else the machine type."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def summarise(
    run: Path, mode: str, wall_s: float, busy_s: float, idle_s: float, cores: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-stage rows and the summary row for a finished demo run folder and the CPU it used."""
    stages = json.loads((run / "stages.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [{"name": "demo_stage", "mode": mode, "stage": k, "seconds": v["seconds"]} for k, v in stages.items()]
    top1 = metrics["evaluate"]["metrics"]["n_way_top_1"]
    target = TARGET_S[mode]
    floor = busy_s / cores
    summary = {
        "name": "demo",
        "mode": mode,
        "wall_s": round(wall_s, 1),
        "stages_s": round(sum(v["seconds"] for v in stages.values()), 1),
        "cpu_busy_s": round(busy_s, 1),
        "cpu_idle_s": round(idle_s, 1),
        "busy_fraction": round(busy_s / max(busy_s + idle_s, 1e-9), 3),
        "cpu_floor_s": round(floor, 1),
        "target_s": target,
        "ratio_to_target": round(wall_s / target, 3),
        "floor_to_target": round(floor / target, 3),
        "n_way_top_1": top1["value"],
        "chance": top1["chance"],
        "num_eeg": metrics["evaluate"]["num_eeg"],
        "device": f"cpu ({cores} cores, {cpu_name()})",
    }
    return rows, summary


def run_demo(out: Path, mode: str, overrides: list[str]) -> tuple[float, float, float]:
    """`dreamdiff demo [--quick] --out OUT [overrides]`; returns (wall, busy, idle) seconds. Its log goes to
    OUT/benchmark.log (stdout stays JSON only)."""
    if (out / "run").exists():  # a re-run resumes: it would time skipped stages
        raise SystemExit(f"{out / 'run'} exists: a benchmark needs a fresh run folder")
    out.mkdir(parents=True, exist_ok=True)
    quick = ["--quick"] if mode == "quick" else []
    command = [sys.executable, "-m", "dreamdiff", "demo", *quick, "--out", str(out / "run"), *overrides]
    busy0, idle0 = cpu_seconds()
    tick = time.perf_counter()
    with open(out / "benchmark.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - tick
    busy1, idle1 = cpu_seconds()
    if done.returncode != 0:
        raise SystemExit(f"demo failed (exit {done.returncode}); its log: {out / 'benchmark.log'}")
    return wall, busy1 - busy0, idle1 - idle0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the whole demo instead of --quick")
    p.add_argument("--out", type=Path, help="keep the run here (default: a temporary folder, removed after)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides passed to the demo (after --)")
    args = p.parse_args(argv)
    mode = "full" if args.full else "quick"
    out = args.out or Path(tempfile.mkdtemp(prefix="ddbench-"))
    try:
        wall, busy, idle = run_demo(out, mode, args.overrides)
        rows, summary = summarise(out / "run", mode, wall, busy, idle, os.cpu_count() or 1)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    for row in [*rows, summary]:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
