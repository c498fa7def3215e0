"""The researcher's visual check of MSM pretraining: original EEG against its reconstruction, with the
masked spans shaded. Reconstruction is drawn only where the model had to invent it (masked tokens).

Uses matplotlib's object API (no pyplot), so it is safe in worker processes and threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from dreamdiff.models.msm import MaskedSignalModel, patch_stats, patchify, unpatchify, zero_channels


@torch.no_grad()
def reconstruct(
    model: MaskedSignalModel,
    eeg: Tensor,
    channel_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Reconstruction [n, C, T] in signal units (undoing normalised targets), time mask [n, T] (1 = masked)
    and the loss, on CPU. The model runs in eval mode and is put back as it was."""
    device = next(model.parameters()).device
    eeg = eeg.to(device).float()
    channel_mask = None if channel_mask is None else channel_mask.to(device).bool()
    was_training = model.training
    model.eval()
    try:
        out = model(eeg, channel_mask=channel_mask, generator=generator)
    finally:
        model.train(was_training)
    pred = out.pred.float()
    if model.cfg.norm_target:
        target = patchify(zero_channels(eeg, channel_mask), model.cfg.patch_size)
        mean, std = patch_stats(target, channel_mask)
        pred = pred * std + mean
    time_mask = out.mask.repeat_interleave(model.cfg.patch_size, dim=1)
    return unpatchify(pred, model.cfg.num_channels).cpu(), time_mask.cpu(), out.loss.item()


def _spans(time_mask: Tensor) -> list[tuple[int, int]]:
    """Runs of 1s in a [T] mask as (start, stop) sample indices."""
    edges = torch.diff(torch.cat([torch.zeros(1), time_mask.float(), torch.zeros(1)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, stops, strict=True))


def plot_reconstructions(
    model: MaskedSignalModel,
    eeg: Tensor,
    path: str | Path,
    channels: Sequence[int] = (0, 1, 2),
    channel_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    title: str | None = None,
) -> Path:
    """Save a PNG grid: one row per window in `eeg` [n, C, T], one column per channel in `channels`.

    Pass the same seeded generator every epoch so the figures of successive epochs show the same masks.
    """
    recon, time_mask, loss = reconstruct(model, eeg, channel_mask, generator)
    original = zero_channels(eeg.detach().float().cpu(), None if channel_mask is None else channel_mask.cpu())
    n = original.shape[0]
    from matplotlib.figure import Figure  # here: only rank 0 plots

    fig = Figure(figsize=(4.0 * len(channels), 1.8 * n), layout="constrained")
    axes = fig.subplots(n, len(channels), squeeze=False, sharex=True)
    for row in range(n):
        spans = _spans(time_mask[row])
        masked = time_mask[row].bool()
        for col, channel in enumerate(channels):
            ax = axes[row, col]
            for start, stop in spans:
                ax.axvspan(start, stop, color="0.88", lw=0)
            ax.plot(original[row, channel], color="k", lw=0.7, label="original")
            ax.plot(
                recon[row, channel].masked_fill(~masked, float("nan")),
                color="tab:red",
                lw=0.9,
                label="reconstruction (masked spans)",
            )
            ax.set_title(f"window {row}, channel {channel}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{title + ': ' if title else ''}masked MSE {loss:.4f}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
