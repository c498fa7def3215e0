"""The preprocess stage's config: raw EEG (MOABB, ImageNet-EEG, SynthEEG-Image) -> Parquet shards."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from dreamdiff.config.common import RayInitConfig
from dreamdiff.config.paths import LocalPath, Location
from dreamdiff.configbase import StrictModel
from dreamdiff.data.synthetic import SynthConfig
from dreamdiff.models.profile import Profile


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
    """The ImageNet-EEG release; `profile: reference` reproduces the reference code's loading, not `signal`'s."""

    kind: Literal["imagenet_eeg"] = "imagenet_eeg"
    eeg_file: LocalPath
    splits_file: LocalPath
    image_dir: LocalPath
    split_index: int = Field(default=0, ge=0, description="which split of the splits file")
    split_indexing: Literal["global", "subject"] = Field(
        default="global",
        description="what the split's indices count: the release's whole trial list (global), or the list of the "
        "selected subjects' trials (subject)",
    )
    subjects: list[int] | Literal["all"] = "all"
    profile: Profile = Field(
        default="dreamdiff",
        description="dreamdiff: `signal`'s band-pass, crop, interpolation and normalisation; reference: samples "
        "20..460 stretched to 512, nothing else, and trials outside 450..600 samples dropped",
    )


Source = Annotated[MOABBSource | SynthSource | ImageNetEEGSource, Field(discriminator="kind")]


class PreprocessConfig(StrictModel):
    """Raw EEG (MOABB, ImageNet-EEG, SynthEEG-Image) -> Parquet shards + manifest."""

    output: Location = Field(description="folder (or URI) for shards and manifest.json")
    sources: list[Source] = Field(min_length=1)
    signal: SignalSection = SignalSection()
    rows_per_shard: int = Field(default=2048, ge=1)
    ray: RayInitConfig = RayInitConfig()
