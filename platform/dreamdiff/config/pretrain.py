"""The pretrain stage's config: masked signal modeling (MSM) of the EEG encoder on Ray Train."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dreamdiff.config.common import AugmentSection, CheckpointSection, OptimSection, RayInitConfig, ScalingSection
from dreamdiff.config.paths import LocalPath, Location
from dreamdiff.configbase import StrictModel
from dreamdiff.models.msm import MSMConfig


class PretrainConfig(StrictModel):
    """Masked signal modeling (MSM) on unlabeled epochs with a TorchTrainer."""

    data: Location = Field(description="folder of pretraining shards written by `dreamdiff preprocess`")
    output: Location = Field(description="run folder: checkpoints, metrics, plots")
    model: MSMConfig = MSMConfig(preset="tiny")
    optim: OptimSection = OptimSection()
    augment: AugmentSection = AugmentSection()
    epochs: int = Field(default=500, ge=1)
    batch_size: int = Field(default=100, ge=1, description="global batch, split across workers")
    precision: Literal["fp32", "bf16"] = Field(default="bf16", description="bf16 autocast on GPU; CPU runs fp32")
    seed: int = 0
    cache_data: Literal["auto", "yes", "no"] = Field(
        default="auto", description="hold the decoded windows in Ray's object store across epochs"
    )
    val_fraction: float = Field(default=0.05, ge=0, lt=1, description="shard files held out for validation")
    val_rows: int = Field(default=32, ge=1, description="held-out windows scored at every log step")
    probe_data: Location | None = Field(
        default=None,
        description="paired shards with class labels: at every checkpoint a linear probe on the frozen encoder's "
        "features scores it (train split -> held-out splits); null = no probe",
    )
    probe_rows: int = Field(default=256, ge=2, description="probe windows read per side (train split, held-out)")
    log_every_steps: int = Field(default=20, ge=1)
    plot_every_epochs: int = Field(default=50, ge=1)
    checkpoint: CheckpointSection = CheckpointSection()
    max_failures: int = Field(default=0, ge=-1, description="restarts from the last checkpoint (-1: always)")
    resume_from: LocalPath | None = Field(
        default=None, description="another pretrain run (or checkpoint) to continue: weights, optimizer, step"
    )
    inject_failure_at_step: int | None = Field(
        default=None, ge=1, description="test hook: rank 0 raises once at this step, to exercise recovery"
    )
    scaling: ScalingSection = ScalingSection()
    ray: RayInitConfig = RayInitConfig()
