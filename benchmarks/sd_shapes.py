"""Random-weight models at the reference shapes (SD 1.5 UNet / VAE, MSM large), or tiny for CPU.

Shared by benchmarks/finetune.py and benchmarks/generate.py. Weights are random (no download): only shapes
and arithmetic matter for throughput.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from dreamdiff.models.conditioner import ConditionerConfig
from dreamdiff.models.diffusion import SDComponents
from dreamdiff.models.eeg_diffusion import EEGDiffusion, GeneratorSpec, build_eeg_diffusion
from dreamdiff.models.msm import MSMConfig

SD15_SCALE = 0.18215


def _unet(tiny: bool) -> UNet2DConditionModel:
    if tiny:  # the demo's tiny UNet, in latent space
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    return UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def _vae(tiny: bool) -> AutoencoderKL:
    channels = (32, 32) if tiny else (128, 256, 512, 512)  # SD 1.5 vae/config.json
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1 if tiny else 2,
        norm_num_groups=32,
        sample_size=16 if tiny else 512,
        scaling_factor=SD15_SCALE,
    )


def sd_components(tiny: bool, device: torch.device, channels_last: bool = False) -> SDComponents:
    """The SD 1.5 layout (UNet 860 M, VAE 84 M, scaled-linear DDPM) with random weights, or a tiny one.
    `channels_last` stores the convolutions' weights NHWC (tensor-core friendly) and lets cuDNN autotune."""
    with torch.device(device):  # initialise on the device: random init of 1 B parameters is slow on a CPU
        unet, vae = _unet(tiny), _vae(tiny)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return SDComponents(unet, vae, scheduler, SD15_SCALE, 16 if tiny else 512)


def eeg_diffusion(components: SDComponents, tiny: bool, trainable: str = "cross_attention") -> EEGDiffusion:
    """The paper's model around `components.unet`: the MSM large encoder (tiny preset when tiny), the conditioner
    to SD's 77 x 768 context and the CLIP head to ViT-L/14's 768."""
    width = 64 if tiny else 768
    spec = GeneratorSpec(
        base_model="random-weights",
        msm=MSMConfig(preset="tiny" if tiny else "large"),
        conditioner=ConditionerConfig(context_dim=width, clip_dim=width),
        trainable=trainable,  # type: ignore[arg-type]
        image_size=components.sample_size,
    )
    with torch.device(components.unet.device):
        return build_eeg_diffusion(spec, components)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_memory_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_compile_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """`--compile [MODE]`: as a stage's `compile` setting does (MODE omitted: "default", torch.compile's mode for
    `compile: true`; reduce-overhead as `compile: reduce-overhead`). The value is torch.compile's `mode`."""
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help=f"torch.compile {what} (slow warm-up); MODE: torch.compile's, default if omitted",
    )
