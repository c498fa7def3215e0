"""The pretrain stage's driver: masked signal modeling on Ray Train (TorchTrainer, DDP), resumable.

The driver (`run`) splits the shard files into train and held-out subjects, checks the batch against the
workers and the data, records the config and the split, and fits a TorchTrainer whose workers run
`pretrain_loop.train_loop`; rank 0 exports the encoder into <output>/msm.safetensors at the end. Re-running the
same config into the same output folder resumes from the last checkpoint (Ray Train restores the run from its
storage folder): same step count, optimizer state and learning rate. `resume_from` starts a new run from
another run's checkpoint.

With `probe_data` set, every checkpoint report also carries `probe_accuracy`: a linear probe on the
frozen encoder's features of labelled EEG (dreamdiff.eval.probe), the score that sweeps compare.
`build_trainer` is the driver without the `fit`, for callers that add callbacks (dreamdiff.tune).

`data`, `probe_data` and `output` may be URIs (dreamdiff.storage): Ray Train keeps its checkpoints there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from dreamdiff import storage
from dreamdiff.config import PretrainConfig, record_config
from dreamdiff.data.reader import TRAIN_COLUMNS, read_table, row_counts, shard_files
from dreamdiff.errors import DreamdiffError, first_line
from dreamdiff.eval.probe import load_probe_sets
from dreamdiff.models.msm import MSMConfig
from dreamdiff.train.checkpoint import STATE_FILE, check_training_state
from dreamdiff.train.pretrain_loop import ENCODER_FILE, steps_per_epoch, train_loop
from dreamdiff.train.trainer import (
    RAY_DIR,
    RUN_NAME,
    build_torch_trainer,
    fit_trainer,
    fits_object_store,
    training_dataset,
)

log = logging.getLogger(__name__)

SPLIT_FILE = "data_split.json"


def split_files(files: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Hold out every k-th shard file (whole subjects, in practice) for validation."""
    if fraction == 0 or len(files) < 2:
        return files, files[:1]
    every = max(2, round(1 / fraction))
    val = files[every - 1 :: every] or files[-1:]
    return [f for f in files if f not in val], val


def read_rows(files: list[str], n: int) -> dict[str, np.ndarray]:
    """The first `n` rows of the training columns (a fixed validation batch)."""
    tables = []
    for file in files:
        tables.append(read_table(file, columns=TRAIN_COLUMNS))
        if sum(t.num_rows for t in tables) >= n:
            break
    table = pa.concat_tables(tables).slice(0, n)
    return {name: table.column(name).combine_chunks().to_numpy_ndarray() for name in TRAIN_COLUMNS}


def latest_checkpoint(run_folder: str | Path) -> Path | None:
    """The newest checkpoint Ray Train kept for a pretrain run folder."""
    found = sorted(p.parent for p in (Path(run_folder) / RAY_DIR / RUN_NAME).glob(f"checkpoint_*/{STATE_FILE}"))
    return found[-1] if found else None


def _resume_folder(resume_from: str | None, model: MSMConfig) -> str | None:
    resume_from = storage.require_local(resume_from, "resume_from")
    if resume_from is None:
        return None
    path = Path(resume_from)
    if (path / STATE_FILE).is_file():
        folder = path
    else:
        latest = latest_checkpoint(path)
        if latest is None:
            raise DreamdiffError(f"resume_from: {resume_from} is neither a checkpoint nor a pretrain run with one")
        folder = latest
    try:
        check_training_state(folder)  # a truncated checkpoint fails here, naming its file, before any work
    except DreamdiffError as err:
        raise DreamdiffError(f"resume_from: {err}") from err
    # the record of the run (or import) continued: beside its checkpoint, or at the root of the run that holds it
    run_root = folder.parents[2] if folder.parent.parent.name == RAY_DIR else folder
    _check_model_fits(run_root / "config.yaml", model)
    return str(folder.resolve())


def _check_model_fits(record: Path, model: MSMConfig) -> None:
    """The run (or import) being continued recorded its model: sizes or a profile that differ fail here, naming
    them, not in a worker when the weights do not load."""
    saved = yaml.safe_load(record.read_text()) if record.is_file() else None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        return
    try:
        theirs = MSMConfig.model_validate(saved["model"]).architecture()
    except ValueError as err:
        raise DreamdiffError(f"resume_from: {record} holds no valid model section ({first_line(err)})") from None
    ours = model.architecture()
    changed = [f"model.{k}={v}" for k, v in theirs.items() if v != ours[k]]
    if changed:
        raise DreamdiffError(
            f"resume_from: {record.parent} was trained with other model settings; set {' '.join(changed)}"
        )


