"""One Ray Train worker of the finetune stage (dreamdiff.train.finetune starts them).

Each worker builds the `EEGDiffusion` on the base SD, reads its shard of the precomputed rows with
`get_dataset_shard`, calls the plain step function `finetune_train_step` (bf16 autocast on CUDA), appends to
metrics.jsonl every `log_every_steps` and reports to Ray Train only with a checkpoint. At the end rank 0 writes
the generator checkpoint and the preview grid. Kept apart from the driver so that a worker process imports
neither open_clip nor the driver's checks, which every worker process would pay for at start-up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamdiff.config import FinetuneConfig
from dreamdiff.data.augment import augment_eeg
from dreamdiff.models.diffusion import load_sd_components
from dreamdiff.models.eeg_diffusion import GeneratorSpec, build_eeg_diffusion, compile_for_training
from dreamdiff.models.generator import Generator, load_generator_weights, save_generator
from dreamdiff.models.sampling import torch_compile_mode
from dreamdiff.train.batches import ResumableBatches
from dreamdiff.train.checkpoint import unwrap
from dreamdiff.train.finetune_step import build_finetune_optimizer, finetune_train_step
from dreamdiff.train.optim import WarmupCosine
from dreamdiff.train.worker import StepWindow, append_metrics, inject_failure, report_checkpoint, restore

log = logging.getLogger(__name__)

GENERATOR_DIR = "generator"
PREVIEW_FILE = "preview.png"


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, maybe restore, train, report; rank 0 exports the generator and a preview."""
    import ray.train
    import ray.train.torch

    cfg = FinetuneConfig.model_validate(config["cfg"])
    spec = GeneratorSpec.model_validate(config["spec"])
    output = Path(config["output"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    autocast = torch.bfloat16 if cfg.precision == "bf16" and device.type == "cuda" else None

    torch.manual_seed(cfg.seed)
    components = load_sd_components(spec.base_model, device, time_cond=spec.conditioner.time_cond)
    model = build_eeg_diffusion(spec, components, config["encoder_weights"])
    optimizer = build_finetune_optimizer(
        model, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, encoder_lr_scale=cfg.encoder_lr_scale
    )
    if cfg.clip_weight == 0:  # the head gets no gradient (the ablation); DDP rejects parameters that never get one
        model.clip_head.requires_grad_(False)
    if config["clip_mean"] is not None:  # the centre of the CLIP targets (ConditionerConfig.clip_center)
        model.clip_head.target_mean.copy_(torch.as_tensor(config["clip_mean"]))
    if config["init_from"]:  # a generator to continue from (its CLIP target centre too, if it has one)
        load_generator_weights(model, config["init_from"], device)
    # rank 0 also drops the metrics rows an earlier attempt logged after the restored step (they are logged again)
    position = restore(model, optimizer, metrics_folder=output if rank == 0 else None)
    if cfg.compile:  # compiles at the first step (and at the first preview); the state dict keeps its names
        compile_for_training(model, components, torch_compile_mode(cfg.compile))
    model = ray.train.torch.prepare_model(model)

    micro = cfg.batch_size // world
    per_epoch = steps_per_epoch(cfg, config["rows"], world)
    total = per_epoch * cfg.epochs
    schedule = WarmupCosine(cfg.optim.lr, cfg.optim.warmup_steps, total, cfg.optim.min_lr)
    shard = ray.train.get_dataset_shard("train")
    batches = ResumableBatches(shard, micro=micro, per_epoch=per_epoch, epochs=cfg.epochs, seed=cfg.seed, rank=rank)
    step = position["step"]
    torch.manual_seed(cfg.seed + 1_000_003 * rank + step)  # timesteps and noise: fresh after a restart, per worker
    aug_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17 * rank + step)

    window = StepWindow(step, cfg.batch_size)
    for epoch, index, (batch,) in batches.from_step(step):
        batch["clip_target"] = batch.pop("clip_embedding")
        batch["eeg"] = augment_eeg(batch["eeg"], cfg.augment.max_crop, cfg.augment.scale, aug_gen)
        stats = finetune_train_step(
            model,
            components.noise_scheduler,
            optimizer,
            batch,
            lr=schedule(step),
            grad_clip=cfg.optim.grad_clip,
            clip_weight=cfg.clip_weight,
            autocast_dtype=autocast,
            device=device,
        )
        step += 1
        window.add(stats)
        inject_failure(cfg.inject_failure_at_step, step, rank, output)
        save = step % cfg.checkpoint.every_steps == 0 or step == total
        if step % cfg.log_every_steps and not save:
            continue
        metrics = {
            "step": step,
            "epoch": epoch + (index + 1) / per_epoch,
            **window.summary(step, ("loss", "sd_loss", "clip_loss", "grad_norm"), batches.take_wait()),
            "resumed_at": position["step"],
        }
        window.restart(step)
        _log(metrics, output, rank)
        if save:  # a Ray Train report is a barrier across workers: only with checkpoints
            report_checkpoint(metrics, model, optimizer, rank, cfg)
    if rank == 0:
        inner = unwrap(model)
        save_generator(inner, spec, output / GENERATOR_DIR, info={"step": step, **config["provenance"]})
        if config["preview"]:
            _preview(Generator(inner, components, autocast), config["preview"], cfg, output / "plots" / PREVIEW_FILE)


def steps_per_epoch(cfg: FinetuneConfig, rows: int, world: int) -> int:
    """Optimizer steps per epoch: each worker sees rows // world rows in whole micro-batches."""
    return (rows // world) // (cfg.batch_size // world)


def _log(metrics: dict[str, float], output: Path, rank: int) -> None:
    """Rank 0 appends to metrics.jsonl and logs a line."""
    if rank != 0:
        return
    append_metrics(output, metrics)
    log.info(
        "step %d  epoch %.2f  loss %.4f (sd %.4f, clip %.4f)  lr %.2e  %.1f samples/s",
        metrics["step"],
        metrics["epoch"],
        metrics["loss"],
        metrics["sd_loss"],
        metrics["clip_loss"],
        metrics["lr"],
        metrics["samples_per_s"],
    )


def _preview(generator: Generator, rows: dict[str, Any], cfg: FinetuneConfig, path: Path) -> None:
    """One row per held-out EEG: its stimulus (captioned with its class), then images generated from the EEG."""
    n = cfg.preview.images_per_eeg
    generated = generator.generate(
        torch.as_tensor(rows["eeg"]).float(),
        num_images=n,
        steps=cfg.preview.steps,
        seed=cfg.seed,
        channel_mask=torch.as_tensor(rows["channel_mask"]).bool(),
    )
    images, labels = [], []
    for stimulus, name, samples in zip(rows["image"], rows["class_name"], generated, strict=True):
        images += [stimulus, *samples]
        labels += [name, *(f"generated {j + 1}" for j in range(n))]
    from dreamdiff.report import image_grid  # here: only rank 0 draws, once

    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(np.stack(images), labels, path, columns=n + 1)
