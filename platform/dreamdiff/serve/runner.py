"""`dreamdiff serve`: start Serve's HTTP proxy on the configured host and port, deploy the app, serve until stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from dreamdiff.config import ServeConfig
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.generator import SPEC_FILE
from dreamdiff.ray_init import init_ray
from dreamdiff.serve.app import absolute_paths, build_application


def start(cfg: ServeConfig) -> str:
    """Join or start Ray, start Serve on cfg.host:cfg.port, deploy; returns the API's base URL once it runs."""
    joining = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not joining and not (Path(cfg.checkpoint) / SPEC_FILE).is_file():  # on a cluster only replicas may see it
        raise DreamdiffError(
            f"checkpoint {cfg.checkpoint!r} holds no {SPEC_FILE}: give a generator folder (finetune writes "
            "<output>/generator), e.g. checkpoint=runs/demo/finetune/generator"
        )
    cfg = absolute_paths(cfg)
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(build_application(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    except RuntimeError as err:  # a replica that cannot start (bad checkpoint, missing token...) fails the deploy
        details = [str(err)]
        with contextlib.suppress(Exception):  # the replicas' tracebacks are in the deployments' status messages
            app = serve.status().applications[cfg.app_name]
            details += [deployment.message for deployment in app.deployments.values()]
        reason = _reason("\n".join(details))
        raise DreamdiffError(f"the Serve application failed to start: {reason}") from err
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def _reason(text: str) -> str:
    """The replica's own error out of Serve's deploy failure (which wraps it in tracebacks), else its last line."""
    ours = [line.split("DreamdiffError: ", 1)[1] for line in text.splitlines() if "DreamdiffError: " in line]
    return ours[-1] if ours else text.strip().splitlines()[-1]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM (`ray job stop`, a pod's shutdown), then delete the app: Serve apps outlive
    the driver that deployed them on a cluster. An interrupt during the start deletes what was deployed."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = start(cfg)
        print(
            f"dreamdiff serve: {url}/v1/generate (POST EEG), {url}/v1/model, {url}/healthz, {url}/docs; Ctrl-C stops",
            flush=True,
        )
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        if ray.is_initialized():
            with contextlib.suppress(RayServeException):  # Serve not started yet: nothing to delete
                serve.delete(cfg.app_name)
        print("dreamdiff serve: stopped", flush=True)
