"""The serve stage's config: the online EEG -> image endpoint on Ray Serve."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from dreamdiff.config.common import RayInitConfig
from dreamdiff.config.paths import LocalPath
from dreamdiff.configbase import StrictModel
from dreamdiff.models.sampling import COMPILE_SAMPLING_HELP, Compile, Sampler


class ServeAutoscalingSection(StrictModel):
    """Ray Serve autoscaling of the generator deployment (`ray.serve.config.AutoscalingConfig`): replicas are
    added when the ongoing requests per replica stay above the target for `upscale_delay_s`, removed when
    below for `downscale_delay_s`."""

    min_replicas: int = Field(default=1, ge=0, description="0 scales to zero: the first request then waits")
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0, description="replicas at deploy time; null = min")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="requests per replica (queued + running); about one batch keeps GPUs full"
    )
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    look_back_period_s: float = Field(default=30.0, gt=0, description="window the ongoing requests average over")

    @model_validator(mode="after")
    def _range(self) -> ServeAutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class ServeBatchingSection(StrictModel):
    """`@serve.batch` of the generator: requests (one EEG each) gathered into one sampling call."""

    max_batch_size: int = Field(default=8, ge=1, description="requests per generator call")
    batch_wait_timeout_s: float = Field(default=0.05, ge=0, description="how long a batch waits to fill")
    max_ongoing_requests: int | None = Field(
        default=None, ge=1, description="per generator replica; null = 2 x max_batch_size (one batch runs, one fills)"
    )

    @model_validator(mode="after")
    def _fill(self) -> ServeBatchingSection:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) below max_batch_size ({self.max_batch_size}) "
                "keeps batches from filling"
            )
        return self


class ServeDefaultsSection(StrictModel):
    """Sampling settings of a request that leaves them out."""

    num_images: int = Field(default=1, ge=1)
    steps: int = Field(default=25, ge=1)
    sampler: Sampler = Field(default="dpm++", description="paper: plms, 250 steps")
    guidance_scale: float = Field(default=1.0, ge=0, description="1.0 = no classifier-free guidance (paper)")


class ServeLimitsSection(StrictModel):
    """Per-request bounds: anything beyond them is refused (413 for the body, 422 for the rest)."""

    max_images_per_request: int = Field(default=8, ge=1)
    max_steps: int = Field(default=100, ge=1)
    max_guidance_scale: float = Field(default=20.0, ge=1.0)
    max_body_bytes: int = Field(default=8 * 2**20, ge=1024, description="request body size limit")
    discard_bytes: int = Field(
        default=64 * 2**20,
        ge=0,
        description="before an early error answer (413, 401, 415, ...) up to this much of the unread body is read "
        "and dropped, so that clients which send the whole body before reading the answer (urllib, proxies) get it "
        "instead of a connection reset; larger bodies are cut off",
    )
    max_channels: int = Field(default=512, ge=1)
    min_samples: int = Field(default=64, ge=2, description="shorter EEG is refused")
    max_samples: int = Field(default=16384, ge=2)
    max_abs_value: float = Field(default=1e6, gt=0, description="largest |sample| accepted (before normalising)")


class ServeEEGSection(StrictModel):
    """What the server does to a request's EEG before the model sees it, with the functions preprocessing uses
    (dreamdiff.data.signal): resample to `sfreq` (when the request states its rate), tile channels to the
    model's count, take the first window of the model's length (longer EEG) or stretch to it (shorter EEG),
    normalise as the shards were."""

    sfreq: float | None = Field(
        default=None, gt=0, description="rate of the model's training windows; null = unknown (requests state none)"
    )
    normalise: Literal["zscore", "fixed", "none"] = Field(default="zscore", description="as preprocess signal")
    scale: float = Field(default=1e6, gt=0, description="factor of the 'fixed' normalisation")
    clip: float | None = Field(default=20.0, gt=0, description="clip normalised values to +-clip")


class ServeAuthSection(StrictModel):
    """Optional bearer-token auth of the API (GET /healthz stays open). The token is read by each ingress
    replica at start, from `token_file` if set, else from the environment variable `token_env`."""

    enabled: bool = False
    token_env: str = Field(default="DREAMDIFF_SERVE_TOKEN", min_length=1)
    token_file: LocalPath | None = Field(default=None, description="a file holding the token (e.g. a mounted Secret)")


class ServeConfig(StrictModel):
    """The online EEG -> image endpoint: a FastAPI ingress and a batching, autoscaled generator on Ray Serve."""

    checkpoint: LocalPath = Field(description="generator checkpoint folder (generator.json + generator.safetensors)")
    app_name: str = Field(default="dreamdiff", min_length=1, description="Serve application name")
    route_prefix: str = Field(default="/", pattern=r"^/", description="URL prefix of the API")
    host: str = Field(default="127.0.0.1", description="HTTP proxy host (`dreamdiff serve`)")
    port: int = Field(default=8000, ge=1, le=65535)
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per generator replica; 0 runs it on CPU")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs per generator replica")
    precision: Literal["fp32", "bf16"] = Field(default="bf16", description="bf16 weights on GPU; CPU runs fp32")
    compile: Compile = Field(default=False, description=COMPILE_SAMPLING_HELP)
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_num_cpus: float = Field(default=0.5, ge=0)
    ingress_max_ongoing_requests: int = Field(
        default=256, ge=1, description="per ingress replica: requests waiting on the generator count too"
    )
    autoscaling: ServeAutoscalingSection = ServeAutoscalingSection()
    batching: ServeBatchingSection = ServeBatchingSection()
    defaults: ServeDefaultsSection = ServeDefaultsSection()
    limits: ServeLimitsSection = ServeLimitsSection()
    eeg: ServeEEGSection = ServeEEGSection()
    auth: ServeAuthSection = ServeAuthSection()
    ray: RayInitConfig = RayInitConfig()

    @field_validator("limits")
    @classmethod
    def _defaults_within(cls, value: ServeLimitsSection, info: ValidationInfo) -> ServeLimitsSection:
        defaults = info.data.get("defaults")
        if defaults is not None and defaults.num_images > value.max_images_per_request:
            raise ValueError(f"max_images_per_request is below defaults.num_images ({defaults.num_images})")
        if defaults is not None and defaults.steps > value.max_steps:
            raise ValueError(f"max_steps is below defaults.steps ({defaults.steps})")
        if value.min_samples > value.max_samples:
            raise ValueError("min_samples must not exceed max_samples")
        return value
