"""The same app from the command lines, each in its own process with its own local Ray: `dreamdiff serve` (Ctrl-C
stops it) and `serve run` of a `serve build`-style YAML shaped like configs/serve-app.yaml; and the benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from dreamdiff.config import REPO_CONFIGS
from dreamdiff.serve.client import ServeClient

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _interruptible() -> None:
    """Child processes take Ctrl-C as from a terminal: a test run started in the background ignores SIGINT, and
    its children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Command:
    """A command with a fresh Ray of its own; its merged output collected line by line by a thread."""

    def __init__(self, argv: list[str], cwd: Path, tmp: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env={**env, "TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_interruptible,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, check: Callable[[], bool], what: str, limit_s: float = 240) -> None:
        deadline = time.monotonic() + limit_s
        while not check():
            if self.proc.poll() is not None:
                pytest.fail(f"exited ({self.proc.returncode}) before {what}:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} in {limit_s} s:\n{self.output[-3000:]}")
            time.sleep(0.5)

    def stop(self, limit_s: float = 240) -> int:
        """Ctrl-C, then the exit status (killed if not stopped in time: Serve and Ray took up to 110 s here)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        return self.proc.returncode


@contextmanager
def _command(argv: list[str], cwd: Path) -> Iterator[Command]:
    """Short TMPDIR (Ray's socket paths must be short); always stopped and reaped."""
    with tempfile.TemporaryDirectory(prefix="ddsv-") as tmp:
        command = Command(argv, cwd, tmp)
        try:
            yield command
        finally:
            command.stop()


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:  # not listening yet, or the proxy waits for the app
        return False


@pytest.mark.slow
def test_dreamdiff_serve_runs_until_ctrl_c(
    tiny_checkpoint: Path, free_port: int, make_eeg: Callable[..., np.ndarray], tmp_path: Path
) -> None:
    argv = [str(BIN / "dreamdiff"), "serve", "--config", "serve-demo", f"checkpoint={tiny_checkpoint}"]
    url = f"http://127.0.0.1:{free_port}"
    with _command([*argv, f"port={free_port}", "defaults.steps=2", "ray.num_cpus=2"], tmp_path) as command:
        command.wait_for(lambda: f"dreamdiff serve: {url}/v1/generate" in command.output, "URL printed")
        result = ServeClient(url).generate(make_eeg(), num_images=2, seed=1)
        assert len(result.images) == 2 and result.metadata["steps"] == 2
        assert command.stop() == 0, command.output[-3000:]
    assert "dreamdiff serve: stopped" in command.output


@pytest.mark.slow
def test_serve_run_of_a_serve_app_yaml(
    tiny_checkpoint: Path, free_port: int, make_eeg: Callable[..., np.ndarray], tmp_path: Path
) -> None:
    """configs/serve-app.yaml with the tiny checkpoint on CPU and this test's port and token: `serve run` it."""
    config = yaml.safe_load((REPO_CONFIGS / "serve-app.yaml").read_text())
    config["http_options"]["port"] = free_port
    args = config["applications"][0]["args"]
    (tmp_path / "token").write_text("yaml-token")
    args.update(checkpoint=str(tiny_checkpoint), num_gpus=0, num_cpus=0.5, ingress_num_cpus=0.5)
    args["auth"]["token_file"] = str(tmp_path / "token")
    args["defaults"]["steps"] = 2
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port}"
    with _command([str(BIN / "serve"), "run", str(tmp_path / "app.yaml")], tmp_path) as command:
        command.wait_for(lambda: _healthy(url), "answer from /healthz")
        assert requests.get(f"{url}/v1/model", timeout=30).status_code == 401
        result = ServeClient(url, token="yaml-token").generate(make_eeg(), seed=1)
        assert len(result.images) == 5 and result.metadata["sampler"] == "dpm++"  # serve-gpu's defaults


@pytest.mark.slow
def test_benchmark_inprocess_mode_needs_no_ray(tmp_path: Path) -> None:
    shadow = tmp_path / "no-ray" / "ray"  # an importable `ray` that fails, as on the GPU machine without Ray
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ray is not installed on this machine')\n")
    argv = ["--mode", "inprocess", "--requests", "24", "--concurrency", "8", "defaults.steps=2"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), *argv],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(shadow.parent)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout)  # stdout is the one JSON line
    assert row["mode"] == "inprocess" and row["errors"] == 0 and row["requests"] == 24
    assert row["p95_s"] >= row["p50_s"] > 0 and row["requests_per_s"] > 0 and row["batch_size_max"] > 1
    assert row["device"].startswith("cpu") and row["config"]["steps"] == 2
