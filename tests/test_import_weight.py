"""Every Ray worker process imports the module its code lives in, so what those modules pull in is paid per
process: on the 2-core demo machine diffusers cost about 3 s, open_clip and scikit-learn 1 s each. These tests
keep the heavy packages out of the modules that do not use them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("diffusers", "open_clip", "sklearn", "matplotlib", "moabb", "mne")


def _heavy_imported(module: str) -> list[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("dreamdiff.config", ()),  # every stage and worker validates its config
        ("dreamdiff.train.pretrain", ()),  # the MSM driver, in each sweep trial's Tune actor
        ("dreamdiff.train.pretrain_loop", ()),  # MSM workers
        ("dreamdiff.tune.sweep", ()),  # each trial's Tune actor
        ("dreamdiff.train.finetune_loop", ("diffusers",)),  # fine-tuning workers: the UNet, not CLIP
    ],
)
def test_worker_modules_leave_heavy_packages_out(module: str, allowed: tuple[str, ...]) -> None:
    extra = [m for m in _heavy_imported(module) if m not in allowed]
    assert not extra, f"importing {module} also imports {extra}"
