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
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from dreamdiff.configbase import StrictModel
from dreamdiff.data.synthetic import SynthConfig
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.msm import MSMConfig

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


class FinetuneConfig(StrictModel):
    """Stable Diffusion conditioned on the EEG encoder, with the CLIP alignment loss."""

    data: str = Field(description="folder of paired shards")
    output: str
    base_model: str = Field(description="SD 1.5 id or local folder, or a tiny model folder")
    encoder_checkpoint: str | None = Field(default=None, description="MSM run folder; None = from scratch")
    trainable: Literal["cross_attention", "all", "none"] = "cross_attention"
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    clip_weight: float = Field(default=1.0, ge=0)
    optim: OptimSection = OptimSection(lr=5.3e-5, weight_decay=0.0)
    epochs: int = Field(default=300, ge=1)
    batch_size: int = Field(default=8, ge=1)
    precision: Literal["fp32", "bf16"] = "bf16"
    seed: int = 2022
    checkpoint: CheckpointSection = CheckpointSection()
    scaling: ScalingSection = ScalingSection()
    ray: RayInitConfig = RayInitConfig()


# ------------------------------------------------------------------------------------ sweep


class SweepConfig(StrictModel):
    """Ray Tune over pretraining settings, scored on a downstream probe."""

    base: PretrainConfig
    probe_data: str = Field(description="paired shards with class labels for the probe")
    search_space: dict[str, Any] = Field(description="dotted pretrain key -> grid/choice/loguniform spec")
    num_samples: int = Field(default=1, ge=1)
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    grace_period: int = Field(default=1, ge=1)
    output: str
    ray: RayInitConfig = RayInitConfig()


# ------------------------------------------------------------------------------------ serve


class ServeConfig(StrictModel):
    """The online EEG -> image endpoint."""

    checkpoint: str = Field(description="generator checkpoint folder")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    num_gpus: float = Field(default=0.0, ge=0)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.05, ge=0)
    max_images_per_request: int = Field(default=8, ge=1)
    max_steps: int = Field(default=100, ge=1)
    ray: RayInitConfig = RayInitConfig()


# --------------------------------------------------------------------------------- evaluate


class EvaluateConfig(StrictModel):
    """The paper's n-way top-k and the image metrics, with their split protocol."""

    checkpoint: str
    data: str
    output: str
    classifier: str = Field(description="'vit_h_14_swag' or a saved classifier folder")
    protocol: Literal["by_image", "by_block", "leave_subject_out"] = "by_image"
    n_way: int = Field(default=50, ge=2)
    top_k: int = Field(default=1, ge=1)
    trials: int = Field(default=50, ge=1)
    samples_per_eeg: int = Field(default=5, ge=1)
    steps: int = Field(default=25, ge=1)
    seed: int = 0
    ray: RayInitConfig = RayInitConfig()


# ------------------------------------------------------------------------------------- demo


class DemoConfig(StrictModel):
    """Every stage, tiny and offline: the README's main command."""

    output: str = "runs/demo"
    quick: bool = False
    quick_overrides: list[str] = Field(default_factory=list, description="dotted overrides that --quick applies")
    preprocess: PreprocessConfig
    pretrain: PretrainConfig
    ray: RayInitConfig = RayInitConfig(num_cpus=4)


STAGES: dict[str, type[StrictModel]] = {
    "preprocess": PreprocessConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "sweep": SweepConfig,
    "serve": ServeConfig,
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


def record_config(cfg: BaseModel, run_dir: str | Path) -> Path:
    """Write `config.yaml` into a run folder; refuse to mix runs of different configs.

    Re-running the same config into the same folder is how stages resume, so an identical
    record is fine (where Ray runs, the `ray` section, may change); a different one means two
    experiments would share checkpoints.
    """
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    text = dump_config(cfg)
    old = (yaml.safe_load(path.read_text()) or {}) if path.exists() else None
    changed = [] if old is None else [k for k in _changed_keys(old, yaml.safe_load(text)) if not k.startswith("ray.")]
    if changed:
        raise ConfigError(
            f"{folder} holds a run made with a different config (changed: {', '.join(changed[:8])}); "
            "use another output folder or remove this one"
        )
    path.write_text(text)
    return path


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]
