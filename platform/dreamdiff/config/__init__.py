"""Typed stage configs: one pydantic schema per stage, the stage registry, and the YAML loader.

- ``paths``: the path field types (Location, LocalPath, ModelRef), found by type wherever paths are handled;
- ``common``: sections several stages share (Ray, scaling, checkpoints, optimiser, augmentation);
- one module per stage schema (``preprocess``, ``pretrain``, ``finetune``, ``sweep``, ``serve``, ``generate``,
  ``evaluate``, ``demo``);
- ``stages``: the registry (name -> config model, runner, help) that the CLI, jobs/, the demo and the location
  checks derive from;
- ``loader``: YAML, dotted overrides, validation and one-line errors; ``record``: a run folder's config.yaml.

Every config model derives from dreamdiff.configbase.StrictModel, as do the model sub-configs beside their models.
"""

from dreamdiff.config.common import AugmentSection, CheckpointSection, OptimSection, RayInitConfig, ScalingSection
from dreamdiff.config.demo import DemoConfig
from dreamdiff.config.evaluate import EvaluateConfig
from dreamdiff.config.finetune import FinetuneConfig, PrecomputeSection, PreviewSection, TinySDPretrainSection
from dreamdiff.config.generate import GenerateConfig
from dreamdiff.config.loader import (
    REPO_CONFIGS,
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    read_yaml,
    resolve_config_path,
    validate_config,
)
from dreamdiff.config.paths import LocalPath, Location, ModelRef, PathKind, path_kind
from dreamdiff.config.preprocess import (
    FakeMOABBSection,
    ImageNetEEGSource,
    MOABBSource,
    PreprocessConfig,
    SignalSection,
    Source,
    SynthSource,
)
from dreamdiff.config.pretrain import PretrainConfig
from dreamdiff.config.record import record_config
from dreamdiff.config.serve import (
    ServeAuthSection,
    ServeAutoscalingSection,
    ServeBatchingSection,
    ServeConfig,
    ServeDefaultsSection,
    ServeEEGSection,
    ServeLimitsSection,
)
from dreamdiff.config.stages import STAGES, Stage
from dreamdiff.config.sweep import TRIAL_OUTPUT, SweepConfig

__all__ = [
    "PathKind",
    "Location",
    "LocalPath",
    "ModelRef",
    "path_kind",
    "RayInitConfig",
    "ScalingSection",
    "CheckpointSection",
    "OptimSection",
    "AugmentSection",
    "PreprocessConfig",
    "SignalSection",
    "FakeMOABBSection",
    "MOABBSource",
    "SynthSource",
    "ImageNetEEGSource",
    "Source",
    "PretrainConfig",
    "FinetuneConfig",
    "PrecomputeSection",
    "PreviewSection",
    "TinySDPretrainSection",
    "SweepConfig",
    "TRIAL_OUTPUT",
    "ServeConfig",
    "ServeAutoscalingSection",
    "ServeBatchingSection",
    "ServeDefaultsSection",
    "ServeLimitsSection",
    "ServeEEGSection",
    "ServeAuthSection",
    "GenerateConfig",
    "EvaluateConfig",
    "DemoConfig",
    "Stage",
    "STAGES",
    "REPO_CONFIGS",
    "ConfigError",
    "resolve_config_path",
    "read_yaml",
    "apply_overrides",
    "validate_config",
    "load_config",
    "dump_config",
    "record_config",
]
