"""A running Serve app of the tiny generator checkpoint (tests/conftest.py), shared by the serve tests."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dreamdiff.config import ServeConfig

TOKEN = "tiny-test-token"


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def make_eeg() -> Callable[..., np.ndarray]:
    def make(channels: int = 128, samples: int = 512, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((channels, samples)).astype(np.float32)

    return make


@pytest.fixture(scope="session")
def token() -> str:
    return TOKEN


def running_app(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, **settings: Any) -> Iterator[ServeConfig]:
    """Serve the demo config on `checkpoint` with auth on (TOKEN), a free port and `settings` over it; shut down
    when the generator is closed (a module fixture's lifetime: a start costs seconds)."""
    from ray import serve

    from dreamdiff.serve.app import config_from_args
    from dreamdiff.serve.runner import start

    token_file = tmp_path_factory.mktemp("serve-auth") / "token"
    token_file.write_text(TOKEN + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    auth = {"enabled": True, "token_file": str(token_file)}
    cfg = config_from_args(
        {"config": "serve-demo", "checkpoint": str(checkpoint), "port": port, "auth": auth, **settings}
    )
    try:  # a start that fails part-way still shuts down what it started, or it holds the session's CPUs
        start(cfg)
        yield cfg
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def serve_app(
    ray_local: None, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeConfig]:
    """One running Serve app per test module on the tiny checkpoint, limits small enough for tests to reach."""
    yield from running_app(
        tiny_checkpoint,
        tmp_path_factory,
        **{
            "defaults.steps": 4,
            "limits.max_body_bytes": 2**21,
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
            "num_cpus": 0.5,
        },
    )


@pytest.fixture(scope="module")
def url(serve_app: ServeConfig) -> str:
    return f"http://127.0.0.1:{serve_app.port}"
