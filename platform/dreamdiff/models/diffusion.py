"""Stable Diffusion's trainable parts (diffusers): loading by id or folder, the trainable subset, the loss.

Only the UNet, the VAE and the noise schedule are loaded; SD's text encoder never is, because the EEG
conditioner produces the cross-attention context. `build_tiny_sd` writes a small model of the same classes
in the runwayml/stable-diffusion-v1-5 folder layout, so tests and the CPU demo run the loading code that
real SD runs. Without a VAE the tiny model diffuses pixels directly ("pixel space").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from torch import Tensor

from dreamdiff.errors import DreamdiffError
from dreamdiff.models.diffusion_config import TinyDiffusionConfig

# diffusers warns on every load when asked for low-memory loading without accelerate installed.
_LOW_MEM = {"low_cpu_mem_usage": is_accelerate_available()}
_MIRROR = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}


@dataclass
class SDComponents:
    """What fine-tuning and sampling need from a base model. `sample_size` is in image pixels."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    noise_scheduler: DDPMScheduler
    latent_scale: float
    sample_size: int

    @property
    def pixel_space(self) -> bool:
        return self.vae is None


def build_tiny_sd(cfg: TinyDiffusionConfig, folder: str | Path) -> Path:
    """Build a random tiny model and save it like SD 1.5 (`unet/`, `vae/` if any, `scheduler/`, safetensors),
    with the config that built it in `tiny_config.json`."""
    folder = Path(folder)
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size // cfg.vae_factor,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(_MIRROR[t] for t in reversed(cfg.down_block_types)),
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
    )
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    if cfg.use_vae:
        n = len(cfg.vae_block_out_channels)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.vae_block_out_channels),
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            sample_size=cfg.sample_size,
            scaling_factor=cfg.vae_scaling_factor,
        )
        vae.save_pretrained(folder / "vae", safe_serialization=True)
    DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,  # as SD 1.5's scheduler config
    ).save_pretrained(folder / "scheduler")
    (folder / "tiny_config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    return folder


def _source(base_model: str) -> tuple[str, dict[str, bool]]:
    """Where to load from, and which subfolders exist (a hub id is assumed to be a full SD layout)."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        missing = [sub for sub in ("unet", "scheduler") if not (path / sub).is_dir()]
        if missing:
            raise DreamdiffError(
                f"base_model {base_model!r}: missing subfolder(s) {missing}; expected a Stable Diffusion "
                "folder with unet/, scheduler/ and optionally vae/ (as written by save_pretrained)"
            )
        return str(path), {"vae": (path / "vae").is_dir()}
    looks_like_id = base_model.count("/") == 1 and not base_model.startswith((".", "/", "~"))
    if path.exists() or not looks_like_id:
        raise DreamdiffError(
            f"base_model {base_model!r} is not a folder; expected a local Stable Diffusion folder "
            "(unet/, scheduler/, vae/) or a Hugging Face id such as runwayml/stable-diffusion-v1-5"
        )
    return base_model, {"vae": True}


def load_sd_components(
    base_model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, time_cond: bool = False
) -> SDComponents:
    """UNet, VAE (if the model has one; frozen, eval) and the DDPM training schedule of `base_model`,
    a local folder or a Hugging Face id (which loads only where the weights are reachable).

    With `time_cond` the UNet is built with class_embed_type "identity": it then adds the `class_labels` it is
    given, [B, time-embedding width], to its timestep embedding (`TimeConditioner`'s output). That adds no
    parameter, so the base weights load as they are, but every call must pass class_labels.
    """
    source, has = _source(base_model)
    unet_config = {"class_embed_type": "identity"} if time_cond else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=dtype, **unet_config, **_LOW_MEM
        )
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        vae = None
        if has["vae"]:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **_LOW_MEM)
    except OSError as err:
        hint = "" if Path(source).is_dir() else " (a hub id needs the hub or a filled cache; or give a folder)"
        raise DreamdiffError(f"could not load base_model {base_model!r}{hint}: {err}") from err
    unet.to(device)
    if vae is None:
        return SDComponents(unet, None, noise_scheduler, 1.0, unet.config.sample_size)
    vae.requires_grad_(False).eval().to(device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return SDComponents(unet, vae, noise_scheduler, vae.config.scaling_factor, unet.config.sample_size * factor)


def compile_sd(components: SDComponents, mode: str | None = None) -> None:
    """torch.compile the UNet and the VAE decoder in place, their weights channels-last (cuDNN's layout on
    recent GPUs; the compiled graphs fuse GroupNorm + SiLU, which eager channels-last runs slowly).

    The first call of each new input shape (and grad mode) compiles, which takes minutes for SD 1.5; later calls
    run faster, and mode "reduce-overhead" also replays the compiled kernels as CUDA graphs, so the host launches
    one graph instead of hundreds of kernels (docs/benchmarks.md). Worth it for long training runs and long-lived
    servers, not for a few calls. The state dict keeps its names. `mode` is torch.compile's (None: its default).
    """
    components.unet.to(memory_format=torch.channels_last)
    components.unet.compile(mode=mode)
    if components.vae is not None:
        components.vae.to(memory_format=torch.channels_last)
        components.vae.decoder.compile(mode=mode)


def select_trainable(unet: UNet2DConditionModel, mode: Literal["cross_attention", "all", "none"]) -> list[str]:
    """Freeze the UNet except `mode`'s parameters; return their sorted names.

    "cross_attention" is the paper's choice: the cross-attention (`attn2`) and the LayerNorm before it
    (`norm2`) of every transformer block, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q
    .weight`. The reference code matched 'attn2' / 'norm2' anywhere, which in its LDM naming hits only
    transformer blocks; diffusers' ResNet blocks have a `norm2` too, so names must lie under
    `transformer_blocks`.
    """
    if mode not in ("cross_attention", "all", "none"):
        raise DreamdiffError(f"trainable must be 'cross_attention', 'all' or 'none', got {mode!r}")
    names = []
    for name, param in unet.named_parameters():
        if mode == "cross_attention":
            train = ".transformer_blocks." in name and (".attn2." in name or ".norm2." in name)
        else:
            train = mode == "all"
        param.requires_grad_(train)
        if train:
            names.append(name)
    return sorted(names)


def encode_images(
    components: SDComponents, images: Tensor, sample: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> what the UNet diffuses: scaled VAE latents, or the images
    themselves in pixel space. `sample` draws from the VAE posterior (as SD training does), else its mean."""
    if components.vae is None:
        return images
    vae = components.vae
    with torch.no_grad():
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mean
    return latents * components.latent_scale


def decode_latents(components: SDComponents, latents: Tensor) -> Tensor:
    """The inverse of `encode_images`, mapped to images in [0, 1]."""
    if components.vae is not None:
        vae = components.vae
        with torch.no_grad():
            latents = vae.decode(latents.to(vae.device, vae.dtype) / components.latent_scale).sample
    return ((latents.float() + 1) / 2).clamp(0, 1)


def diffusion_loss(
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    latents: Tensor,
    context: Tensor,
    generator: torch.Generator | None = None,
    class_labels: Tensor | None = None,
) -> Tensor:
    """SD's training loss: noise `latents` at uniform random timesteps, predict with the UNet conditioned on
    `context` [B, tokens, cross_attention_dim], MSE against the scheduler's prediction target (epsilon:
    the paper's loss). `generator` must live on the latents' device. `class_labels` [B, time-embedding width]
    is what a UNet loaded with `time_cond` adds to its timestep embedding (None for any other UNet)."""
    b = latents.shape[0]
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=latents.device, generator=generator)
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    elif kind == "sample":
        target = latents
    else:
        raise DreamdiffError(f"scheduler prediction_type {kind!r} is not one of epsilon, v_prediction, sample")
    pred = unet(noisy, t, encoder_hidden_states=context.to(noisy.dtype), class_labels=class_labels).sample
    return F.mse_loss(pred.float(), target.float())
