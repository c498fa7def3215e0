"""`dreamdiff serve`: start Serve's HTTP proxy on the configured host and port, deploy the app, serve until stopped."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from dreamdiff.config import ServeConfig
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.generator import SPEC_FILE
from dreamdiff.ray_init import init_ray, is_loopback_host
from dreamdiff.serve.app import absolute_paths, build_application

log = logging.getLogger(__name__)


def start(cfg: ServeConfig, *, own_stop_signals: bool = False) -> str:
    """Join or start Ray, start Serve on cfg.host:cfg.port, deploy; returns the API's base URL once it runs.

    own_stop_signals: take SIGTERM and SIGINT back once Ray is up (see `_own_stop_signals`), for a process that
    serves until stopped; only from the main thread.
    """
    warn_if_exposed(cfg)
    joining = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not joining and not (Path(cfg.checkpoint) / SPEC_FILE).is_file():  # on a cluster only replicas may see it
        raise DreamdiffError(
            f"checkpoint {cfg.checkpoint!r} holds no {SPEC_FILE}: give a generator folder (finetune writes "
            "<output>/generator), e.g. checkpoint=runs/demo/finetune/generator"
        )
    cfg = absolute_paths(cfg)
    init_ray(cfg.ray)
    if own_stop_signals:
        _own_stop_signals()
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


def exposure_warning(cfg: ServeConfig) -> str | None:
    """The warning for an HTTP proxy that listens beyond this machine with the API's auth off, else None: anyone
    who reaches the port can then generate images (and use its GPUs)."""
    if cfg.auth.enabled or is_loopback_host(cfg.host):
        return None
    return (
        f"Serve's HTTP proxy listens on {cfg.host}:{cfg.port}, reachable from other machines, with auth off: "
        "anyone who reaches it can call the API. Set auth.enabled=true (and auth.token_file), or host=127.0.0.1 "
        "behind a proxy or port-forward that authenticates."
    )


def warn_if_exposed(cfg: ServeConfig) -> None:
    """Log `exposure_warning` and print it as one line on stderr (where an operator starting `dreamdiff serve`
    looks), once per start."""
    message = exposure_warning(cfg)
    if message is not None:
        log.warning(message)
        print(f"dreamdiff serve: warning: {message}", file=sys.stderr, flush=True)


def _reason(text: str) -> str:
    """The replica's own error out of Serve's deploy failure (which wraps it in tracebacks), else its last line."""
    ours = [line.split("DreamdiffError: ", 1)[1] for line in text.splitlines() if "DreamdiffError: " in line]
    return ours[-1] if ours else text.strip().splitlines()[-1]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _force_exit(signum: int, frame: object) -> None:
    """A second signal while the app is being deleted: leave now (Python's exit still runs Ray's clean-up)."""
    raise SystemExit(128 + signum)


def _own_stop_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt, which `run` turns into deleting the app.

    Called again once Ray is up: `ray.init` replaces the SIGTERM handler (in Python, one that exits at once, or
    for a local Ray drains and kills the node) and its core worker installs a native crash handler for SIGTERM
    that aborts the process; either way the app would not be deleted. A signal ignored when this process started
    (`nohup`, a background job's SIGINT) stays ignored.
    """
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _interrupt)


def run(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM (`ray job stop`, a pod's shutdown), then delete the app: Serve apps outlive
    the driver that deployed them on a cluster. An interrupt during the start deletes what was deployed. A
    stopped server returns normally (exit status 0), whichever of the two signals stopped it."""
    _own_stop_signals()
    try:
        url = start(cfg, own_stop_signals=True)
        print(
            f"dreamdiff serve: {url}/v1/generate (POST EEG), {url}/v1/model, {url}/healthz, {url}/docs; Ctrl-C stops",
            flush=True,
        )
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is _interrupt:
                signal.signal(signum, _force_exit)
        _delete_app(cfg.app_name)
        print("dreamdiff serve: stopped", flush=True)


def _delete_app(name: str) -> None:
    """Delete the app and wait until Serve reports it gone. On a cluster the request reaches the controller at
    once, so the app goes even if the driver is killed while waiting (`ray job stop` waits only a few seconds
    before SIGKILL); the HTTP proxy stays, as Serve on a cluster is shared."""
    if not ray.is_initialized():
        return
    try:
        serve.delete(name)
    except RayServeException:  # Serve not started yet: nothing to delete
        return
    print(f"dreamdiff serve: deleted the application {name!r}", flush=True)
