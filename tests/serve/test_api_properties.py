"""Properties of request validation (pure: no Ray, no HTTP): any EEG and rate either fits the model or is refused
with a 4xx naming a field, in bounded time and memory."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dreamdiff.config import load_config
from dreamdiff.serve.api import GenerateParams, ModelShape, RequestError, harmonise, resolve

CFG = load_config("serve", "serve-demo", ["checkpoint=unused", "eeg.sfreq=250"])
MODEL = ModelShape(channels=128, samples=512, image_size=8, guidance=False)
DTYPES = st.sampled_from(["float64", "float32", "float16", "int16", "int64", "uint8", "bool", "complex64", "U3"])
RATES = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([5e-324, 1e-6, 0.2, 1.0, 2.5, 128.0, 250.0, 500.0, 1000.0, 99_999.0, 1e9]),
)


def _shapes() -> st.SearchStrategy[tuple[int, ...]]:
    return st.one_of(
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=8),
        st.tuples(st.integers(1, 600), st.sampled_from([1, 63, 64, 100, 512, 2000])),
    )


@st.composite
def eegs(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(DTYPES))
    shape = draw(_shapes())
    if dtype.kind in "fc" and draw(st.booleans()):  # hypothesis-drawn values: NaN, inf, huge, subnormal
        return draw(hnp.arrays(dtype, shape if np.prod(shape) <= 4096 else (2, 64)))
    return np.asarray(np.random.default_rng(0).standard_normal(shape) * 50).astype(dtype)


def _check(call: object) -> None:
    tracemalloc.start()
    began = time.process_time()
    try:
        out = call()  # type: ignore[operator]
    except RequestError as err:
        assert 400 <= err.status < 500 and err.field, (err.status, err.field, err.message)
        out = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.process_time() - began < 1.0 and peak < 200 * 2**20, peak
    if out is not None:
        data = out[0] if isinstance(out, tuple) else out.eeg
        assert data.shape == (MODEL.channels, MODEL.samples) and data.dtype == np.float32
        assert np.isfinite(data).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(eeg=eegs(), sfreq=RATES)
def test_harmonise_fits_or_refuses_any_eeg_and_rate(eeg: np.ndarray, sfreq: float | None) -> None:
    _check(lambda: harmonise(eeg, sfreq, CFG, MODEL))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    samples=st.integers(64, 3000),
    sfreq=st.floats(1.0, 100_000.0),
    num_images=st.integers(1, 12),
    steps=st.integers(1, 120),
)
def test_resolve_fits_or_refuses_any_rate_and_parameters(
    samples: int, sfreq: float, num_images: int, steps: int
) -> None:
    eeg = np.random.default_rng(samples).standard_normal((4, samples))
    params = GenerateParams(sfreq=sfreq, num_images=num_images, steps=steps)
    _check(lambda: resolve(eeg, params, CFG, MODEL))
