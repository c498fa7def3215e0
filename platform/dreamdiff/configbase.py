"""The base every dreamdiff config model derives from: the stage schemas (dreamdiff.config) and the model-level
sub-configs beside their models (MSMConfig, ConditionerConfig, TinyDiffusionConfig, SynthConfig).

Configs are data: pydantic models that reject unknown keys and wrong types, so a typo in a YAML file fails at
load time with the key named, not hours into a run.
"""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
