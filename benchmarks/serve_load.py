"""A bounded load test of a running endpoint: N requests, C at a time, latency percentiles and throughput.

Used by benchmarks/serve.py and the endpoint's tests. Every request is the same EEG with its own seed; a request
that fails (an error answer or no answer) counts as an error, and its latency is left out of the percentiles.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dreamdiff.errors import DreamdiffError
from dreamdiff.serve.client import ServeClient


def latency_stats(latencies: list[float], wall: float, count: int) -> dict[str, float | None]:
    """p50/p95/max latency (s) of the finished requests and throughput (finished requests/s over the wall time)."""
    if not latencies:
        return {"p50_s": None, "p95_s": None, "max_s": None, "requests_per_s": 0.0}
    lat = np.asarray(latencies)
    return {
        "p50_s": round(float(np.percentile(lat, 50)), 4),
        "p95_s": round(float(np.percentile(lat, 95)), 4),
        "max_s": round(float(lat.max()), 4),
        "requests_per_s": round(count / wall, 2),
    }


def run_load(
    client: ServeClient, eeg: np.ndarray, requests: int = 200, concurrency: int = 16, **params: Any
) -> dict[str, Any]:
    """Send `requests` generate calls, `concurrency` in flight; returns latency, throughput, errors and the
    batch sizes the server reported."""

    def one(i: int) -> tuple[float, dict[str, Any] | None, str | None]:
        tick = time.perf_counter()
        try:
            result = client.generate(eeg, seed=i, **params)
        except (DreamdiffError, OSError) as err:
            return time.perf_counter() - tick, None, str(err)
        return time.perf_counter() - tick, result.metadata, None

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - began
    done = [(lat, meta) for lat, meta, err in results if err is None]
    errors = [err for _, _, err in results if err is not None]
    batch = [meta["batch_size"] for _, meta in done]
    return {
        "requests": requests,
        "concurrency": concurrency,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": round(wall, 3),
        **latency_stats([lat for lat, _ in done], wall, len(done)),
        "images_per_s": round(sum(meta["num_images"] for _, meta in done) / wall, 2),
        "batch_size_mean": round(float(np.mean(batch)), 2) if batch else None,
        "batch_size_max": max(batch) if batch else None,
    }
