"""Throughput of the MSM pretraining step (the same `msm_train_step` the trainer runs), no Ray.

Prints one JSON line per measurement: samples/s, MFU (matmul FLOPs against 989 TFLOP/s dense bf16,
H100/H200; null off-GPU), peak GPU memory, and ratios to the DreamDiffusion reference implementation's figures
for the same model and batch (docs/reference-figures.md; measured on an H200: compare only on that card).

    python benchmarks/msm.py --tiny                     # CPU smoke test
    python benchmarks/msm.py --suite gpu                # the reference shapes
    python benchmarks/msm.py --preset large --mlp-ratio 1.0 --batch 512 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from dreamdiff.models.msm import MSMConfig, build_msm, msm_train_flops_per_sample
from dreamdiff.train.msm_step import msm_train_step
from dreamdiff.train.optim import build_optimizer

PEAK_FLOPS = 989e12  # H100/H200 SXM, dense bf16
REFERENCE_DEVICE = "NVIDIA H200"
# docs/reference-figures.md, reference implementation: 1024 x 24 encoder, 512 x 8 decoder, 128 ch x 512, patch 4,
# mask 0.75. (mlp_ratio, batch, precision) -> samples/s.
REFERENCE_ROWS = {
    (1.0, 100, "fp32"): 762.0,
    (1.0, 100, "tf32"): 1714.0,
    (1.0, 100, "bf16"): 1347.0,
    (1.0, 512, "bf16"): 4279.0,
    (4.0, 100, "fp32"): 447.0,
    (4.0, 100, "bf16"): 1767.0,
}
REFERENCE_SHAPE = MSMConfig(preset="large").model_dump(exclude={"preset", "mlp_ratio", "norm_target"})
GPU_SUITE = [(mlp, batch, prec) for mlp in (4.0, 1.0) for batch in (100, 512) for prec in ("fp32", "bf16")]


def reference_samples_per_s(cfg: MSMConfig, batch: int, precision: str) -> float | None:
    """The reference figure for this shape and precision, or None where the table has no row."""
    if cfg.model_dump(exclude={"preset", "mlp_ratio", "norm_target"}) != REFERENCE_SHAPE:
        return None
    return REFERENCE_ROWS.get((cfg.mlp_ratio, batch, precision))


def set_precision(precision: str) -> torch.dtype | None:
    """fp32: true fp32 matmuls (the reference); tf32: TF32 tensor cores; bf16: autocast. Returns its dtype."""
    tf32 = precision == "tf32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    return torch.bfloat16 if precision == "bf16" else None


def measure(
    cfg: MSMConfig, batch: int, precision: str, steps: int, warmup: int, device: torch.device, compile_: bool
) -> dict[str, Any]:
    """Time `steps` training steps after `warmup` ones on a fixed random batch resident on the device."""
    torch.manual_seed(0)
    autocast_dtype = set_precision(precision)
    model = build_msm(cfg).to(device)
    params = model.num_params()
    optimizer = build_optimizer(model, lr=2.5e-4)
    step_model = torch.compile(model) if compile_ else model
    eeg = torch.randn(batch, cfg.num_channels, cfg.num_samples, device=device)
    cuda = device.type == "cuda"

    def step() -> None:
        msm_train_step(
            step_model, optimizer, [eeg], lr=2.5e-4, grad_clip=0.8, autocast_dtype=autocast_dtype, device=device
        )

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    samples_per_s = batch * steps / elapsed
    ref_fp32 = reference_samples_per_s(cfg, batch, "fp32")
    ref_same = reference_samples_per_s(cfg, batch, precision)
    return {
        "name": "msm_train_step",
        "model": cfg.model_dump(),
        "params": params,
        "batch": batch,
        "precision": precision,
        "compile": compile_,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "steps": steps,
        "samples_per_s": round(samples_per_s, 2),
        "mfu": round(msm_train_flops_per_sample(cfg) * samples_per_s / PEAK_FLOPS, 4) if cuda else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None,
        "reference_device": REFERENCE_DEVICE,
        "ratio_to_reference": round(samples_per_s / ref_fp32, 3) if ref_fp32 else None,
        "ratio_to_same_precision_row": round(samples_per_s / ref_same, 3) if ref_same else None,
    }


def run_one(cfg: MSMConfig, batch: int, precision: str, args: argparse.Namespace, device: torch.device) -> None:
    """Measure and print one JSON line; out of memory prints the error and the suite goes on."""
    try:
        row = measure(cfg, batch, precision, args.steps, args.warmup, device, args.compile)
    except torch.OutOfMemoryError as err:
        row = {
            "name": "msm_train_step",
            "model": cfg.model_dump(),
            "batch": batch,
            "precision": precision,
            "error": f"out of memory: {str(err).splitlines()[0]}",
        }
    print(json.dumps(row), flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["large", "small", "tiny"], default="large")
    for flag, kind in (
        ("--embed-dim", int),
        ("--depth", int),
        ("--num-heads", int),
        ("--mlp-ratio", float),
        ("--decoder-embed-dim", int),
        ("--decoder-depth", int),
        ("--decoder-num-heads", int),
        ("--mask-ratio", float),
    ):
        p.add_argument(flag, type=kind, help="overrides the preset")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], help="default: bf16 (fp32 on CPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny preset, batch 8, 2 steps")
    p.add_argument("--suite", choices=["gpu"], help="gpu: large mlp 4 and 1 at batch 100/512, fp32 and bf16")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.batch, args.steps, args.warmup = "tiny", 8, 2, 1
        args.device = args.device or "cpu"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.suite == "gpu":
        for mlp_ratio, batch, precision in GPU_SUITE:
            run_one(MSMConfig(preset="large", mlp_ratio=mlp_ratio), batch, precision, args, device)
        return
    overrides = {k: v for k, v in vars(args).items() if k in MSMConfig.model_fields and v is not None}
    run_one(MSMConfig(**overrides), args.batch, args.precision, args, device)


if __name__ == "__main__":
    main()
