"""Throughput of the fine-tuning step (the same `finetune_train_step` the trainer runs), no Ray.

SD 1.5 UNet with the paper's trainable set (attn2 + norm2), the MSM large encoder, conditioner and CLIP head,
at 512 px (64 x 64 latents), random weights. The VAE and CLIP latents/embeddings are precomputed in our stage,
so a step here is what a worker runs: encoder + UNet forward/backward and AdamW. Prints one JSON line per
measurement with samples/s, peak GPU memory and the ratio to the reference implementation's row for the same
shape (docs/reference-figures.md; measured on an H200).

    python benchmarks/finetune.py --tiny          # CPU smoke test (tiny UNet, batch 4)
    python benchmarks/finetune.py --suite gpu     # batch 8, fp32 and bf16 (the reference's shape)
    python benchmarks/finetune.py --compile       # bf16 as `compile: true` (UNet and encoder blocks compiled)
    python benchmarks/finetune.py --compile reduce-overhead   # as `compile: reduce-overhead` (+ CUDA graphs)
"""

from __future__ import annotations

import argparse
import json
import time
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

from dreamdiff.models.eeg_diffusion import compile_for_training
from dreamdiff.train.finetune_step import build_finetune_optimizer, finetune_train_step

REFERENCE_DEVICE = "NVIDIA H200"
REFERENCE_FP32 = 14.1  # samples/s at batch 8, 512 px, reference code (VAE + CLIP run every step)
REFERENCE_BF16 = 73.1


def measure(
    batch: int,
    precision: str,
    steps: int,
    warmup: int,
    device: torch.device,
    tiny: bool,
    channels_last: bool = False,
    compile_: str | None = None,
) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32, as the reference
    components = sd_components(tiny, device, channels_last)
    model = eeg_diffusion(components, tiny)
    components.vae = None  # precomputed latents: the VAE does not run in a step
    if compile_:  # as FinetuneConfig.compile does
        compile_for_training(model, components, compile_)
    optimizer = build_finetune_optimizer(model, lr=5.3e-5, fused=device.type == "cuda")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    side = components.unet.config.sample_size
    clip_dim = model.spec.conditioner.clip_dim
    data = {
        "eeg": torch.randn(batch, 128, 512, device=device),
        "latents": torch.randn(batch, 4, side, side, device=device),
        "clip_target": torch.randn(batch, clip_dim, device=device),
    }
    autocast = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        finetune_train_step(
            model,
            components.noise_scheduler,
            optimizer,
            data,
            lr=5.3e-5,
            grad_clip=0.5,
            clip_weight=1.0,
            autocast_dtype=autocast,
            device=device,
        )

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    samples_per_s = batch * steps / (time.perf_counter() - start)
    reference = None if tiny or batch != 8 else REFERENCE_FP32
    return {
        "name": "finetune_train_step",
        "model": "tiny" if tiny else "sd15-unet + msm-large",
        "image_px": components.sample_size,
        "trainable_params": trained,
        "batch": batch,
        "precision": precision,
        "channels_last": channels_last or bool(compile_),  # compiling stores the UNet channels-last
        "compile": compile_ or False,
        "device": device_name(device),
        "warmup_s": round(warmup_s, 1),
        "steps": steps,
        "samples_per_s": round(samples_per_s, 2),
        "peak_mem_gb": peak_memory_gb(device),
        "reference_device": REFERENCE_DEVICE,
        "ratio_to_reference_fp32": round(samples_per_s / reference, 2) if reference else None,
        "ratio_to_reference_bf16": round(samples_per_s / REFERENCE_BF16, 2) if reference else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, batch 4, 2 steps")
    p.add_argument("--suite", choices=["gpu"], help="gpu: batch 8 at fp32 and bf16")
    p.add_argument("--channels-last", action="store_true", help="UNet in channels-last, cuDNN autotuning")
    add_compile_flag(p, "the UNet")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if args.tiny:
        args.batch, args.steps, args.warmup = 4, 2, 1
    runs = (
        [(args.batch, prec) for prec in ("fp32", "bf16")]
        if args.suite == "gpu"
        else [(args.batch, args.precision or ("bf16" if device.type == "cuda" else "fp32"))]
    )
    for batch, precision in runs:
        try:
            row = measure(
                batch, precision, args.steps, args.warmup, device, args.tiny, args.channels_last, args.compile
            )
        except torch.OutOfMemoryError as err:
            row = {"name": "finetune_train_step", "batch": batch, "precision": precision, "error": str(err)[:200]}
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
