"""`dreamdiff demo`: the stages end-to-end on a laptop, on a local Ray, leaving a report.

Stages run in order, each with the config section of configs/demo.yaml (relative paths are
inside the demo's run folder). A stage that finished is recorded in stages.json and skipped on
a re-run, so an interrupted demo resumes where it stopped and finished stages stay usable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dreamdiff.config import DemoConfig, apply_overrides, dump_config, record_config, validate_config
from dreamdiff.data import preprocess, synthetic
from dreamdiff.report import image_grid, loss_curve, write_report
from dreamdiff.train import pretrain

STAGES_FILE = "stages.json"
PENDING = ("finetune (issue #5)", "sweep (issue #6)", "evaluate (issue #5)", "serve + batch generation (issue #7)")


def _inside(folder: Path, path: str) -> str:
    return str(path if Path(path).is_absolute() else folder / path)


def resolve(cfg: DemoConfig) -> DemoConfig:
    """Apply --quick's overrides and place relative stage paths inside the run folder."""
    if cfg.quick:
        cfg = validate_config("demo", apply_overrides(cfg.model_dump(mode="json"), cfg.quick_overrides), "demo --quick")
    out = Path(cfg.output)
    cfg.preprocess.output = _inside(out, cfg.preprocess.output)
    cfg.pretrain.data = _inside(out, cfg.pretrain.data)
    cfg.pretrain.output = _inside(out, cfg.pretrain.output)
    cfg.preprocess.ray = cfg.pretrain.ray = cfg.ray
    return cfg


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run (or resume) every built stage; write report.html and metrics.json into the run folder."""
    from dreamdiff.ray_init import init_ray

    cfg = resolve(cfg)
    out = Path(cfg.output)
    record_config(cfg, out)
    record = json.loads((out / STAGES_FILE).read_text()) if (out / STAGES_FILE).exists() else {}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("preprocess", lambda: preprocess.run(cfg.preprocess)),
        ("pretrain", lambda: pretrain.run(cfg.pretrain)),
    ]
    began = time.perf_counter()
    init_ray(cfg.ray)
    for number, (name, stage) in enumerate(steps, 1):
        if record.get(name, {}).get("status") == "done":
            print(f"[demo {number}/{len(steps)}] {name}: done in an earlier run, skipped")
            continue
        print(f"[demo {number}/{len(steps)}] {name} ...", flush=True)
        tick = time.perf_counter()
        stage()
        record[name] = {"status": "done", "seconds": round(time.perf_counter() - tick, 1)}
        (out / STAGES_FILE).write_text(json.dumps(record, indent=1))
        print(
            f"[demo {number}/{len(steps)}] {name}: done in {record[name]['seconds']} s "
            f"(elapsed {time.perf_counter() - began:.0f} s)",
            flush=True,
        )
    metrics = _report(cfg, record)
    print(f"demo: report {out / 'report.html'}; metrics {out / 'metrics.json'}")
    return metrics


def _synth_source(cfg: DemoConfig) -> synthetic.SynthConfig:
    return next(s.synth for s in cfg.preprocess.sources if s.kind == "synthetic" and s.labeled)


def _held_out(run: Path) -> str:
    held = json.loads((run / pretrain.SPLIT_FILE).read_text())["held_out"]
    return ", ".join(sorted({str(Path(f).relative_to(Path(f).parents[2])) for f in held}))


def _report(cfg: DemoConfig, record: dict[str, Any]) -> dict[str, Any]:
    out = Path(cfg.output)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    synth = _synth_source(cfg)
    first = [k * synth.images_per_class for k in range(synth.num_classes)]
    names = [f"{a['shape']}/{a['colour']}" for a in synthetic.class_attributes(synth)]
    classes = image_grid(
        np.stack([synthetic.render_image(synth, i) for i in first]), names, figures / "synth-classes.png"
    )
    manifest = json.loads((Path(cfg.preprocess.output) / "manifest.json").read_text())
    per_dataset: dict[str, dict[str, Any]] = {}
    for subject in manifest["subjects"]:
        row = per_dataset.setdefault(subject["dataset"], {"dataset": subject["dataset"], "subjects": 0, "rows": 0})
        row["subjects"] += 1
        row["rows"] += subject.get("rows", 0)
    pre_out = Path(cfg.pretrain.output)
    lines = [json.loads(line) for line in (pre_out / pretrain.METRICS_FILE).read_text().splitlines()]
    last = lines[-1]
    curve = loss_curve(pre_out / pretrain.METRICS_FILE, figures / "pretrain-loss.png", "MSM pretraining")
    recon = sorted((pre_out / "plots").glob("reconstruction-epoch*.png"))[-1]
    metrics = {
        "stages": record,
        "preprocess": manifest["totals"],
        "pretrain": {
            "step": last["step"],
            "val_loss": last["val_loss"],
            "val_loss_zero_prediction": last["val_loss_zero_prediction"],
            "val_loss_ratio_to_zero_prediction": last["val_loss"] / last["val_loss_zero_prediction"],
            "protocol": "masked MSE on held-out shard files, fixed masks; z-scored EEG, so predicting zeros scores ~1",
        },
        "not_in_demo_yet": list(PENDING),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_report(
        out,
        "dreamdiff demo",
        [
            {
                "heading": "Stages",
                "table": [{"stage": k, **v} for k, v in record.items()]
                + [{"stage": p, "status": "not built yet", "seconds": ""} for p in PENDING],
            },
            {"heading": "SynthEEG-Image classes (one stimulus per class)", "images": [classes]},
            {
                "heading": "Preprocessing (Ray Data -> Parquet shards)",
                "table": list(per_dataset.values()),
                "text": f"{manifest['totals']['rows']} windows, {manifest['totals']['bytes'] / 1e6:.1f} MB; "
                f"band-pass {manifest['signal']['band_pass_hz']} Hz, upper edge clipped to "
                f"{manifest['signal']['upper_edge_clipped_to_hz']} Hz where Nyquist required.",
            },
            {
                "heading": "MSM pretraining (Ray Train, DDP)",
                "table": [metrics["pretrain"]],
                "text": f"Held-out loss: a fixed batch from {_held_out(pre_out)}, with fixed masks. The training loss "
                "also covers FakeDataset windows, which are white noise that no model can predict.",
                "images": [curve, recon],
            },
            {"heading": "Resolved config", "code": dump_config(cfg)},
        ],
    )
    return metrics

