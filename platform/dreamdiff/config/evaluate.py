"""The evaluate stage's config: the paper's n-way top-k and the image metrics, with their split protocol."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dreamdiff.config.paths import LocalPath, ModelRef
from dreamdiff.configbase import StrictModel
from dreamdiff.models.sampling import COMPILE_SAMPLING_HELP, Compile, Sampler


class EvaluateConfig(StrictModel):
    """The paper's n-way top-k and the image metrics, with their split protocol (one process, no Ray).

    Defaults are the paper's protocol (50-way top-1, 50 trials, 5 samples per EEG, no guidance) except the
    sampler: DPM-Solver++ with 25 steps, which matches the reference PLMS at 250 steps in far less time; set
    sampler=plms steps=250 to reproduce the reference exactly.
    """

    checkpoint: LocalPath = Field(description="generator checkpoint folder (generator.json + generator.safetensors)")
    data: LocalPath = Field(description="folder of paired shards (epoch-only shards below it are ignored)")
    output: LocalPath = Field(description="folder for results.json, report.html and generated/")
    classifier: LocalPath = Field(description="a saved classifier folder, or 'vit_h_14_swag' (the paper's, by name)")
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
    clip_pretrained: ModelRef | None = Field(
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
