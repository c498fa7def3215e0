"""Temporal masked signal model (MSM): DreamDiffusion's masked autoencoder over time for EEG.

A window [C, T] is cut along time by a Conv1d (kernel = stride = patch_size over all C channels), so each
of the T/p tokens sees every channel for p samples. Pre-training hides a random `mask_ratio` of the
tokens, encodes only the visible ones (plus a cls token) and lets a lighter decoder reconstruct the
hidden ones; the loss is MSE on the hidden tokens only (He et al. 2022; Bai et al. 2024). Downstream
stages keep only `MaskedSignalModel.encoder`, which maps a window to T/p tokens of width `embed_dim`.

Patches are laid out [p, C] with the channel fastest: value j * C + c of a token is channel c at its
j-th sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from dreamdiff.configbase import StrictModel
from dreamdiff.models.profile import Profile

_SIZE_FIELDS = (
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
)

# Encoder parameters (patch embed + cls + blocks + final norm: what survives pretraining), 128 ch x 512,
# patch 4; see `msm_param_counts`. The reference code's own setting is `large` with mlp_ratio 1.0.
PRESETS: dict[str, dict[str, Any]] = {
    # 302.8 M (paper: ~297 M); decoder 26.0 M; 328.8 M in all.
    "large": dict(
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
    # 17.9 M (paper: 18.3 M); decoder 3.4 M.
    "small": dict(
        embed_dim=384, depth=10, num_heads=6, mlp_ratio=4.0, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8
    ),
    # 0.13 M, decoder 0.03 M: tests and the CPU demo.
    "tiny": dict(
        embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2
    ),
}


class MSMConfig(StrictModel):
    """MSM sizes and masking. `preset` fills every size the user left out; given values win."""

    preset: Literal["large", "small", "tiny"] | None = None
    num_channels: int = Field(128, ge=1)
    num_samples: int = Field(512, ge=1)
    patch_size: int = Field(4, ge=1)
    embed_dim: int = Field(ge=2)
    depth: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    mlp_ratio: float = Field(gt=0)
    decoder_embed_dim: int = Field(ge=2)
    decoder_depth: int = Field(ge=1)
    decoder_num_heads: int = Field(ge=1)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="share of tokens hidden; > 0 or nothing is learned")
    norm_target: bool = False
    profile: Profile = Field(
        "dreamdiff",
        description="reference: the DreamDiffusion code's LayerNorm eps (1e-5) and, downstream, no cls token "
        "(dreamdiff.models.profile)",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
            return {**PRESETS[preset], **data}
        missing = [name for name in _SIZE_FIELDS if name not in data]
        if missing:
            presets = ", ".join(PRESETS)
            raise ValueError(f"model sizes {missing} are missing: set them or give a preset ({presets})")
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> MSMConfig:
        if self.num_samples % self.patch_size:
            raise ValueError(f"num_samples ({self.num_samples}) must be divisible by patch_size ({self.patch_size})")
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            width, count = getattr(self, dim), getattr(self, heads)
            if width % count:
                raise ValueError(f"{dim} ({width}) must be divisible by {heads} ({count})")
            if width % 2:
                raise ValueError(f"{dim} ({width}) must be even for the sin-cos positions")
        return self

    @property
    def num_tokens(self) -> int:
        """Tokens per window: T / patch_size."""
        return self.num_samples // self.patch_size

    def architecture(self) -> dict[str, Any]:
        """The settings that fix the weights' shapes and the forward pass (not training's, like the mask ratio)."""
        return {k: getattr(self, k) for k in ("num_channels", "num_samples", "patch_size", *_SIZE_FIELDS, "profile")}

    @property
    def layer_norm_eps(self) -> float:
        """The LayerNorms' eps: 1e-6 (ours, as MAE's ViT) or 1e-5 (the reference code's, PyTorch's default)."""
        return 1e-5 if self.profile == "reference" else 1e-6

    @property
    def num_visible(self) -> int:
        """Tokens the encoder sees in pretraining (`visible_tokens`)."""
        return visible_tokens(self.num_tokens, self.mask_ratio, self.profile)


@dataclass
class MSMOutput:
    """loss: scalar; pred: [B, L, p*C] reconstructed patches; mask: [B, L] float, 1 = masked."""

    loss: Tensor
    pred: Tensor
    mask: Tensor


def sincos_positions(dim: int, length: int) -> Tensor:
    """Fixed 1-D sin-cos positions [1 + length, dim]; row 0 (the cls slot) is zeros, as in MAE."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def patchify(eeg: Tensor, patch_size: int) -> Tensor:
    """[B, C, T] -> [B, T/p, p*C], channel fastest within a patch."""
    b, c, t = eeg.shape
    return eeg.reshape(b, c, t // patch_size, patch_size).permute(0, 2, 3, 1).reshape(b, t // patch_size, -1)


def unpatchify(patches: Tensor, num_channels: int) -> Tensor:
    """[B, L, p*C] -> [B, C, L*p], the inverse of `patchify`."""
    b, n, pc = patches.shape
    p = pc // num_channels
    return patches.reshape(b, n, p, num_channels).permute(0, 3, 1, 2).reshape(b, num_channels, n * p)


def zero_channels(eeg: Tensor, channel_mask: Tensor | None) -> Tensor:
    """Zero the non-real channels (channel_mask [B, C], True = real) so padding never reaches the model."""
    if channel_mask is None:
        return eeg
    return eeg.masked_fill(~channel_mask.bool()[:, :, None], 0.0)


def _value_weights(target: Tensor, channel_mask: Tensor | None) -> Tensor:
    """[B, 1, p*C] 1.0 where a patch value belongs to a real channel."""
    if channel_mask is None:
        return torch.ones_like(target[:, :1])
    repeats = target.shape[-1] // channel_mask.shape[-1]
    return channel_mask.to(target.dtype).repeat(1, repeats)[:, None]


def patch_stats(patches: Tensor, channel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token mean and std over the real values of each patch ([B, L, 1] each), for normalised targets."""
    w = _value_weights(patches, channel_mask)
    n = w.sum(-1, keepdim=True).clamp_min(1)
    mean = (patches * w).sum(-1, keepdim=True) / n
    var = ((patches - mean) ** 2 * w).sum(-1, keepdim=True) / n
    return mean, (var + 1e-6).sqrt()


def masked_mse(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    channel_mask: Tensor | None = None,
    norm_target: bool = False,
) -> Tensor:
    """MSE over the real channel values of each masked token, averaged over masked tokens.

    Visible tokens are excluded: reconstructing what the encoder saw is trivial and would dilute the loss.
    """
    pred, target = pred.float(), target.float()
    if norm_target:
        mean, std = patch_stats(target, channel_mask)
        target = (target - mean) / std
    w = _value_weights(target, channel_mask)
    err = torch.where(w > 0, (pred - target) ** 2, 0.0)
    per_token = err.sum(-1) / w.sum(-1).clamp_min(1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def visible_tokens(num_tokens: int, mask_ratio: float, profile: Profile = "dreamdiff") -> int:
    """Tokens kept visible: round(L * (1 - mask_ratio)); the reference code truncates (int) instead."""
    kept = num_tokens * (1 - mask_ratio)
    return int(kept) if profile == "reference" else round(kept)


def random_masking(
    tokens: Tensor, mask_ratio: float, generator: torch.Generator | None = None, profile: Profile = "dreamdiff"
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep `visible_tokens` random tokens per sample (MAE's argsort of uniform noise).

    Returns the kept tokens [B, keep, D], the mask [B, L] (1 = masked) and the permutation that puts
    [kept, masked] back in time order. `generator` must live on the tokens' device.
    """
    b, n, d = tokens.shape
    keep = visible_tokens(n, mask_ratio, profile)
    noise = torch.rand(b, n, device=tokens.device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = tokens.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block (ViT / MAE)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float = 1e-6) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class MSMEncoder(nn.Module):
    """EEG [B, C, T] -> tokens [B, T/p, D]: the part of the MSM that the conditioner and heads consume."""

    def __init__(self, cfg: MSMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = nn.Conv1d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(d))
        self.register_buffer("pos_embed", sincos_positions(d, cfg.num_tokens), persistent=False)
        eps = cfg.layer_norm_eps
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio, eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=eps)
        self.apply(_init_linear)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, eeg: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """Patch tokens with positions [B, L, D], before masking."""
        c, t = self.cfg.num_channels, self.cfg.num_samples
        if eeg.ndim != 3 or eeg.shape[1:] != (c, t):
            raise ValueError(f"eeg must be [batch, {c}, {t}], got {list(eeg.shape)}")
        tokens = self.patch_embed(zero_channels(eeg, channel_mask)).transpose(1, 2)
        return tokens + self.pos_embed[1:]

    def encode(self, tokens: Tensor, with_cls: bool = True) -> Tensor:
        """Run the blocks over the tokens, cls prepended: [B, N, D] -> [B, 1 + N, D]; without: [B, N, D]."""
        x = tokens
        if with_cls:
            token = (self.cls_token + self.pos_embed[0]).to(tokens.dtype).expand(tokens.shape[0], 1, -1)
            x = torch.cat([token, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, eeg: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """The downstream tokens [B, T/p, D]. Ours see the cls token in the blocks (as in pretraining) and drop
        it after; the reference profile's encoder never has it (dreamdiff.models.profile)."""
        if self.cfg.profile == "reference":
            return self.encode(self.embed(eeg, channel_mask), with_cls=False)
        return self.encode(self.embed(eeg, channel_mask))[:, 1:]

    def compile_blocks(self, mode: str | None = None) -> None:
        """torch.compile each transformer block in place (regional compilation: the blocks share one compiled
        graph, so this compiles one block, not `depth`). `mode` is torch.compile's."""
        for block in self.blocks:
            block.compile(mode=mode)


class MSMDecoder(nn.Module):
    """Encoded visible tokens + mask tokens -> reconstructed patches [B, L, p*C]."""

    def __init__(self, cfg: MSMConfig) -> None:
        super().__init__()
        d = cfg.decoder_embed_dim
        self.embed = nn.Linear(cfg.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.register_buffer("pos_embed", sincos_positions(d, cfg.num_tokens), persistent=False)
        eps = cfg.layer_norm_eps
        self.blocks = nn.ModuleList(
            Block(d, cfg.decoder_num_heads, cfg.mlp_ratio, eps) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(d, eps=eps)
        self.pred = nn.Linear(d, cfg.patch_size * cfg.num_channels)
        self.apply(_init_linear)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.embed(latent)
        b, n = ids_restore.shape
        masked = self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], -1)
        body = torch.cat([x[:, 1:], masked], dim=1)
        body = body.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], body], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


class MaskedSignalModel(nn.Module):
    """The pretraining model: `encoder` (kept) + `decoder` (dropped after pretraining)."""

    def __init__(self, cfg: MSMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = MSMEncoder(cfg)
        self.decoder = MSMDecoder(cfg)

    def forward(
        self,
        eeg: Tensor,
        channel_mask: Tensor | None = None,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> MSMOutput:
        """Mask, encode, reconstruct. `channel_mask` [B, C] (True = real) hides padded channels from
        both the input and the loss; `generator` (on the eeg's device) fixes the mask."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        eeg = zero_channels(eeg, channel_mask)
        kept, mask, ids_restore = random_masking(self.encoder.embed(eeg), ratio, generator, self.cfg.profile)
        pred = self.decoder(self.encoder.encode(kept), ids_restore)
        target = patchify(eeg, self.cfg.patch_size)
        loss = masked_mse(pred, target, mask, channel_mask, self.cfg.norm_target)
        return MSMOutput(loss=loss, pred=pred, mask=mask)

    def num_params(self) -> dict[str, int]:
        """Trainable parameter counts: encoder, decoder, total."""
        enc = sum(p.numel() for p in self.encoder.parameters())
        dec = sum(p.numel() for p in self.decoder.parameters())
        return {"encoder": enc, "decoder": dec, "total": enc + dec}


def build_msm(cfg: MSMConfig) -> MaskedSignalModel:
    """The pretraining model for a config (on the current default device)."""
    return MaskedSignalModel(cfg)


def msm_param_counts(cfg: MSMConfig) -> dict[str, int]:
    """Exact parameter counts without allocating: the model is built on the meta device."""
    with torch.device("meta"):
        return build_msm(cfg).num_params()


def msm_train_flops_per_sample(cfg: MSMConfig) -> float:
    """Matmul FLOPs of one training sample (3 x forward), the numerator of the benchmarks' MFU.

    Counts 2 FLOPs per multiply-add of every Linear/Conv weight and of attention's QK^T and AV: the patch
    embed on all L tokens, the encoder on the visible tokens + cls, the decoder on all L tokens + cls.
    """
    n_tokens, n_enc, n_dec = cfg.num_tokens, cfg.num_visible + 1, cfg.num_tokens + 1

    def blocks(n: int, d: int, depth: int) -> int:
        linear = 4 * d * d + 2 * d * int(d * cfg.mlp_ratio)
        return depth * (2 * n * linear + 4 * n * n * d)

    patch_values = cfg.patch_size * cfg.num_channels
    forward = (
        2 * n_tokens * patch_values * cfg.embed_dim
        + blocks(n_enc, cfg.embed_dim, cfg.depth)
        + 2 * n_enc * cfg.embed_dim * cfg.decoder_embed_dim
        + blocks(n_dec, cfg.decoder_embed_dim, cfg.decoder_depth)
        + 2 * n_dec * cfg.decoder_embed_dim * patch_values
    )
    return 3.0 * forward
