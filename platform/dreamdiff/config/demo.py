"""The demo's config: one section per stage, tiny and offline."""

from __future__ import annotations

from pydantic import Field

from dreamdiff.config.common import RayInitConfig
from dreamdiff.config.evaluate import EvaluateConfig
from dreamdiff.config.finetune import FinetuneConfig
from dreamdiff.config.generate import GenerateConfig
from dreamdiff.config.paths import LocalPath
from dreamdiff.config.preprocess import PreprocessConfig
from dreamdiff.config.pretrain import PretrainConfig
from dreamdiff.config.serve import ServeConfig
from dreamdiff.config.sweep import SweepConfig
from dreamdiff.configbase import StrictModel


class DemoConfig(StrictModel):
    """Every stage, tiny and offline: the README's main command."""

    output: LocalPath = "runs/demo"
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
