"""Teach the tiny SD to draw before fine-tuning: the stand-in for Stable Diffusion's own pretraining.

DreamDiffusion fine-tunes an SD that already draws what a CLIP-space condition describes; fine-tuning then only
has to make the EEG speak that language (the paper trains the cross-attention alone). A tiny SD built from config
draws nothing, so without this step the fine-tuning steps would have to teach the UNet to draw and the EEG encoder
to condition it at once, and the encoder would never be what limits the images. Here the UNet first learns to
draw the training stimuli from their CLIP image embedding, as "image variation" models are conditioned: one
context token, the embedding standardised per dimension, replaced by zeros with `cond_drop_prob`. The CLIP
embeddings are those the fine-tuning precomputed (train/precompute.py), so the base model and the CLIP loss share
one CLIP space, as SD and CLIP ViT-L/14 do in the paper.

More steps and larger batches draw the stimuli better; the demo's settings trade that against its run time.
Plain torch, no Ray: the finetune driver runs `pretrain` in one Ray task.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from dreamdiff.config import TinySDPretrainSection
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.diffusion import decode_latents, diffusion_loss, load_sd_components
from dreamdiff.models.generator import initial_noise, make_sampler
from dreamdiff.train.optim import build_optimizer, set_lr, warmup_cosine

MARKER_FILE = "pretrained.json"
PREVIEW_FILE = "preview.png"
UNET_DIR = "unet"


def clip_context(clip_embedding: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """CLIP image embeddings [B, D] -> the base model's context [B, 1, D]: standardised per dimension."""
    return ((clip_embedding - mean) / std).unsqueeze(1)


def read_rows(files: list[str]) -> tuple[Tensor, Tensor]:
    """Latents [N, C, H, W] and CLIP image embeddings [N, D] of the precomputed training rows."""
    table = pq.read_table(files, columns=["latents", "clip_embedding"])
    return tuple(  # type: ignore[return-value]
        torch.from_numpy(table.column(name).combine_chunks().to_numpy_ndarray().astype(np.float32))
        for name in ("latents", "clip_embedding")
    )


def train_unet(
    unet: UNet2DConditionModel,
    noise_scheduler: Any,
    latents: Tensor,
    context: Tensor,
    section: TinySDPretrainSection,
    seed: int,
) -> list[dict[str, float]]:
    """`section.steps` AdamW steps of SD's loss on random batches of (latents, context); the loss every
    `section.log_every_steps` steps."""
    device = next(unet.parameters()).device
    unet.requires_grad_(True).train()
    optimizer = build_optimizer(unet, section.lr, (0.9, 0.999), 0.0)
    draws = torch.Generator().manual_seed(seed)
    history, began = [], time.perf_counter()
    for step in range(1, section.steps + 1):
        index = torch.randint(0, len(latents), (section.batch_size,), generator=draws)
        batch_context = context[index]
        dropped = torch.rand(section.batch_size, generator=draws) < section.cond_drop_prob
        batch_context = torch.where(dropped[:, None, None], torch.zeros_like(batch_context), batch_context)
        set_lr(optimizer, warmup_cosine(step - 1, section.warmup_steps, section.steps, section.lr, section.min_lr))
        loss = diffusion_loss(unet, noise_scheduler, latents[index].to(device), batch_context.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), section.grad_clip)
        optimizer.step()
        if step % section.log_every_steps == 0 or step == section.steps:
            seconds = time.perf_counter() - began
            history.append({"step": step, "loss": loss.item(), "seconds": round(seconds, 1)})
            print(
                f"tiny SD pretraining: step {step}/{section.steps}  loss {loss.item():.4f}  {seconds:.0f} s", flush=True
            )
    unet.requires_grad_(False).eval()
    return history


@torch.no_grad()
def draw(components: Any, context: Tensor, seeds: list[int], steps: int) -> np.ndarray:
    """One image per context row from `components.unet` (DPM-Solver++), uint8 [B, H, W, 3]."""
    unet = components.unet
    scheduler = make_sampler("dpm++", components.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = initial_noise(seeds, 1, shape) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        latents = scheduler.step(unet(latents, t, encoder_hidden_states=context).sample, t, latents).prev_sample
    images = decode_latents(components, latents)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pretrained_marker(folder: Path, section: TinySDPretrainSection) -> bool:
    """Whether `folder`'s UNet was pretrained with `section`; an earlier pretraining with other settings is an error
    (the fine-tuning checkpoints beside it were trained on that base)."""
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text())["settings"]
    if done != section.model_dump(mode="json"):
        raise DreamdiffError(
            f"tiny_sd_pretrain: {folder} was pretrained with {done}, not {section.model_dump(mode='json')}; "
            "keep those settings or fine-tune into a new output folder"
        )
    return True


def pretrain(
    folder: str | Path,
    section: TinySDPretrainSection,
    files: list[str],
    seed: int,
    preview: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the UNet of the tiny SD in `folder` (initialised afresh from its config and `seed`, so a re-run gives
    the same model) on the precomputed rows in `files`; replace the folder's UNet and write `pretrained.json` last. With
    `preview` (held-out `image` uint8 [B, H, W, 3] and their `clip_embedding` [B, D]) also draw each held-out
    stimulus from its CLIP embedding into `<folder>/preview.png` (PREVIEW_FILE)."""
    folder, old = Path(folder), Path(folder) / f".{UNET_DIR}.random"
    if old.is_dir() and not (folder / UNET_DIR).is_dir():  # killed between the two renames below
        os.replace(old, folder / UNET_DIR)
    latents, clip = read_rows(files)
    components = load_sd_components(str(folder), torch.device("cpu"))
    width = components.unet.config.cross_attention_dim
    if clip.shape[1] != width:
        raise DreamdiffError(
            f"tiny_sd_pretrain: the CLIP embeddings are {clip.shape[1]} wide but tiny_sd.cross_attention_dim is "
            f"{width}; they must be equal (the embedding is the context)"
        )
    mean, std = clip.mean(0), clip.std(0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):  # the initialisation, the batches and SD's noise all from `seed`
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(components.unet.config)
        history = train_unet(unet, components.noise_scheduler, latents, clip_context(clip, mean, std), section, seed)
    staging = folder / f".{UNET_DIR}.pretrained"
    shutil.rmtree(staging, ignore_errors=True)
    unet.save_pretrained(staging)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder / UNET_DIR, old)
    os.replace(staging, folder / UNET_DIR)
    shutil.rmtree(old)
    summary = {
        "settings": section.model_dump(mode="json"),
        "rows": len(latents),
        "loss": history[-1]["loss"],
        "seconds": history[-1]["seconds"],
        "history": history,
        "context": "CLIP image embedding, standardised per dimension, as one token",
    }
    if preview is not None:
        components.unet = unet
        context = clip_context(torch.as_tensor(preview["clip_embedding"]).float(), mean, std)
        drawn = draw(components, context, list(range(len(context))), steps=20)
        from dreamdiff.report import image_grid

        pairs = [image for pair in zip(preview["image"], drawn, strict=True) for image in pair]
        labels = [label for name in preview["class_name"] for label in (name, "drawn from CLIP")]
        summary["preview"] = str(image_grid(np.stack(pairs), labels, folder / PREVIEW_FILE, columns=6))
    (folder / MARKER_FILE).write_text(json.dumps(summary, indent=1))
    return summary
