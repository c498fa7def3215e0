"""The local Ray a stage starts: its processes inherit the local-only settings, the caller's environment does not."""

from __future__ import annotations

import os

import ray

from dreamdiff.ray_init import LOCAL_NODE_ENV


def test_local_node_processes_inherit_the_local_settings(ray_local: None) -> None:
    @ray.remote
    def environment() -> dict[str, str | None]:
        return {name: os.environ.get(name) for name in LOCAL_NODE_ENV}

    # RAY_ADDRESS=local keeps Ray Train's placement-group cleaner on this instance; no preemption watcher actor
    assert ray.get(environment.remote()) == LOCAL_NODE_ENV
    assert all(name not in os.environ for name in LOCAL_NODE_ENV)  # the driver's environment is restored
