"""`dreamdiff request EEG_FILE --url URL --out DIR [...]`: one EEG file to a running endpoint, PNGs to a folder.

Only argparse at import time (the CLI builds every parser for --help); the client is imported when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "send an EEG file (.npy or .json) to a running endpoint and save the PNGs"
DESCRIPTION = (
    "POST one EEG ([channels, samples]) to <url>/v1/generate and write <out>/<file stem>_seed<seed>_<j>.png plus "
    "<out>/<file stem>.json (seed, model, sampler, timing). The bearer token comes from --token-file or the "
    "DREAMDIFF_SERVE_TOKEN environment variable."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("eeg", help="EEG file: .npy (channels x samples) or .json (nested list, or {'eeg': ...})")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="endpoint (default: %(default)s)")
    parser.add_argument("--out", default=".", help="folder for the PNGs and the metadata (default: .)")
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--sampler", choices=["dpm++", "ddim", "plms"])
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--sfreq", type=float, help="sampling rate of the EEG (Hz), when not the model's")
    parser.add_argument("--token-file", help="file holding the bearer token")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from dreamdiff.errors import DreamdiffError
    from dreamdiff.serve.client import ServeClient, load_eeg, read_token

    try:
        client = ServeClient(args.url, token=read_token(args.token_file), timeout=args.timeout)
        result = client.generate(
            load_eeg(args.eeg),
            num_images=args.num_images,
            seed=args.seed,
            steps=args.steps,
            sampler=args.sampler,
            guidance_scale=args.guidance_scale,
            sfreq=args.sfreq,
        )
        paths = result.save(args.out, Path(args.eeg).stem)
    except DreamdiffError as err:
        print(f"dreamdiff request: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # connection refused, timeouts (requests' errors derive from OSError)
        print(f"dreamdiff request: error: could not reach {args.url}: {err}", file=sys.stderr)
        return 2
    meta = result.metadata
    print(
        f"dreamdiff request: {len(paths)} image(s) in {args.out} (seed {meta['seed']}, {meta['sampler']} x "
        f"{meta['steps']}, model {meta['model']['id']}, {meta['time_s']['total']} s)"
    )
    for path in paths:
        print(path)
    return 0
