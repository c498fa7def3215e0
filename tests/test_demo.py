"""`dreamdiff demo --quick` end-to-end on the session's local Ray: stages, metrics, report, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dreamdiff.cli import main


@pytest.mark.slow
def test_quick_demo_runs_every_built_stage_and_reports(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert {name: s["status"] for name, s in stages.items()} == {"preprocess": "done", "pretrain": "done"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preprocess"]["subjects_failed"] == 0 and metrics["preprocess"]["rows"] > 0
    pre = metrics["pretrain"]
    assert pre["val_loss"] < pre["val_loss_zero_prediction"]  # the encoder learned something
    assert "protocol" in pre
    report = (out / "report.html").read_text()
    images = re.findall(r"<img src='([^']+)'", report)
    assert len(images) >= 3 and all((out / src).is_file() for src in images)
    assert "MSM pretraining" in report and "Resolved config" in report

    # a second run resumes: finished stages are skipped, the report is written again
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done in an earlier run, skipped") == 2
