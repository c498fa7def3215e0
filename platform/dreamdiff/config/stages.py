"""The stage registry: each stage's name, config model, runner and help, in one place.

The CLI builds a sub-command per entry and dispatches to its runner; the loader validates a stage's config with
its model; the jobs/ drivers, the demo and the location checks all read the same table. A runner imports its
stage module when called, so that listing the stages (``dreamdiff --help``) loads no Ray, torch or diffusers code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dreamdiff.config.demo import DemoConfig
from dreamdiff.config.evaluate import EvaluateConfig
from dreamdiff.config.finetune import FinetuneConfig
from dreamdiff.config.generate import GenerateConfig
from dreamdiff.config.preprocess import PreprocessConfig
from dreamdiff.config.pretrain import PretrainConfig
from dreamdiff.config.serve import ServeConfig
from dreamdiff.config.sweep import SweepConfig
from dreamdiff.configbase import StrictModel


@dataclass(frozen=True)
class Stage:
    """One `dreamdiff <name>` command: its config model, the function that runs a validated config, its help."""

    name: str
    config: type[StrictModel]
    run: Callable[[Any], object]
    help: str
    description: str
    default_config: str  # a file of the repository's configs/ folder


def _preprocess(cfg: PreprocessConfig) -> object:
    from dreamdiff.data.preprocess import run

    return run(cfg)


def _pretrain(cfg: PretrainConfig) -> object:
    from dreamdiff.train.pretrain import run

    return run(cfg)


def _finetune(cfg: FinetuneConfig) -> object:
    from dreamdiff.train.finetune import run

    return run(cfg)


def _sweep(cfg: SweepConfig) -> object:
    from dreamdiff.tune.sweep import run

    return run(cfg)


def _serve(cfg: ServeConfig) -> object:
    from dreamdiff.serve.runner import run

    return run(cfg)


def _generate(cfg: GenerateConfig) -> object:
    from dreamdiff.serve.batch import run

    return run(cfg)


def _evaluate(cfg: EvaluateConfig) -> object:
    from dreamdiff.eval.evaluate import run

    return run(cfg)


def _demo(cfg: DemoConfig) -> object:
    from dreamdiff.demo import run

    return run(cfg)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "preprocess",
            PreprocessConfig,
            _preprocess,
            "raw EEG (MOABB, ImageNet-EEG, SynthEEG-Image) -> Parquet shards",
            "Stream (dataset, subject) read tasks through Ray Data: band-pass, resample, window to 512 "
            "samples, harmonise to 128 channels, normalise, and write Parquet shards plus manifest.json. "
            "Re-running skips what is done.",
            "preprocess-demo.yaml",
        ),
        Stage(
            "pretrain",
            PretrainConfig,
            _pretrain,
            "masked signal modeling (MSM) of the EEG encoder on Ray Train",
            "Pretrain the temporal MSM encoder on unlabeled shards with a TorchTrainer (DDP, bf16 on GPU), "
            "with checkpoints, resume and reconstruction plots.",
            "pretrain-demo.yaml",
        ),
        Stage(
            "finetune",
            FinetuneConfig,
            _finetune,
            "Stable Diffusion + CLIP alignment fine-tuning on paired EEG-image shards",
            "Condition Stable Diffusion on the EEG encoder and train encoder, conditioner and cross-attention "
            "with the epsilon loss plus the CLIP image-embedding alignment loss on a TorchTrainer (DDP, bf16 on "
            "GPU). VAE latents and CLIP image embeddings are precomputed once by Ray Data; checkpoints and resume; "
            "writes the generator checkpoint (generator/) and a preview grid (plots/preview.png).",
            "finetune-demo.yaml",
        ),
        Stage(
            "sweep",
            SweepConfig,
            _sweep,
            "Ray Tune sweep over mask ratio x encoder size, scored downstream",
            "Run one TorchTrainer per trial under ASHA; score each encoder with a linear probe on held-out "
            "labelled EEG, and write the results table (results.csv), a plot of score vs mask ratio and the best "
            "trial's config (best_pretrain.yaml, for `dreamdiff pretrain`). Re-running the same config resumes "
            "the sweep.",
            "sweep-demo.yaml",
        ),
        Stage(
            "serve",
            ServeConfig,
            _serve,
            "Ray Serve EEG-to-image endpoint (batched, autoscaled)",
            "Deploy the FastAPI ingress and the batching, autoscaled generator on Ray Serve, with the HTTP proxy "
            "on the configured host and port (127.0.0.1:8000 by default); print the URL and serve until Ctrl-C. "
            "`dreamdiff request EEG_FILE` talks to it.",
            "serve-demo.yaml",
        ),
        Stage(
            "generate",
            GenerateConfig,
            _generate,
            "batch EEG -> image generation over Parquet shards with Ray Data",
            "Read shards (paired or EEG-only; optionally some splits, max_eeg of them) with Ray Data and run the "
            "generator in an actor pool (one model load per actor, GPUs per actor from config); write num_images "
            "PNGs per EEG under images/ and an index (index.parquet, index.json: EEG id -> image paths, seed, "
            "sampler, steps, model). Seeds derive from the EEG id, so batching does not change an image; a re-run "
            "skips EEGs already done.",
            "generate-demo.yaml",
        ),
        Stage(
            "evaluate",
            EvaluateConfig,
            _evaluate,
            "the paper's n-way top-k and image metrics",
            "Generate images for held-out EEG and score them: n-way top-k with a pluggable classifier, CLIP "
            "similarity, SSIM/PCC, EEG->image retrieval, FID where asked; every figure records its split "
            "protocol. Writes results.json, report.html and generated/ under the output folder.",
            "evaluate-demo.yaml",
        ),
        Stage(
            "demo",
            DemoConfig,
            _demo,
            "every stage end-to-end on a laptop: tiny models, synthetic data, a report",
            "Start a local Ray in-process and run the stages on SynthEEG-Image and MOABB's FakeDataset with "
            "tiny models, no network and no GPU; leave a report under the run folder.",
            "demo.yaml",
        ),
    )
}