def _cache(cfg: PretrainConfig, rows: int) -> bool:
    """Keep the decoded windows in Ray's object store when asked, or on auto when they fit comfortably."""
    if cfg.cache_data != "auto":
        return cfg.cache_data == "yes"
    return fits_object_store(rows * 128 * cfg.model.num_samples * 2)  # float16 [128, T] windows


@dataclass(frozen=True)
class RunPlan:
    """What a pretrain run reads and how long it trains, known before Ray starts."""

    train_files: list[str]
    val_files: list[str]
    rows: int
    steps_per_epoch: int
    total_steps: int
    reports: int  # checkpoint reports to Ray Train (and to Tune): every checkpoint.every_steps, and at the end


def plan_run(cfg: PretrainConfig) -> RunPlan:
    """Split the shard files and count steps; a batch that does not fit the workers or the data fails here."""
    train_files, val_files = split_files(shard_files(cfg.data), cfg.val_fraction)
    rows = sum(row_counts(train_files))  # an unreadable shard fails here, naming it
    world = max(1, cfg.scaling.num_workers)
    if cfg.batch_size % (world * cfg.optim.grad_accum):
        raise DreamdiffError(
            f"batch_size: {cfg.batch_size} must divide evenly into {world} worker(s) x "
            f"{cfg.optim.grad_accum} accumulation step(s)"
        )
    per_epoch = steps_per_epoch(cfg, rows, world)
    if per_epoch == 0:
        raise DreamdiffError(f"batch_size: {cfg.batch_size} is larger than the {rows} training rows in {cfg.data}")
    total = per_epoch * cfg.epochs
    return RunPlan(train_files, val_files, rows, per_epoch, total, -(-total // cfg.checkpoint.every_steps))


def _probe_sets(cfg: PretrainConfig) -> dict[str, np.ndarray] | None:
    if cfg.probe_data is None:
        return None
    try:
        files = shard_files(cfg.probe_data)
    except DreamdiffError as err:
        raise DreamdiffError(f"probe_data: {str(err).removeprefix('data: ')}") from None
    return load_probe_sets(files, cfg.probe_rows)


def build_trainer(cfg: PretrainConfig, callbacks: Sequence[Any] = ()) -> Any:
    """The TorchTrainer of a run (Ray started, config recorded), not yet fitted; `callbacks` go to its RunConfig."""
    from dreamdiff.ray_init import init_ray

    output = storage.absolute(cfg.output)
    plan = plan_run(cfg)
    resume_from = _resume_folder(cfg.resume_from, cfg.model)
    probe = _probe_sets(cfg)
    record_config(cfg, output)
    split = json.dumps({"train": plan.train_files, "held_out": plan.val_files}, indent=1)
    storage.write_text(storage.join(output, SPLIT_FILE), split)
    init_ray(cfg.ray)
    dataset = training_dataset(plan.train_files, TRAIN_COLUMNS, seed=cfg.seed, cache=_cache(cfg, plan.rows))
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "rows": plan.rows,
        "output": output,
        "val": read_rows(plan.val_files, cfg.val_rows),
        "probe": probe,
        "resume_from": resume_from,
        "shards": plan.train_files,  # not read by the loop: names an unreadable shard if a worker fails on one
    }
    log.info(
        "pretrain: %d training windows from %d files, %d held-out files, %d worker(s), %d steps/epoch%s",
        plan.rows,
        len(plan.train_files),
        len(plan.val_files),
        max(1, cfg.scaling.num_workers),
        plan.steps_per_epoch,
        "" if probe is None else f", probe on {len(probe['train_label'])} + {len(probe['test_label'])} windows",
    )
    return build_torch_trainer(
        train_loop,
        loop_config,
        output=output,
        scaling=cfg.scaling,
        checkpoint=cfg.checkpoint,
        max_failures=cfg.max_failures,
        datasets={"train": dataset},
        callbacks=callbacks,
    )


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or resume) an MSM run; returns the last metrics. The encoder lands in <output>/msm.safetensors."""
    trainer = build_trainer(cfg)
    shards = trainer.train_loop_config["shards"]
    result = fit_trainer(trainer, "pretrain", storage.absolute(cfg.output), cfg.max_failures, shards=shards)
    metrics = dict(result.metrics or {})
    probe = f"  probe {metrics['probe_accuracy']:.3f}" if "probe_accuracy" in metrics else ""
    print(
        f"pretrain: step {metrics.get('step')}  loss {metrics.get('loss', float('nan')):.4f}  "
        f"val {metrics.get('val_loss', float('nan')):.4f} (zero prediction "
        f"{metrics.get('val_loss_zero_prediction', float('nan')):.4f}){probe}; "
        f"weights: {storage.join(storage.absolute(cfg.output), ENCODER_FILE)}"
    )
    return metrics
