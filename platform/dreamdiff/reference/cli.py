"""`dreamdiff import-reference {pretrain,generator} CHECKPOINT --out DIR`: the reference code's checkpoints in.

Only argparse at import time (the CLI builds every parser for --help); the importers load when they run.
"""

from __future__ import annotations

import argparse

SD15_CONFIGS = "runwayml/stable-diffusion-v1-5"  # whose component configs describe SD 1.5's single file
HELP = "import a DreamDiffusion reference checkpoint (pretraining or generation) as a dreamdiff folder"
DESCRIPTION = (
    "Read a checkpoint of the DreamDiffusion reference code without running anything in it, map every tensor onto "
    "dreamdiff's modules (or report it), infer the model sizes from the tensor shapes and its config, and write a "
    "folder the other stages accept, with import.json recording the source, its sha256 and the mapping. The "
    "imported model has `profile: reference`, which reproduces the reference's forward passes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    pretrain = kinds.add_parser(
        "pretrain",
        help="a pretraining checkpoint (MAEforEEG) -> an encoder_checkpoint / resume_from folder",
        description="Write msm.safetensors, config.yaml (the model section) and a step-0 training checkpoint, "
        "usable as finetune's encoder_checkpoint and as pretrain's resume_from.",
    )
    pretrain.add_argument("checkpoint", help="the reference's pretraining checkpoint (.pth)")
    pretrain.add_argument("--out", required=True, help="a new or empty folder")
    generator = kinds.add_parser(
        "generator",
        help="a generation checkpoint (eLDM) -> a generator folder for serve, generate and evaluate",
        description="Write a generator folder (generator.safetensors, generator.json) holding what the reference "
        "trained: the EEG encoder, the conditioner, the CLIP head, the time-conditioning layer and the UNet's "
        "cross-attention; every other UNet tensor is checked equal to the base model's.",
    )
    generator.add_argument("checkpoint", help="the reference's generation checkpoint (.pth)")
    generator.add_argument(
        "--base-model",
        required=True,
        help="the SD 1.5 it was trained from: a diffusers folder, a hub id, or SD's single .ckpt/.safetensors file",
    )
    generator.add_argument(
        "--base-config",
        default=SD15_CONFIGS,
        help="for a single-file base model: the diffusers folder or hub id whose component configs describe it "
        "(default: %(default)s)",
    )
    generator.add_argument("--out", required=True, help="a new or empty folder")


def run(args: argparse.Namespace) -> int:
    if args.kind == "generator":
        from dreamdiff.reference.import_generator import import_generator

        record = import_generator(args.checkpoint, args.base_model, args.out, args.base_config)
    else:
        from dreamdiff.reference.import_pretrain import import_pretrain

        record = import_pretrain(args.checkpoint, args.out)
    if record.get("skipped"):
        print(
            f"import-reference: {args.out} already holds this checkpoint's import, skipped "
            f"(sha256 {record['source']['sha256'][:16]})"
        )
        return 0
    counts = ", ".join(f"{n} {status}" for status, n in sorted(record["counts"].items()))
    unused = sorted({entry.get("why", "") for entry in record["tensors"].values() if entry["status"] == "unused"})
    print(f"import-reference: {len(record['tensors'])} tensors: {counts}")
    for why in unused:
        print(f"  unused: {why}")
    model = record["model"] if args.kind == "pretrain" else record["spec"]["msm"]
    print(
        f"import-reference: MSM embed_dim {model['embed_dim']}, depth {model['depth']}, heads {model['num_heads']}, "
        f"mlp_ratio {model['mlp_ratio']}, mask_ratio {model['mask_ratio']}, profile reference"
    )
    print(f"import-reference: wrote {args.out} (import.json has the mapping of every tensor)")
    if args.kind == "generator":
        print(f"  use it: dreamdiff serve ... checkpoint={args.out}; dreamdiff generate ... checkpoint={args.out}")
        return 0
    overrides = " ".join(f"model.{k}={v}" for k, v in model.items() if v is not None and k != "preset")
    print(f"  fine-tune from it: dreamdiff finetune ... encoder_checkpoint={args.out} profile=reference")
    print(f"  continue pretraining: dreamdiff pretrain ... resume_from={args.out} {overrides}")
    return 0
