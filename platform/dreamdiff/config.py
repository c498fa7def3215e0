"""Typed stage configs, YAML loading and dotted command-line overrides.

One pydantic model per stage. A YAML file in ``configs/`` holds every knob of a stage; the
command line may override any of them with ``dotted.key=value`` (the value is parsed as YAML,
so ``model.depth=2`` is an int and ``data.subjects=[1,2]`` a list). Unknown keys and wrong
types fail at load time with the file, the key and the expected form named.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dreamdiff import storage
from dreamdiff.configbase import StrictModel
from dreamdiff.data.synthetic import SynthConfig
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.conditioner import ConditionerConfig
from dreamdiff.models.diffusion_config import TinyDiffusionConfig
from dreamdiff.models.msm import MSMConfig
from dreamdiff.models.sampling import COMPILE_SAMPLING_HELP, Compile, Sampler

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(DreamdiffError):
    """A config problem, reported as one line that names the file and the key."""


# ---------------------------------------------------------------------------- shared sections


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


# ------------------------------------------------------------------------------- preprocess


class SignalSection(StrictModel):
    """Signal processing applied to every recording (see dreamdiff.data.signal)."""

    l_freq: float = Field(default=5.0, ge=0)
    h_freq: float = Field(default=95.0, gt=0)
    sfreq: float | None = Field(default=None, gt=0, description="resample to this rate; None keeps it")
    window: int = Field(default=512, ge=8)
    stride: int = Field(default=512, ge=1)
    channels: Literal["tile", "interpolate"] = "tile"
    montage: str = "biosemi128"
    normalise: Literal["zscore", "fixed", "none"] = "zscore"
    scale: float = Field(default=1e6, gt=0, description="factor of the 'fixed' normalisation (V -> uV)")
    clip: float | None = Field(default=20.0, gt=0, description="clip z-scores to +-clip")

    @model_validator(mode="after")
    def _band(self) -> SignalSection:
        if self.l_freq >= self.h_freq:
            raise ValueError(f"l_freq ({self.l_freq}) must be below h_freq ({self.h_freq})")
        return self


class FakeMOABBSection(StrictModel):
    """Layouts for MOABB's offline FakeDataset, which stands in for real datasets in tests/demo."""

    n_subjects: int = Field(default=3, ge=1)
    n_sessions: int = Field(default=1, ge=1)
    n_runs: int = Field(default=2, ge=1)
    sfreq: float = Field(default=128.0, gt=0)
    duration: float = Field(default=60.0, gt=0, description="seconds per run")
    channels: list[str] | None = Field(default=None, description="10-05 names; None = MOABB's C3, Cz, C4")
    seed: int = 0


class MOABBSource(StrictModel):
    kind: Literal["moabb"] = "moabb"
    datasets: list[str] | Literal["all"] = Field(description="MOABB dataset codes, or 'all'")
    subjects: list[int] | Literal["all"] = "all"
    fake: list[FakeMOABBSection] = Field(
        default_factory=list, description="layouts of FakeDataset instances (dataset code 'FakeDataset')"
    )

    @field_validator("datasets", "subjects")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must list at least one entry, or be 'all'")
        return value


class SynthSource(StrictModel):
    kind: Literal["synthetic"] = "synthetic"
    synth: SynthConfig = SynthConfig()
    labeled: bool = True
    unlabeled_epochs_per_subject: int = Field(default=200, ge=1, description="when labeled is false")


class ImageNetEEGSource(StrictModel):
    kind: Literal["imagenet_eeg"] = "imagenet_eeg"
    eeg_file: str
    splits_file: str
    image_dir: str
    split_index: int = Field(default=0, ge=0)
    subjects: list[int] | Literal["all"] = "all"


Source = Annotated[MOABBSource | SynthSource | ImageNetEEGSource, Field(discriminator="kind")]


class PreprocessConfig(StrictModel):
    """Raw EEG (MOABB, ImageNet-EEG, SynthEEG-Image) -> Parquet shards + manifest."""

    output: str = Field(description="folder (or URI) for shards and manifest.json")
    sources: list[Source] = Field(min_length=1)
    signal: SignalSection = SignalSection()
    rows_per_shard: int = Field(default=2048, ge=1)
    ray: RayInitConfig = RayInitConfig()


