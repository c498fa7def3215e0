"""One Ray Train worker of the pretrain stage (dreamdiff.train.pretrain starts them).

Each worker builds the MSM model, restores the run's training state if it has one, reads its shard of the data
with `get_dataset_shard`, calls the plain step function `msm_train_step` (bf16 autocast on CUDA), appends to
metrics.jsonl every `log_every_steps` and reports to Ray Train only with a checkpoint (every
`checkpoint.every_steps` and at the end). With a probe set, every checkpoint report also carries
`probe_accuracy`, the score that sweeps compare. Rank 0 plots reconstructions at the end of every
`plot_every_epochs` epochs and exports the encoder at the end. Kept apart from the driver so that a worker
process imports only what training needs.

The run folder may be a URI: rank 0 writes its files into a local staging folder that it copies up at every
checkpoint and at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamdiff import storage
from dreamdiff.config import PretrainConfig
from dreamdiff.data.augment import augment_eeg
from dreamdiff.eval.probe import chance_accuracy, probe_encoder
from dreamdiff.models.msm import build_msm
from dreamdiff.train.batches import ResumableBatches
from dreamdiff.train.checkpoint import save_model, unwrap
from dreamdiff.train.msm_plot import plot_reconstructions
from dreamdiff.train.msm_step import msm_eval_loss, msm_train_step, zero_prediction_loss
from dreamdiff.train.optim import WarmupCosine, build_optimizer
from dreamdiff.train.worker import METRICS_FILE, StepWindow, append_metrics, inject_failure, report_checkpoint, restore

log = logging.getLogger(__name__)

ENCODER_FILE = "msm.safetensors"


def _micro_batch_size(cfg: PretrainConfig, world: int) -> int:
    return cfg.batch_size // (world * cfg.optim.grad_accum)


def steps_per_epoch(cfg: PretrainConfig, rows: int, world: int) -> int:
    """Optimizer steps per epoch: each worker sees rows // world rows in whole micro-batches."""
    return (rows // world) // _micro_batch_size(cfg, world) // cfg.optim.grad_accum


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, maybe restore, train, report; rank 0 exports the encoder."""
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # rank 0 writes the run folder's own files: in place when local, else staged and copied up at checkpoints
    staging = storage.LocalStaging(config["output"], pull=(METRICS_FILE,)) if rank == 0 else None
    device = ray.train.torch.get_device()
    use_bf16 = cfg.precision == "bf16" and device.type == "cuda"

    torch.manual_seed(cfg.seed)
    model = build_msm(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    # rank 0 also drops the metrics rows an earlier attempt logged after the restored step (they are logged again)
    position = restore(model, optimizer, config["resume_from"], staging.path if staging else None)
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
    window = StepWindow(step, cfg.batch_size)
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
        window.add(stats)
        inject_failure(cfg.inject_failure_at_step, step, rank, config["output"])
        save = step % cfg.checkpoint.every_steps == 0 or step == total
        if save or step % cfg.log_every_steps == 0:
            metrics = {
                "step": step,
                "epoch": epoch + (index + 1) / per_epoch,
                **window.summary(step, ("loss", "grad_norm"), batches.take_wait()),
                "val_loss": msm_eval_loss(model, val, device=device, generator=torch.Generator().manual_seed(val_seed)),
                "val_loss_zero_prediction": zero_loss,
                "resumed_at": position["step"],
            }
            if save and probe is not None:  # outside the timed window: probing is not training throughput
                metrics.update(_probe(model, probe, rank))
            window.restart(step)
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


def _log(metrics: dict[str, float], folder: Path) -> None:
    """Rank 0 appends to metrics.jsonl and logs a line."""
    append_metrics(folder, metrics)
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
