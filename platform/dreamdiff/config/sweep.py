"""The sweep stage's config: Ray Tune over pretraining settings, scored by a probe on held-out labelled EEG."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from dreamdiff.config.common import RayInitConfig
from dreamdiff.config.paths import LocalPath
from dreamdiff.config.pretrain import PretrainConfig
from dreamdiff.configbase import StrictModel

# base.output as the sweep records it: each trial writes to its own folder instead
TRIAL_OUTPUT = "(per trial: <sweep output>/trials/<trial id>)"


class SweepConfig(StrictModel):
    """Ray Tune over pretraining settings, one TorchTrainer run per trial, ASHA early stopping, scored by a linear
    probe on held-out labelled EEG (reconstruction loss does not compare across mask ratios; see dreamdiff.tune)."""

    base: PretrainConfig = Field(description="the pretrain config every trial starts from; the sweep sets its output")
    probe_data: LocalPath = Field(description="paired shards with class labels: the probe that scores every trial")
    search_space: dict[str, Any] = Field(
        description="dotted pretrain key -> {grid: [values]}, {choice: [values]}, {uniform: [lo, hi]} or "
        "{loguniform: [lo, hi]}"
    )
    num_samples: int = Field(default=1, ge=1, description="draws of the space (a grid is run num_samples times)")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="null: as many trials as the cluster's CPUs (and GPUs) hold at once"
    )
    grace_period: int = Field(default=1, ge=1, description="ASHA: checkpoint reports before a trial may be stopped")
    output: LocalPath = Field(description="sweep folder: tune/, trials/, results.csv, the plot, best_pretrain.yaml")
    ray: RayInitConfig = RayInitConfig()

    @field_validator("base", mode="before")
    @classmethod
    def _trial_output(cls, value: Any) -> Any:
        if isinstance(value, dict) and "output" not in value:  # each trial writes to <output>/trials/<trial id>
            return {**value, "output": TRIAL_OUTPUT}
        return value

    @field_validator("probe_data")
    @classmethod
    def _one_probe(cls, value: str, info: ValidationInfo) -> str:
        base = info.data.get("base")
        if base is not None and base.probe_data not in (None, value):
            raise ValueError(f"differs from base.probe_data ({base.probe_data}); give it once, here")
        return value
