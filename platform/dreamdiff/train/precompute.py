"""The frozen models' outputs for fine-tuning, computed once on Ray Data and stored beside the pairs.

Neither the VAE encoder nor the CLIP image tower trains, so what they make of a stimulus never changes; the
reference implementation still runs both on every image of every step. This job reads the paired shards of the
training split(s), decodes each stimulus, resizes it to the base model's image size, and runs both models in an
actor pool (`map_batches` with `ActorPoolStrategy`: each actor loads the models once, on a GPU when
`precompute.num_gpus` says so). It writes precomputed rows (`data/schema.py: precomputed_schema`: the EEG,
channel mask, ids, label and split of each row plus `latents` and `clip_embedding`) to `<folder>/data/`, then,
last, `<folder>/_SUCCESS.json` naming the files and what they were made from. A re-run with the same inputs
(base model, CLIP model and weights, image size, splits, source files) skips the job; other inputs, or a run
killed before its marker, redo it. `dreamdiff.data.reader.shard_files(folder)` lists the finished files.

Two differences from the reference follow from computing once: the latent is the VAE posterior's mean, where
the reference draws a fresh posterior sample each step, and the reference's random crop (p = 0.5) is not
applied. The resize is the reference's square `Resize((size, size))` (no aspect-preserving crop).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from dreamdiff.config import PrecomputeSection
from dreamdiff.data.schema import DONE, precomputed_schema, to_table
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.clip import load_clip_image_encoder
from dreamdiff.models.diffusion import encode_images, load_sd_components

log = logging.getLogger(__name__)

DATA_DIR = "data"
PASSED_THROUGH = ("epoch_id", "eeg", "channel_mask", "image_id", "label", "split")


@dataclass(frozen=True)
class FrozenModels:
    """The frozen models and the shapes of what they produce: with the splits and source files, the key that
    decides whether stored outputs are still valid."""

    base_model: str
    clip_model: str
    clip_pretrained: str | None
    image_size: int
    latent_shape: tuple[int, int, int]
    clip_dim: int


@dataclass(frozen=True)
class Precomputed:
    files: list[str]
    rows: int
    skipped: bool


def decode_images(blobs: Sequence[bytes], size: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [B, size, size, 3], resized (bicubic) to a square as the reference does."""
    out = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as image:
            rgb = image.convert("RGB")
            out[i] = np.asarray(rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.BICUBIC))
    return out


class FrozenEncoders:
    """Ray Data actor: paired rows (numpy batch) -> precomputed rows (Arrow table in `precomputed_schema`)."""

    def __init__(self, models: FrozenModels, use_gpu: bool) -> None:
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.models = models
        # The UNet comes along but stays on the CPU; only the VAE (if any) runs, on the actor's device.
        self.components = load_sd_components(models.base_model)
        if self.components.vae is not None:
            self.components.vae.to(self.device)
        self.clip = load_clip_image_encoder(models.clip_model, models.clip_pretrained, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = torch.from_numpy(decode_images(batch["image"], self.models.image_size)).permute(0, 3, 1, 2)
        pixels = images.to(self.device).float() / 127.5 - 1
        with torch.no_grad():
            latents = encode_images(self.components, pixels, sample=False)
            embeddings = self.clip(images.to(self.device))
        columns: dict[str, Any] = {name: batch[name] for name in PASSED_THROUGH}
        columns["latents"] = latents.float().cpu().numpy()
        columns["clip_embedding"] = embeddings.cpu().numpy()
        return to_table(columns, _schema(self.models, batch["eeg"].shape[1:]))


def _schema(models: FrozenModels, eeg_shape: Sequence[int]) -> pa.Schema:
    return precomputed_schema(models.latent_shape, models.clip_dim, *eeg_shape)


def _key(files: Sequence[str], models: FrozenModels, splits: Sequence[str]) -> dict[str, Any]:
    """JSON-normalised, so that a key read back from the marker compares equal."""
    sources = [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size} for f in files]
    return json.loads(json.dumps({"models": asdict(models), "splits": sorted(splits), "sources": sources}))


def precompute(
    files: Sequence[str],
    folder: str | Path,
    models: FrozenModels,
    splits: Sequence[str],
    section: PrecomputeSection,
) -> Precomputed:
    """Precompute the rows of `splits` in the paired shard `files` into `folder`, or find them already done.

    Needs a running Ray. The EEG shape is read from the first file's schema.
    """
    import ray.data
    from ray.data.expressions import col

    folder = Path(folder)
    marker = folder / DONE
    key = _key(files, models, splits)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            log.info("precompute: %d rows already in %s", done["rows"], folder)
            return Precomputed([str(folder / f) for f in done["files"]], done["rows"], skipped=True)
        log.info("precompute: inputs changed since %s was written; computing again", folder)
    marker.unlink(missing_ok=True)
    shutil.rmtree(folder / DATA_DIR, ignore_errors=True)
    began = time.perf_counter()
    eeg_shape = pq.read_schema(files[0]).field("eeg").type.shape
    dataset = (
        ray.data.read_parquet(list(files))
        .select_columns([*PASSED_THROUGH, "image"])
        .filter(expr=col("split").is_in(list(splits)))
        .map_batches(
            FrozenEncoders,
            fn_constructor_kwargs={"models": models, "use_gpu": section.num_gpus > 0},
            batch_size=section.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=section.actors),
            num_gpus=section.num_gpus,
            num_cpus=section.cpus_per_actor,
        )
    )
    dataset.context.enable_progress_bars = False
    dataset.write_parquet(str(folder / DATA_DIR), schema=_schema(models, eeg_shape))
    written = sorted(f"{DATA_DIR}/{p.name}" for p in (folder / DATA_DIR).glob("*.parquet"))
    rows = sum(pq.ParquetFile(folder / f).metadata.num_rows for f in written)
    if rows == 0:
        raise DreamdiffError(f"train_splits: no rows of split(s) {list(splits)} in the paired shards")
    seconds = round(time.perf_counter() - began, 1)
    marker.write_text(json.dumps({"files": written, "rows": rows, "seconds": seconds, "key": key}, indent=1))
    log.info("precompute: %d rows (VAE latents + CLIP embeddings) in %.1f s into %s", rows, seconds, folder)
    return Precomputed([str(folder / f) for f in written], rows, skipped=False)
