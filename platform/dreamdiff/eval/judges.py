"""The models that judge generated images: the classifier of the n-way metric and the CLIP tower of the CLIP
metrics, chosen from the evaluate config (and, for CLIP, from what fine-tuning recorded in the checkpoint).
On SynthEEG-Image a missing classifier is trained first where the config asks."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamdiff.config import EvaluateConfig, read_yaml, validate_config
from dreamdiff.data.synthetic import SynthConfig
from dreamdiff.data.synthetic_images import render_image
from dreamdiff.errors import DreamdiffError
from dreamdiff.eval.classifier import (
    VIT_H14_SWAG,
    ImageClassifier,
    load_image_classifier,
    save_classifier,
    train_synthetic_classifier,
)
from dreamdiff.models.clip import FrozenClipImage, load_clip_image_encoder

SYNTH_DATASET = "SynthEEG-Image"
PAPER_CLIP = ("ViT-L-14", "openai")


def _synth_config(data: Path) -> tuple[SynthConfig, Path]:
    """The SynthEEG-Image config that made the shards: from preprocess's config.yaml in ``data`` or above."""
    for folder in (data, *list(data.resolve().parents)[:3]):
        record = folder / "config.yaml"
        if not record.is_file():
            continue
        raw = read_yaml(record)
        if "sources" not in raw:
            continue
        cfg = validate_config("preprocess", raw, str(record))
        synths = [s.synth for s in cfg.sources if s.kind == "synthetic" and s.labeled]
        if len(synths) != 1:
            raise DreamdiffError(
                f"train_classifier_if_missing: {record} has {len(synths)} labelled synthetic sources; expected one"
            )
        return synths[0], record
    raise DreamdiffError(
        f"train_classifier_if_missing: no preprocess record (config.yaml with sources) in {data} or its parents; "
        "train and save a classifier first (dreamdiff.eval.classifier) and name its folder"
    )


def _train_classifier(
    cfg: EvaluateConfig, meta: dict[str, np.ndarray], rows: dict[str, Any], test: np.ndarray
) -> dict[str, Any]:
    """Train the SynthEEG classifier on the TRAIN-split stimuli and save it at cfg.classifier.

    The judge must come from the same synthetic world as the shards: its config is read from the shards'
    preprocess record and checked against a stored stimulus before any training."""
    synth_rows = np.flatnonzero(meta["dataset"][test] == SYNTH_DATASET)
    if not len(synth_rows):
        raise DreamdiffError(
            f"train_classifier_if_missing: needs {SYNTH_DATASET} rows, the test rows hold "
            f"{sorted(set(meta['dataset'][test].tolist()))}; for ImageNet-EEG use classifier: {VIT_H14_SWAG}"
        )
    synth, record = _synth_config(Path(cfg.data))
    if cfg.n_way > synth.num_classes:
        raise DreamdiffError(f"n_way ({cfg.n_way}) exceeds the {synth.num_classes} classes of the synthetic set")
    position = int(synth_rows[0])
    image_id = str(meta["image_id"][test[position]])
    with Image.open(io.BytesIO(rows["image"][position])) as image:
        stored = np.asarray(image.convert("RGB"))
    index = int(image_id.removeprefix("synth-"))
    if not np.array_equal(stored, render_image(synth, index)):
        raise DreamdiffError(
            f"train_classifier_if_missing: the synthetic config in {record} does not render stimulus {image_id} of "
            f"the shards; is {cfg.data} the output of that preprocess run?"
        )
    model = train_synthetic_classifier(synth, seed=cfg.seed)
    save_classifier(model, cfg.classifier)
    return {"trained_now": True, "trained_on": f"{SYNTH_DATASET} train-split stimuli of {record}", "seed": cfg.seed}


def choose_classifier(
    cfg: EvaluateConfig, meta: dict[str, np.ndarray], rows: dict[str, Any], test: np.ndarray, device: torch.device
) -> tuple[ImageClassifier, dict[str, Any]]:
    """The judge of the n-way metric (trained first where asked and missing) and what to record about it."""
    info: dict[str, Any] = {"spec": cfg.classifier, "trained_now": False}
    folder = Path(cfg.classifier)
    if cfg.classifier != VIT_H14_SWAG and cfg.train_classifier_if_missing and not (folder / "classifier.json").exists():
        info.update(_train_classifier(cfg, meta, rows, test))
    classifier = load_image_classifier(cfg.classifier, device)
    info["num_classes"] = classifier.num_classes
    if cfg.n_way > classifier.num_classes:
        raise DreamdiffError(
            f"n_way ({cfg.n_way}) exceeds the classifier's {classifier.num_classes} classes ({cfg.classifier})"
        )
    return classifier, info


def choose_clip(
    cfg: EvaluateConfig, info: dict[str, Any], device: torch.device
) -> tuple[FrozenClipImage | None, dict[str, Any]]:
    """The frozen CLIP tower of the CLIP metrics and what to record about it. Retrieval is only meaningful in
    the space the generator's CLIP head was aligned to, so the checkpoint's own CLIP is the default."""
    if not cfg.clip_metrics:
        return None, {"skipped": "clip_metrics is false"}
    recorded = (info.get("clip_model"), info.get("clip_pretrained"))
    if cfg.clip_model is None and recorded[0]:
        model, source = recorded[0], "checkpoint"
    else:
        model, source = cfg.clip_model or PAPER_CLIP[0], "config" if cfg.clip_model else "paper default"
    pretrained = cfg.clip_pretrained or (recorded[1] if model == recorded[0] and recorded[1] else PAPER_CLIP[1])
    clip = load_clip_image_encoder(model, pretrained, device)
    return clip, {"model": model, "pretrained": pretrained, "source": source, "embed_dim": clip.embed_dim}
