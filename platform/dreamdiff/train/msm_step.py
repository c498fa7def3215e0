"""One MSM optimisation step and an evaluation loss, as plain functions of (model, optimizer, data).

The Ray Train loop, the benchmark and the tests all call these, so what is timed is what is trained.
A micro-batch is an EEG tensor [B, C, T] or a mapping with "eeg" and optionally "channel_mask" [B, C];
EEG may arrive as float16 (as stored) and is cast to float32 on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from dreamdiff.models.msm import masked_mse, patchify, zero_channels
from dreamdiff.train.device import autocast_for, device_of
from dreamdiff.train.optim import set_lr

MicroBatch = Tensor | Mapping[str, Tensor]


def _unpack(batch: MicroBatch, device: torch.device) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        eeg, channel_mask = batch, None
    else:
        eeg, channel_mask = batch["eeg"], batch.get("channel_mask")
    eeg = eeg.to(device, non_blocking=True).float()  # cast after the copy: half the bytes cross the bus
    if channel_mask is not None:
        channel_mask = channel_mask.to(device, non_blocking=True).bool()
    return eeg, channel_mask


def msm_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[MicroBatch],
    *,
    lr: float,
    grad_clip: float | None,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    mask_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Accumulate gradients over the micro-batches, clip, step, and return loss, grad_norm and lr.

    Each micro-batch's loss is scaled by 1/len(batches), so equal-sized micro-batches give the gradient
    of one large batch. Under DDP/FSDP the gradient all-reduce runs only on the last micro-batch.
    `grad_clip=None` measures the norm without clipping. One host sync per step (for the returned floats).
    """
    if not batches:
        raise ValueError("batches must hold at least one micro-batch")
    device = device_of(model, device)
    set_lr(optimizer, lr)
    model.train()
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        eeg, channel_mask = _unpack(batch, device)
        last = i == len(batches) - 1
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast_for(device, autocast_dtype):
                out = model(eeg, channel_mask=channel_mask, mask_ratio=mask_ratio, generator=generator)
            (out.loss / len(batches)).backward()
        total += out.loss.detach()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), math.inf if grad_clip is None else grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss, norm = torch.stack([total / len(batches), grad_norm.to(device, torch.float32)]).tolist()
    return {"loss": loss, "grad_norm": norm, "lr": lr}


@torch.no_grad()
def msm_eval_loss(
    model: nn.Module,
    batch: MicroBatch,
    *,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    mask_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Reconstruction loss in eval mode. Pass a generator seeded the same way each time so that successive
    evaluations draw the same masks and their losses are comparable."""
    device = device_of(model, device)
    was_training = model.training
    model.eval()
    try:
        eeg, channel_mask = _unpack(batch, device)
        with autocast_for(device, autocast_dtype):
            out = model(eeg, channel_mask=channel_mask, mask_ratio=mask_ratio, generator=generator)
        return out.loss.item()
    finally:
        model.train(was_training)


@torch.no_grad()
def zero_prediction_loss(model: nn.Module, batch: MicroBatch, *, generator: torch.Generator | None = None) -> float:
    """The masked loss of predicting all zeros on the same masks: the floor a model must get well below."""
    inner = getattr(model, "module", model)
    device = device_of(inner, None)
    eeg, channel_mask = _unpack(batch, device)
    out = inner(eeg, channel_mask=channel_mask, generator=generator)
    target = patchify(zero_channels(eeg, channel_mask), inner.cfg.patch_size)
    zeros = torch.zeros_like(out.pred)
    return masked_mse(zeros, target, out.mask, channel_mask, inner.cfg.norm_target).item()
