"""AdamW with MAE's weight-decay split, and a warm-up + cosine learning-rate schedule.

The schedule is a pure function of the step: a resumed run needs only its step count, not a scheduler's
state dict, and the training step takes the lr as an argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Parameters that are not 1-D but must not decay either (e.g. a learned [1, N, D] position table).
_NO_DECAY_SUFFIXES = ("token", "pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weight matrices: norms, biases, cls/mask tokens and positions are 1-D (or named so).

    Decaying a LayerNorm gain or a bias pulls it towards zero for no regularising benefit (MAE, nanoGPT).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(_NO_DECAY_SUFFIXES):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.05,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with the paper's defaults; the fused CUDA kernel when every parameter is on a GPU."""
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up to base_lr over warmup_steps (step 0 already trains), then cosine to min_lr at
    total_steps; min_lr after that."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupCosine:
    """`warmup_cosine` with its settings bound: `lr = schedule(step)`; the step count is the only state."""

    base_lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.base_lr, self.min_lr)
