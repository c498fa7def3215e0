"""The demo's report.html and metrics.json, read back from what each stage left in the run folder.

Everything comes from the stages' own outputs on disk (manifest.json, metrics.jsonl, results.csv, results.json,
the Serve answer, the batch index), so a resumed demo reports the same as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dreamdiff.config import DemoConfig, FinetuneConfig, dump_config
from dreamdiff.data import synthetic, synthetic_images
from dreamdiff.report import image_grid, loss_curve, metric_curves, write_report
from dreamdiff.train import finetune, finetune_loop, pretrain, tiny_sd_pretrain, worker
from dreamdiff.tune import sweep

SERVE_DIR = "serve"  # the demo's Serve request and answer, inside the run folder
TOP1 = "n_way_top_1"
# the paper's Table 3 (50-way top-1 on ImageNet-EEG, subject 4), for the ablation table
PAPER_TOP1 = {"full": 0.458, "no pretraining": 0.323, "no CLIP loss": None, "neither": 0.042}
SHOWN_METRICS = (TOP1, "retrieval_top_1", "retrieval_top_5", "clip_similarity", "ssim", "pcc")


def _synth_source(cfg: DemoConfig) -> synthetic.SynthConfig:
    return next(s.synth for s in cfg.preprocess.sources if s.kind == "synthetic" and s.labeled)


def _held_out(run: Path) -> str:
    held = json.loads((run / pretrain.SPLIT_FILE).read_text())["held_out"]
    return ", ".join(sorted({str(Path(f).relative_to(Path(f).parents[2])) for f in held}))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _evaluation(folder: Path) -> dict[str, Any]:
    """The headline figures of an evaluate run, each with its chance level where it has one."""
    results = json.loads((folder / "results.json").read_text())
    figures = {}
    for name in SHOWN_METRICS:
        figure = results["metrics"].get(name, {})
        if "value" in figure:
            figures[name] = {"value": figure["value"], **({"chance": figure["chance"]} if "chance" in figure else {})}
    return {
        "protocol": results["protocol"]["name"],
        "num_eeg": results["num_eeg"],
        "samples_per_eeg": results["samples_per_eeg"],
        "n_way": results["metrics"][TOP1]["n_way"],
        "seed": results["seed"],
        "sampler": f"{results['generation']['sampler']} {results['generation']['steps']} steps",
        "metrics": figures,
    }


def _preprocess_section(cfg: DemoConfig, figures: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    synth = _synth_source(cfg)
    first = [k * synth.images_per_class for k in range(synth.num_classes)]
    names = [f"{a['shape']}/{a['colour']}" for a in synthetic_images.class_attributes(synth)]
    classes = image_grid(
        np.stack([synthetic_images.render_image(synth, i) for i in first]), names, figures / "synth-classes.png"
    )
    manifest = json.loads((Path(cfg.preprocess.output) / "manifest.json").read_text())
    per_dataset: dict[str, dict[str, Any]] = {}
    for subject in manifest["subjects"]:
        row = per_dataset.setdefault(subject["dataset"], {"dataset": subject["dataset"], "subjects": 0, "rows": 0})
        row["subjects"] += 1
        row["rows"] += subject.get("rows", 0)
    sections = [
        {"heading": "SynthEEG-Image classes (one stimulus per class)", "images": [classes]},
        {
            "heading": "Preprocessing (Ray Data -> Parquet shards)",
            "table": list(per_dataset.values()),
            "text": f"{manifest['totals']['rows']} windows, {manifest['totals']['bytes'] / 1e6:.1f} MB; "
            f"band-pass {manifest['signal']['band_pass_hz']} Hz, upper edge clipped to "
            f"{manifest['signal']['upper_edge_clipped_to_hz']} Hz where Nyquist required.",
        },
    ]
    return manifest["totals"], sections


def _pretrain_section(cfg: DemoConfig, figures: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    run = Path(cfg.pretrain.output)
    last = _jsonl(run / worker.METRICS_FILE)[-1]
    curve = loss_curve(run / worker.METRICS_FILE, figures / "pretrain-loss.png", "MSM pretraining")
    recon = sorted((run / "plots").glob("reconstruction-epoch*.png"))[-1]
    metrics = {
        "step": last["step"],
        "val_loss": last["val_loss"],
        "val_loss_zero_prediction": last["val_loss_zero_prediction"],
        "val_loss_ratio_to_zero_prediction": last["val_loss"] / last["val_loss_zero_prediction"],
        "protocol": "masked MSE on held-out shard files, fixed masks; z-scored EEG, so predicting zeros scores ~1",
    }
    section = {
        "heading": "MSM pretraining (Ray Train, DDP)",
        "table": [metrics],
        "text": f"Held-out loss: a fixed batch from {_held_out(run)}, with fixed masks. The training loss also "
        "covers FakeDataset windows, which are white noise that no model can predict.",
        "images": [curve, recon],
    }
    return metrics, section


def _finetune_section(ft: FinetuneConfig, figures: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    run = Path(ft.output)
    last = _jsonl(run / worker.METRICS_FILE)[-1]
    curve = metric_curves(
        run / worker.METRICS_FILE,
        ("loss", "sd_loss", "clip_loss"),
        figures / "finetune-loss.png",
        "fine-tuning (SD loss + CLIP alignment loss)",
        "loss",
    )
    metrics = {k: last[k] for k in ("step", "loss", "sd_loss", "clip_loss", "samples_per_s")}
    text = "Preview: held-out (validation) stimuli, then images generated from the EEG recorded while they were shown."
    images = [curve, run / "plots" / finetune_loop.PREVIEW_FILE]
    base = Path(ft.base_model or run / finetune.TINY_SD_DIR)
    if (base / tiny_sd_pretrain.MARKER_FILE).is_file():
        done = json.loads((base / tiny_sd_pretrain.MARKER_FILE).read_text())
        metrics |= {"tiny_sd_pretrain_steps": done["settings"]["steps"], "tiny_sd_pretrain_loss": done["loss"]}
        text = (
            "First the tiny SD learned to draw, the stand-in for SD's own pretraining: held-out stimuli, each beside "
            f"what the base model draws from the stimulus's CLIP embedding alone. Then fine-tuning. {text}"
        )
        images.insert(0, base / tiny_sd_pretrain.PREVIEW_FILE)
    section = {
        "heading": f"Fine-tuning (Ray Train): EEG encoder + conditioner + UNet ({ft.trainable}), CLIP alignment",
        "table": [metrics],
        "text": text,
        "images": images,
    }
    return metrics, section


def _sweep_section(cfg: DemoConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    folder = Path(cfg.sweep.output)
    with open(folder / sweep.RESULTS_FILE) as f:
        rows = list(csv.DictReader(f))
    keep = ("trial_id", "mask_ratio", "encoder", "status", "probe_accuracy", "probe_chance", "val_loss", "wall_s")
    table = [{k: row[k] for k in keep if k in row} for row in rows]
    best = sweep.best_trial([{**r, "probe_accuracy": float(r["probe_accuracy"] or "nan")} for r in rows])
    metrics = {
        "trials": len(rows),
        "stopped_early": sum(r.get("status") == "early-stopped" for r in rows),
        # the sweep's choice (the trial in best_config), not the top row: that can be a trial ASHA stopped early
        "best": next(t for t in table if t["trial_id"] == best["trial_id"]) if best else None,
        "best_config": str(folder / sweep.BEST_FILE),
    }
    section = {
        "heading": "Sweep (Ray Tune + ASHA): mask ratio x encoder size, scored by a linear probe",
        "table": table,
        "text": f"{metrics['stopped_early']} of {len(rows)} trials stopped early by ASHA. Best config: "
        f"{sweep.BEST_FILE} (trains as is with `dreamdiff pretrain`).",
        "images": [folder / sweep.PLOT_FILE],
    }
    return metrics, section


def _evaluate_section(cfg: DemoConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    folder = Path(cfg.evaluate.output)
    figures = _evaluation(folder)
    table = [{"metric": k, "value": v["value"], "chance": v.get("chance", "")} for k, v in figures["metrics"].items()]
    section = {
        "heading": "Evaluation: the paper's n-way top-1 on held-out EEG",
        "text": f"Protocol {figures['protocol']} (test images never seen in fine-tuning), {figures['num_eeg']} "
        f"EEGs x {figures['samples_per_eeg']} samples, {figures['n_way']}-way, seed {figures['seed']}, "
        f"{figures['sampler']}. Ground truth: a small classifier trained on the synthetic training stimuli labels "
        "each stimulus; a generated image scores when that class beats n-1 random others.",
        "table": table,
        "images": [folder / "grid.png"],
    }
    return figures, section


def _ablation_section(
    cfg: DemoConfig, full: dict[str, Any], ablations: dict[str, tuple[FinetuneConfig, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = [("full", cfg.finetune, full)]
    rows += [(name, ft, _evaluation(Path(ev.output))) for name, (ft, ev) in ablations.items()]
    table = []
    for name, ft, figures in rows:
        top = figures["metrics"][TOP1]
        table.append(
            {
                "variant": name,
                "MSM pretraining": ft.encoder_checkpoint is not None,
                "CLIP loss": ft.clip_weight > 0,
                "top-1": top["value"],
                "chance": top["chance"],
                "retrieval top-1": figures["metrics"].get("retrieval_top_1", {}).get("value", ""),
                "paper (50-way, ImageNet-EEG)": PAPER_TOP1.get(name) or "",
            }
        )
    section = {
        "heading": "Ablations (the paper's Table 3, on SynthEEG-Image)",
        "table": table,
        "text": "Same data, steps and seed; only the encoder initialisation and the CLIP loss change.",
    }
    return table, section


def _serve_section(cfg: DemoConfig, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    summary = json.loads((out / SERVE_DIR / "summary.json").read_text())
    metrics = {"url": summary["url"], "latency_s": summary["latency_s"], "images": len(summary["images"])}
    section = {
        "heading": "Serve: one HTTP request to the Ray Serve endpoint on 127.0.0.1",
        "text": f"POST {summary['url']} with one held-out EEG (class {summary['class_shown']}): "
        f"{len(summary['images'])} PNGs in {summary['latency_s']} s.",
        "table": [{k: v for k, v in summary["metadata"].items() if not isinstance(v, (dict, list))}],
        "images": [Path(p) for p in summary["images"]],
    }
    return metrics, section


def _generate_section(cfg: DemoConfig, figures: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    folder = Path(cfg.generate.output)
    index = json.loads((folder / "index.json").read_text())
    paths = [folder / p for row in index for p in row["images"]]
    shown = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:20]]
    grid = image_grid(np.stack(shown), [Path(p).stem[-12:] for p in paths[:20]], figures / "batch-generated.png")
    metrics = {"eegs": len(index), "images": len(paths), "index": str(folder / "index.json")}
    section = {
        "heading": "Batch generation (Ray Data actor pool over the test split)",
        "text": f"{len(index)} EEGs -> {len(paths)} PNGs, listed in {folder / 'index.json'}. The first 20:",
        "images": [grid],
    }
    return metrics, section


def write_demo_report(
    cfg: DemoConfig, record: dict[str, Any], ablations: dict[str, tuple[FinetuneConfig, Any]]
) -> dict[str, Any]:
    """report.html + metrics.json in the run folder; returns the metrics."""
    out = Path(cfg.output)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    preprocess_totals, pre_sections = _preprocess_section(cfg, figures)
    metrics: dict[str, Any] = {"stages": record, "preprocess": preprocess_totals}
    sections: list[dict[str, Any]] = [{"heading": "Stages", "table": [{"stage": k, **v} for k, v in record.items()]}]
    evaluated: dict[str, Any] = {}
    headline = []
    for name, build in (
        ("pretrain", lambda: _pretrain_section(cfg, figures)),
        ("finetune", lambda: _finetune_section(cfg.finetune, figures)),
        ("sweep", lambda: _sweep_section(cfg)),
        ("evaluate", lambda: _evaluate_section(cfg)),
        ("serve", lambda: _serve_section(cfg, out)),
        ("generate", lambda: _generate_section(cfg, figures)),
    ):
        metrics[name], section = build()
        sections.append(section)
        if name == "evaluate":
            evaluated = metrics[name]
            top = evaluated["metrics"][TOP1]
            headline = [{"metric": f"{evaluated['n_way']}-way top-1 (held-out EEG)", **top}]
    if ablations:
        metrics["ablations"], section = _ablation_section(cfg, evaluated, ablations)
        sections.append(section)
    sections.append({"heading": "Resolved config", "code": dump_config(cfg)})
    sections = [sections[0], {"heading": "Headline", "table": headline}, *pre_sections, *sections[1:]]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _copy_inside(out, sections)
    write_report(out, "dreamdiff demo", sections)
    return metrics


def _copy_inside(out: Path, sections: list[dict[str, Any]]) -> None:
    """Every image the report shows must lie inside the run folder (the report moves with it): copy strays in."""
    for section in sections:
        images = []
        for image in section.get("images", []):
            path = Path(image).resolve()
            if not path.is_relative_to(out.resolve()):
                target = out / "figures" / path.name
                shutil.copyfile(path, target)
                path = target
            images.append(path)
        if images:
            section["images"] = images
