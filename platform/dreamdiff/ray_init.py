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
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.dashboard,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
    )
    log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
