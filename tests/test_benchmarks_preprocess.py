"""benchmarks/preprocess.py --quick runs the real preprocess stage on 1 and 2 Ray CPUs and reports JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_preprocess_benchmark_quick_prints_json_lines(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the harness's temp root (Ray's session, shards, MNE scratch); short, as Ray's socket paths must be
    with tempfile.TemporaryDirectory(prefix="ddbt-") as scratch:
        out = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "preprocess.py"), "--quick"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={**env, "TMPDIR": scratch},
        )
        left = list(Path(scratch).iterdir())
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]  # stdout is only JSON
    measured = {r["ray_cpus"]: r for r in rows if r["name"] == "preprocess"}
    assert set(measured) == {1, 2}
    for row in measured.values():
        assert row["epochs"] == 2 * (30 * 250 // 512)  # 2 subjects x one 30 s run at 250 Hz
        assert row["epochs_per_s"] > 0 and row["MB_per_s"] > 0 and row["bytes_per_epoch"] > 0
        assert row["device"].startswith("cpu (")
    assert measured[2]["scaling_vs_1cpu"] > 0
    extrapolation = rows[-1]
    assert extrapolation["name"] == "extrapolation"
    assert [t["epochs"] for t in extrapolation["targets"]][0] == 120_000
    assert all(t["end_to_end"]["1_cpu_s"] > t["end_to_end"]["64_cpu_s"] > 0 for t in extrapolation["targets"])
    assert left == [] and list(tmp_path.iterdir()) == []  # the harness leaves no files behind
