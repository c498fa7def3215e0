"""benchmarks/finetune.py and benchmarks/generate.py --tiny run the real step / sampler on CPU and print JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> list[dict]:
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]  # stdout is only JSON


@pytest.mark.slow
def test_finetune_benchmark_measures_the_training_step() -> None:
    [row] = _run("finetune.py")
    assert row["name"] == "finetune_train_step" and row["batch"] == 4 and row["samples_per_s"] > 0
    assert row["trainable_params"] > 0 and row["device"].startswith("cpu (")
    assert row["ratio_to_reference_fp32"] is None  # a tiny model has no reference row


@pytest.mark.slow
def test_generate_benchmark_measures_seconds_per_eeg() -> None:
    parts, row = _run("generate.py", "--breakdown")
    assert row["name"] == "generate" and row["images_per_eeg"] == 5 and row["image_px"] == 16
    assert row["s_per_eeg"] > 0 and row["speedup_vs_reference"] is None
    assert parts["name"] == "generate_breakdown" and parts["images"] == 5
    assert all(parts[k] > 0 for k in ("context_ms", "unet_step_ms", "vae_decode_ms"))
