"""Config sections that several stages share."""

from __future__ import annotations

from pydantic import Field, field_validator

from dreamdiff.configbase import StrictModel


class RayInitConfig(StrictModel):
    """How a stage finds Ray: an existing cluster (RAY_ADDRESS or `address`) or a local one."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1, description="logical CPUs of a local Ray")
    dashboard: bool = Field(default=False, description="start the dashboard with a local Ray")


class ScalingSection(StrictModel):
    """Ray Train workers. num_workers=0 runs the loop in the driver process: quick local runs that
    Ray does not checkpoint, restart or resume; use one worker or more for real runs."""

    num_workers: int = Field(default=1, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)


class CheckpointSection(StrictModel):
    every_steps: int = Field(default=200, ge=1)
    keep: int = Field(default=2, ge=1)


class OptimSection(StrictModel):
    """AdamW with warm-up + cosine, as the reference (betas 0.9/0.95, wd 0.05, clip 0.8)."""

    lr: float = Field(default=2.5e-4, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float = Field(default=0.8, gt=0)
    grad_accum: int = Field(default=1, ge=1)


class AugmentSection(StrictModel):
    """Train-time transforms, applied per worker to each batch (dreamdiff.data.augment)."""

    max_crop: int = Field(default=0, ge=0, description="samples cut off and stretched back; 0 = off")
    scale: tuple[float, float] = Field(default=(1.0, 1.0), description="random gain range")

    @field_validator("scale")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return value