# --------------------------------------------------------------------------------- pretrain


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


class PretrainConfig(StrictModel):
    """Masked signal modeling (MSM) on unlabeled epochs with a TorchTrainer."""

    data: str = Field(description="folder of pretraining shards written by `dreamdiff preprocess`")
    output: str = Field(description="run folder: checkpoints, metrics, plots")
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
    probe_data: str | None = Field(
        default=None,
        description="paired shards with class labels: at every checkpoint a linear probe on the frozen encoder's "
        "features scores it (train split -> held-out splits); null = no probe",
    )
    probe_rows: int = Field(default=256, ge=2, description="probe windows read per side (train split, held-out)")
    log_every_steps: int = Field(default=20, ge=1)
    plot_every_epochs: int = Field(default=50, ge=1)
    checkpoint: CheckpointSection = CheckpointSection()
    max_failures: int = Field(default=0, ge=-1, description="restarts from the last checkpoint (-1: always)")
    resume_from: str | None = Field(
        default=None, description="another pretrain run (or checkpoint) to continue: weights, optimizer, step"
    )
    inject_failure_at_step: int | None = Field(
        default=None, ge=1, description="test hook: rank 0 raises once at this step, to exercise recovery"
    )
    scaling: ScalingSection = ScalingSection()
    ray: RayInitConfig = RayInitConfig()


# --------------------------------------------------------------------------------- finetune


class PrecomputeSection(StrictModel):
    """The Ray Data job that runs the frozen VAE encoder and CLIP image tower once per training row, instead of
    on every step as the reference does (dreamdiff.train.precompute)."""

    actors: int = Field(default=1, ge=1, description="actor pool size; each actor loads both models once")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per actor; 0 runs the frozen models on CPU")
    cpus_per_actor: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=32, ge=1, description="images per model call")


class PreviewSection(StrictModel):
    """The grid rank 0 draws at the end of fine-tuning: held-out stimuli beside images generated from their EEG."""

    split: str = Field(default="val", description="a held-out split of the paired shards")
    eegs: int = Field(default=4, ge=0, description="EEGs shown, distinct classes first; 0 = no preview")
    images_per_eeg: int = Field(default=3, ge=1)
    steps: int = Field(default=20, ge=1, description="DPM-Solver++ steps (the paper samples PLMS x 250)")


