"""The finetune stage's config: Stable Diffusion conditioned on the EEG encoder, with the CLIP alignment loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from dreamdiff.config.common import AugmentSection, CheckpointSection, OptimSection, RayInitConfig, ScalingSection
from dreamdiff.config.paths import LocalPath, ModelRef
from dreamdiff.configbase import StrictModel
from dreamdiff.models.conditioner import ConditionerConfig
from dreamdiff.models.diffusion_config import TinyDiffusionConfig
from dreamdiff.models.msm import MSMConfig
from dreamdiff.models.profile import Profile
from dreamdiff.models.sampling import Compile


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

    data: LocalPath = Field(description="folder of paired shards (epoch-only shards below it are ignored)")
    output: LocalPath = Field(description="run folder: precomputed/, checkpoints, metrics, generator/, plots/")
    base_model: ModelRef | None = Field(
        default=None, description="SD 1.5 id or local SD-layout folder; null with tiny_sd"
    )
    tiny_sd: TinyDiffusionConfig | None = Field(
        default=None,
        validate_default=True,
        description="sizes of a random tiny SD built into <output>/tiny-sd and used as the base model",
    )
    encoder_checkpoint: LocalPath | None = Field(
        default=None,
        description="pretrain run folder (its msm.safetensors, sizes from its config.yaml); null = from scratch",
    )
    init_from: LocalPath | None = Field(
        default=None,
        description="a generator folder (from finetune or `dreamdiff import-reference generator`) to continue from: "
        "its encoder, conditioner, CLIP head, time conditioner and trained UNet tensors; encoder sizes, conditioner, "
        "trainable and profile must match it; null = start from encoder_checkpoint or scratch",
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
    profile: Profile = Field(
        default="dreamdiff",
        validate_default=True,
        description="the switch between our forward passes and the reference code's (dreamdiff.models.profile): "
        "it sets the encoder's profile (over the pretrain run's; an explicit encoder.profile must agree), and "
        "reference also turns "
        "conditioner.time_cond on and samples PLMS at the reference's timesteps",
    )
    clip_model: str = Field(default="ViT-L-14", description="open_clip model of the frozen image tower")
    clip_pretrained: ModelRef | None = Field(
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
        description="torch.compile the UNet and the encoder's blocks (true, or reduce-overhead: + CUDA graphs); "
        "faster steps on GPU after minutes of compiling (docs/benchmarks.md)",
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
        checkpoint, init = info.data.get("encoder_checkpoint"), info.data.get("init_from")
        if checkpoint is not None and init is not None:
            raise ValueError("encoder_checkpoint and init_from both initialise the encoder: give one")
        if value is None and checkpoint is None and init is None:
            raise ValueError("give the encoder sizes (e.g. {preset: large}) when encoder_checkpoint is null")
        return value

    @field_validator("profile")
    @classmethod
    def _one_profile(cls, value: str, info: ValidationInfo) -> str:
        encoder = info.data.get("encoder")
        if encoder is not None and "profile" in encoder.model_fields_set and encoder.profile != value:
            raise ValueError(f"is {value!r} but encoder.profile is {encoder.profile!r}: set one, `profile`")
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
