"""Latency and throughput of the EEG -> image endpoint: a bounded load test printing one JSON line.

Two modes measure the same batched generator path:

- `--mode http` (default): a real local Ray Serve app (HTTP proxy on 127.0.0.1, a free port) of the serve config,
  driven by N requests with C in flight through the Python client (`serve_load.run_load`): HTTP, the
  ingress's checks, `@serve.batch` and the generator replica.
- `--mode inprocess`: no Ray at all, for the GPU benchmark machine, which has none installed. C client tasks
  each parse and harmonise a .npy request with the ingress's functions (`dreamdiff.serve.api`) and hand it to
  an asyncio batcher that gathers up to `batching.max_batch_size` items, waiting at most
  `batching.batch_wait_timeout_s`, and runs `GenerationEngine.run_batch` in a thread: what the generator
  deployment's `@serve.batch` method wraps. Latencies leave out HTTP and Ray's routing, nothing else.

Models: `--model tiny` (a random 8 px generator, CPU smoke), `--model sd15-shape` (random weights in SD 1.5's
UNet/VAE shapes under the large MSM encoder: the paper's compute, no download), or `--checkpoint DIR` (a real
generator folder). Sampling settings and batching come from the serve config (`--config`, default
configs/serve-demo.yaml for tiny, configs/serve-gpu.yaml otherwise) plus dotted overrides.

    python benchmarks/serve.py --model tiny                                   # CPU, through Ray Serve
    python benchmarks/serve.py --model tiny --mode inprocess
    python benchmarks/serve.py --model sd15-shape --mode inprocess            # GPU machine (no Ray there)
    python benchmarks/serve.py --model sd15-shape --mode inprocess defaults.num_images=1 batching.max_batch_size=16
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from serve_load import latency_stats, run_load

from dreamdiff.config import ServeConfig, apply_overrides, read_yaml, resolve_config_path, validate_config
from dreamdiff.models.conditioner import ConditionerConfig
from dreamdiff.models.diffusion import build_tiny_sd, load_sd_components
from dreamdiff.models.diffusion_config import TinyDiffusionConfig
from dreamdiff.models.eeg_diffusion import GeneratorSpec, build_eeg_diffusion
from dreamdiff.models.generator import save_generator
from dreamdiff.models.msm import MSMConfig
from dreamdiff.serve.api import GenerationItem, parse_npy, resolve
from dreamdiff.serve.engine import GenerationEngine

SHAPES: dict[str, tuple[TinyDiffusionConfig, MSMConfig, ConditionerConfig]] = {
    "tiny": (
        TinyDiffusionConfig(
            sample_size=8, block_out_channels=[32, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]
        ),
        MSMConfig(preset="tiny"),
        ConditionerConfig(context_dim=64, clip_dim=32),
    ),
    "sd15-shape": (  # SD 1.5: 512 px, 64 x 64 x 4 latents, UNet 320-640-1280-1280 (860 M), context 77 x 768
        TinyDiffusionConfig(
            sample_size=512,
            block_out_channels=[320, 640, 1280, 1280],
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            use_vae=True,
            vae_block_out_channels=[128, 256, 512, 512],
        ),
        MSMConfig(preset="large"),
        ConditionerConfig(context_dim=768, clip_dim=768),
    ),
}


def random_checkpoint(shape: str, folder: Path) -> Path:
    """A generator of random weights in the given shape, saved like a fine-tuned one."""
    torch.manual_seed(0)
    sd_cfg, msm, conditioner = SHAPES[shape]
    sd = build_tiny_sd(sd_cfg, folder / "sd")
    spec = GeneratorSpec(
        base_model=str(sd), msm=msm, conditioner=conditioner, trainable="cross_attention", image_size=sd_cfg.sample_size
    )
    return save_generator(build_eeg_diffusion(spec, load_sd_components(str(sd))), spec, folder / "generator")


def device_name(cfg: ServeConfig) -> str:
    if cfg.num_gpus > 0 and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def request_bytes(eeg: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, eeg)
    return buffer.getvalue()


async def _inprocess(engine: GenerationEngine, body: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    """C clients, one batcher with @serve.batch's rule (up to max_batch_size, at most batch_wait_timeout_s)."""
    cfg = engine.cfg.batching
    queue: asyncio.Queue[tuple[GenerationItem, asyncio.Future]] = asyncio.Queue()
    latencies: list[float] = []
    batches: list[int] = []
    errors = 0
    issued = iter(range(requests))

    async def batcher() -> None:
        while True:
            batch = [await queue.get()]
            deadline = time.perf_counter() + cfg.batch_wait_timeout_s
            while len(batch) < cfg.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:  # Python 3.10: not the builtin TimeoutError
                    break
            answers = await asyncio.to_thread(engine.run_batch, [item for item, _ in batch])
            batches.append(len(batch))
            for (_, future), answer in zip(batch, answers, strict=True):
                future.set_result(answer)

    async def client() -> None:
        nonlocal errors
        for i in issued:
            tick = time.perf_counter()
            item = await asyncio.to_thread(
                lambda i=i: resolve(*parse_npy(body, {"seed": str(i)}), engine.cfg, engine.shape)
            )
            future = asyncio.get_running_loop().create_future()
            await queue.put((item, future))
            answer = await future
            if "error" in answer:
                errors += 1
            else:
                latencies.append(time.perf_counter() - tick)

    runner = asyncio.create_task(batcher())
    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    runner.cancel()
    images = len(latencies) * engine.cfg.defaults.num_images
    return {
        "requests": requests,
        "concurrency": concurrency,
        "errors": errors,
        "wall_s": round(wall, 3),
        **latency_stats(latencies, wall, len(latencies)),
        "images_per_s": round(images / wall, 2),
        "batch_size_mean": round(float(np.mean(batches)), 2),
        "batch_size_max": max(batches),
    }