class TinySDPretrainSection(StrictModel):
    """Training the tiny SD to draw before fine-tuning (train/tiny_sd_pretrain.py): the stand-in for SD's own
    pretraining, on the training stimuli conditioned on their CLIP image embeddings."""

    steps: int = Field(default=400, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1.0e-3, gt=0)
    min_lr: float = Field(default=1.0e-4, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    cond_drop_prob: float = Field(default=0.1, ge=0, lt=1, description="contexts replaced by zeros (unconditional)")
    log_every_steps: int = Field(default=50, ge=1)


class FinetuneConfig(StrictModel):
    """Stable Diffusion conditioned on the EEG encoder, with the CLIP alignment loss.

    The base model is either `base_model` (SD 1.5 id or local folder: the paper's setting, with `trainable:
    cross_attention`) or `tiny_sd` (no pretrained SD at hand: a random tiny SD of those sizes is built once into
    <output>/tiny-sd; with `tiny_sd_pretrain` it first learns to draw, standing in for SD's pretraining, so the
    paper's `trainable: cross_attention` applies). Defaults are the reference implementation's.
    """

    data: str = Field(description="folder of paired shards (epoch-only shards below it are ignored)")
    output: str = Field(description="run folder: precomputed/, checkpoints, metrics, generator/, plots/")
    base_model: str | None = Field(default=None, description="SD 1.5 id or local SD-layout folder; null with tiny_sd")
    tiny_sd: TinyDiffusionConfig | None = Field(
        default=None,
        validate_default=True,
        description="sizes of a random tiny SD built into <output>/tiny-sd and used as the base model",
    )
    encoder_checkpoint: str | None = Field(
        default=None,
        description="pretrain run folder (its msm.safetensors, sizes from its config.yaml); null = from scratch",
    )
    encoder: MSMConfig | None = Field(
        default=None,
        validate_default=True,
        description="encoder sizes: needed from scratch; with a checkpoint they must match its run",
    )
    trainable: Literal["cross_attention", "all", "none"] = Field(
        default="cross_attention", description="UNet parameters trained (paper: cross_attention = attn2 + norm2)"
    )
    conditioner: ConditionerConfig = Field(
        default=ConditionerConfig(), description="context_dim = the UNet's cross_attention_dim, clip_dim = CLIP's"
    )
    clip_model: str = Field(default="ViT-L-14", description="open_clip model of the frozen image tower")
    clip_pretrained: str | None = Field(
        default="openai",
        description="a tag or a checkpoint file; null = random weights seeded by `seed`, saved as "
        "<output>/clip-random.safetensors (the demo's offline stand-in)",
    )
    clip_weight: float = Field(default=1.0, ge=0, description="weight of the CLIP alignment loss; 0 = ablation")
    tiny_sd_pretrain: TinySDPretrainSection | None = Field(
        default=None,
        description="with tiny_sd: first train the tiny SD to draw the training stimuli from their CLIP embeddings "
        "(the stand-in for SD's pretraining; null = fine-tune a random one)",
    )
    train_splits: list[str] = Field(default=["train"], min_length=1, description="paired-shard splits trained on")
    optim: OptimSection = Field(
        # reference: torch AdamW defaults (betas 0.9/0.999, wd 0.01), constant lr 5.3e-5, Lightning grad clip 0.5
        default=OptimSection(lr=5.3e-5, min_lr=5.3e-5, betas=(0.9, 0.999), weight_decay=0.01, grad_clip=0.5)
    )
    encoder_lr_scale: float = Field(
        default=1.0,
        gt=0,
        description="the EEG encoder's learning rate as a fraction of optim's (paper: 1.0, one rate for all); "
        "below 1 a pretrained encoder keeps more of what pretraining learned",
    )
    augment: AugmentSection = Field(default=AugmentSection(), description="train-time EEG transforms (paper: none)")
    epochs: int = Field(default=300, ge=1)
    batch_size: int = Field(default=16, ge=1, description="global batch, split across workers (reference: 16)")
    precision: Literal["fp32", "bf16"] = Field(default="bf16", description="bf16 autocast on GPU; CPU runs fp32")
    compile: Compile = Field(
        default=False,
        description="torch.compile the UNet and the encoder's blocks (true, or reduce-overhead: + CUDA graphs). SD "
        "1.5, batch 8, H200s: 38-57 samples/s eager, 59 with the UNet alone compiled, 103 reduce-overhead, after "
        "about 3 min of compiling",
    )
    seed: int = Field(default=2022, ge=0)
    log_every_steps: int = Field(default=20, ge=1)
    checkpoint: CheckpointSection = CheckpointSection()
    max_failures: int = Field(default=0, ge=-1, description="restarts from the last checkpoint (-1: always)")
    inject_failure_at_step: int | None = Field(
        default=None, ge=1, description="test hook: rank 0 raises once at this step, to exercise recovery"
    )
    precompute: PrecomputeSection = PrecomputeSection()
    preview: PreviewSection = PreviewSection()
    scaling: ScalingSection = ScalingSection()
    ray: RayInitConfig = RayInitConfig()

    # Field validators, not one model validator, so that an error names its key (fields are validated in order).
    @field_validator("tiny_sd")
    @classmethod
    def _one_base(cls, value: TinyDiffusionConfig | None, info: ValidationInfo) -> TinyDiffusionConfig | None:
        if (info.data.get("base_model") is None) == (value is None):
            raise ValueError("give exactly one of base_model (an SD folder or id) and tiny_sd (sizes of a tiny SD)")
        return value

    @field_validator("tiny_sd_pretrain")
    @classmethod
    def _pretrain_needs_tiny(
        cls, value: TinySDPretrainSection | None, info: ValidationInfo
    ) -> TinySDPretrainSection | None:
        tiny, conditioner = info.data.get("tiny_sd"), info.data.get("conditioner")
        if value is None:
            return value
        if tiny is None:
            raise ValueError("pretrains a tiny SD: give tiny_sd (a base_model is pretrained already), or set it null")
        if conditioner is not None and conditioner.clip_dim != tiny.cross_attention_dim:
            raise ValueError(
                f"conditions the tiny SD on CLIP embeddings: conditioner.clip_dim ({conditioner.clip_dim}) must equal "
                f"tiny_sd.cross_attention_dim ({tiny.cross_attention_dim})"
            )
        return value

    @field_validator("encoder")
    @classmethod
    def _encoder_sizes(cls, value: MSMConfig | None, info: ValidationInfo) -> MSMConfig | None:
        if value is None and info.data.get("encoder_checkpoint") is None:
            raise ValueError("give the encoder sizes (e.g. {preset: large}) when encoder_checkpoint is null")
        return value

    @field_validator("optim")
    @classmethod
    def _no_accumulation(cls, value: OptimSection) -> OptimSection:
        if value.grad_accum != 1:
            raise ValueError("grad_accum must be 1 for fine-tuning; raise batch_size or the number of workers")
        return value

    @field_validator("preview")
    @classmethod
    def _held_out(cls, value: PreviewSection, info: ValidationInfo) -> PreviewSection:
        if value.eegs and value.split in info.data.get("train_splits", []):
            raise ValueError(f"split {value.split!r} is trained on; choose a held-out split")
        return value


# ------------------------------------------------------------------------------------ sweep


class SweepConfig(StrictModel):
    """Ray Tune over pretraining settings, one TorchTrainer run per trial, ASHA early stopping, scored by a linear
    probe on held-out labelled EEG (reconstruction loss does not compare across mask ratios; see dreamdiff.tune)."""

    base: PretrainConfig = Field(description="the pretrain config every trial starts from; the sweep sets its output")
    probe_data: str = Field(description="paired shards with class labels: the probe that scores every trial")
    search_space: dict[str, Any] = Field(
        description="dotted pretrain key -> {grid: [values]}, {choice: [values]}, {uniform: [lo, hi]} or "
        "{loguniform: [lo, hi]}"
    )
    num_samples: int = Field(default=1, ge=1, description="draws of the space (a grid is run num_samples times)")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="null: as many trials as the cluster's CPUs (and GPUs) hold at once"
    )
    grace_period: int = Field(default=1, ge=1, description="ASHA: checkpoint reports before a trial may be stopped")
    output: str = Field(description="sweep folder: tune/, trials/, results.csv, the plot, best_pretrain.yaml")
    ray: RayInitConfig = RayInitConfig()

    @field_validator("base", mode="before")
    @classmethod
    def _trial_output(cls, value: Any) -> Any:
        if isinstance(value, dict) and "output" not in value:  # each trial writes to <output>/trials/<trial id>
            return {**value, "output": "(per trial: <sweep output>/trials/<trial id>)"}
        return value

    @field_validator("probe_data")
    @classmethod
    def _one_probe(cls, value: str, info: ValidationInfo) -> str:
        base = info.data.get("base")
        if base is not None and base.probe_data not in (None, value):
            raise ValueError(f"differs from base.probe_data ({base.probe_data}); give it once, here")
        return value


