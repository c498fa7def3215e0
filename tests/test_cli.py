"""The `dreamdiff` command: help for every stage, one-line errors, resolved configs."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from dreamdiff.cli import build_parser, main
from dreamdiff.config import STAGES, load_config
from dreamdiff.configbase import StrictModel


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dreamdiff", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_stage() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for stage in STAGES:
        assert stage in out.stdout


@pytest.mark.parametrize("name", list(STAGES))
def test_the_registry_drives_the_cli(name: str) -> None:
    """Each registered stage is a sub-command whose default config loads as the stage's model, run by a function."""
    stage = STAGES[name]
    args = build_parser().parse_args([name])
    assert args.stage == name and args.config == stage.default_config
    assert stage.name == name and issubclass(stage.config, StrictModel)
    assert isinstance(load_config(name, stage.default_config), stage.config)
    assert inspect.isfunction(stage.run) and list(inspect.signature(stage.run).parameters) == ["cfg"]


def test_version_through_python_m() -> None:
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"dreamdiff {version('dreamdiff')}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_has_help(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([stage, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text and "key=value" in text


def test_print_config_resolves_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--config", "pretrain-demo.yaml", "--print-config", "model.depth=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["depth"] == 3 and resolved["model"]["preset"] == "tiny"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pretrain", "--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["pretrain", "--config", "pretrain-demo.yaml", "optim.lr=fast"], "optim.lr"),
        (
            ["pretrain", "--config", "pretrain-demo.yaml", "optim.learningrate=1"],
            "optim.learningrate: unknown key",
        ),
    ],
)
def test_bad_config_exits_nonzero_with_one_line_and_no_traceback(args: list[str], expected: str) -> None:
    out = _run(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert expected in lines[0] and "Traceback" not in out.stderr


def test_unknown_stage_is_an_argparse_error() -> None:
    out = _run("train-everything")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("dreamdiff")
    assert script.exists(), "pip install -e . should install the `dreamdiff` console script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0


def test_a_local_ray_driver_drops_the_placement_group_cleaners_warnings() -> None:
    """`quiet_local_ray_logs` before `import ray`: the cleaner's State API warning, logged by a worker, never reaches
    the driver's output; the worker's other lines do."""
    code = """
import logging
from dreamdiff.cli import quiet_local_ray_logs
quiet_local_ray_logs()
import ray
from dreamdiff.ray_init import start_local_ray
start_local_ray(num_cpus=1, include_dashboard=False, configure_logging=False)

@ray.remote
def warn() -> None:
    log = logging.getLogger("cleaner")
    log.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
    log.warning("a warning that stays")

ray.get(warn.remote())
import time; time.sleep(2)  # the log monitor forwards worker lines about once a second
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS_SKIP_REGEX")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-2000:]
    assert "a warning that stays" in output
    assert "Failed to query Ray Train Controller" not in output
