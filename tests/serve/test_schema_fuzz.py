"""The endpoint fuzzed from its own OpenAPI schema (/openapi.json) with schemathesis and all its checks: every
generated request gets a 2xx or a 4xx the schema documents, schema-valid requests are accepted, and the server
stays healthy. A bounded number of examples keeps it a CI test."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from tests.serve.conftest import TOKEN, running_app

from dreamdiff.config import ServeConfig

# small limits: generated requests reach them, and the largest (num_images x steps) still samples in a moment
LIMITS = {"max_images_per_request": 2, "max_steps": 4, "max_channels": 4, "min_samples": 8, "max_samples": 64}


@pytest.fixture(scope="module")
def serve_app(
    ray_local: None, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeConfig]:
    """conftest's app with LIMITS (this module's own)."""
    yield from running_app(
        tiny_checkpoint,
        tmp_path_factory,
        **{"defaults.steps": 2, "limits": {**LIMITS, "max_body_bytes": 2**20}, "num_cpus": 0.5},
    )


@st.composite
def _npy_bodies(draw: st.DrawFn) -> bytes:
    """.npy files the server takes: [channels, samples] real arrays within LIMITS (JSON Schema cannot state them)."""
    channels = draw(st.integers(1, LIMITS["max_channels"]))
    samples = draw(st.integers(LIMITS["min_samples"], LIMITS["max_samples"]))
    dtype = draw(st.sampled_from(["float32", "float64", "int16"]))
    array = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((channels, samples)) * 100
    buffer = io.BytesIO()
    np.save(buffer, array.astype(dtype), allow_pickle=False)
    return buffer.getvalue()


schemathesis.openapi.media_type("application/x-npy", _npy_bodies())


@pytest.fixture(scope="module")
def api_schema(url: str) -> Any:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")

    @schema.hook("filter_body")
    def _rectangular(ctx: Any, body: Any) -> bool:
        # what JSON Schema cannot say (the schema's descriptions do): rows of equal length, and enough samples at
        # the model's rate after resampling from the stated sfreq
        if not isinstance(body, dict) or not isinstance(body.get("eeg"), list) or not body["eeg"]:
            return True
        rows = body["eeg"]
        if not all(isinstance(r, list) for r in rows):
            return True
        if len({len(r) for r in rows}) > 1:
            return False
        sfreq = body.get("sfreq")
        return not isinstance(sfreq, int | float) or len(rows[0]) * 250.0 / sfreq >= LIMITS["min_samples"]

    return schema


def test_the_api_meets_its_own_schema(api_schema: Any) -> None:
    from hypothesis import given

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} == {"/healthz", "/v1/model", "/v1/generate"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

        fuzz()


def test_the_server_is_healthy_after_the_fuzz(url: str) -> None:
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
