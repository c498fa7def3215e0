"""The pretrain stage: masked signal modeling on Ray Train (TorchTrainer, DDP), resumable.

The driver (`run`) splits the shard files into train and held-out subjects, starts a
TorchTrainer and exports the encoder at the end. Each worker (`train_loop`) reads its shard of
the data with `get_dataset_shard`, calls the plain step function `msm_train_step`, and reports
metrics every `log_every_steps` and a checkpoint every `checkpoint.every_steps`. Re-running the
same config into the same output folder resumes from the last checkpoint (Ray Train restores
the run from its storage folder): same step count, optimizer state and learning rate.

With `probe_data` set, every checkpoint report also carries `probe_accuracy`: a linear probe on the
frozen encoder's features of labelled EEG (dreamdiff.eval.probe), the score that sweeps compare.
`build_trainer` is the driver without the `fit`, for callers that add callbacks (dreamdiff.tune).

`data`, `probe_data` and `output` may be URIs (dreamdiff.storage): Ray Train keeps its checkpoints there
(storage_path), and rank 0 writes metrics, plots and the weights into a local staging folder that it copies
up at every checkpoint and at the end.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel

from dreamdiff import storage
from dreamdiff.config import PretrainConfig, dump_config, record_config
from dreamdiff.data.augment import augment_eeg
from dreamdiff.data.reader import TRAIN_COLUMNS, shard_files
from dreamdiff.errors import DreamdiffError
from dreamdiff.eval.probe import chance_accuracy, load_probe_sets, probe_encoder
from dreamdiff.models.msm import build_msm
from dreamdiff.train.batches import ResumableBatches
from dreamdiff.train.checkpoint import STATE_FILE, load_training_state, save_model, save_training_state, unwrap
from dreamdiff.train.msm_plot import plot_reconstructions
from dreamdiff.train.msm_step import msm_eval_loss, msm_train_step, zero_prediction_loss
from dreamdiff.train.optim import WarmupCosine, build_optimizer

log = logging.getLogger(__name__)

ENCODER_FILE = "msm.safetensors"
METRICS_FILE = "metrics.jsonl"
SPLIT_FILE = "data_split.json"
FAILED_ONCE = ".injected_failure"


# ------------------------------------------------------------------------------- per worker


def _micro_batch_size(cfg: PretrainConfig, world: int) -> int:
    return cfg.batch_size // (world * cfg.optim.grad_accum)


def steps_per_epoch(cfg: PretrainConfig, rows: int, world: int) -> int:
    """Optimizer steps per epoch: each worker sees rows // world rows in whole micro-batches."""
    return (rows // world) // _micro_batch_size(cfg, world) // cfg.optim.grad_accum


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, maybe restore, train, report."""
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # rank 0 writes the run folder's own files: in place when local, else staged and copied up at checkpoints
    staging = storage.LocalStaging(config["output"], pull=(METRICS_FILE,)) if rank == 0 else None
    failure_marker = storage.join(config["output"], FAILED_ONCE)
    device = ray.train.torch.get_device()
    use_bf16 = cfg.precision == "bf16" and device.type == "cuda"

    torch.manual_seed(cfg.seed)
    model = build_msm(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    position = {"step": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # this run restarted (failure or re-run): Ray hands back its latest checkpoint
        with checkpoint.as_directory() as folder:
            position = load_training_state(folder, model, optimizer)
    elif config["resume_from"]:  # a new run continuing another one
        position = load_training_state(config["resume_from"], model, optimizer)
    if rank == 0 and position["step"]:
        log.info("resumed at step %d", position["step"])
    model = ray.train.torch.prepare_model(model)

    micro = _micro_batch_size(cfg, world)
    per_epoch = steps_per_epoch(cfg, config["rows"], world)
    total = per_epoch * cfg.epochs
    schedule = WarmupCosine(cfg.optim.lr, cfg.optim.warmup_steps, total, cfg.optim.min_lr)
    val = {k: torch.as_tensor(v) for k, v in config["val"].items()}
    val_seed = cfg.seed + 12345  # the same masks at every evaluation, so val losses compare
    zero_loss = zero_prediction_loss(model, val, generator=torch.Generator().manual_seed(val_seed))
    probe = config["probe"]
    shard = ray.train.get_dataset_shard("train")
    aug_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    batches = ResumableBatches(
        shard, micro=micro, per_epoch=per_epoch, epochs=cfg.epochs, seed=cfg.seed, rank=rank, group=cfg.optim.grad_accum
    )

    step = position["step"]
    window: list[dict[str, float]] = []
    tick, tick_step = time.perf_counter(), step
    for epoch, index, group in batches.from_step(step):
        for item in group:
            item["eeg"] = augment_eeg(item["eeg"], cfg.augment.max_crop, cfg.augment.scale, aug_gen)
        stats = msm_train_step(
            model,
            optimizer,
            group,
            lr=schedule(step),
            grad_clip=cfg.optim.grad_clip,
            autocast_dtype=torch.bfloat16 if use_bf16 else None,
            device=device,
        )
        step += 1
        window.append(stats)
        if cfg.inject_failure_at_step == step and rank == 0 and not storage.exists(failure_marker):
            storage.write_text(failure_marker, "")
            raise RuntimeError(f"injected failure at step {step} (config inject_failure_at_step)")
        save = step % cfg.checkpoint.every_steps == 0 or step == total
        if save or step % cfg.log_every_steps == 0:
            elapsed = max(time.perf_counter() - tick, 1e-9)
            metrics = {
                "step": step,
                "epoch": epoch + (index + 1) / per_epoch,
                "loss": float(np.mean([w["loss"] for w in window])),
                "grad_norm": float(np.mean([w["grad_norm"] for w in window])),
                "lr": stats["lr"],
                "samples_per_s": (step - tick_step) * cfg.batch_size / elapsed,
                "data_wait_fraction": batches.take_wait() / elapsed,
                "val_loss": msm_eval_loss(model, val, device=device, generator=torch.Generator().manual_seed(val_seed)),
                "val_loss_zero_prediction": zero_loss,
                "resumed_at": position["step"],
            }
            if save and probe is not None:  # outside the timed window: probing is not training throughput
                metrics.update(_probe(model, probe, rank))
            window, tick, tick_step = [], time.perf_counter(), step
            if staging:
                _log(metrics, staging.path)
            if save:  # a Ray Train report is a barrier across workers: only with checkpoints
                report_checkpoint(metrics, model, optimizer, rank, cfg)
                if staging:
                    staging.sync()
        end_of_epoch = index == per_epoch - 1
        if staging and end_of_epoch and ((epoch + 1) % cfg.plot_every_epochs == 0 or epoch == cfg.epochs - 1):
            plot = staging.path / "plots" / f"reconstruction-epoch{epoch + 1:04d}.png"
            _plot(unwrap(model), val, plot, f"epoch {epoch + 1}", val_seed)
    if staging:
        save_model(model, staging.path / ENCODER_FILE, metadata={"step": str(step), "preset": str(cfg.model.preset)})
        staging.close()


def _probe(model: torch.nn.Module, sets: dict[str, np.ndarray], rank: int) -> dict[str, float]:
    """Rank 0 probes the encoder; the other ranks report the same keys as NaN (Tune reads rank 0's metrics)."""
    if rank != 0:
        return {"probe_accuracy": float("nan"), "probe_chance": float("nan")}
    return {
        "probe_accuracy": probe_encoder(unwrap(model).encoder, sets),
        "probe_chance": chance_accuracy(sets["train_label"], sets["test_label"]),
    }


def _log(metrics: dict[str, float], output: Path) -> None:
    """Rank 0 appends to metrics.jsonl and logs a line."""
    with open(output / METRICS_FILE, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    log.info(
        "step %d  epoch %.2f  loss %.4f  val %.4f  lr %.2e  %.0f samples/s%s",
        metrics["step"],
        metrics["epoch"],
        metrics["loss"],
        metrics["val_loss"],
        metrics["lr"],
        metrics["samples_per_s"],
        f"  probe {metrics['probe_accuracy']:.3f}" if "probe_accuracy" in metrics else "",
    )


def report_checkpoint(
    metrics: dict[str, float], model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, cfg: BaseModel
) -> None:
    """Every worker reports (Ray Train needs the same number of calls from each); rank 0 attaches the checkpoint:
    the training state beside the stage config that built it. Pretraining and fine-tuning workers both call it."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_training_state(folder, model, optimizer, {"step": int(metrics["step"])})
        (Path(folder) / "config.yaml").write_text(dump_config(cfg))  # weights beside the config that built them
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _plot(model: torch.nn.Module, val: dict[str, torch.Tensor], path: Path, title: str, seed: int) -> None:
    n = min(4, len(val["eeg"]))
    mask = val["channel_mask"][:n].bool()
    plot_reconstructions(
        model,
        val["eeg"][:n].float(),
        path,
        channel_mask=mask,
        generator=torch.Generator().manual_seed(seed),
        title=title,
    )


# ------------------------------------------------------------------------------------ driver


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
        tables.append(storage.read_parquet(file, columns=list(TRAIN_COLUMNS)))
        if sum(t.num_rows for t in tables) >= n:
            break
    table = pa.concat_tables(tables).slice(0, n)
    return {name: table.column(name).combine_chunks().to_numpy_ndarray() for name in TRAIN_COLUMNS}


def latest_checkpoint(run_folder: str | Path) -> Path | None:
    """The newest checkpoint Ray Train kept for a pretrain run folder."""
    found = sorted(p.parent for p in (Path(run_folder) / "ray" / "train").glob(f"checkpoint_*/{STATE_FILE}"))
    return found[-1] if found else None


def _resume_folder(resume_from: str | None) -> str | None:
    resume_from = storage.require_local(resume_from, "resume_from")
    if resume_from is None:
        return None
    path = Path(resume_from)
    if (path / STATE_FILE).is_file():
        return str(path.resolve())
    latest = latest_checkpoint(path)
    if latest is None:
        raise DreamdiffError(f"resume_from: {resume_from} is neither a checkpoint nor a pretrain run with one")
    return str(latest.resolve())


def _cache(cfg: PretrainConfig, rows: int) -> bool:
    """Keep the decoded windows in Ray's object store when they fit comfortably (auto: under 25%)."""
    import ray

    if cfg.cache_data != "auto":
        return cfg.cache_data == "yes"
    decoded = rows * 128 * cfg.model.num_samples * 2
    return decoded < 0.25 * ray.available_resources().get("object_store_memory", 0)


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
    rows = sum(storage.parquet_rows(train_files))
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
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from dreamdiff.ray_init import init_ray

    output = storage.absolute(cfg.output)
    plan = plan_run(cfg)
    resume_from = _resume_folder(cfg.resume_from)
    probe = _probe_sets(cfg)
    record_config(cfg, output)
    split = json.dumps({"train": plan.train_files, "held_out": plan.val_files}, indent=1)
    storage.write_text(storage.join(output, SPLIT_FILE), split)
    init_ray(cfg.ray)
    data_fs, _ = storage.resolve(plan.train_files[0])
    dataset = (
        ray.data.read_parquet([storage.resolve(f)[1] for f in plan.train_files], filesystem=data_fs)
        .select_columns(list(TRAIN_COLUMNS))
        .randomize_block_order(seed=cfg.seed)
    )
    dataset.context.enable_progress_bars = False  # the loop logs its own progress, per step
    if _cache(cfg, plan.rows):
        dataset = dataset.materialize()  # read once: later epochs iterate the object store
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "rows": plan.rows,
        "output": output,
        "val": read_rows(plan.val_files, cfg.val_rows),
        "probe": probe,
        "resume_from": resume_from,
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
    checkpoints_fs, checkpoints = storage.resolve(storage.join(output, "ray"))
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=checkpoints,
            storage_filesystem=checkpoints_fs if storage.is_remote(output) else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks),
        ),
        datasets={"train": dataset},
    )


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or resume) an MSM run; returns the last metrics. The encoder lands in <output>/msm.safetensors."""
    metrics = dict(build_trainer(cfg).fit().metrics or {})
    probe = f"  probe {metrics['probe_accuracy']:.3f}" if "probe_accuracy" in metrics else ""
    print(
        f"pretrain: step {metrics.get('step')}  loss {metrics.get('loss', float('nan')):.4f}  "
        f"val {metrics.get('val_loss', float('nan')):.4f} (zero prediction "
        f"{metrics.get('val_loss_zero_prediction', float('nan')):.4f}){probe}; "
        f"weights: {storage.join(storage.absolute(cfg.output), ENCODER_FILE)}"
    )
    return metrics
