"""The same app from the command lines, each in its own process with its own local Ray: `dreamdiff serve` (SIGTERM
or Ctrl-C stops it) and `serve run` of a `serve build`-style YAML shaped like configs/serve-app.yaml; and the
benchmark. Also the warning `dreamdiff serve` gives before it starts an HTTP proxy open to the network with auth off."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import yaml

from dreamdiff.config import REPO_CONFIGS, ServeConfig
from dreamdiff.errors import DreamdiffError
from dreamdiff.serve.client import ServeClient
from dreamdiff.serve.runner import STOP_SIGNALS, _interrupt, _own_stop_signals, exposure_warning, start

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
            start_new_session=True,  # its own process group, which its local Ray's processes join
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

    def stop(self, limit_s: float = 240, signum: int = signal.SIGINT) -> int:
        """Ctrl-C (or `signum`), then the exit status (killed if not stopped in time: Serve and Ray can be slow to
        stop on a busy machine)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        return self.proc.returncode


@contextmanager
def _command(argv: list[str], cwd: Path) -> Iterator[Command]:
    """Short TMPDIR (Ray's socket paths must be short); always stopped and reaped, and whatever is left of its
    process group (its local Ray's processes) killed."""
    with tempfile.TemporaryDirectory(prefix="ddsv-") as tmp:
        command = Command(argv, cwd, tmp)
        try:
            yield command
        finally:
            command.stop()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(command.proc.pid, signal.SIGKILL)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:  # not listening yet, or the proxy waits for the app
        return False


@pytest.mark.slow
def test_dreamdiff_serve_answers_until_sigterm(
    tiny_checkpoint: Path, free_port: int, make_eeg: Callable[..., np.ndarray], tmp_path: Path
) -> None:
    """`dreamdiff serve` prints its URL and answers; SIGTERM (`ray job stop`, a pod's shutdown) takes Ctrl-C's path:
    the app is deleted, "stopped" printed, exit status 0, and the process's own local Ray goes with it. `ray.init`
    installs a SIGTERM handler of its own (exit at once, or drain and kill the local node), so `dreamdiff serve`
    installs its handlers again once Ray is up (Ctrl-C's: `test_ctrl_c_and_sigterm_share_the_stop_path`)."""
    argv = [str(BIN / "dreamdiff"), "serve", "--config", "serve-demo", f"checkpoint={tiny_checkpoint}"]
    url = f"http://127.0.0.1:{free_port}"
    ray_processes: list[psutil.Process] = []
    with _command([*argv, f"port={free_port}", "defaults.steps=2", "ray.num_cpus=2"], tmp_path) as command:
        try:
            command.wait_for(lambda: f"dreamdiff serve: {url}/v1/generate" in command.output, "URL printed")
            result = ServeClient(url).generate(make_eeg(), num_images=2, seed=1)
            assert len(result.images) == 2 and result.metadata["steps"] == 2
            ray_processes = psutil.Process(command.proc.pid).children(recursive=True)
            assert ray_processes, "no local Ray processes under `dreamdiff serve`"
            tick = time.monotonic()
            status = command.stop(limit_s=STOP_LIMIT_S, signum=signal.SIGTERM)
            assert time.monotonic() - tick < STOP_LIMIT_S, f"not stopped in {STOP_LIMIT_S} s:\n{command.output[-3000:]}"
            assert status == 0, command.output[-3000:]
            assert "dreamdiff serve: deleted the application" in command.output, command.output[-3000:]
            assert "dreamdiff serve: stopped" in command.output
            assert not _listening(free_port), "the Serve proxy still answers after the driver stopped"
            _, alive = psutil.wait_procs(ray_processes, timeout=30)
            assert not alive, f"Ray processes outlived `dreamdiff serve`: {[p.pid for p in alive]}"
        finally:
            for proc in ray_processes:  # only the processes this test's command started
                with contextlib.suppress(psutil.Error):
                    proc.kill()


STOP_LIMIT_S = 60


def test_ctrl_c_and_sigterm_share_the_stop_path() -> None:
    """Both signals raise KeyboardInterrupt, which `run` turns into deleting the app; one ignored when the process
    started (`nohup`, a background job's SIGINT) stays ignored."""
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _own_stop_signals()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is _interrupt
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _own_stop_signals()
        assert signal.getsignal(signal.SIGINT) is _interrupt
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


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


@pytest.mark.parametrize(
    ("host", "auth", "warned"),
    [
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("10.1.2.3", False, True),
        ("serve.example.com", False, True),  # a name may resolve to any interface
        ("0.0.0.0", True, False),
        ("127.0.0.1", False, False),
        ("127.0.0.2", False, False),
        ("localhost", False, False),
        ("::1", False, False),
        ("[::1]", False, False),
    ],
)
def test_an_http_proxy_open_to_the_network_without_auth_is_warned_of(host: str, auth: bool, warned: bool) -> None:
    cfg = ServeConfig(checkpoint="unused", host=host, auth={"enabled": auth})
    message = exposure_warning(cfg)
    assert (message is not None) == warned
    if warned:
        assert f"{host}:8000" in message and "auth.enabled=true" in message


def test_start_warns_once_on_stderr_and_in_the_log_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """Through `start` itself, stopped by its first check (no generator in the checkpoint) before Ray starts."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = ServeConfig(checkpoint=str(tmp_path), host="0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="dreamdiff.serve.runner"), pytest.raises(DreamdiffError):
        start(cfg)
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("dreamdiff serve: warning: ") and "0.0.0.0:8000" in stderr[0]
    assert [r.levelno for r in caplog.records if "auth off" in r.getMessage()] == [logging.WARNING]
