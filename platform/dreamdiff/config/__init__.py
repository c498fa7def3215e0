"""Typed stage configs: one pydantic schema per stage, the stage registry, and the YAML loader.

- ``base``: StrictModel (every config section) and the path field types (Location, LocalPath, ModelRef);
- ``common``: sections several stages share (Ray, scaling, checkpoints, optimiser, augmentation);
- one module per stage schema (``preprocess``, ``pretrain``, ``finetune``, ``sweep``, ``serve``, ``generate``,
  ``evaluate``, ``demo``);
- ``stages``: the registry (name -> config model, runner, help) that the CLI, jobs/, the demo and the location
  checks derive from;
- ``loader``: YAML, dotted overrides, validation and one-line errors; ``record``: a run folder's config.yaml.

``from dreamdiff.config import PretrainConfig, load_config`` works for every name below. The names load on first
use: model sub-configs (dreamdiff.models) derive from ``dreamdiff.config.base``, and the stage schemas import
those models, so importing this package must not import the schemas.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "base": ("StrictModel", "PathKind", "Location", "LocalPath", "ModelRef", "path_kind"),
    "common": ("RayInitConfig", "ScalingSection", "CheckpointSection", "OptimSection", "AugmentSection"),
    "preprocess": (
        "PreprocessConfig",
        "SignalSection",
        "FakeMOABBSection",
        "MOABBSource",
        "SynthSource",
        "ImageNetEEGSource",
        "Source",
    ),
    "pretrain": ("PretrainConfig",),
    "finetune": ("FinetuneConfig", "PrecomputeSection", "PreviewSection", "TinySDPretrainSection"),
    "sweep": ("SweepConfig", "TRIAL_OUTPUT"),
    "serve": (
        "ServeConfig",
        "ServeAutoscalingSection",
        "ServeBatchingSection",
        "ServeDefaultsSection",
        "ServeLimitsSection",
        "ServeEEGSection",
        "ServeAuthSection",
    ),
    "generate": ("GenerateConfig",),
    "evaluate": ("EvaluateConfig",),
    "demo": ("DemoConfig",),
    "stages": ("Stage", "STAGES"),
    "loader": (
        "REPO_CONFIGS",
        "ConfigError",
        "resolve_config_path",
        "read_yaml",
        "apply_overrides",
        "validate_config",
        "load_config",
        "dump_config",
    ),
    "record": ("record_config",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
