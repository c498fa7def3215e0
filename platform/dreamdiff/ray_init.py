"""Connect to the Ray cluster a stage runs in, or start a local one bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os

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
        ray.init(address=address, log_to_driver=True)
        log.info("joined the Ray cluster at %s", address)
        return
    start_local_ray(num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard, configure_logging=False)
    log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))


LOCAL_NODE_ENV = {"RAY_ADDRESS": "local", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
LOCAL_DRIVER_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def start_local_ray(**kwargs: object) -> None:
    """`ray.init` of a new local instance on 127.0.0.1 whose processes inherit two settings (`LOCAL_NODE_ENV`),
    and one setting for the driver itself (`LOCAL_DRIVER_ENV`).

    RAY_ADDRESS=local: Ray Train's PlacementGroupCleaner finds its cluster through the environment;
    without RAY_ADDRESS it takes the cluster of the last `ray start` on this machine, finds no controller there,
    and removes the placement group of a live run, killing its workers. "local" makes it look only for a
    running instance (this one) and give up when there are several.

    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 (unless set already): the watcher is one more actor per trainer that
    polls for nodes about to be drained, and a single local node has none; on a laptop each actor slows the
    start.

    RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1 (unless set already) stays set in this process, where Ray Data plans
    its reads: each Parquet read starts a pool of actors that read the files' footers, 32 by default, sized
    for object stores over a network. On a local disk one actor reads them as fast, and each actor is a
    process that a small machine pays for in start-up time and memory.

    A cluster's own processes, and drivers that join a cluster, never see these.
    """
    saved = {name: os.environ.get(name) for name in LOCAL_NODE_ENV}
    os.environ["RAY_ADDRESS"] = LOCAL_NODE_ENV["RAY_ADDRESS"]  # inherited by the node's processes, spawned now
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", LOCAL_NODE_ENV["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"])
    for name, value in LOCAL_DRIVER_ENV.items():
        os.environ.setdefault(name, value)
    try:
        ray.init(_node_ip_address="127.0.0.1", **kwargs)  # type: ignore[arg-type]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
