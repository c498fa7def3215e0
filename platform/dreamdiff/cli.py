"""`dreamdiff <stage> --config FILE [dotted.key=value ...]`: one entry point for every stage.

The sub-commands are the stage registry's (dreamdiff.config.stages): each loads its config, checks its locations and
calls its stage's runner. The `jobs/` drivers call `main` too.

Errors: `main` is the one place that turns a known failure (`dreamdiff.errors.DreamdiffError`, raised where a field,
a config or a file is read, and where a stage's training fails) into one stderr line,
`dreamdiff <stage>: error: <what, naming the field or file, and what to do>`, with exit status 2 for bad input and 1
for a failure of the stage's own work (`StageFailedError`, e.g. a training worker died). The traceback behind the
line is logged at DEBUG (logger `dreamdiff.cli`); with the environment variable `DREAMDIFF_DEBUG=1` it is also
printed to stderr below the line. Any other exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from dreamdiff.config import STAGES, dump_config, load_config
from dreamdiff.errors import DreamdiffError
from dreamdiff.locations import check_locations

log = logging.getLogger(__name__)

DEBUG_ENV = "DREAMDIFF_DEBUG"  # set to 1: print the traceback behind a one-line error too

# Ray Train's PlacementGroupCleaner asks the dashboard's State API, once a second, whether its Train controller
# still lives. A local Ray without the dashboard (the default here) cannot answer, so every trainer logs the same
# warning once a second for as long as it runs. The driver drops those lines (Ray reads the variable when it is
# imported). A worker-side log filter would need a runtime_env setup hook, which slows every worker's start.
QUIET_LOCAL_RAY = {"RAY_DEDUP_LOGS_SKIP_REGEX": "Failed to query Ray Train Controller actor state"}


def quiet_local_ray_logs() -> None:
    """Unless a cluster is named (RAY_ADDRESS) or the user set them, apply `QUIET_LOCAL_RAY` (before `import ray`)."""
    if not os.environ.get("RAY_ADDRESS"):
        for name, value in QUIET_LOCAL_RAY.items():
            os.environ.setdefault(name, value)


def _version() -> str:
    try:
        return version("dreamdiff")
    except PackageNotFoundError:  # run from a source tree that is not installed (e.g. Ray's py_modules)
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreamdiff",
        description="EEG -> image generation after DreamDiffusion (Bai et al., ECCV 2024), on Ray.",
        epilog="Override any config key: dreamdiff pretrain --config pretrain-demo.yaml model.depth=2",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
    from dreamdiff.reference import cli as reference_cli  # argparse only

    reference_cli.add_arguments(
        sub.add_parser("import-reference", help=reference_cli.HELP, description=reference_cli.DESCRIPTION)
    )
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
    if args.stage == "import-reference":  # a converter of files, not a stage with a config
        from dreamdiff.reference import cli as reference_cli

        try:
            return reference_cli.run(args)
        except DreamdiffError as err:
            return report_error(args.stage, err)
    stage = STAGES[args.stage]
    quiet_local_ray_logs()
    try:
        cfg = load_config(stage.name, args.config, [*args.overrides, *_demo_overrides(args)])
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        check_locations(stage.name, cfg)  # a URI where the stage cannot use one fails here, naming the field
        stage.run(cfg)
    except DreamdiffError as err:
        return report_error(args.stage, err)
    except KeyboardInterrupt:
        print(
            f"dreamdiff {args.stage}: interrupted; finished work is kept and a re-run resumes",
            file=sys.stderr,
        )
        return 130
    return 0


def report_error(stage: str, err: DreamdiffError) -> int:
    """Print `err` as one line (its traceback is logged at DEBUG, and printed when DREAMDIFF_DEBUG=1); return the
    exit status: 2 for bad input, 1 for a failure of the stage's own work."""
    message = " ".join(str(err).split())  # one line, whatever the message held
    log.debug("dreamdiff %s failed", stage, exc_info=err)
    print(f"dreamdiff {stage}: error: {message}", file=sys.stderr)
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(err, file=sys.stderr)
    return err.exit_code
