"""Images for a batch of EEGs known by their ids: the one sampling path of evaluation and batch generation (no Ray).

EEG ``e`` samples from the seed :func:`eeg_seed` ``(seed, e)``, and image j of it as :mod:`dreamdiff.models.generator`
documents, so an image depends on the EEG's id, the seed and the sampling settings only: not on the batch it came
in, the other EEGs selected, or the process that drew it. :func:`png_name` names each image's file from the same id.

The images come from an :data:`ImageSource`: the generator (:func:`generator_source`), or any function of a
:class:`GenerationBatch` (e.g. the stimuli themselves, to score an upper bound through the same path).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dreamdiff.errors import DreamdiffError
from dreamdiff.models.generator import Generator
from dreamdiff.models.sampling import Sampler


def eeg_seed(seed: int, epoch_id: str) -> int:
    """The sampling seed of one EEG: a hash of (seed, epoch_id), 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch_id}".encode()).digest()[:8], "big") >> 1


def png_name(epoch_id: str, sample: int) -> str:
    """A file name for a generated image that is safe on any filesystem and unique per epoch_id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", epoch_id).strip("._")[:80]
    return f"{safe}-{hashlib.sha1(epoch_id.encode()).hexdigest()[:8]}_s{sample}.png"


@dataclass(frozen=True)
class Sampling:
    """How the images of every EEG are drawn: the settings their pixels depend on, besides the EEG itself."""

    num_images: int  # per EEG
    seed: int  # with the epoch_id, gives each EEG's seed (eeg_seed)
    sampler: Sampler
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class GenerationBatch:
    """What an image source gets for one batch of EEGs."""

    eeg: Tensor  # float32 [B, C, T]
    channel_mask: Tensor  # bool [B, C], True = real electrode
    seeds: list[int]  # one per EEG (eeg_seed)
    epoch_ids: list[str]
    num_images: int


ImageSource = Callable[[GenerationBatch], np.ndarray]  # -> uint8 [B, num_images, H, W, 3]


def generator_source(generator: Generator, sampling: Sampling) -> ImageSource:
    """A loaded generator with the sampler, steps and guidance of ``sampling``."""

    def source(batch: GenerationBatch) -> np.ndarray:
        return generator.generate(
            batch.eeg,
            batch.num_images,
            sampling.steps,
            sampling.sampler,
            sampling.guidance_scale,
            batch.seeds,
            batch.channel_mask,
        )

    return source


@dataclass(frozen=True)
class Generated:
    """One batch's images and what names them."""

    batch: GenerationBatch
    images: np.ndarray  # uint8 [B, num_images, H, W, 3]
    names: list[list[str]]  # png_name of each image, per EEG


def generate(
    source: ImageSource, eeg: np.ndarray, channel_mask: np.ndarray, epoch_ids: Sequence[str], sampling: Sampling
) -> Generated:
    """``sampling.num_images`` images for each EEG (float [B, C, T], channel mask bool [B, C]), each EEG seeded
    from ``(sampling.seed, its epoch_id)``."""
    ids = [str(e) for e in epoch_ids]
    batch = GenerationBatch(
        eeg=torch.tensor(np.asarray(eeg, dtype=np.float32)),
        channel_mask=torch.tensor(np.asarray(channel_mask, dtype=bool)),
        seeds=[eeg_seed(sampling.seed, e) for e in ids],
        epoch_ids=ids,
        num_images=sampling.num_images,
    )
    images = np.asarray(source(batch))
    if images.dtype != np.uint8 or images.ndim != 5 or images.shape[:2] != (len(ids), batch.num_images):
        raise DreamdiffError(
            f"image source returned {images.dtype} {list(images.shape)}; expected uint8 "
            f"[{len(ids)}, {batch.num_images}, H, W, 3]"
        )
    names = [[png_name(e, j) for j in range(batch.num_images)] for e in ids]
    return Generated(batch=batch, images=images, names=names)
