"""What the evaluate stage writes besides results.json: one JSON line per test EEG, and report.html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from dreamdiff.config import EvaluateConfig
from dreamdiff.eval.shards import META_COLUMNS
from dreamdiff.report import image_grid, write_report


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value json writes."""
    return value.item() if isinstance(value, np.generic) else value


def write_per_eeg(
    output: Path, meta: dict[str, np.ndarray], test: np.ndarray, scores: dict[str, Tensor], files_of: list[list[str]]
) -> None:
    """One JSON line per test EEG: what it showed, its images, their classes and scores (for error analysis)."""
    gt = scores["stim_probs"].argmax(1)
    pred = scores["gen_probs"].argmax(2)
    with (output / "per_eeg.jsonl").open("w") as out:
        for k, row in enumerate(test):
            line = {name: _plain(meta[name][row]) for name in META_COLUMNS}
            line.update(generated=files_of[k], gt_class=int(gt[k]), predicted=pred[k].tolist())
            for name in ("ssim", "pcc"):
                if name in scores:
                    line[name] = [round(v, 5) for v in scores[name][k].tolist()]
            if "gen_emb" in scores:
                line["clip_similarity"] = [
                    round(v, 5) for v in F.cosine_similarity(scores["gen_emb"][k], scores["stim_emb"][k][None]).tolist()
                ]
            out.write(json.dumps(line) + "\n")


def write_evaluate_report(
    output: Path,
    cfg: EvaluateConfig,
    results: dict[str, Any],
    meta: dict[str, np.ndarray],
    test: np.ndarray,
    scores: dict[str, Tensor],
    report_images: dict[int, tuple[np.ndarray, np.ndarray]],
) -> None:
    """report.html: setup, metrics table, a stimulus | generated grid."""
    gt = scores["stim_probs"].argmax(1)
    pred = scores["gen_probs"].argmax(2)
    tiles, labels = [], []
    for k in sorted(report_images):
        stimulus, generated = report_images[k]
        tiles.append(stimulus)
        labels.append(f"GT {str(meta['class_name'][test[k]])[:24]} ({int(gt[k])})")
        for j, image in enumerate(generated):
            tiles.append(image)
            labels.append(f"sample {j}: {int(pred[k, j])}" + (" = GT" if int(pred[k, j]) == int(gt[k]) else ""))
    grid = image_grid(np.stack(tiles), labels, output / "grid.png", columns=1 + cfg.samples_per_eeg)
    table, split_name = [], results["protocol"]["name"]
    for name, figure in results["metrics"].items():
        value = figure.get("value", figure.get("skipped"))
        table.append({"metric": name, "value": value, "chance": figure.get("chance", ""), "protocol": split_name})
    setup = (
        f"{results['protocol']['description']}. {results['num_eeg']} EEGs x {results['samples_per_eeg']} samples, "
        f"seed {cfg.seed}, sampler {cfg.sampler} {cfg.steps} steps, guidance {cfg.guidance_scale}; classifier "
        f"{cfg.classifier} ({results['classifier']['num_classes']} classes); CLIP {results['clip']}. "
        f"Checkpoint {results['checkpoint']}; test rows of its fine-tuning splits: "
        f"{results['protocol']['test_rows_seen_in_finetuning']}."
    )
    write_report(
        output,
        "dreamdiff evaluate",
        [
            {"heading": "Setup", "text": setup},
            {"heading": "Metrics", "table": table},
            {
                "heading": "Stimulus | generated",
                "text": "First column: the stimulus (ground truth = the classifier's class in brackets); then the "
                "generated samples with the classifier's class.",
                "images": [grid],
            },
            {"heading": "Results (JSON)", "code": json.dumps(results, indent=2)},
        ],
    )