# ------------------------------------------------------------------------------------ serve


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
    token_file: str | None = Field(default=None, description="a file holding the token (e.g. a mounted Secret)")


class ServeConfig(StrictModel):
    """The online EEG -> image endpoint: a FastAPI ingress and a batching, autoscaled generator on Ray Serve."""

    checkpoint: str = Field(description="generator checkpoint folder (generator.json + generator.safetensors)")
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


# --------------------------------------------------------------------------------- generate


class GenerateConfig(StrictModel):
    """Batch generation over Parquet shards on Ray Data (dreamdiff.serve.batch): an actor pool of generators writes
    num_images PNGs per EEG plus an index; a re-run skips EEGs already done. Defaults are the paper's sampling
    except the sampler (DPM-Solver++ 25 steps; sampler=plms steps=250 is the reference)."""

    input: str = Field(description="folder of shards written by `dreamdiff preprocess` (paired or EEG-only)")
    output: str = Field(description="folder for images/, index/ parts, index.parquet and index.json")
    checkpoint: str = Field(description="generator checkpoint folder (generator.json + generator.safetensors)")
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


# --------------------------------------------------------------------------------- evaluate


class EvaluateConfig(StrictModel):
    """The paper's n-way top-k and the image metrics, with their split protocol (one process, no Ray).

    Defaults are the paper's protocol (50-way top-1, 50 trials, 5 samples per EEG, no guidance) except the
    sampler: DPM-Solver++ with 25 steps, which matches the reference PLMS at 250 steps in far less time; set
    sampler=plms steps=250 to reproduce the reference exactly.
    """

    checkpoint: str = Field(description="generator checkpoint folder (generator.json + generator.safetensors)")
    data: str = Field(description="folder of paired shards (epoch-only shards below it are ignored)")
    output: str = Field(description="folder for results.json, report.html and generated/")
    classifier: str = Field(description="'vit_h_14_swag' or a saved classifier folder")
    train_classifier_if_missing: bool = Field(
        default=False,
        description="SynthEEG-Image only: if the classifier folder is missing, train a SmallCNN on the synthetic "
        "TRAIN-split stimuli (config read from the shards' preprocess record) and save it there",
    )
    protocol: Literal["by_image", "by_block", "leave_subject_out"] = "by_image"
    test_blocks: int = Field(default=1, ge=1, description="by_block: last blocks of each subject held out")
    test_subject: int | None = Field(default=None, description="leave_subject_out: the held-out subject")
    max_eeg: int | None = Field(default=None, ge=1, description="cap on test EEGs (a seeded random subset)")
    n_way: int = Field(default=50, ge=2)
    top_k: int = Field(default=1, ge=1)
    trials: int = Field(default=50, ge=1)
    samples_per_eeg: int = Field(default=5, ge=1)
    sampler: Sampler = Field(default="dpm++", description="paper: plms, 250 steps")
    steps: int = Field(default=25, ge=1)
    guidance_scale: float = Field(default=1.0, ge=0, description="1.0 = no classifier-free guidance (paper)")
    clip_metrics: bool = Field(default=True, description="CLIP similarity and EEG->image retrieval")
    clip_model: str | None = Field(
        default=None,
        description="open_clip model for both; null = the one the checkpoint was fine-tuned against (its "
        "generator.json info), else ViT-L-14",
    )
    clip_pretrained: str | None = Field(
        default=None, description="its weights, a tag or a file; null = the checkpoint's record, else 'openai'"
    )
    fid: bool = Field(default=False, description="FID (torchmetrics InceptionV3: needs torch-fidelity + weights)")
    batch_size: int = Field(default=8, ge=1, description="EEGs per generation call; images per classifier / CLIP call")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = Field(default="bf16", description="bf16 weights on GPU; CPU runs fp32")
    compile: Compile = Field(default=False, description=COMPILE_SAMPLING_HELP)
    report_eegs: int = Field(default=8, ge=1, description="EEGs shown in the report's image grid")
    seed: int = Field(default=0, ge=0, description="sampling noise, trial draws and the max_eeg subset")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if self.top_k >= self.n_way:
            raise ValueError(f"top_k ({self.top_k}) must be below n_way ({self.n_way})")
        if self.protocol == "leave_subject_out" and self.test_subject is None:
            raise ValueError("protocol 'leave_subject_out' needs test_subject (the held-out subject id)")
        return self


