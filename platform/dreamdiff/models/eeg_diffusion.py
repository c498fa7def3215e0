"""The model that DreamDiffusion fine-tunes: EEG encoder + conditioner + CLIP head around SD's UNet.

`EEGDiffusion` holds every trained part and the UNet they condition, so one `forward` computes the training
losses (and DDP, which only syncs gradients of a forward through its wrapper, can wrap it whole).
`GeneratorSpec` is the recipe that rebuilds it: the base SD (id or folder), the MSM sizes, the conditioner
sizes, what of the UNet trains and the profile (ours or the reference code's forward passes). The VAE and
the CLIP image tower stay outside: frozen, their outputs are computed once per image, not per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from pydantic import Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from dreamdiff.configbase import StrictModel
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.conditioner import (
    ClipHead,
    ConditionerConfig,
    EEGConditioner,
    TimeConditioner,
    clip_alignment_loss,
)
from dreamdiff.models.diffusion import SDComponents, compile_sd, diffusion_loss, select_trainable
from dreamdiff.models.msm import MSMConfig, MSMEncoder
from dreamdiff.models.profile import Profile

ENCODER_PREFIX = "encoder."


class GeneratorSpec(StrictModel):
    """Everything needed to rebuild an `EEGDiffusion` on top of its base model (saved as generator.json)."""

    base_model: str = Field(description="SD 1.5 id or local SD-layout folder the UNet comes from")
    msm: MSMConfig = Field(description="EEG encoder sizes (the pretraining run's model section)")
    conditioner: ConditionerConfig = Field(
        description="context_tokens, context_dim (= UNet cross_attention_dim), mid_tokens, cond_drop_prob, clip_dim, "
        "time_cond"
    )
    trainable: Literal["cross_attention", "all", "none"] = Field(
        "cross_attention", description="UNet parameters fine-tuned (paper: cross_attention)"
    )
    image_size: int = Field(ge=1, description="generated image side in pixels; must match the base model")
    profile: Profile = Field(
        "dreamdiff", description="whose forward passes: ours or the reference code's (e.g. its PLMS timesteps)"
    )

    @model_validator(mode="after")
    def _one_profile(self) -> GeneratorSpec:
        if self.profile != self.msm.profile:
            raise ValueError(f"profile ({self.profile!r}) must equal msm.profile ({self.msm.profile!r})")
        return self


class EEGDiffusion(nn.Module):
    """Encoder, conditioner, CLIP head and, with `conditioner.time_cond`, the time conditioner (always trained)
    and the base `unet` (partly trained, see `unet_trainable`). The encoder runs once per batch (`tokens`);
    both heads read its tokens."""

    def __init__(self, spec: GeneratorSpec, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.spec = spec
        n, d = spec.msm.num_tokens, spec.msm.embed_dim
        self.encoder = MSMEncoder(spec.msm)
        self.conditioner = EEGConditioner.from_config(spec.conditioner, embed_dim=d, num_tokens=n)
        self.clip_head = ClipHead.from_config(spec.conditioner, embed_dim=d, num_tokens=n)
        self.time_conditioner = (
            TimeConditioner.from_config(spec.conditioner, time_embed_dim=unet.time_embedding.linear_2.out_features)
            if spec.conditioner.time_cond
            else None
        )
        self.unet = unet
        self.unet_trainable = select_trainable(unet, spec.trainable)

    def tokens(self, eeg: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """EEG [B, C, T] -> encoder tokens [B, T/p, D]."""
        return self.encoder(eeg, channel_mask)

    def context(self, eeg: Tensor, channel_mask: Tensor | None = None, drop_mask: Tensor | None = None) -> Tensor:
        """EEG -> UNet cross-attention context [B, context_tokens, context_dim]. In training mode samples are
        replaced by the null context at random (if the conditioner has one); `drop_mask` forces it."""
        return self.conditioner(self.tokens(eeg, channel_mask), drop_mask)

    def class_labels(self, context: Tensor) -> Tensor | None:
        """What the UNet adds to its timestep embedding for this context (the same context it cross-attends
        to, null contexts included): the time conditioner's [B, time_embed_dim], or None without one."""
        return None if self.time_conditioner is None else self.time_conditioner(context)

    def clip_embedding(self, eeg: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """EEG -> the CLIP head's vector [B, clip_dim], to compare with `clip_head.target(image embeddings)`
        (e.g. for EEG -> image retrieval)."""
        return self.clip_head(self.tokens(eeg, channel_mask))

    def forward(
        self,
        eeg: Tensor,
        latents: Tensor,
        noise_scheduler: DDPMScheduler,
        clip_target: Tensor | None = None,
        *,
        clip_grad: bool = True,
        channel_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The training losses from one encoder pass: (SD loss, CLIP alignment loss or None without a target).

        With `clip_grad=False` the CLIP loss is only measured (no graph), so the head gets no gradient.
        """
        tokens = self.tokens(eeg, channel_mask)
        context = self.conditioner(tokens)
        sd_loss = diffusion_loss(self.unet, noise_scheduler, latents, context, generator, self.class_labels(context))
        if clip_target is None:
            return sd_loss, None
        with torch.set_grad_enabled(clip_grad and torch.is_grad_enabled()):
            clip_loss = clip_alignment_loss(self.clip_head(tokens), self.clip_head.target(clip_target))
        return sd_loss, clip_loss


def load_encoder_weights(encoder: MSMEncoder, path: str | Path) -> None:
    """Load the "encoder.*" tensors of an MSM pretraining export (the full MaskedSignalModel state dict in
    safetensors, as `dreamdiff pretrain` writes msm.safetensors); the decoder's are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DreamdiffError(f"encoder_weights {str(path)!r} is not a file; expected an MSM export (msm.safetensors)")
    try:
        saved = load_file(str(path))
    except SafetensorError as err:
        raise DreamdiffError(f"encoder_weights {str(path)!r} is not a safetensors file: {err}") from err
    state = {k.removeprefix(ENCODER_PREFIX): v for k, v in saved.items() if k.startswith(ENCODER_PREFIX)}
    if not state:
        raise DreamdiffError(
            f"encoder_weights {str(path)!r} holds no 'encoder.*' tensors (found e.g. {sorted(saved)[:3]}); "
            "expected a MaskedSignalModel state dict"
        )
    try:
        encoder.load_state_dict(state)
    except RuntimeError as err:
        raise DreamdiffError(
            f"encoder_weights {str(path)!r} do not fit the spec's msm sizes (preset {encoder.cfg.preset!r}, "
            f"embed_dim {encoder.cfg.embed_dim}, depth {encoder.cfg.depth}): {err}"
        ) from err


def build_eeg_diffusion(
    spec: GeneratorSpec, components: SDComponents, encoder_weights: str | Path | None = None
) -> EEGDiffusion:
    """An `EEGDiffusion` on `components.unet` (whose parameters outside `spec.trainable` get frozen), on the
    UNet's device. The encoder starts from an MSM export, or from scratch with None (the paper's ablation)."""
    unet_dim = components.unet.config.cross_attention_dim
    if spec.conditioner.context_dim != unet_dim:
        raise DreamdiffError(
            f"conditioner.context_dim ({spec.conditioner.context_dim}) must equal the base model's UNet "
            f"cross_attention_dim ({unet_dim})"
        )
    if spec.image_size != components.sample_size:
        raise DreamdiffError(
            f"image_size ({spec.image_size}) must equal the base model's image size ({components.sample_size})"
        )
    time_cond, embed_type = spec.conditioner.time_cond, components.unet.config.class_embed_type
    if time_cond != (embed_type == "identity"):
        raise DreamdiffError(
            f"conditioner.time_cond is {time_cond}: load the base model with load_sd_components(..., "
            f"time_cond={time_cond}) (its UNet has class_embed_type {embed_type!r})"
        )
    model = EEGDiffusion(spec, components.unet)
    if encoder_weights is not None:
        load_encoder_weights(model.encoder, encoder_weights)
    return model.to(components.unet.device)


def compile_for_training(model: EEGDiffusion, components: SDComponents, mode: str | None = None) -> None:
    """What fine-tuning's `compile` does: `compile_sd` and the encoder's transformer blocks, which run at every
    step there (sampling runs the encoder once per request and leaves it eager)."""
    compile_sd(components, mode)
    model.encoder.compile_blocks(mode)
