"""`dreamdiff import-reference pretrain`: a reference pretraining checkpoint as a dreamdiff pretrain export.

The output folder serves as both things a pretrain run leaves:
- `encoder_checkpoint` for fine-tuning: `msm.safetensors` (the whole `MaskedSignalModel`) and `config.yaml`, whose
  `model` section holds the sizes inferred from the tensors, with `profile: reference`;
- `resume_from` for pretraining: a training checkpoint (`trainer_state.json`, `model.safetensors`, the same file as
  msm.safetensors, and `optimizer.safetensors`) at step 0. The reference's optimizer moments are not carried over
  (its parameter order is not ours); AdamW starts fresh from the imported weights, with the reference's weight
  decay.
`import.json` records where it came from: the source file and its sha256, the reference config's values, where each
size came from, and what became of every tensor. The folder appears whole or not at all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from dreamdiff.models.msm import build_msm
from dreamdiff.reference.checkpoint import load_reference_checkpoint, sha256
from dreamdiff.reference.folder import previous_import, published, write_record
from dreamdiff.reference.msm_keys import count_statuses, map_msm
from dreamdiff.train.checkpoint import MODEL_FILE, save_training_state
from dreamdiff.train.optim import build_optimizer
from dreamdiff.train.pretrain_loop import ENCODER_FILE

CONFIG_FILE = "config.yaml"
REFERENCE_LR = 2.5e-4  # the reference's Config_MBM_EEG defaults, where its config lacks them
REFERENCE_WEIGHT_DECAY = 0.05


def import_pretrain(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Import `checkpoint` into the folder `out`; returns the import record. Everything is checked before anything
    is written; importing the same file again into the same folder returns the earlier record."""
    checkpoint, out = Path(checkpoint), Path(out)
    digest = sha256(checkpoint, "pretrain")
    earlier = previous_import(out, digest)
    if earlier is not None:
        return {**earlier, "skipped": True}
    data = load_reference_checkpoint(checkpoint, "pretrain")
    config = data.get("config")
    values = config.values if config is not None else {}
    mapped = map_msm(data["model"], values)
    model = build_msm(mapped.config)
    model.load_state_dict(mapped.state, strict=True)
    decay = float(values.get("weight_decay", REFERENCE_WEIGHT_DECAY))
    optimizer = build_optimizer(model, float(values.get("lr", REFERENCE_LR)), weight_decay=decay)
    record = {
        "kind": "pretrain",
        "source": {"path": str(checkpoint.resolve()), "sha256": digest, "epoch": data.get("epoch")},
        "model": mapped.config.model_dump(mode="json"),
        "sizes_from": mapped.sources,
        "reference_config": values,
        "reference_config_dropped": config.dropped if config is not None else [],
        "tensors": mapped.report,
        "counts": count_statuses(mapped.report),
        "optimizer": f"fresh AdamW moments (weight decay {decay}); the reference's are not carried over",
    }
    with published(out) as stage:
        save_training_state(stage, model, optimizer, {"step": 0})
        _link_or_copy(stage / MODEL_FILE, stage / ENCODER_FILE)
        header = "# the encoder sizes of an imported reference checkpoint (see import.json)\n"
        model_section = {"model": mapped.config.model_dump(mode="json")}
        (stage / CONFIG_FILE).write_text(header + yaml.safe_dump(model_section, sort_keys=False))
        write_record(stage, record)
    return record


def _link_or_copy(source: Path, target: Path) -> None:
    """One file under two names: a hard link where the filesystem has them (no second copy of the weights)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
