"""From EEG encoder tokens to what Stable Diffusion and CLIP consume (DreamDiffusion, Sec. 3.2-3.3).

`EEGConditioner` replaces SD's text encoder: it maps the encoder's [B, 128, D] tokens to the [B, 77, 768]
cross-attention context with a token mixer (two 1x1 Conv1d over the TOKEN axis, 128 -> 64 -> 77) and a
Linear D -> 768. `ClipHead` maps the same tokens to one vector in CLIP's image-embedding space, where
`clip_alignment_loss` pulls it towards the CLIP embedding of the stimulus image. `TimeConditioner` (the reference
code's time conditioning, optional) maps the context to one vector that the UNet adds to its timestep embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from dreamdiff.configbase import StrictModel


class ConditionerConfig(StrictModel):
    """Sizes of the conditioner and the CLIP head; the defaults are SD 1.5 and CLIP ViT-L/14."""

    context_tokens: int = Field(77, ge=1, description="SD's text context length")
    context_dim: int = Field(768, ge=1, description="UNet cross_attention_dim")
    mid_tokens: int = Field(64, ge=1, description="token mixer's middle width (paper: 128 // 2)")
    cond_drop_prob: float = Field(
        0.0, ge=0.0, lt=1.0, description="beyond the paper: condition dropout for classifier-free guidance"
    )
    clip_dim: int = Field(768, ge=1, description="CLIP image-embedding width (ViT-L/14: 768)")
    clip_center: bool = Field(
        False,
        description="beyond the paper: align with CLIP embeddings minus their training-set mean (ClipHead.target). "
        "Where the embeddings share one dominant direction (a random CLIP's are nearly parallel for any two images), "
        "the paper's loss is met by predicting that direction and teaches the encoder nothing",
    )
    time_cond: bool = Field(
        False,
        description="the reference code's time-conditioning layer: a vector computed from the context is added to "
        "the UNet's timestep embedding (TimeConditioner; on with the reference profile)",
    )

    @field_validator("time_cond")
    @classmethod
    def _pool_needs_tokens(cls, value: bool, info: ValidationInfo) -> bool:
        tokens = info.data.get("context_tokens")
        if value and tokens is not None and tokens < 2:
            raise ValueError(f"time_cond needs context_tokens >= 2 (it pools them to half as many), got {tokens}")
        return value


def token_mixer(tokens: int, mid: int, out: int) -> nn.Sequential:
    """Two 1x1 Conv1d over the TOKEN axis (tokens -> mid -> out), no activation between: one linear map over
    tokens of rank <= mid, as the reference code mixes tokens."""
    return nn.Sequential(nn.Conv1d(tokens, mid, kernel_size=1), nn.Conv1d(mid, out, kernel_size=1))


def _check_tokens(tokens: Tensor, num_tokens: int, embed_dim: int) -> None:
    if tokens.ndim != 3 or tokens.shape[1:] != (num_tokens, embed_dim):
        raise ValueError(f"tokens must be [batch, {num_tokens}, {embed_dim}], got {list(tokens.shape)}")


class EEGConditioner(nn.Module):
    """Encoder tokens [B, N, D] -> SD context [B, context_tokens, context_dim].

    The two 1x1 convolutions have no activation between them, as in the reference code: together they are
    one linear map over tokens of rank <= mid_tokens. With `cond_drop_prob` > 0 a learned null context
    exists and, in training, replaces the context of each sample with that probability, so that sampling
    can use classifier-free guidance (scale 1.0, i.e. no guidance, reproduces the paper).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_tokens: int = 128,
        context_tokens: int = 77,
        context_dim: int = 768,
        mid_tokens: int = 64,
        cond_drop_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.num_tokens, self.embed_dim = num_tokens, embed_dim
        self.cond_drop_prob = cond_drop_prob
        self.token_mixer = token_mixer(num_tokens, mid_tokens, context_tokens)
        self.proj = nn.Linear(embed_dim, context_dim)
        # Only created when used: a parameter that never receives a gradient breaks DDP, and a checkpoint
        # should not carry an untrained null context that guidance would then trust.
        self.null = nn.Parameter(torch.randn(context_tokens, context_dim) * 0.02) if cond_drop_prob > 0 else None

    @classmethod
    def from_config(cls, cfg: ConditionerConfig, *, embed_dim: int, num_tokens: int = 128) -> EEGConditioner:
        return cls(
            embed_dim=embed_dim,
            num_tokens=num_tokens,
            context_tokens=cfg.context_tokens,
            context_dim=cfg.context_dim,
            mid_tokens=cfg.mid_tokens,
            cond_drop_prob=cfg.cond_drop_prob,
        )

    def forward(self, tokens: Tensor, drop_mask: Tensor | None = None) -> Tensor:
        """`drop_mask` [B] bool (True = use the null context) is applied whenever given; without it, samples
        are dropped at random only in training mode."""
        _check_tokens(tokens, self.num_tokens, self.embed_dim)
        context = self.proj(self.token_mixer(tokens))
        if drop_mask is None and self.training and self.null is not None:
            drop_mask = torch.rand(tokens.shape[0], device=tokens.device) < self.cond_drop_prob
        if drop_mask is None:
            return context
        if self.null is None:
            raise ValueError("drop_mask needs a null context: build the conditioner with cond_drop_prob > 0")
        # torch.where even when nothing is dropped, so the null context always takes part in the graph.
        return torch.where(drop_mask.to(tokens.device)[:, None, None], self.null.to(context.dtype), context)

    def null_context(self, batch: int) -> Tensor:
        """The unconditional context [batch, context_tokens, context_dim] for classifier-free guidance."""
        if self.null is None:
            raise ValueError("no null context: guidance needs a conditioner trained with cond_drop_prob > 0")
        return self.null.expand(batch, -1, -1)