# ------------------------------------------------------------------------------------- demo


class DemoConfig(StrictModel):
    """Every stage, tiny and offline: the README's main command."""

    output: str = "runs/demo"
    quick: bool = False
    ablations: bool = Field(
        default=False, description="also fine-tune + evaluate without pretraining, without the CLIP loss, and neither"
    )
    quick_overrides: list[str] = Field(default_factory=list, description="dotted overrides that --quick applies")
    preprocess: PreprocessConfig
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    sweep: SweepConfig
    evaluate: EvaluateConfig
    serve: ServeConfig
    generate: GenerateConfig
    ray: RayInitConfig = RayInitConfig(num_cpus=4)


STAGES: dict[str, type[StrictModel]] = {
    "preprocess": PreprocessConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "sweep": SweepConfig,
    "serve": ServeConfig,
    "generate": GenerateConfig,
    "evaluate": EvaluateConfig,
    "demo": DemoConfig,
}


# ------------------------------------------------------------------------------------ loading


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, else a file of the repository's configs/ folder (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (REPO_CONFIGS / path.name, REPO_CONFIGS / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``dotted.key=value`` pairs in a nested dict (values parsed as YAML)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. model.depth=2")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = _child(node, part, item)
        if isinstance(node, list):
            node[_index(node, parts[-1], item)] = value
        else:
            node[parts[-1]] = value
    return data


