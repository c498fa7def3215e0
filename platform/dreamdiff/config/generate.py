"""The generate stage's config: batch EEG -> image generation over Parquet shards on Ray Data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from dreamdiff.config.common import RayInitConfig
from dreamdiff.config.paths import LocalPath
from dreamdiff.configbase import StrictModel
from dreamdiff.models.sampling import COMPILE_SAMPLING_HELP, Compile, Sampler


class GenerateConfig(StrictModel):
    """Batch generation over Parquet shards on Ray Data (dreamdiff.serve.batch): an actor pool of generators writes
    num_images PNGs per EEG plus an index; a re-run skips EEGs already done. Defaults are the paper's sampling
    except the sampler (DPM-Solver++ 25 steps; sampler=plms steps=250 is the reference)."""

    input: LocalPath = Field(description="folder of shards written by `dreamdiff preprocess` (paired or EEG-only)")
    output: LocalPath = Field(description="folder for images/, index/ parts, index.parquet and index.json")
    checkpoint: LocalPath = Field(description="generator checkpoint folder (generator.json + generator.safetensors)")
    num_images: int = Field(default=5, ge=1, description="images per EEG (paper: 5)")
    seed: int = Field(default=0, ge=0, description="base seed: EEG e samples from sha256(f'{seed}/{epoch_id}')")
    sampler: Sampler = Field(default="dpm++", description="paper: plms, 250 steps")
    steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=1.0, ge=0, description="1.0 = no classifier-free guidance (paper)")
    precision: Literal["fp32", "bf16"] = Field(default="bf16", description="bf16 weights on GPU; CPU runs fp32")
    compile: Compile = Field(default=False, description=COMPILE_SAMPLING_HELP)
    splits: list[str] | None = Field(
        default=None, min_length=1, description="paired-shard splits to generate for, e.g. [test]; null = every row"
    )
    max_eeg: int | None = Field(default=None, ge=1, description="cap on EEGs (a seeded random subset, stable)")
    batch_size: int = Field(default=8, ge=1, description="EEGs per generator call (images per call: x num_images)")
    min_actors: int = Field(default=1, ge=1, description="actor pool: each actor loads the generator once")
    max_actors: int = Field(default=1, ge=1)
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per actor; 0 samples on CPU")
    cpus_per_actor: float = Field(default=1.0, gt=0)
    ray: RayInitConfig = RayInitConfig()

    @field_validator("max_actors")
    @classmethod
    def _pool(cls, value: int, info: ValidationInfo) -> int:
        if value < info.data.get("min_actors", 1):
            raise ValueError(f"must be >= min_actors ({info.data['min_actors']})")
        return value
