"""Request parsing, limits and EEG harmonisation of the endpoint (pure: no Ray, no HTTP)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import numpy as np
import pytest

from dreamdiff.config import load_config
from dreamdiff.data.signal import crop_and_interpolate, normalise, resample, tile_channels
from dreamdiff.serve.api import ModelShape, RequestError, parse_json, parse_npy, resolve

CFG = load_config("serve", "serve-demo", ["checkpoint=unused", "eeg.sfreq=250"])
MODEL = ModelShape(channels=128, samples=512, image_size=8, guidance=False)


def _eeg(channels: int = 128, samples: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((channels, samples)) * 30.0


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    return buffer.getvalue()


def _refused(call: Callable[[], object], status: int, field: str | None) -> str:
    with pytest.raises(RequestError) as err:
        call()
    assert (err.value.status, err.value.field) == (status, field), err.value.message
    return err.value.message


def test_json_and_npy_requests_parse_to_the_same_item() -> None:
    x = _eeg()
    eeg, params = parse_json(json.dumps({"eeg": x.tolist(), "num_images": 2, "seed": 7, "sampler": "ddim"}).encode())
    item = resolve(eeg, params, CFG, MODEL)
    npy_eeg, npy_params = parse_npy(_npy(x), {"num_images": "2", "seed": "7", "sampler": "ddim"})
    other = resolve(npy_eeg, npy_params, CFG, MODEL)
    assert np.array_equal(item.eeg, other.eeg) and item.key() == other.key() == (2, 20, "ddim", 1.0)
    assert item.seed == other.seed == 7 and item.eeg.dtype == np.float32 and item.channel_mask.all()
    expected = normalise(x[None], "zscore", clip=20.0)[0]
    np.testing.assert_allclose(item.eeg, expected, rtol=1e-6)
    default = resolve(eeg, parse_json(json.dumps({"eeg": x.tolist()}).encode())[1], CFG, MODEL)
    assert (default.num_images, default.steps, default.sampler) == (1, 20, "dpm++")  # serve-demo's defaults
    assert 0 <= default.seed < 2**63  # drawn, and returned to the client


def test_harmonisation_uses_the_preprocessing_functions() -> None:
    x = _eeg(channels=32, samples=1000, seed=1)  # 32 channels at 500 Hz, 2 s
    item = resolve(x, parse_npy(_npy(x), {"sfreq": "500"})[1], CFG, MODEL)
    at_rate = resample(x, 500.0, 250.0)  # 500 samples at the model's 250 Hz: stretched to 512
    stretched = crop_and_interpolate(at_rate, 0, at_rate.shape[1], 512)
    expected, mask = tile_channels(normalise(stretched[None], "zscore", clip=20.0)[0], 128)
    np.testing.assert_allclose(item.eeg, expected, rtol=1e-5, atol=1e-6)
    assert mask.sum() == 32 and np.array_equal(item.channel_mask, mask)
    assert item.eeg_report["applied"] == [
        "resampled 500 -> 250 Hz (1000 -> 500 samples)",
        "stretched 500 -> 512 samples",
        "normalised (zscore)",
        "tiled 32 -> 128 channels",
    ]
    long = _eeg(channels=200, samples=2048, seed=2)
    item = resolve(long, parse_npy(_npy(long), {})[1], CFG, MODEL)
    np.testing.assert_allclose(item.eeg, normalise(long[None, :128, :512], "zscore", clip=20.0)[0], rtol=1e-6)
    assert item.eeg_report["applied"][0] == "took the first 512 of 2048 samples"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{", 400, "body"),
        (b"\xff\xfe", 400, "body"),
        (b"[1, 2]", 422, "body"),
        (b'{"num_images": 1}', 422, "eeg"),
        (b'{"eeg": "abc"}', 422, "eeg"),
        (b'{"eeg": [1, 2, 3]}', 422, "eeg"),
        (b'{"eeg": [[1, 2], [3]]}', 422, "eeg"),
        (b'{"eeg": [[1, "2"]]}', 422, "eeg"),
        (b'{"eeg": [[1, true]]}', 422, "eeg"),
        (b'{"eeg": [[1e400]]}', 422, "eeg"),
        (b'{"eeg": [[1]], "num_images": "2"}', 422, "num_images"),
        (b'{"eeg": [[1]], "steps": 2.5}', 422, "steps"),
        (b'{"eeg": [[1]], "seed": -1}', 422, "seed"),
        (b'{"eeg": [[1]], "sampler": "euler"}', 422, "sampler"),
        (b'{"eeg": [[1]], "colour": "red"}', 422, "colour"),
    ],
)
def test_bad_json_is_refused_naming_the_field(body: bytes, status: int, field: str) -> None:
    _refused(lambda: resolve(*parse_json(body), CFG, MODEL), status, field)


@pytest.mark.parametrize(
    ("array", "query", "field"),
    [
        (np.array([{"code": "run me"}], dtype=object), {}, "eeg"),  # a pickle: never loaded
        (np.ones((4, 512), dtype=np.complex64), {}, "eeg"),
        (np.ones((4, 512), dtype=bool), {}, "eeg"),
        (np.ones((2, 4, 512)), {}, "eeg"),
        (np.ones((4, 10)), {}, "eeg"),  # shorter than limits.min_samples
        (np.ones((600, 512)), {}, "eeg"),  # more than limits.max_channels
        (np.full((4, 512), np.nan), {}, "eeg"),
        (np.full((4, 512), 1e9), {}, "eeg"),  # beyond limits.max_abs_value
        (np.ones((4, 512)), {"num_images": "9"}, "num_images"),  # over limits.max_images_per_request
        (np.ones((4, 512)), {"steps": "101"}, "steps"),
        (np.ones((4, 512)), {"guidance_scale": "3"}, "guidance_scale"),  # this model has no null context
        (np.ones((4, 512)), {"guidance_scale": "inf"}, "guidance_scale"),
        (np.ones((4, 512)), {"size": "16"}, "size"),
        (np.ones((4, 512)), {"seed": "x"}, "seed"),
        (np.ones((4, 512)), {"sfreq": "0"}, "sfreq"),
    ],
)
def test_bad_npy_requests_are_refused_naming_the_field(array: np.ndarray, query: dict, field: str) -> None:
    _refused(lambda: resolve(*parse_npy(_npy(array), query), CFG, MODEL), 422, field)


def test_unknown_rate_and_garbage_files() -> None:
    x = _eeg()
    cfg = load_config("serve", "serve-demo", ["checkpoint=unused", "eeg.sfreq=null"])
    message = _refused(lambda: resolve(x, parse_npy(_npy(x), {"sfreq": "250"})[1], cfg, MODEL), 422, "sfreq")
    assert "eeg.sfreq is null" in message
    _refused(lambda: parse_npy(b"not an npy file", {}), 422, "eeg")
    _refused(lambda: parse_npy(b"", {}), 422, "eeg")
    _refused(lambda: parse_npy(b"PK\x03\x04" + bytes(100), {}), 422, "eeg")  # an .npz
    guided = ModelShape(channels=128, samples=512, image_size=8, guidance=True)
    assert resolve(x, parse_npy(_npy(x), {"guidance_scale": "3"})[1], cfg, guided).guidance_scale == 3.0


def test_the_ingress_module_does_not_import_diffusers() -> None:
    # the ingress replica imports dreamdiff.serve.app; only the generator's replicas need diffusers (seconds of
    # start-up and hundreds of MB per process), so an autoscaled ingress comes up fast
    import subprocess
    import sys

    code = "import sys, dreamdiff.serve.app; print('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("sfreq", [1e-4, 1e-6, 5e-324, 0.2, 300_000.0])
def test_a_tiny_request_with_an_absurd_rate_is_refused_before_any_work(sfreq: float) -> None:
    # 1 channel x 64 samples (about 1.5 KB as JSON): resampling it from a rate near zero would grow it a
    # millionfold, so the rate and the length it would give are checked before any resampling
    import time
    import tracemalloc

    body = json.dumps({"eeg": [[float(i % 7) for i in range(64)]], "sfreq": sfreq}).encode()
    assert len(body) < 2000
    tracemalloc.start()
    began = time.process_time()
    try:
        message = _refused(lambda: resolve(*parse_json(body), CFG, MODEL), 422, "sfreq")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - began < 1.0 and peak < 20 * 2**20, (peak, message)
    assert "sfreq" in message


def test_the_resampled_length_is_checked_before_resampling_and_only_the_read_part_is_resampled() -> None:
    short = _eeg(channels=2, samples=100)  # 100 samples at 1000 Hz are 25 at the model's 250 Hz
    message = _refused(lambda: resolve(short, parse_npy(_npy(short), {"sfreq": "1000"})[1], CFG, MODEL), 422, "eeg")
    assert "25 at the model's 250 Hz" in message
    for sfreq, samples in [(1000.0, 16384), (160.0, 2000), (2500.0 / 999, 64), (512.0, 5000)]:
        x = _eeg(channels=3, samples=samples, seed=samples)
        item = resolve(x, parse_npy(_npy(x), {"sfreq": str(sfreq)})[1], CFG, MODEL)
        full = resample(x, sfreq, 250.0)  # the whole EEG resampled, then its first window (or stretched)
        fitted = full[:, :512] if full.shape[1] >= 512 else crop_and_interpolate(full, 0, full.shape[1], 512)
        expected = normalise(fitted[None], "zscore", clip=20.0)[0]
        np.testing.assert_allclose(item.eeg[:3], expected, rtol=1e-5, atol=1e-5)
        assert f"({samples} -> {full.shape[1]} samples)" in item.eeg_report["applied"][0]
