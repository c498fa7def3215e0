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


def start_local_ray(**kwargs: object) -> None:
    """`ray.init` of a new local instance on 127.0.0.1 whose processes see RAY_ADDRESS=local.

    Why: Ray Train's PlacementGroupCleaner (Ray 2.60) finds its cluster through the environment; without
    RAY_ADDRESS it takes the cluster of the last `ray start` on this machine, finds no controller there, and
    removes the placement group of a live run, killing its workers. "local" makes it look only for a running
    instance (this one) and give up when there are several.
    """
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"  # inherited by the node's processes, spawned now
    try:
        ray.init(_node_ip_address="127.0.0.1", **kwargs)  # type: ignore[arg-type]
    finally:
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
