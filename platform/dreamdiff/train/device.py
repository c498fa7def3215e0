"""Where a training step runs and in what precision: the device of a model and the autocast context.

Plain torch, shared by the step functions (msm_step, finetune_step) so that the Ray Train loops, the benchmarks
and the tests run the same code.
"""

from __future__ import annotations

import torch
from torch import nn


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype` on `device`, or a disabled autocast for None (full precision).

    float16 is refused: it needs loss scaling, which the steps do not do; bfloat16 does not.
    """
    if dtype == torch.float16:
        raise ValueError("autocast_dtype float16 needs loss scaling, which this step lacks; use bfloat16")
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """`device` when given, else the device of the model's first parameter."""
    return torch.device(device) if device is not None else next(model.parameters()).device