def _index(node: list[Any], part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {item!r}: {part!r} is not an index of a list of {len(node)} entries")
    return int(part)


def _child(node: Any, part: str, item: str) -> Any:
    """Step into a mapping key or a list index, creating mappings on the way."""
    if isinstance(node, list):
        return node[_index(node, part, item)]
    child = node.get(part)
    if not isinstance(child, dict | list):
        child = {}
        node[part] = child
    return child


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str] | None:
    """Field names of the config section that `loc` points into (for 'unknown key' messages)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _describe(model: type[BaseModel], err: Mapping[str, Any], overridden: set[str]) -> str:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p in {"moabb", "synthetic", "imagenet_eeg"})]
    key = ".".join(str(p) for p in loc) or "(top level)"
    origin = " (from the command line)" if key in overridden else ""
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1]) or []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; allowed: {', '.join(allowed)}" if allowed else "")
        return f"{key}: unknown key{origin}{hint}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    got = err.get("input")
    return f"{key}: {err['msg'].removeprefix('Value error, ')} (got {got!r}){origin}"


def validate_config(stage: str, data: dict[str, Any], source: str, overridden: Sequence[str] = ()) -> StrictModel:
    """Validate a raw dict as the config of `stage`; errors become one-line ConfigErrors."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    model = STAGES[stage]
    try:
        return model.model_validate(data)
    except ValidationError as err:
        keys = {o.partition("=")[0] for o in overridden}
        problems = "; ".join(_describe(model, e, keys) for e in err.errors())
        raise ConfigError(f"{source}: {problems}") from None


def load_config(stage: str, path: str | Path, overrides: Sequence[str] = ()) -> StrictModel:
    """Read a stage's YAML, apply dotted overrides, validate. Raises ConfigError."""
    resolved = resolve_config_path(path)
    data = apply_overrides(read_yaml(resolved), overrides)
    return validate_config(stage, data, str(resolved), overrides)


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (every default written out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def record_config(cfg: BaseModel, run_dir: str | Path) -> Path | str:
    """Write `config.yaml` into a run folder; refuse to mix runs of different configs.

    Re-running the same config into the same folder is how stages resume, so an identical
    record is fine (where Ray runs, the `ray` section, may change); a different one means two
    experiments would share checkpoints. `run_dir` may be a URI (dreamdiff.storage); a local one gives a Path.
    """
    folder = storage.normalise(run_dir)
    storage.makedirs(folder)
    path = storage.join(folder, "config.yaml")
    text = dump_config(cfg)
    old = (yaml.safe_load(storage.read_text(path)) or {}) if storage.exists(path) else None
    changed = [] if old is None else [k for k in _changed_keys(old, yaml.safe_load(text)) if not k.startswith("ray.")]
    if changed:
        raise ConfigError(
            f"{folder} holds a run made with a different config (changed: {', '.join(changed[:8])}); "
            "use another output folder or remove this one"
        )
    storage.write_text(path, text)
    return path if storage.is_remote(path) else Path(path)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]
