"""AdamW with MAE's weight-decay split, and a warm-up + cosine learning-rate schedule.

The schedule is a pure function of the step: a resumed run needs only its step count, not a scheduler's
state dict, and the training step takes the lr as an argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

# Parameters that are not 1-D but must not decay either (e.g. a learned [1, N, D] position table).
_NO_DECAY_SUFFIXES = ("token", "pos_embed")


def param_groups(model: nn.Module, weight_decay: float, lr_scales: Mapping[str, float] | None = None) -> list[dict]:
    """Decay only weight matrices: norms, biases, cls/mask tokens and positions are 1-D (or named so).

    Decaying a LayerNorm gain or a bias pulls it towards zero for no regularising benefit (MAE, nanoGPT).
    `lr_scales` maps a parameter-name prefix (e.g. "encoder.") to a factor on the learning rate of its
    parameters, kept in their groups' "lr_scale" (see `set_lr`).
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim < 2 or name.endswith(_NO_DECAY_SUFFIXES))
        scale = next((f for prefix, f in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)
        groups.setdefault((decays, scale), []).append(param)
    order = sorted(groups, key=lambda key: (not key[0], key[1]))  # decayed first, as torch users expect
    return [
        {"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0, "lr_scale": key[1]} for key in order
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.05,
    fused: bool | None = None,
    lr_scales: Mapping[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW with the paper's defaults; the fused CUDA kernel when every parameter is on a GPU."""
    groups = param_groups(model, weight_decay, lr_scales)
    if fused is None:
        fused = torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    set_lr(optimizer, lr)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group, times the group's "lr_scale" where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