def run_inprocess(cfg: ServeConfig, eeg: np.ndarray, requests: int, concurrency: int) -> dict[str, Any]:
    engine = GenerationEngine.load(cfg)
    body = request_bytes(eeg)
    warm = resolve(*parse_npy(body, {"seed": "0"}), cfg, engine.shape)
    engine.run_batch([warm] * cfg.batching.max_batch_size)  # first-call costs (kernels, allocator) left out
    return asyncio.run(_inprocess(engine, body, requests, concurrency))


def run_http(cfg: ServeConfig, eeg: np.ndarray, requests: int, concurrency: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from dreamdiff.serve.client import ServeClient
    from dreamdiff.serve.runner import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = cfg.model_copy(update={"port": port, "host": "127.0.0.1"})
    tick = time.perf_counter()
    url = start(cfg)
    started = time.perf_counter() - tick
    try:
        client = ServeClient(url, timeout=600, pool=concurrency)
        client.generate(eeg, seed=0)  # warm
        stats = run_load(client, eeg, requests=requests, concurrency=concurrency)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {**stats, "serve_start_s": round(started, 1)}


def load_serve_config(name: str, overrides: list[str], checkpoint: str) -> ServeConfig:
    path = resolve_config_path(name)
    data = apply_overrides(read_yaml(path), [*overrides, f"checkpoint={checkpoint}"])
    return cast(ServeConfig, validate_config("serve", data, str(path), overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["http", "inprocess"], default="http")
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny", help="random weights of this shape")
    parser.add_argument("--checkpoint", help="a real generator folder instead of --model")
    parser.add_argument("--config", help="serve YAML (default: serve-demo for tiny, else serve-gpu)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted serve config overrides")
    args = parser.parse_args(argv)
    if args.mode == "http":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="ddserve-") as scratch:
        checkpoint = args.checkpoint or str(random_checkpoint(args.model, Path(scratch)))
        tiny = args.checkpoint is None and args.model == "tiny"
        cfg = load_serve_config(args.config or ("serve-demo" if tiny else "serve-gpu"), args.overrides, checkpoint)
        cfg.auth.enabled = False  # the benchmark measures generation, not a token check
        spec = json.loads((Path(checkpoint) / "generator.json").read_text())["spec"]["msm"]
        eeg = np.random.default_rng(0).standard_normal((spec["num_channels"], spec["num_samples"])).astype(np.float32)
        run = run_http if args.mode == "http" else run_inprocess
        stats = run(cfg, eeg, args.requests, args.concurrency)
    print(
        json.dumps(
            {
                "name": "serve",
                "mode": args.mode,
                "model": args.checkpoint or args.model,
                "device": device_name(cfg),
                **stats,
                "config": {
                    **cfg.defaults.model_dump(),
                    **cfg.batching.model_dump(),
                    "precision": cfg.precision if cfg.num_gpus > 0 else "fp32",
                    "num_gpus": cfg.num_gpus,
                    "replicas": [cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas],
                },
            }
        ),
        flush=True,
    )
    return 0 if stats["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
