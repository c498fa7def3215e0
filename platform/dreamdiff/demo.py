"""`dreamdiff demo`: every stage end-to-end on a laptop, on a local Ray, leaving a report.

Stages run in order, each with its section of configs/demo.yaml (relative paths are inside the demo's run
folder): preprocess -> pretrain -> finetune -> sweep -> evaluate -> serve (one HTTP request) -> batch generation,
then, with `--ablations`, fine-tune + evaluate without pretraining, without the CLIP loss and without both. A
stage that finished is recorded in stages.json and skipped on a re-run, so an interrupted demo (Ctrl-C
included) resumes where it stopped and finished stages stay usable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dreamdiff.config import DemoConfig, FinetuneConfig, apply_overrides, record_config, validate_config
from dreamdiff.data import preprocess
from dreamdiff.demo_report import SERVE_DIR, write_demo_report
from dreamdiff.eval import evaluate
from dreamdiff.train import finetune, pretrain

STAGES_FILE = "stages.json"
# config section -> its fields that hold paths (placed inside the run folder when relative)
PATH_FIELDS = {
    "preprocess": ("output",),
    "pretrain": ("data", "output"),
    "finetune": ("data", "output", "encoder_checkpoint"),
    "sweep": ("output", "probe_data"),
    "evaluate": ("checkpoint", "data", "output", "classifier"),
    "serve": ("checkpoint",),
    "generate": ("input", "output", "checkpoint"),
}
# the paper's ablations (Table 3): name -> what changes against the full fine-tuning
ABLATIONS = {
    "no pretraining": {"encoder_checkpoint": None},
    "no CLIP loss": {"clip_weight": 0.0},
    "neither": {"encoder_checkpoint": None, "clip_weight": 0.0},
}


def _inside(folder: Path, path: str | None) -> str | None:
    return path if path is None or Path(path).is_absolute() else str(folder / path)


def resolve(cfg: DemoConfig) -> DemoConfig:
    """Apply --quick's overrides, place relative stage paths inside the run folder, share the demo's Ray."""
    if cfg.quick:
        cfg = validate_config("demo", apply_overrides(cfg.model_dump(mode="json"), cfg.quick_overrides), "demo --quick")
    out = Path(cfg.output).resolve()
    cfg.output = str(out)
    for section, fields in PATH_FIELDS.items():
        stage = getattr(cfg, section)
        for name in fields:
            setattr(stage, name, _inside(out, getattr(stage, name)))
        if "ray" in type(stage).model_fields:
            stage.ray = cfg.ray
    cfg.sweep.base.data = str(_inside(out, cfg.sweep.base.data))
    return cfg


def ablation_configs(cfg: DemoConfig) -> dict[str, tuple[FinetuneConfig, Any]]:
    """Per ablation: its fine-tune config (own output folder) and the evaluate config that scores it."""
    out = Path(cfg.output)
    configs = {}
    for name, change in ABLATIONS.items():
        slug = name.replace(" ", "-").lower()
        update: dict[str, Any] = {**change, "output": str(out / f"finetune-{slug}")}
        if cfg.finetune.tiny_sd is not None:  # every variant fine-tunes the same base model, the full run's
            base = Path(cfg.finetune.output) / finetune.TINY_SD_DIR
            update.update(base_model=str(base), tiny_sd=None, tiny_sd_pretrain=None)
        if change.get("encoder_checkpoint", "") is None:  # from scratch: the sizes of the pretrained encoder
            update["encoder"] = cfg.pretrain.model
        ft = cfg.finetune.model_copy(update=update)
        generator = str(Path(ft.output) / finetune.GENERATOR_DIR)
        ev = cfg.evaluate.model_copy(update={"checkpoint": generator, "output": str(out / f"evaluate-{slug}")})
        configs[name] = (ft, ev)
    return configs


def serve_one_request(cfg: DemoConfig) -> dict[str, Any]:
    """Deploy the generator on Ray Serve at 127.0.0.1, send one held-out EEG over HTTP, keep the answer, shut down."""
    from ray import serve

    from dreamdiff.serve.client import ServeClient
    from dreamdiff.serve.runner import start

    folder = Path(cfg.output) / SERVE_DIR
    rows = finetune.read_preview(finetune.paired_files(cfg.finetune.data), cfg.finetune.preview, 16)
    eeg = np.asarray(rows["eeg"][0], dtype=np.float32)
    url = start(cfg.serve)
    try:
        client = ServeClient(url)
        model = client.model()
        tick = time.perf_counter()
        result = client.generate(eeg, seed=0)
        latency = time.perf_counter() - tick
    finally:
        serve.shutdown()
    paths = result.save(folder, "request")
    summary = {
        "url": f"{url}/v1/generate",
        "latency_s": round(latency, 3),
        "class_shown": rows["class_name"][0],
        "images": [str(p) for p in paths],
        "metadata": result.metadata,
        "model": model.get("spec", {}).get("base_model", model),
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def plan(cfg: DemoConfig) -> list[tuple[str, Callable[[], Any]]]:
    """The stages in order: (name, what runs it)."""
    from dreamdiff.serve import batch
    from dreamdiff.tune import sweep

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("preprocess", lambda: preprocess.run(cfg.preprocess)),
        ("pretrain", lambda: pretrain.run(cfg.pretrain)),
        ("finetune", lambda: finetune.run(cfg.finetune)),
        ("sweep", lambda: sweep.run(cfg.sweep)),
        ("evaluate", lambda: evaluate.run(cfg.evaluate)),
        ("serve", lambda: serve_one_request(cfg)),
        ("generate", lambda: batch.run(cfg.generate)),
    ]
    if cfg.ablations:
        for name, (ft, ev) in ablation_configs(cfg).items():
            steps.append((f"finetune: {name}", lambda ft=ft: finetune.run(ft)))
            steps.append((f"evaluate: {name}", lambda ev=ev: evaluate.run(ev)))
    return steps


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run (or resume) every stage; write report.html and metrics.json into the run folder."""
    from dreamdiff.ray_init import init_ray

    cfg = resolve(cfg)
    out = Path(cfg.output)
    record_config(cfg, out)
    record = json.loads((out / STAGES_FILE).read_text()) if (out / STAGES_FILE).exists() else {}
    steps = plan(cfg)
    began = time.perf_counter()
    init_ray(cfg.ray)
    for number, (name, stage) in enumerate(steps, 1):
        tag = f"[demo {number}/{len(steps)}] {name}"
        if record.get(name, {}).get("status") == "done":
            print(f"{tag}: done in an earlier run, skipped", flush=True)
            continue
        print(f"{tag} ...", flush=True)
        tick = time.perf_counter()
        stage()
        record[name] = {"status": "done", "seconds": round(time.perf_counter() - tick, 1)}
        (out / STAGES_FILE).write_text(json.dumps(record, indent=1))
        print(f"{tag}: done in {record[name]['seconds']} s (elapsed {time.perf_counter() - began:.0f} s)", flush=True)
    metrics = write_demo_report(cfg, record, ablation_configs(cfg) if cfg.ablations else {})
    print(f"demo: report {out / 'report.html'}; metrics {out / 'metrics.json'}")
    return metrics
