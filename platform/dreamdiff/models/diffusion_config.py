"""The tiny SD's sizes, apart from the code that builds it: stage configs validate them without importing diffusers
(a slow import, which every Ray worker that reads a config would pay)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dreamdiff.configbase import StrictModel


class TinyDiffusionConfig(StrictModel):
    """A small SD-layout model built from config. Sizes default to the CPU demo's (1.7 M UNet params).

    Attention costs grow with the square of the pixel count, so cross-attention sits only at the lower
    resolutions (attention at full resolution is what a CPU cannot afford); the UNet is symmetric.
    """

    sample_size: int = Field(16, ge=4, description="image side in pixels")
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=1)
    down_block_types: list[Literal["DownBlock2D", "CrossAttnDownBlock2D"]] = Field(
        default_factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    )
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    cross_attention_dim: int = Field(64, ge=1, description="conditioner context_dim (SD 1.5: 768)")
    attention_head_dim: int = Field(
        2,
        ge=1,
        description="diffusers' historic name for the HEAD COUNT (SD 1.5: 8). Tiny widths want few heads: on CPU the "
        "demo UNet's step is faster with 2 heads of 32 than with 8 of 8, and its top-1 no worse",
    )
    use_vae: bool = False
    vae_block_out_channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    latent_channels: int = Field(4, ge=1)
    vae_scaling_factor: float = Field(0.18215, gt=0)
    num_train_timesteps: int = Field(1000, ge=1)
    beta_start: float = Field(0.00085, gt=0)
    beta_end: float = Field(0.012, gt=0)
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"

    @model_validator(mode="after")
    def _check_shapes(self) -> TinyDiffusionConfig:
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}) and block_out_channels "
                f"({len(self.block_out_channels)}) must have the same length"
            )
        for field in ("block_out_channels", "vae_block_out_channels"):
            bad = [c for c in getattr(self, field) if c % self.norm_num_groups]
            if bad:
                raise ValueError(f"{field} {bad} must be multiples of norm_num_groups ({self.norm_num_groups})")
        factor = self.vae_factor * 2 ** (len(self.block_out_channels) - 1)
        if self.sample_size % factor:
            raise ValueError(f"sample_size ({self.sample_size}) must be divisible by {factor} (the downsampling)")
        return self

    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel along a side (1 in pixel space)."""
        return 2 ** (len(self.vae_block_out_channels) - 1) if self.use_vae else 1

    @property
    def in_channels(self) -> int:
        """UNet channels: RGB in pixel space, the VAE's latent channels otherwise."""
        return self.latent_channels if self.use_vae else 3
