"""`dreamdiff demo --quick` end-to-end on the session's local Ray: every stage, metrics, report, browser, resume."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from dreamdiff.cli import main
from dreamdiff.config import load_config, validate_config
from dreamdiff.demo import ablation_configs, resolve

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["preprocess", "pretrain", "finetune", "sweep", "evaluate", "serve", "generate"]
# where the browser's screenshot of the report is kept (CI keeps test-artifacts/)
ARTIFACTS = Path(os.environ.get("DREAMDIFF_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()  # one port for the module: a re-run must present the same config


@pytest.fixture(scope="module")
def quick_demo(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out), f"serve.port={PORT}"]) == 0
    return out


def test_every_ablation_fine_tunes_the_full_runs_base_model(tmp_path: Path) -> None:
    cfg = resolve(load_config("demo", ROOT / "configs" / "demo.yaml", [f"output={tmp_path}", "ablations=true"]))
    assert cfg.finetune.tiny_sd_pretrain is not None and cfg.finetune.trainable == "cross_attention"
    variants = ablation_configs(cfg)
    assert list(variants) == ["no pretraining", "no CLIP loss", "neither"]
    for name, (ft, ev) in variants.items():
        # one base model for all (the full run's pretrained tiny SD, not pretrained again), a config that validates
        assert ft.base_model == str(tmp_path / "finetune" / "tiny-sd") and ft.tiny_sd is None, name
        assert ft.tiny_sd_pretrain is None and ft.trainable == "cross_attention", name
        validate_config("finetune", ft.model_dump(mode="json"), name)
        assert ev.checkpoint == str(Path(ft.output) / "generator") and ft.output != cfg.finetune.output
    assert variants["no pretraining"][0].encoder_checkpoint is None and variants["neither"][0].clip_weight == 0


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_beats_chance(quick_demo: Path) -> None:
    stages = json.loads((quick_demo / "stages.json").read_text())
    assert list(stages) == STAGES and all(s["status"] == "done" for s in stages.values())
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    assert metrics["preprocess"]["subjects_failed"] == 0 and metrics["preprocess"]["rows"] > 0
    assert metrics["pretrain"]["val_loss"] < metrics["pretrain"]["val_loss_zero_prediction"]
    top1 = metrics["evaluate"]["metrics"]["n_way_top_1"]
    assert top1["chance"] == pytest.approx(0.1)  # 10-way, stated beside the figure
    assert top1["value"] > top1["chance"], top1
    assert metrics["evaluate"]["protocol"] == "by_image"
    assert metrics["sweep"]["trials"] == 2 and metrics["sweep"]["best"]["probe_accuracy"]
    assert metrics["serve"]["images"] == 2 and metrics["serve"]["latency_s"] > 0
    assert metrics["evaluate"]["num_eeg"] == 60  # --quick: a seeded subset of the 120 test EEGs
    assert metrics["generate"]["eegs"] == 60 and metrics["generate"]["images"] == 2 * 60


@pytest.mark.slow
def test_report_references_existing_images_and_shows_every_stage(quick_demo: Path) -> None:
    report = (quick_demo / "report.html").read_text()
    images = re.findall(r"<img src='([^']+)'", report)
    assert len(images) >= 10 and all((quick_demo / src).is_file() for src in images)
    for heading in ("Headline", "MSM pretraining", "Fine-tuning", "Sweep", "Evaluation", "Serve", "Batch generation"):
        assert heading in report, heading
    assert "finetune/tiny-sd/preview.png" in report  # what the base model draws before fine-tuning
    assert "Resolved config" in report


@pytest.mark.slow
def test_report_renders_in_headless_chromium(quick_demo: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium (.ci/run installs it)")
        pytest.skip("chromium is not installed here (apt-get install chromium)")
    # a copy of the report, beside it so relative image paths resolve, that writes what the browser saw
    probe = quick_demo / "report-browser-check.html"
    probe.write_text(
        (quick_demo / "report.html")
        .read_text()
        .replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const seen = [...document.images].map("
            "i => [i.getAttribute('src'), i.complete, i.naturalWidth]); const tables = [...document.querySelectorAll"
            "('table')].map(t => t.innerText); document.body.insertAdjacentHTML('beforeend', '<pre id=\"seen\">' + "
            "JSON.stringify({images: seen, tables}).replace(/</g, '&lt;') + '</pre>'); });</script></body>",
        )
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={quick_demo / '.chromium'}",
    ]
    url = probe.resolve().as_uri()
    dom = subprocess.run(
        [browser, *flags, "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    found = re.findall(r'<pre id="seen">(.*?)</pre>', dom, re.S)  # the last: the first is the script's own text
    assert found, dom[-2000:]
    seen = json.loads(found[-1].replace("&lt;", "<").replace("&amp;", "&"))
    assert len(seen["images"]) >= 10
    assert all(complete and width > 0 for _, complete, width in seen["images"]), seen["images"]
    assert any("top-1" in table and "chance" in table for table in seen["tables"]), seen["tables"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "demo-report.png"
    subprocess.run(
        [browser, *flags, "--window-size=1200,4000", f"--screenshot={shot}", (quick_demo / "report.html").as_uri()],
        capture_output=True,
        timeout=180,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000


@pytest.mark.slow
def test_rerun_resumes_and_skips_finished_stages(quick_demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(quick_demo), f"serve.port={PORT}"]) == 0
    assert capsys.readouterr().out.count("done in an earlier run, skipped") == len(STAGES)


@pytest.mark.slow
def test_demo_benchmark_sets_the_run_against_its_target(quick_demo: Path) -> None:
    """benchmarks/demo.py's reading of a finished run and of the machine's CPU counters (its own run of the demo
    is the README's command in a subprocess)."""
    spec = importlib.util.spec_from_file_location("bench_demo", ROOT / "benchmarks" / "demo.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    busy0, idle0 = bench.cpu_seconds()
    sum(i * i for i in range(2_000_000))  # some CPU work between the two readings
    busy1, idle1 = bench.cpu_seconds()
    assert busy1 > busy0 and idle1 >= idle0

    rows, summary = bench.summarise(quick_demo, "quick", wall_s=300.0, busy_s=480.0, idle_s=120.0, cores=2)
    stages = json.loads((quick_demo / "stages.json").read_text())
    assert [(r["stage"], r["seconds"]) for r in rows] == [(k, v["seconds"]) for k, v in stages.items()]
    assert summary["stages_s"] == pytest.approx(sum(v["seconds"] for v in stages.values()), abs=0.1)
    assert summary["target_s"] == 180 and summary["ratio_to_target"] == pytest.approx(300 / 180, abs=1e-3)
    assert summary["cpu_floor_s"] == 240 and summary["floor_to_target"] == pytest.approx(240 / 180, abs=1e-3)
    assert summary["busy_fraction"] == 0.8
    top1 = json.loads((quick_demo / "metrics.json").read_text())["evaluate"]["metrics"]["n_way_top_1"]
    assert (summary["n_way_top_1"], summary["chance"], summary["num_eeg"]) == (top1["value"], top1["chance"], 60)
