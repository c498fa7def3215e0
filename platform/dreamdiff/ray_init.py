"""Connect to the Ray cluster a stage runs in, or start a local one bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from dreamdiff.config import RayInitConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayInitConfig) -> None:
    """`ray job submit` and clusters set RAY_ADDRESS; without one, a local Ray starts in-process."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        with _loopback_node() if _is_loopback_address(address) else contextlib.nullcontext():
            ray.init(address=address, log_to_driver=True)
        log.info("joined the Ray cluster at %s", address)
        return
    start_local_ray(num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard, configure_logging=False)
    log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))


LOCAL_NODE_ENV = {
    "RAY_ADDRESS": "local",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
}
LOCAL_DRIVER_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}
LOOPBACK = "127.0.0.1"


def start_local_ray(**kwargs: object) -> None:
    """`ray.init` of a new local instance on 127.0.0.1 whose processes inherit three settings (`LOCAL_NODE_ENV`),
    and one setting for the driver itself (`LOCAL_DRIVER_ENV`).

    RAY_ADDRESS=local: Ray Train's PlacementGroupCleaner finds its cluster through the environment;
    without RAY_ADDRESS it takes the cluster of the last `ray start` on this machine, finds no controller there,
    and removes the placement group of a live run, killing its workers. "local" makes it look only for a
    running instance (this one) and give up when there are several.

    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 (unless set already): the watcher is one more actor per trainer that
    polls for nodes about to be drained, and a single local node has none; on a laptop each actor slows the
    start.

    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1 (unless set already; Ray's default is 2 s): the Train controller polls
    its workers this often, and a worker's `ray.train.report` (every checkpoint, every Tune report) waits for the
    next poll, as does the end of a run; on one machine a poll is a local call, and at 2 s each short run spends
    more time waiting than working. A missed poll is retried, not taken for a dead worker.

    RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1 (unless set already) stays set in this process, where Ray Data plans
    its reads: each Parquet read starts a pool of actors that read the files' footers, 32 by default, sized
    for object stores over a network. On a local disk one actor reads them as fast, and each actor is a
    process that a small machine pays for in start-up time and memory.

    A cluster's own processes, and drivers that join a cluster, never see these.

    The node's address is 127.0.0.1 (see `_loopback_node`), so what this starts listens on loopback only.
    """
    saved = {name: os.environ.get(name) for name in LOCAL_NODE_ENV}
    os.environ["RAY_ADDRESS"] = LOCAL_NODE_ENV["RAY_ADDRESS"]  # inherited by the node's processes, spawned now
    for name, value in LOCAL_NODE_ENV.items():
        os.environ.setdefault(name, value)
    for name, value in LOCAL_DRIVER_ENV.items():
        os.environ.setdefault(name, value)
    try:
        with _loopback_node():
            ray.init(_node_ip_address=LOOPBACK, **kwargs)  # type: ignore[arg-type]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # a Ray whose address selection changed: its servers listen beyond this machine
        log.warning("the local Ray runs on %s, not %s: its ports listen on all interfaces", node_ip, LOOPBACK)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) and "localhost"; any other name or address (0.0.0.0, ::, a LAN address,
    "auto") is not: a host name other than localhost may resolve to anything."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_loopback_address(address: str) -> bool:
    """Whether a Ray address ("host:port", optionally with a scheme) names this machine's loopback interface: a
    driver joining a local Ray started by `start_local_ray` must keep that address (see `_loopback_node`)."""
    return is_loopback_host(address.split("://", 1)[-1].rsplit(":", 1)[0])


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Ray's "local only" address selection while `ray.init` starts a node, so that the node's address is 127.0.0.1.

    `ray.init(_node_ip_address="127.0.0.1")` alone does not do it: Ray 2.60 replaces a loopback address with the
    machine's routable one (`services.resolve_ip_for_localhost` -> `get_node_ip_address`) unless
    `ray_constants.ENABLE_RAY_CLUSTER` is false, as on macOS and Windows by default (the environment variable
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is imported, too late here). The node's address decides
    where its servers listen: on a loopback address GCS, raylet, workers, dashboard agent (gRPC, HTTP, metrics)
    and runtime-env agent bind 127.0.0.1; on a routable one most of them bind every interface (0.0.0.0 or ::).
    Nothing else reads the flag during `ray.init`; it is restored at once. A driver that joins such a node at
    127.0.0.1 needs the same: Ray would otherwise rewrite the address it joins to the routable one.
    """
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
