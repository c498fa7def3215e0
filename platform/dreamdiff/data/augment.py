"""Train-time EEG augmentations, applied per worker on torch batches (pure torch, no Ray)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_resize(eeg: torch.Tensor, max_crop: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cut a random span of up to `max_crop` samples off each epoch and stretch it back to length T.

    A small random time-stretch and shift: the model sees the same evoked shape a few ms off.
    """
    if max_crop <= 0:
        return eeg
    b, _, t = eeg.shape
    crop = torch.randint(0, max_crop + 1, (b,), generator=generator)
    start = (torch.rand(b, generator=generator) * (crop + 1)).long().clamp(max=crop)
    # a sampling grid per epoch over [start, start + t - crop), in grid_sample's [-1, 1] units
    frac = torch.linspace(0, 1, t).unsqueeze(0)
    pos = start.unsqueeze(1) + frac * (t - 1 - crop).unsqueeze(1)
    grid_x = (pos / (t - 1)) * 2 - 1
    grid = torch.stack([grid_x, torch.zeros_like(grid_x)], dim=-1).unsqueeze(1).to(eeg.device, eeg.dtype)
    return F.grid_sample(eeg.unsqueeze(2), grid, align_corners=True).squeeze(2)


def random_scale(eeg: torch.Tensor, low: float, high: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multiply each epoch by a random gain in [low, high] (amplitude varies across people and caps)."""
    gain = torch.empty(eeg.shape[0], 1, 1).uniform_(low, high, generator=generator)
    return eeg * gain.to(eeg.device, eeg.dtype)


def augment_eeg(
    eeg: torch.Tensor, max_crop: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """The configured train-time transforms (an `augment` config section) on a batch [B, C, T]; identity when off."""
    low, high = scale
    if max_crop == 0 and low == high == 1.0:
        return eeg
    eeg = random_crop_resize(eeg.float(), max_crop, generator)
    return random_scale(eeg, low, high, generator) if (low, high) != (1.0, 1.0) else eeg
