"""Latency of generation: one EEG -> N images (the same `Generator.generate` Serve and batch generation run).

SD 1.5 UNet + VAE + the MSM large encoder and conditioner at 512 px, random weights, no guidance. Prints one JSON
line per setting: seconds per EEG (mean of `--repeats` after a warm-up), images/s, peak GPU memory and the
ratio to the reference implementation's setting (fp32, PLMS 250 steps, on an H200: docs/reference-figures.md).

    python benchmarks/generate.py --tiny              # CPU smoke test (tiny models, 16 px, 4 steps)
    python benchmarks/generate.py --suite gpu         # reference setting, then ours (bf16 weights, DPM++ 25)
    python benchmarks/generate.py --dtype bf16 --steps 25 --compile                    # as `compile: true`
    python benchmarks/generate.py --dtype bf16 --steps 25 --compile reduce-overhead    # + CUDA graphs
    python benchmarks/generate.py --breakdown --channels-last   # ms per part: encoder, one UNet step, VAE decode
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from sd_shapes import (
    add_compile_flag,
    device_name,
    eeg_diffusion,
    peak_memory_gb,
    sd_components,
    synchronize,
)

from dreamdiff.models.diffusion import decode_latents
from dreamdiff.models.generator import Generator

REFERENCE_DEVICE = "NVIDIA H200"
REFERENCE_S_PER_EEG = 39.4 + 0.46  # fp32, PLMS 250 steps, 5 images, 512 px
# (sampler, steps, dtype): the reference setting and ours
GPU_SUITE = [("plms", 250, "fp32"), ("dpm++", 25, "bf16"), ("dpm++", 20, "bf16")]


def build(device: torch.device, dtype: str, tiny: bool, compile_: str | None, channels_last: bool) -> Generator:
    torch.manual_seed(0)
    components = sd_components(tiny, device, channels_last)
    model = eeg_diffusion(components, tiny).eval().requires_grad_(False)
    if dtype == "bf16":  # weights in bf16 (inference only), not autocast: no per-op casts
        model.to(torch.bfloat16)
        components.vae.to(torch.bfloat16)
    generator = Generator(model, components)
    if compile_:
        generator.compile(compile_)  # as `compile:` does in serve, generate and evaluate
    return generator


def measure(
    generator: Generator, sampler: str, steps: int, images: int, repeats: int, dtype: str, compile_: str | None
) -> dict[str, Any]:
    device = generator.device
    eeg = torch.randn(1, 128, 512)
    # warm-up (kernels, allocator, compile): a few steps do it; 250 reference steps would add a whole generation
    start = time.perf_counter()
    generator.generate(eeg, num_images=images, steps=min(steps, 5), sampler=sampler, seed=0)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(repeats):
        out = generator.generate(eeg, num_images=images, steps=steps, sampler=sampler, seed=i)
    synchronize(device)
    per_eeg = (time.perf_counter() - start) / repeats
    full_size = generator.spec.image_size == 512 and images == 5
    return {
        "name": "generate",
        "image_px": int(out.shape[2]),
        "images_per_eeg": images,
        "sampler": sampler,
        "steps": steps,
        "dtype": dtype,
        "compile": compile_ or False,
        "channels_last": generator.components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last),
        "device": device_name(device),
        "warmup_s": round(warmup_s, 1),
        "s_per_eeg": round(per_eeg, 4),
        "images_per_s": round(images / per_eeg, 2),
        "peak_mem_gb": peak_memory_gb(device),
        "reference_device": REFERENCE_DEVICE,
        "speedup_vs_reference": round(REFERENCE_S_PER_EEG / per_eeg, 1) if full_size else None,
    }


def _ms(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return round((time.perf_counter() - start) / repeats * 1e3, 2)


@torch.inference_mode()
def breakdown(generator: Generator, images: int, dtype: str) -> dict[str, Any]:
    """Milliseconds of each part of `generate` for one EEG: encoder + conditioner, one UNet call on the
    `images` latents, the VAE decode of them, and the copy of the uint8 images to the host."""
    device, unet = generator.device, generator.components.unet
    side = unet.config.sample_size
    eeg = torch.randn(1, 128, 512, device=device, dtype=generator.model.encoder.patch_embed.weight.dtype)
    context = generator.model.context(eeg).repeat_interleave(images, dim=0).to(unet.dtype)
    latents = torch.randn(images, unet.config.in_channels, side, side, device=device, dtype=unet.dtype)
    t = torch.tensor(500, device=device)
    decoded = decode_latents(generator.components, latents)
    return {
        "name": "generate_breakdown",
        "dtype": dtype,
        "images": images,
        "device": device_name(device),
        "context_ms": _ms(lambda: generator.model.context(eeg), device),
        "unet_step_ms": _ms(lambda: unet(latents, t, encoder_hidden_states=context), device),
        "vae_decode_ms": _ms(lambda: decode_latents(generator.components, latents), device),
        "to_host_ms": _ms(lambda: (decoded * 255).round().to(torch.uint8).cpu(), device),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sampler", choices=["dpm++", "ddim", "plms"], default="dpm++")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    add_compile_flag(p, "the UNet and VAE decoder")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, 16 px, 4 steps, 1 repeat")
    p.add_argument("--suite", choices=["gpu"], help="gpu: fp32 PLMS 250 (reference), bf16 DPM++ 25 and 20")
    p.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels-last, cuDNN autotuning")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of one generation")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if args.tiny:
        args.steps, args.repeats = 4, 1
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    runs = GPU_SUITE if args.suite == "gpu" else [(args.sampler, args.steps, dtype)]
    built: dict[str, Generator] = {}
    for sampler, steps, run_dtype in runs:
        if run_dtype not in built:
            built.clear()  # one model on the device at a time
            built[run_dtype] = build(device, run_dtype, args.tiny, args.compile, args.channels_last)
        if args.breakdown:
            print(json.dumps(breakdown(built[run_dtype], args.images, run_dtype)), flush=True)
        row = measure(built[run_dtype], sampler, steps, args.images, args.repeats, run_dtype, args.compile)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
