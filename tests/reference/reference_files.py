"""Checkpoints in the DreamDiffusion reference code's layout, written by the tests at tiny sizes.

The layout (names, shapes, the pickled config classes) is the reference's; the values are random. The reference's
config classes are pickled under their own names (`config.Config_MBM_EEG`, ...) from a stand-in module `config`
that exists only while a file is written.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

TINY = {
    "num_channels": 8,
    "patch_size": 4,
    "num_samples": 32,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 1.0,
    "decoder_embed_dim": 8,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}


def sincos_table(dim: int, length: int) -> torch.Tensor:
    """MAE's 1-D sin-cos positions with a zero cls row, [1, 1 + length, dim], computed in numpy float64."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", np.arange(length, dtype=np.float64), omega)
    table = np.concatenate([np.zeros([1, dim]), np.concatenate([np.sin(out), np.cos(out)], axis=1)], axis=0)
    return torch.from_numpy(table).float()[None]


def _block(prefix: str, dim: int, hidden: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    return {
        f"{prefix}.norm1.weight": 1 + rand(dim),
        f"{prefix}.norm1.bias": rand(dim),
        f"{prefix}.attn.qkv.weight": rand(3 * dim, dim),
        f"{prefix}.attn.qkv.bias": rand(3 * dim),
        f"{prefix}.attn.proj.weight": rand(dim, dim),
        f"{prefix}.attn.proj.bias": rand(dim),
        f"{prefix}.norm2.weight": 1 + rand(dim),
        f"{prefix}.norm2.bias": rand(dim),
        f"{prefix}.mlp.fc1.weight": rand(hidden, dim),
        f"{prefix}.mlp.fc1.bias": rand(hidden),
        f"{prefix}.mlp.fc2.weight": rand(dim, hidden),
        f"{prefix}.mlp.fc2.bias": rand(dim),
    }


def msm_state(sizes: dict[str, Any] = TINY, seed: int = 0, image_branch: bool = False) -> dict[str, torch.Tensor]:
    """A reference `MAEforEEG` state dict (encoder, decoder, fixed positions; the image branch when asked)."""
    gen = torch.Generator().manual_seed(seed)
    d, dd = sizes["embed_dim"], sizes["decoder_embed_dim"]
    c, p = sizes["num_channels"], sizes["patch_size"]
    n = sizes["num_samples"] // p
    state = {
        "cls_token": torch.randn(1, 1, d, generator=gen) * 0.02,
        "pos_embed": sincos_table(d, n),
        "patch_embed.proj.weight": torch.randn(d, c, p, generator=gen) * 0.2,
        "patch_embed.proj.bias": torch.randn(d, generator=gen) * 0.2,
    }
    for i in range(sizes["depth"]):
        state |= _block(f"blocks.{i}", d, int(d * sizes["mlp_ratio"]), gen)
    state |= {
        "norm.weight": 1 + torch.randn(d, generator=gen) * 0.2,
        "norm.bias": torch.randn(d, generator=gen) * 0.2,
        "decoder_embed.weight": torch.randn(dd, d, generator=gen) * 0.2,
        "decoder_embed.bias": torch.randn(dd, generator=gen) * 0.2,
        "mask_token": torch.randn(1, 1, dd, generator=gen) * 0.02,
        "decoder_pos_embed": sincos_table(dd, n),
    }
    for i in range(sizes["decoder_depth"]):
        state |= _block(f"decoder_blocks.{i}", dd, int(dd * sizes["mlp_ratio"]), gen)
    state |= {
        "decoder_norm.weight": torch.ones(dd),
        "decoder_norm.bias": torch.zeros(dd),
        "decoder_pred.weight": torch.randn(c * p, dd, generator=gen) * 0.2,
        "decoder_pred.bias": torch.zeros(c * p),
    }
    if image_branch:
        state |= {"nature_img_decoder_embed.weight": torch.zeros(dd, d), "nature_img_mask_token": torch.zeros(1, 1, dd)}
    return state


def pretrain_config_values(sizes: dict[str, Any] = TINY) -> dict[str, Any]:
    """The attributes of the reference's `Config_MBM_EEG` as its released checkpoint carries them."""
    return {
        "lr": 2.5e-4,
        "weight_decay": 0.05,
        "num_epoch": 500,
        "batch_size": 128,
        "mask_ratio": 0.1,
        "patch_size": sizes["patch_size"],
        "embed_dim": sizes["embed_dim"],
        "decoder_embed_dim": sizes["decoder_embed_dim"],
        "depth": sizes["depth"],
        "num_heads": sizes["num_heads"],
        "decoder_num_heads": sizes["decoder_num_heads"],
        "mlp_ratio": sizes["mlp_ratio"],
        "root_path": "./",
        "focus_range": None,
    }


def save_reference(path: Path, payload: dict[str, Any], configs: dict[str, dict[str, Any]]) -> Path:
    """torch.save `payload`, whose values named in `configs` become instances of the reference's config class of
    that name (e.g. {"config": ...} with configs={"Config_MBM_EEG": values} sets payload["config"])."""
    module = types.ModuleType("config")
    saved = sys.modules.get("config")
    sys.modules["config"] = module
    try:
        for class_name, values in configs.items():
            cls = type(class_name, (), {"__module__": "config"})
            setattr(module, class_name, cls)
            instance = cls()
            instance.__dict__.update(values)
            payload = {**payload, "config": instance}
        torch.save(payload, path)
    finally:
        if saved is None:
            sys.modules.pop("config", None)
        else:
            sys.modules["config"] = saved
    return path


def pretrain_checkpoint(path: Path, sizes: dict[str, Any] = TINY, seed: int = 0, **extra: Any) -> Path:
    """A reference pretraining checkpoint: {'model', 'optimizer', 'epoch', 'scaler', 'config'}."""
    payload = {"model": msm_state(sizes, seed, **extra), "optimizer": {}, "epoch": 499, "scaler": {}}
    return save_reference(path, payload, {"Config_MBM_EEG": pretrain_config_values(sizes)})


_RESNET_TO_LDM = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def _resnet(rest: str) -> str:
    for ours, theirs in _RESNET_TO_LDM:
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    raise KeyError(rest)


def ldm_unet_name(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """The CompVis (LDM) name of a diffusers `UNet2DConditionModel` tensor of an SD 1.x-shaped UNet: the inverse of
    diffusers' own `convert_ldm_unet_checkpoint`, which the tests use to check it."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top:
        return top[key]
    parts = key.split(".")
    per = layers_per_block + 1
    if parts[0] == "down_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{1 + block * per + index}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + block * per + index}.1.{rest}"
        return f"input_blocks.{1 + block * per + layers_per_block}.0.op.{parts[-1]}"  # downsamplers.0.conv
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * index}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{block * per + index}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{block * per + index}.1.{rest}"
        slot = 2 if up_has_attention[block] else 1
        return f"output_blocks.{block * per + layers_per_block}.{slot}.conv.{parts[-1]}"  # upsamplers.0.conv
    raise KeyError(key)


def ldm_unet_state(unet: Any) -> dict[str, torch.Tensor]:
    """A diffusers UNet's tensors under their CompVis names, with the `model.diffusion_model.` prefix."""
    config = unet.config
    up_has_attention = ["CrossAttn" in t for t in config.up_block_types]
    return {
        "model.diffusion_model." + ldm_unet_name(k, config.layers_per_block, up_has_attention): v.clone()
        for k, v in unet.state_dict().items()
    }


ENCODER = {**TINY, "num_channels": 128, "num_samples": 512, "depth": 1}  # 128 tokens, as the stages feed


def generation_config_values(sizes: dict[str, Any] = ENCODER) -> dict[str, Any]:
    """The attributes of the reference's `Config_Generative_Model` that its generation checkpoint carries."""
    return {
        "patch_size": sizes["patch_size"],
        "embed_dim": sizes["embed_dim"],
        "depth": sizes["depth"],
        "num_heads": sizes["num_heads"],
        "mlp_ratio": sizes["mlp_ratio"],
        "global_pool": False,
        "use_time_cond": True,
        "clip_tune": True,
        "num_samples": 5,
        "ddim_steps": 250,
        "subject": 4,
        "lr": 5.3e-5,
    }


def generation_state(base_model: Path, seed: int = 0, clip_dim: int = 64, mid: int = 8) -> dict[str, torch.Tensor]:
    """A reference generation `model_state_dict` on the SD folder `base_model`: its UNet in the CompVis layout with
    the cross-attention changed (what the reference trains), the time-conditioning layer, the downstream encoder,
    the conditioner and CLIP head, a stand-in VAE and CLIP tower, and the noise schedule's buffers."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    gen = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    state = ldm_unet_state(unet)
    for name, value in state.items():
        if ".transformer_blocks." in name and (".attn2." in name or ".norm2." in name):
            state[name] = value + 0.1 * torch.randn(value.shape, generator=gen)
    context, time_dim = unet.config.cross_attention_dim, unet.time_embedding.linear_2.out_features
    prefix = "model.diffusion_model.time_embed_condtion."
    state |= {
        prefix + "0.weight": torch.randn(77 // 2, 77, 1, generator=gen) * 0.1,
        prefix + "0.bias": torch.randn(77 // 2, generator=gen) * 0.1,
        prefix + "1.weight": torch.randn(1, 77 // 2, 1, generator=gen) * 0.1,
        prefix + "1.bias": torch.randn(1, generator=gen) * 0.1,
        prefix + "2.weight": torch.randn(time_dim, context, generator=gen) * 0.1,
        prefix + "2.bias": torch.randn(time_dim, generator=gen) * 0.1,
    }
    encoder = {k: v for k, v in msm_state(ENCODER, seed).items() if not k.startswith(("decoder", "mask_token"))}
    encoder["mask_token"] = torch.zeros(1, 1, ENCODER["embed_dim"])
    state |= {"cond_stage_model.mae." + k: v for k, v in encoder.items()}
    tokens, width = ENCODER["num_samples"] // ENCODER["patch_size"], ENCODER["embed_dim"]
    state |= {
        "cond_stage_model.channel_mapper.0.weight": torch.randn(mid, tokens, 1, generator=gen) * 0.1,
        "cond_stage_model.channel_mapper.0.bias": torch.randn(mid, generator=gen) * 0.1,
        "cond_stage_model.channel_mapper.1.weight": torch.randn(77, mid, 1, generator=gen) * 0.1,
        "cond_stage_model.channel_mapper.1.bias": torch.randn(77, generator=gen) * 0.1,
        "cond_stage_model.dim_mapper.weight": torch.randn(context, width, generator=gen) * 0.1,
        "cond_stage_model.dim_mapper.bias": torch.randn(context, generator=gen) * 0.1,
        "cond_stage_model.mapping.maxpool.weight": torch.randn(1, tokens, 1, generator=gen) * 0.1,
        "cond_stage_model.mapping.maxpool.bias": torch.randn(1, generator=gen) * 0.1,
        "cond_stage_model.mapping.fc.weight": torch.randn(clip_dim, width, generator=gen) * 0.1,
        "cond_stage_model.mapping.fc.bias": torch.randn(clip_dim, generator=gen) * 0.1,
        "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=gen),
        "image_embedder.transformer.vision_model.post_layernorm.weight": torch.ones(16),
    }
    schedule = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler")
    alphas_cumprod = schedule.alphas_cumprod.float()
    state |= {
        "betas": schedule.betas.float(),
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1]]),
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "posterior_variance": schedule.betas.float(),
    }
    return state


def generation_checkpoint(path: Path, base_model: Path, seed: int = 0, **values: Any) -> Path:
    """A reference generation checkpoint: {'model_state_dict', 'config', 'state'}."""
    payload = {"model_state_dict": generation_state(base_model, seed), "state": torch.get_rng_state()}
    return save_reference(path, payload, {"Config_Generative_Model": generation_config_values() | values})
