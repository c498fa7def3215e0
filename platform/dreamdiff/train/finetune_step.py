"""One fine-tuning step of DreamDiffusion (SD epsilon loss + CLIP alignment), as a plain function.

The frozen models are NOT run here: a batch carries the VAE latents (or pixels, in pixel space) and the CLIP
image embeddings of its images, computed once per image before training (train/precompute.py). That is what
saves per-step time against the reference code, which runs the VAE encoder and CLIP ViT-L/14 on every image
of every step, although neither changes during training. (The VAE latent is then one fixed posterior
sample, or its mean, per image instead of a fresh sample per step.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from diffusers import DDPMScheduler
from torch import Tensor, nn

from dreamdiff.models.eeg_diffusion import EEGDiffusion
from dreamdiff.train.checkpoint import unwrap
from dreamdiff.train.device import autocast_for, device_of
from dreamdiff.train.optim import build_optimizer, set_lr


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What fine-tuning updates: encoder, conditioner, CLIP head and time conditioner (if any), plus the UNet
    parameters that `select_trainable` left trainable (for "cross_attention": attn2/norm2 of the transformer
    blocks)."""
    inner = unwrap(model)
    heads = [inner.encoder, inner.conditioner, inner.clip_head, inner.time_conditioner]
    params = [p for module in heads if module is not None for p in module.parameters()]
    unet = dict(inner.unet.named_parameters())
    return params + [unet[name] for name in inner.unet_trainable]


def build_finetune_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    fused: bool | None = None,
    encoder_lr_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over `trainable_parameters`, without decay on norms, biases and tokens (`build_optimizer`); the
    encoder at `encoder_lr_scale` times the learning rate.

    The defaults are the reference fine-tuning's (torch AdamW betas; FinetuneConfig's weight decay 0).
    """
    inner = unwrap(model)
    expected = {id(p) for p in trainable_parameters(inner)}
    flagged = {id(p) for p in inner.parameters() if p.requires_grad}
    if flagged != expected:
        raise ValueError(
            f"{len(flagged ^ expected)} parameters' requires_grad disagree with the trainable set; "
            "build the model with build_eeg_diffusion and leave its flags alone"
        )
    scales = {"encoder.": encoder_lr_scale}  # at 1.0 the groups are the same as without it
    return build_optimizer(inner, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused, lr_scales=scales)


def _check_batch(eeg: Tensor, latents: Tensor, clip_target: Tensor | None, clip_dim: int) -> None:
    if latents.ndim != 4 or latents.shape[0] != eeg.shape[0]:
        raise ValueError(f"latents must be [{eeg.shape[0]}, channels, height, width], got {list(latents.shape)}")
    if clip_target is not None and clip_target.shape != (eeg.shape[0], clip_dim):
        raise ValueError(f"clip_target must be [{eeg.shape[0]}, {clip_dim}], got {list(clip_target.shape)}")


def finetune_train_step(
    model: EEGDiffusion | nn.Module,
    noise_scheduler: DDPMScheduler,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, Tensor | None],
    *,
    lr: float,
    grad_clip: float | None,
    clip_weight: float,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """loss = SD loss + clip_weight * CLIP loss; backward, clip, step. Returns loss, sd_loss, clip_loss,
    grad_norm, lr as floats (one host sync).

    `batch`: "eeg" [B, C, T] (float16 as stored is fine), "latents" [B, c, h, w] (scaled VAE latents, or pixels
    in [-1, 1] in pixel space), "clip_target" [B, clip_dim] (frozen CLIP image embeddings) or None, and
    optionally "channel_mask" [B, C]. With clip_weight 0 the CLIP loss is still reported when a target is
    given (NaN otherwise) but adds no gradient, so the CLIP head does not train. `model` may be DDP-wrapped;
    `generator` (on the device) fixes the timesteps and noise.
    """
    inner = unwrap(model)
    device = device_of(inner, device)
    eeg = batch["eeg"].to(device, non_blocking=True).float()  # cast after the copy: half the bytes
    latents = batch["latents"].to(device, non_blocking=True).float()
    clip_target = batch.get("clip_target")
    channel_mask = batch.get("channel_mask")
    if clip_target is not None:
        clip_target = clip_target.to(device, non_blocking=True).float()
    elif clip_weight > 0:
        raise ValueError(f"clip_weight is {clip_weight} but the batch has no clip_target; give one or set 0")
    if channel_mask is not None:
        channel_mask = channel_mask.to(device, non_blocking=True).bool()
    _check_batch(eeg, latents, clip_target, inner.spec.conditioner.clip_dim)
    set_lr(optimizer, lr)
    model.train()
    with autocast_for(device, autocast_dtype):
        sd_loss, clip_loss = model(
            eeg,
            latents,
            noise_scheduler,
            clip_target,
            clip_grad=clip_weight > 0,
            channel_mask=channel_mask,
            generator=generator,
        )
    loss = sd_loss + clip_weight * clip_loss if clip_weight > 0 else sd_loss
    loss.backward()
    params = trainable_parameters(inner)
    grad_norm = nn.utils.clip_grad_norm_(params, math.inf if grad_clip is None else grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clip_value = clip_loss.detach() if clip_loss is not None else torch.full((), math.nan, device=device)
    values = torch.stack([loss.detach(), sd_loss.detach(), clip_value, grad_norm.to(device, torch.float32)])
    total, sd, clip, norm = values.float().tolist()
    return {"loss": total, "sd_loss": sd, "clip_loss": clip, "grad_norm": norm, "lr": lr}