class ClipHead(nn.Module):
    """Encoder tokens [B, N, D] -> [B, clip_dim]: a 1x1 Conv1d that pools N tokens into one, then a Linear.

    Its output lives in the space of `target(clip_embedding)`: the raw CLIP space (the paper), or, with
    `center=True`, CLIP embeddings minus `target_mean`, the training images' mean embedding, which the
    fine-tune driver sets once and the generator checkpoint keeps.
    """

    def __init__(self, *, embed_dim: int, num_tokens: int = 128, clip_dim: int = 768, center: bool = False) -> None:
        super().__init__()
        self.num_tokens, self.embed_dim = num_tokens, embed_dim
        self.pool = nn.Conv1d(num_tokens, 1, kernel_size=1)
        self.proj = nn.Linear(embed_dim, clip_dim)
        self.target_mean: Tensor | None
        self.register_buffer("target_mean", torch.zeros(clip_dim) if center else None)

    @classmethod
    def from_config(cls, cfg: ConditionerConfig, *, embed_dim: int, num_tokens: int = 128) -> ClipHead:
        return cls(embed_dim=embed_dim, num_tokens=num_tokens, clip_dim=cfg.clip_dim, center=cfg.clip_center)

    def forward(self, tokens: Tensor) -> Tensor:
        _check_tokens(tokens, self.num_tokens, self.embed_dim)
        return self.proj(self.pool(tokens).squeeze(1))

    def target(self, clip_embedding: Tensor) -> Tensor:
        """CLIP image embeddings [B, clip_dim] -> the space the head predicts in (what the loss and retrieval
        compare the head's output with)."""
        if self.target_mean is None:
            return clip_embedding
        return clip_embedding - self.target_mean.to(clip_embedding.device, clip_embedding.dtype)


class TimeConditioner(nn.Module):
    """Context [B, context_tokens, context_dim] -> [B, time_embed_dim], added to the UNet's timestep embedding.

    The reference code's `time_embed_condtion`: two 1x1 Conv1d over the token axis (context_tokens ->
    context_tokens // 2 -> 1, no activation between) and a Linear context_dim -> time_embed_dim (the UNet's
    time-embedding width: 1280 for SD 1.5). The UNet adds it through diffusers' class embedding ("identity").
    """

    def __init__(self, *, context_tokens: int = 77, context_dim: int = 768, time_embed_dim: int = 1280) -> None:
        super().__init__()
        if context_tokens < 2:
            raise ValueError(f"context_tokens must be >= 2 (pooled through context_tokens // 2), got {context_tokens}")
        self.context_tokens, self.context_dim = context_tokens, context_dim
        self.token_mixer = token_mixer(context_tokens, context_tokens // 2, 1)
        self.proj = nn.Linear(context_dim, time_embed_dim)

    @classmethod
    def from_config(cls, cfg: ConditionerConfig, *, time_embed_dim: int) -> TimeConditioner:
        return cls(context_tokens=cfg.context_tokens, context_dim=cfg.context_dim, time_embed_dim=time_embed_dim)

    def forward(self, context: Tensor) -> Tensor:
        if context.ndim != 3 or context.shape[1:] != (self.context_tokens, self.context_dim):
            want = f"[batch, {self.context_tokens}, {self.context_dim}]"
            raise ValueError(f"context must be {want}, got {list(context.shape)}")
        return self.proj(self.token_mixer(context).squeeze(1))


def clip_alignment_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of 1 - cos(pred, target) over the batch: 0 aligned, 1 orthogonal, 2 opposite.

    Cosine ignores scale, so the target may be a raw or an L2-normalised CLIP embedding.
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must both be [batch, dim], got {list(pred.shape)}, {list(target.shape)}")
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()
