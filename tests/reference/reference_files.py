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
