"""Shared test infrastructure: a real local Ray, run folders, an offline MNE/MOABB home and a tiny generator."""

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


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Stable Diffusion folder: 8 px pixel space (no VAE), one cross-attention down block."""
    import torch

    from dreamdiff.models.diffusion import build_tiny_sd
    from dreamdiff.models.diffusion_config import TinyDiffusionConfig

    torch.manual_seed(0)
    cfg = TinyDiffusionConfig(
        sample_size=8, block_out_channels=[32, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]
    )
    return build_tiny_sd(cfg, tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random, untrained generator on `tiny_sd` (tiny MSM encoder, cross-attention trainable) saved as a
    checkpoint folder; read-only for the tests that share it."""
    import torch

    from dreamdiff.models.conditioner import ConditionerConfig
    from dreamdiff.models.diffusion import load_sd_components
    from dreamdiff.models.eeg_diffusion import GeneratorSpec, build_eeg_diffusion
    from dreamdiff.models.generator import save_generator
    from dreamdiff.models.msm import MSMConfig

    spec = GeneratorSpec(
        base_model=str(tiny_sd),
        msm=MSMConfig(preset="tiny"),
        conditioner=ConditionerConfig(context_dim=64, clip_dim=32),
        trainable="cross_attention",
        image_size=8,
    )
    torch.manual_seed(0)
    model = build_eeg_diffusion(spec, load_sd_components(str(tiny_sd)))
    return save_generator(model, spec, tmp_path_factory.mktemp("generator") / "generator")
