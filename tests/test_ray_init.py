"""The local Ray a stage starts: its processes inherit the local-only settings, the caller's environment does not,
and it listens on loopback only."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray

from dreamdiff.ray_init import LOCAL_NODE_ENV, _is_loopback_address


def test_local_node_processes_inherit_the_local_settings(ray_local: None) -> None:
    @ray.remote
    def environment() -> dict[str, str | None]:
        return {name: os.environ.get(name) for name in LOCAL_NODE_ENV}

    # RAY_ADDRESS=local keeps Ray Train's placement-group cleaner on this instance; no preemption watcher actor;
    # the Train controller polls its workers every 0.1 s
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


def test_the_local_node_address_is_loopback(ray_local: None) -> None:
    # ray.init turns _node_ip_address="127.0.0.1" into the machine's routable address unless told "local only"
    assert ray.util.get_node_ip_address() == "127.0.0.1"


# Run in a process of its own (a second local Ray beside the session's): start it, make a worker listen by running
# one task, then list what the driver and every process under it listens on.
LISTENERS_SCRIPT = """
import json

import psutil
import pytest
import ray

from dreamdiff.ray_init import start_local_ray

start_local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
ray.get(ray.remote(lambda: 1).remote())
rows = []
driver = psutil.Process()
for proc in [driver, *driver.children(recursive=True)]:
    try:
        name = " ".join(proc.cmdline()[:1]).rsplit("/", 1)[-1] or proc.name()
        rows += [[name, c.laddr.ip, c.laddr.port] for c in proc.net_connections(kind="inet") if c.status == "LISTEN"]
    except psutil.NoSuchProcess:  # an idle worker that exited meanwhile
        continue
print("LISTENERS " + json.dumps(rows))
"""


def test_a_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    """GCS, raylet, workers and the driver (gRPC), dashboard agent (gRPC, metrics) and runtime-env agent: every
    listening socket of a local Ray that `start_local_ray` starts is on a loopback address, none on 0.0.0.0 or ::.
    No exceptions: with a loopback node address Ray binds each of them to it (docs/cluster.md, What listens where)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="ddri-") as tmp:  # short: Ray's socket paths are capped
        proc = subprocess.Popen(
            [sys.executable, "-c", LISTENERS_SCRIPT], cwd=tmp_path, env={**env, "TMPDIR": tmp},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=180)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # its Ray's processes, if any are left
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    lines = [line for line in output.splitlines() if line.startswith("LISTENERS ")]
    assert proc.returncode == 0 and lines, output[-3000:]
    rows = json.loads(lines[-1].removeprefix("LISTENERS "))
    names = {name for name, _, _ in rows}
    assert {"gcs_server", "raylet"} <= names and any("Agent" in n for n in names), rows  # the listing sees them
    exposed = [row for row in rows if not _loopback(row[1])]
    assert not exposed, f"listening beyond this machine: {exposed}"


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # a dual-stack socket's 127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:6379", True),
        ("localhost:6379", True),
        ("[::1]:6379", True),
        ("ray://127.0.0.1:10001", True),
        ("10.0.0.5:6379", False),
        ("head.cluster.local:6379", False),
        ("auto", False),
    ],
)
def test_a_driver_keeps_a_loopback_address_it_joins(address: str, loopback: bool) -> None:
    """A job that joins the local Ray at 127.0.0.1 must not be sent to the machine's routable address, where the
    local Ray does not listen."""
    assert _is_loopback_address(address) is loopback
