"""Shared test infrastructure: a real local Ray, run folders, and an offline MNE/MOABB home."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def offline_mne_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """MNE/MOABB read and write data and config under a temp folder, never the user's home."""
    home = tmp_path_factory.mktemp("mne_home")
    saved = {k: os.environ.get(k) for k in ("MNE_DATA", "_MNE_FAKE_HOME_DIR", "RAY_ADDRESS")}
    os.environ["MNE_DATA"] = str(home / "mne_data")
    os.environ["_MNE_FAKE_HOME_DIR"] = str(home)
    os.environ.pop("RAY_ADDRESS", None)  # tests start their own local Ray, never join a cluster
    (home / "mne_data").mkdir()
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on two cores shared with Ray workers (OpenMP spinning)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray for the whole session: 4 logical CPUs so Train workers leave room for Data."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from dreamdiff.ray_init import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run folder for one test."""
    path = tmp_path / "run"
    path.mkdir()
    return path
