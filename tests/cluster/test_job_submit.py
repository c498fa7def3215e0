"""`ray job submit` of the jobs/ drivers to a real Ray head with token authentication, as on a cluster.

The head runs on 127.0.0.1 with its own ports and temp dir (other Ray instances on this machine are left alone),
in its own process group: the test stops it by signalling that group, not with `ray stop`, which would stop every
Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dreamdiff.data.reader import shard_files

REPO = Path(__file__).resolve().parents[2]
SUBMIT_TIMEOUT_S = 240


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _worker_window(taken: list[int], width: int = 100) -> int:
    """The first of `width` worker ports of this head's own, clear of the `taken` ports: from 20,000 to 31,999,
    below Linux's ephemeral range (32,768 on) where `_free_ports` found them and above the session Ray's worker
    ports (to 19,999), moved on while it overlaps one of them."""
    low = 20000 + (taken[0] % 120) * width
    while any(low <= port < low + width for port in taken):
        low += width
    return low


class Head:
    """A `ray start --head --block` process group with token auth; `env` is what its clients need."""

    def __init__(self, root: Path) -> None:
        # Ray's session folder, short (socket paths are capped at 107 bytes); also how this head's processes are known
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dd-ray-", dir="/tmp"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(HOME=str(root / "home"), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
        token = subprocess.run(
            ["ray", "get-auth-token", "--generate"], env=self.env, capture_output=True, text=True, check=True
        ).stdout.strip()
        assert len(token) >= 32 and (root / "home" / ".ray" / "auth_token").read_text().strip() == token
        self.bearer = f"Bearer {token}"
        ports = _free_ports(9)
        gcs, dashboard, client, node, objects, agent, agent_grpc, runtime_env, metrics = ports
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        worker_low = _worker_window(ports)
        self.log = open(root / "head.log", "w")  # closed in stop()
        self.process = subprocess.Popen(
            ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=4",
             f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--node-manager-port={node}",
             f"--object-manager-port={objects}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
             f"--metrics-export-port={metrics}", f"--min-worker-port={worker_low}",
             f"--max-worker-port={worker_low + 99}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"ray start exited: {self.read_log()}"
            try:  # answers 401 until a token is given: the dashboard is up and enforces auth
                urllib.request.urlopen(f"{self.dashboard}/api/jobs/", timeout=2)
                raise AssertionError("the dashboard answered without a token")
            except urllib.error.HTTPError as err:
                if err.code == 401:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise AssertionError(f"the head did not come up in {timeout_s} s: {self.read_log()}")

    def ray(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ray", *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def stop(self) -> None:
        """SIGTERM to the head's process group, SIGKILL to whatever of it (or of its session) is left."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        leftovers = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(proc.pid) == self.process.pid or str(self.temp_dir) in " ".join(
                    proc.info["cmdline"] or []
                ):
                    leftovers.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
        for proc in leftovers:
            proc.kill()
        psutil.wait_procs(leftovers, timeout=10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def head(tmp_path: Path) -> Iterator[Head]:
    started = Head(tmp_path)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def _submit(head: Head, job_id: str, runtime_env: list[str], command: list[str]) -> str:
    """Submit and follow the logs to the end, as a user would; return the logs once the job SUCCEEDED."""
    submitted = head.ray(
        "job", "submit", "--address", head.dashboard, "--submission-id", job_id, *runtime_env, "--", *command,
        timeout_s=SUBMIT_TIMEOUT_S,
    )  # fmt: skip
    logs = head.ray("job", "logs", "--address", head.dashboard, job_id).stdout
    request = urllib.request.Request(f"{head.dashboard}/api/jobs/{job_id}", headers={"Authorization": head.bearer})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status = json.loads(answer.read())["status"]
    except urllib.error.HTTPError as err:  # 404: the submission never made a job (e.g. its upload failed)
        said = submitted.stderr[-4000:]
        raise AssertionError(f"{job_id}: no such job ({err}); `ray job submit` said:\n{said}") from err
    assert status == "SUCCEEDED", f"{job_id}: {status}\n{logs[-6000:]}"
    return logs


@pytest.mark.slow
def test_preprocess_and_pretrain_jobs_succeed_on_a_token_auth_head(head: Head, tmp_path: Path) -> None:
    listed = head.ray("job", "list", "--address", head.dashboard)
    assert listed.returncode == 0, listed.stderr
    head.env["RAY_AUTH_MODE"] = "disabled"
    assert head.ray("job", "list", "--address", head.dashboard).returncode != 0  # no token, no entry
    head.env["RAY_AUTH_MODE"] = "token"

    shards, run = tmp_path / "shards", tmp_path / "pretrain"
    logs = _submit(
        head,
        "preprocess-e2e",
        ["--working-dir", ".", "--runtime-env-json", '{"py_modules": ["platform/dreamdiff"]}'],
        ["python", "jobs/preprocess.py", "--config", "configs/preprocess-demo.yaml", f"output={shards}",
         "sources.0.synth.num_subjects=1", "sources.0.synth.repeats=1",
         "sources.1.fake=[{n_subjects: 1, sfreq: 250, duration: 60}]"],
    )  # fmt: skip
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["totals"]["subjects_done"] == 2 and manifest["totals"]["subjects_failed"] == 0, logs
    assert manifest["totals"]["rows"] == 200 + 2 * (60 * 250 // 512)  # 10 classes x 20 images; 2 runs of 29 windows
    assert len(shard_files(shards)) >= 2
    assert str(head.temp_dir) in logs  # Ray Data ran in the head's session: the driver joined, not a local Ray

    logs = _submit(
        head,
        "pretrain-e2e",
        ["--runtime-env", "cluster/runtime_env.yaml"],  # the file the README and the RayJobs use
        ["python", "jobs/pretrain.py", "--config", "configs/pretrain-demo.yaml", f"data={shards}",
         f"output={run}", "epochs=2", "batch_size=16", "scaling.num_workers=1", "checkpoint.every_steps=4",
         "log_every_steps=4"],
    )  # fmt: skip
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["epoch"] == 2 and metrics[-1]["loss"] == metrics[-1]["loss"], logs  # trained to the end, no NaN
    assert (run / "msm.safetensors").stat().st_size > 0 and list((run / "ray" / "train").glob("checkpoint_*"))
    assert "pretrain: step" in logs
