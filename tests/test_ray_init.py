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


def test_a_local_parquet_read_starts_one_footer_reader(ray_local: None, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    for i in range(4):
        pq.write_table(pa.table({"x": [i, i + 1]}), tmp_path / f"part-{i}.parquet")
    before = _footer_readers()
    assert sorted(r["x"] for r in ray.data.read_parquet(str(tmp_path)).take_all()) == [0, 1, 1, 2, 2, 3, 3, 4]
    # Ray Data's default pool is 32 actors, a process each, per read; on one local disk one serves
    assert _footer_readers() - before == 1


def _footer_readers() -> int:
    from ray._private.state import actors  # the GCS's table: no dashboard needed

    return sum("FooterReader" in a["ActorClassName"] for a in actors().values())
