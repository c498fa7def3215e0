"""The generator side of the endpoint without Ray: load the model once, sample a batch of requests.

`GenerationEngine.run_batch` is what the Serve deployment's `@serve.batch` method runs (in a thread, so that the
next batch fills while this one samples); benchmarks/serve.py calls it directly where Ray is not installed.
Requests with the same settings (num_images, steps, sampler, guidance) are sampled in ONE `Generator.generate`
call; each keeps its own seed, and an image depends on its EEG's seed and index only, so batching never changes it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamdiff.config import ServeConfig
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.generator import SPEC_FILE, Generator, inference_dtype, model_id
from dreamdiff.models.sampling import torch_compile_mode
from dreamdiff.serve.api import GenerationItem, ModelInfo, ModelRef, ModelShape

log = logging.getLogger(__name__)


class GenerationEngine:
    """One loaded Generator and the serve config it answers by."""

    def __init__(self, generator: Generator, cfg: ServeConfig, info: ModelInfo) -> None:
        self.generator = generator
        self.cfg = cfg
        self.info = info
        self.failure: BaseException | None = None  # a device error: the replica reports unhealthy from then on

    @classmethod
    def load(cls, cfg: ServeConfig) -> GenerationEngine:
        if cfg.num_gpus > 0 and not torch.cuda.is_available():
            raise DreamdiffError(f"num_gpus is {cfg.num_gpus} but torch sees no CUDA device on this replica")
        device = torch.device("cuda" if cfg.num_gpus > 0 else "cpu")
        generator = Generator.load(cfg.checkpoint, device, dtype=inference_dtype(device, cfg.precision))
        if cfg.compile:  # compile now, on one request of the default size, not on the first user's request
            began = time.perf_counter()
            shape = (1, generator.spec.msm.num_channels, generator.spec.msm.num_samples)
            generator.compile(torch_compile_mode(cfg.compile))
            generator.generate(torch.zeros(shape), num_images=cfg.defaults.num_images, steps=1, seed=0)
            log.info("compiled the generator in %.0f s", time.perf_counter() - began)
        return cls(generator, cfg, _model_info(generator, cfg, str(device)))

    @property
    def shape(self) -> ModelShape:
        return self.info.shape()

    def run_batch(self, items: list[GenerationItem]) -> list[dict[str, Any]]:
        """Sample every item; one answer per item, in order: {"images": uint8 [n, H, W, 3], "batch_size",
        "fused", "sampling_s"} or {"error", "field"} (a refusal of the generator for that item's group)."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.key(), []).append(i)
        answers: list[dict[str, Any]] = [{} for _ in items]
        for members in groups.values():
            for i, answer in zip(members, self._run_group([items[i] for i in members]), strict=True):
                answers[i] = {**answer, "batch_size": len(items)}
        return answers

    def _run_group(self, group: list[GenerationItem]) -> list[dict[str, Any]]:
        first = group[0]
        tick = time.perf_counter()
        try:
            images = self.generator.generate(
                np.stack([g.eeg for g in group]),
                num_images=first.num_images,
                steps=first.steps,
                sampler=first.sampler,
                guidance_scale=first.guidance_scale,
                seed=[g.seed for g in group],
                channel_mask=np.stack([g.channel_mask for g in group]),
            )
        except DreamdiffError as err:  # a refusal the ingress did not foresee: the request's fault, not the replica's
            return [{"error": str(err), "field": None} for _ in group]
        except RuntimeError as err:
            if self.generator.device.type == "cuda":
                self.failure = err
            raise
        took = round(time.perf_counter() - tick, 4)
        return [{"images": images[k], "fused": len(group), "sampling_s": took} for k in range(len(group))]

    def check_health(self) -> None:
        """Raise if this replica should be replaced (a device error in an earlier batch, a lost CUDA context)."""
        if self.failure is not None:
            raise RuntimeError(f"generator replica failed earlier: {self.failure}")
        if self.generator.device.type == "cuda":
            torch.cuda.synchronize(self.generator.device)


def _model_info(generator: Generator, cfg: ServeConfig, device: str) -> ModelInfo:
    folder = Path(cfg.checkpoint)
    meta = json.loads((folder / SPEC_FILE).read_text())
    spec = generator.spec
    return ModelInfo(
        model=ModelRef(id=model_id(folder), checkpoint=str(folder), base_model=spec.base_model),
        spec=spec.model_dump(mode="json"),
        info=meta.get("info", {}),
        image_size=spec.image_size,
        eeg_shape=[spec.msm.num_channels, spec.msm.num_samples],
        guidance=generator.model.conditioner.null is not None,
        device=device,
        defaults=cfg.defaults.model_dump(mode="json"),
        limits=cfg.limits.model_dump(mode="json"),
        eeg=cfg.eeg.model_dump(mode="json"),
        batching=cfg.batching.model_dump(mode="json"),
    )
