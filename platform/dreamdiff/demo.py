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
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dreamdiff.config import (
    STAGES,
    TRIAL_OUTPUT,
    DemoConfig,
    FinetuneConfig,
    PathKind,
    apply_overrides,
    record_config,
    validate_config,
)
from dreamdiff.demo_report import SERVE_DIR, write_demo_report
from dreamdiff.locations import path_fields
from dreamdiff.train import finetune

STAGES_FILE = "stages.json"
# the paper's ablations (Table 3): name -> what changes against the full fine-tuning
ABLATIONS = {
    "no pretraining": {"encoder_checkpoint": None},
    "no CLIP loss": {"clip_weight": 0.0},
    "neither": {"encoder_checkpoint": None, "clip_weight": 0.0},
}


def sections(cfg: DemoConfig) -> list[str]:
    """The stages the demo runs, in its config's order: its sections named after a stage."""
    return [name for name in type(cfg).model_fields if name in STAGES]


def resolve(cfg: DemoConfig) -> DemoConfig:
    """Apply --quick's overrides, place relative stage paths inside the run folder, share the demo's Ray.

    Every path field of every section (dreamdiff.locations.path_fields) moves into the run folder when relative;
    a `ModelRef` (a model name or a path) only where the run folder holds it.
    """
    if cfg.quick:
        cfg = validate_config("demo", apply_overrides(cfg.model_dump(mode="json"), cfg.quick_overrides), "demo --quick")
    out = Path(cfg.output).resolve()
    cfg.output = str(out)
    for found in path_fields(cfg):
        path = Path(found.value)
        if path.is_absolute() or found.value == TRIAL_OUTPUT:  # the sweep gives each trial its own output
            continue
        if found.kind is PathKind.MODEL_REF and not (out / path).exists():
            continue
        found.set(str(out / path))
    for name in sections(cfg):
        section = getattr(cfg, name)
        if "ray" in type(section).model_fields:
            section.ray = cfg.ray
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


def _runner(cfg: DemoConfig, stage: str) -> Callable[[], Any]:
    if stage == "serve":  # the demo deploys, answers one request and shuts down instead of serving until Ctrl-C
        return partial(serve_one_request, cfg)
    return partial(STAGES[stage].run, getattr(cfg, stage))


def plan(cfg: DemoConfig) -> list[tuple[str, Callable[[], Any]]]:
    """The stages in order: (name, what runs it)."""
    steps = [(name, _runner(cfg, name)) for name in sections(cfg)]
    if cfg.ablations:
        for name, (ft, ev) in ablation_configs(cfg).items():
            steps.append((f"finetune: {name}", partial(STAGES["finetune"].run, ft)))
            steps.append((f"evaluate: {name}", partial(STAGES["evaluate"].run, ev)))
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
