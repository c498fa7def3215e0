"""`dreamdiff <stage> --config FILE [dotted.key=value ...]`: one entry point for every stage.

The CLI and the `jobs/` drivers call the same `run` functions; this file only parses
arguments, loads the config and reports errors as one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dreamdiff.errors import DreamdiffError


@dataclass(frozen=True)
class Stage:
    help: str
    description: str
    default_config: str
    runner: str  # "module:function" taking the validated config


# Ray Train's PlacementGroupCleaner (Ray 2.60) asks the dashboard's State API once a second whether its Train
# controller still lives. A local Ray without the dashboard (the default here) cannot answer, so every trainer
# warns once a second: about 280 identical lines in one `dreamdiff demo`. The driver drops them (Ray reads the
# variable when it is imported). A worker-side log filter would need a runtime_env setup hook, and that costs
# every worker process seconds of start-up: with it, 3 actors took 3.1 s to start here against 1.0 s.
QUIET_LOCAL_RAY = {"RAY_DEDUP_LOGS_SKIP_REGEX": "Failed to query Ray Train Controller actor state"}


def quiet_local_ray_logs() -> None:
    """Unless a cluster is named (RAY_ADDRESS) or the user set them, apply `QUIET_LOCAL_RAY` (before `import ray`)."""
    if not os.environ.get("RAY_ADDRESS"):
        for name, value in QUIET_LOCAL_RAY.items():
            os.environ.setdefault(name, value)


STAGES: dict[str, Stage] = {
    "preprocess": Stage(
        "raw EEG (MOABB, ImageNet-EEG, SynthEEG-Image) -> Parquet shards",
        "Stream (dataset, subject) read tasks through Ray Data: band-pass, resample, window to 512 "
        "samples, harmonise to 128 channels, normalise, and write Parquet shards plus manifest.json. "
        "Re-running skips what is done.",
        "preprocess-demo.yaml",
        "dreamdiff.data.preprocess:run",
    ),
    "pretrain": Stage(
        "masked signal modeling (MSM) of the EEG encoder on Ray Train",
        "Pretrain the temporal MSM encoder on unlabeled shards with a TorchTrainer (DDP, bf16 on GPU), "
        "with checkpoints, resume and reconstruction plots.",
        "pretrain-demo.yaml",
        "dreamdiff.train.pretrain:run",
    ),
    "finetune": Stage(
        "Stable Diffusion + CLIP alignment fine-tuning on paired EEG-image shards",
        "Condition Stable Diffusion on the EEG encoder and train encoder, conditioner and cross-attention "
        "with the epsilon loss plus the CLIP image-embedding alignment loss on a TorchTrainer (DDP, bf16 on GPU). "
        "VAE latents and CLIP image embeddings are precomputed once by Ray Data; checkpoints and resume; writes "
        "the generator checkpoint (generator/) and a preview grid (plots/preview.png).",
        "finetune-demo.yaml",
        "dreamdiff.train.finetune:run",
    ),
    "sweep": Stage(
        "Ray Tune sweep over mask ratio x encoder size, scored downstream",
        "Run one TorchTrainer per trial under ASHA; score each encoder with a linear probe on held-out labelled "
        "EEG, and write the results table (results.csv), a plot of score vs mask ratio and the best trial's config "
        "(best_pretrain.yaml, for `dreamdiff pretrain`). Re-running the same config resumes the sweep.",
        "sweep-demo.yaml",
        "dreamdiff.tune.sweep:run",
    ),
    "serve": Stage(
        "Ray Serve EEG-to-image endpoint (batched, autoscaled)",
        "Deploy the FastAPI ingress and the batching, autoscaled generator on Ray Serve, with the HTTP proxy on "
        "the configured host and port (127.0.0.1:8000 by default); print the URL and serve until Ctrl-C. "
        "`dreamdiff request EEG_FILE` talks to it.",
        "serve-demo.yaml",
        "dreamdiff.serve.runner:run",
    ),
    "generate": Stage(
        "batch EEG -> image generation over Parquet shards with Ray Data",
        "Read shards (paired or EEG-only; optionally some splits, max_eeg of them) with Ray Data and run the "
        "generator in an actor pool (one model load per actor, GPUs per actor from config); write num_images PNGs "
        "per EEG under images/ and an index (index.parquet, index.json: EEG id -> image paths, seed, sampler, "
        "steps, model). Seeds derive from the EEG id, so batching does not change an image; a re-run skips EEGs "
        "already done.",
        "generate-demo.yaml",
        "dreamdiff.serve.batch:run",
    ),
    "evaluate": Stage(
        "the paper's n-way top-k and image metrics",
        "Generate images for held-out EEG and score them: n-way top-k with a pluggable classifier, CLIP "
        "similarity, SSIM/PCC, EEG->image retrieval, FID where asked; every figure records its split protocol. "
        "Writes results.json, report.html and generated/ under the output folder.",
        "evaluate-demo.yaml",
        "dreamdiff.eval.evaluate:run",
    ),
    "demo": Stage(
        "every stage end-to-end on a laptop: tiny models, synthetic data, a report",
        "Start a local Ray in-process and run the stages on SynthEEG-Image and MOABB's FakeDataset with "
        "tiny models, no network and no GPU; leave a report under the run folder.",
        "demo.yaml",
        "dreamdiff.demo:run",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreamdiff",
        description="EEG -> image generation after DreamDiffusion (Bai et al., ECCV 2024), on Ray.",
        epilog="Override any config key: dreamdiff pretrain --config pretrain-demo.yaml model.depth=2",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        cmd = sub.add_parser(name, help=stage.help, description=stage.description)
        cmd.add_argument(
            "--config",
            default=stage.default_config,
            help=f"YAML file, or a name in the repository's configs/ (default: {stage.default_config})",
        )
        cmd.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        if name == "demo":
            cmd.add_argument("--out", help="run folder (default: the config's output)")
            cmd.add_argument("--quick", action="store_true", help="the shortest run that still shows every stage")
            cmd.add_argument(
                "--ablations", action="store_true", help="also the paper's ablations: no pretraining, no CLIP, neither"
            )
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    from dreamdiff.serve import request_cli  # argparse only

    request_cli.add_arguments(sub.add_parser("request", help=request_cli.HELP, description=request_cli.DESCRIPTION))
    return parser


def _demo_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if getattr(args, "out", None):
        extra.append(f"output={args.out}")
    if getattr(args, "quick", False):
        extra.append("quick=true")
    if getattr(args, "ablations", False):
        extra.append("ablations=true")
    return extra


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage == "request":  # a client of `dreamdiff serve`, not a stage with a config
        from dreamdiff.serve import request_cli

        return request_cli.run(args)
    stage = STAGES[args.stage]
    quiet_local_ray_logs()
    from dreamdiff.config import dump_config, load_config  # heavy imports only after --help
    from dreamdiff.locations import check_locations

    try:
        cfg = load_config(args.stage, args.config, [*args.overrides, *_demo_overrides(args)])
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        check_locations(args.stage, cfg)  # a URI where the stage cannot use one fails here, naming the field
        module, _, func = stage.runner.partition(":")
        runner: Callable[..., object] = getattr(importlib.import_module(module), func)
        runner(cfg)
    except DreamdiffError as err:
        print(f"dreamdiff {args.stage}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"dreamdiff {args.stage}: interrupted; finished work is kept and a re-run resumes",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
