"""Signal processing against known answers: tones, ramps, spatial fields, MOABB's FakeDataset."""

from __future__ import annotations

from pathlib import Path

import mne
import numpy as np
import pytest

from dreamdiff.data.signal import (
    bandpass,
    crop_and_interpolate,
    epochs_from_raw,
    interpolate_channels,
    normalise,
    resample,
    tile_channels,
    window,
)

# MNE 1.13 renamed the 10-20 templates (the old names warn); older MNE only has the old ones.
MONTAGE_1020 = "colin27_1020" if "colin27_1020" in mne.channels.get_builtin_montages() else "standard_1020"
NAMES_8 = ["Fp1", "Fz", "C3", "Cz", "C4", "Pz", "O1", "O2"]
NAMES_32 = NAMES_8 + [
    "Fp2", "F7", "F3", "F4", "F8", "T7", "T8", "P7", "P3", "P4", "P8", "Oz",
    "FC1", "FC2", "CP1", "CP2", "FC5", "FC6", "CP5", "CP6", "AF3", "AF4", "PO3", "PO4",
]  # fmt: skip


def _amplitude(y: np.ndarray, freq: float, sfreq: float) -> float:
    """Amplitude of the `freq` component of `y` (an integer number of periods long)."""
    t = np.arange(y.size) / sfreq
    return float(2 * abs(np.mean(y * np.exp(-2j * np.pi * freq * t))))


def _positions(info: mne.Info) -> np.ndarray:
    """Head-frame positions of the EEG channels, in channel order."""
    return np.array([info["chs"][i]["loc"][:3] for i in mne.pick_types(info, eeg=True)])


def _info_with_montage(names: list[str], sfreq: float = 100.0) -> mne.Info:
    info = mne.create_info(names, sfreq, "eeg")
    info.set_montage(MONTAGE_1020)
    return info


# --- bandpass -------------------------------------------------------------------------------


def test_bandpass_keeps_passband_and_removes_both_stopbands() -> None:
    sfreq = 1000.0
    t = np.arange(4000) / sfreq
    x = np.stack([np.sin(2 * np.pi * f * t) for f in (2, 40, 200)]).sum(0)[None]
    y, h_used = bandpass(x, sfreq, 5.0, 95.0)
    assert y.shape == x.shape and h_used == 95.0
    mid = y[0, 1000:3000]  # 2 s away from the edges: whole periods of every tone
    assert _amplitude(mid, 40, sfreq) == pytest.approx(1.0, abs=0.05)
    assert _amplitude(mid, 2, sfreq) < 0.05
    assert _amplitude(mid, 200, sfreq) < 0.05


def test_bandpass_clips_upper_edge_below_nyquist_and_reports_it() -> None:
    sfreq = 128.0
    t = np.arange(1280) / sfreq
    x = np.sin(2 * np.pi * 20 * t)[None].astype(np.float32)
    y, h_used = bandpass(x, sfreq, 5.0, 95.0)
    assert h_used == pytest.approx(0.45 * sfreq) and h_used < sfreq / 2
    assert y.dtype == np.float32
    assert _amplitude(y[0, 256:1024], 20, sfreq) == pytest.approx(1.0, abs=0.05)


def test_bandpass_rejects_low_edge_above_effective_high_edge() -> None:
    with pytest.raises(ValueError, match="l_freq"):
        bandpass(np.zeros((1, 500)), 128.0, l_freq=60.0, h_freq=95.0)  # effective h is 57.6
    with pytest.raises(ValueError, match="l_freq"):
        bandpass(np.zeros((1, 500)), 1000.0, l_freq=30.0, h_freq=20.0)


# --- resample -------------------------------------------------------------------------------


def test_resample_matches_analytic_sine() -> None:
    x = np.sin(2 * np.pi * 10 * np.arange(500) / 250.0)[None]
    y = resample(x, 250.0, 500.0)
    assert y.shape == (1, 1000)
    err = np.abs(y[0] - np.sin(2 * np.pi * 10 * np.arange(1000) / 500.0))
    assert err[50:-50].max() < 5e-3
    assert err.max() < 0.05  # zero-padded edges
    assert resample(x, 250.0, 250.0) is x


# --- window ---------------------------------------------------------------------------------


def test_window_exact_starts_and_content() -> None:
    x = np.arange(2 * 20, dtype=float).reshape(2, 20)
    w, starts = window(x, size=8, stride=8)
    assert w.shape == (2, 2, 8)
    np.testing.assert_array_equal(starts, [0, 8])
    for k, s in enumerate(starts):
        np.testing.assert_array_equal(w[k], x[:, s : s + 8])
    assert np.shares_memory(w, x)  # a view, not a copy

    w, starts = window(x, size=8, stride=4)
    np.testing.assert_array_equal(starts, [0, 4, 8, 12])
    np.testing.assert_array_equal(w[3], x[:, 12:20])

    w, starts = window(x[:, :7], size=8, stride=8)
    assert w.shape == (0, 2, 8) and starts.shape == (0,)


# --- crop_and_interpolate -------------------------------------------------------------------


def test_crop_and_interpolate_keeps_a_ramp_linear_with_exact_endpoints() -> None:
    x = np.stack([3.0 * np.arange(500) + 7.0, -np.arange(500.0)])
    y = crop_and_interpolate(x, 20, 460, 512)
    assert y.shape == (2, 512)
    assert y[0, 0] == pytest.approx(x[0, 20]) and y[0, -1] == pytest.approx(x[0, 459])
    expected = 7.0 + 3.0 * (20 + np.arange(512) * 439 / 511)
    np.testing.assert_allclose(y[0], expected, rtol=1e-12)
    np.testing.assert_allclose(np.diff(y[1]), -439 / 511)

    batch = np.stack([x, 2 * x])
    yb = crop_and_interpolate(batch, 20, 460, 512)
    assert yb.shape == (2, 2, 512)
    np.testing.assert_allclose(yb[1], 2 * y)


def test_crop_and_interpolate_matches_np_interp_on_a_curve() -> None:
    x = np.sin(np.arange(500) / 7.0)[None]
    y = crop_and_interpolate(x)
    np.testing.assert_allclose(y[0], np.interp(np.linspace(20, 459, 512), np.arange(500), x[0]), atol=1e-12)
    with pytest.raises(ValueError, match="stop"):
        crop_and_interpolate(x[:, :400])


# --- tile_channels --------------------------------------------------------------------------


def test_tile_channels_repeats_cyclically_and_masks_first_copies() -> None:
    x = np.random.default_rng(0).normal(size=(3, 16))
    y, mask = tile_channels(x, 128)
    assert y.shape == (128, 16)
    for i in range(128):
        np.testing.assert_array_equal(y[i], x[i % 3])
    assert mask.dtype == bool and mask.sum() == 3 and mask[:3].all()

    batch = np.stack([x, -x])
    yb, _ = tile_channels(batch, 128)
    np.testing.assert_array_equal(yb[1, 5], -x[2])

    many = np.arange(130 * 4, dtype=float).reshape(130, 4)
    y, mask = tile_channels(many, 128)
    np.testing.assert_array_equal(y, many[:128])
    assert mask.all()


# --- interpolate_channels -------------------------------------------------------------------


@pytest.mark.parametrize("names", [NAMES_32, NAMES_8], ids=["32ch", "8ch"])
@pytest.mark.parametrize("axis", [0, 1], ids=["x", "y"])
def test_interpolate_channels_reproduces_a_smooth_field(names: list[str], axis: int) -> None:
    info = _info_with_montage(names)
    field = _positions(info)[:, axis, None] * np.linspace(1.0, 2.0, 10)  # linear in space, scaled in time
    raw = mne.io.RawArray(field, info, verbose=False)
    out, mask = interpolate_channels(raw, "biosemi128")
    assert len(out.ch_names) == 128 and mask.shape == (128,) and mask.dtype == bool
    target = _positions(out.info)[:, axis]
    for k in (0, -1):
        assert np.corrcoef(out.get_data()[:, k], target)[0, 1] > 0.9
    # every real electrode has a template electrode nearby; most of the template is extrapolated
    assert len(names) // 2 <= mask.sum() < 128


def test_interpolate_channels_mask_follows_distance_and_works_with_three_channels() -> None:
    raw = mne.io.RawArray(np.full((3, 10), 1e-5), _info_with_montage(["C3", "Cz", "C4"]), verbose=False)
    out, near = interpolate_channels(raw, max_dist=0.02)
    _, far = interpolate_channels(raw, max_dist=0.2)
    assert np.isfinite(out.get_data()).all()
    assert 1 <= near.sum() < far.sum() and not (near & ~far).any()


def test_interpolate_channels_needs_a_montage() -> None:
    raw = mne.io.RawArray(np.zeros((3, 10)), mne.create_info(["C3", "Cz", "C4"], 100.0, "eeg"), verbose=False)
    with pytest.raises(ValueError, match="montage"):
        interpolate_channels(raw)


# --- normalise ------------------------------------------------------------------------------


def test_normalise_zscore_is_per_epoch_and_channel_and_safe_on_flat_rows() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 256)) * np.array([1e-5, 3.0, 0.0])[:, None] + np.array([5.0, -2.0, 7.0])[:, None]
    x[2, 1] *= 100.0  # epochs are normalised independently
    y = normalise(x, "zscore")
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[:, :2].mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y[:, :2].std(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(y[:, 2], 0.0)  # constant channel: 0, not NaN

    spiky = x.copy()
    spiky[0, 0, 10] = 1.0  # a 1e5-sigma artifact
    clipped = normalise(spiky, "zscore", clip=3.0)
    assert np.abs(clipped).max() == pytest.approx(3.0)
    assert np.isfinite(clipped).all()


def test_normalise_fixed_and_none_are_exact() -> None:
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4) * 1e-6
    np.testing.assert_allclose(normalise(x, "fixed", scale=1e5), x * 1e5, rtol=1e-6)
    np.testing.assert_array_equal(normalise(x, "fixed", scale=1e6, clip=10.0).max(), 10.0)
    np.testing.assert_array_equal(normalise(x, "none"), x.astype(np.float32))
    with pytest.raises(ValueError, match="mode"):
        normalise(x, "robust")  # type: ignore[arg-type]


# --- epochs_from_raw on MOABB's FakeDataset -------------------------------------------------


def _fake_raw(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, channels: tuple[str, ...], sfreq: float
) -> mne.io.BaseRaw:
    from moabb.datasets.fake import FakeDataset

    monkeypatch.setenv("MNE_DATA", str(tmp_path))
    dataset = FakeDataset(
        n_subjects=1, n_sessions=1, n_runs=1, channels=channels, sfreq=sfreq, duration=21, n_events=6, seed=3
    )
    return dataset.get_data(subjects=[1])[1]["0"]["0"]


@pytest.mark.parametrize(
    ("channels", "sfreq", "target", "mode", "h_expected"),
    [
        (("C3", "Cz", "C4"), 128.0, None, "tile", 57.6),
        (tuple(NAMES_8), 250.0, 200.0, "tile", 90.0),
        (("C3", "Cz", "C4"), 128.0, 256.0, "interpolate", 57.6),
        (tuple(NAMES_8), 250.0, 200.0, "interpolate", 90.0),
    ],
)
@pytest.mark.filterwarnings("ignore:Montage name 'standard_1005' is deprecated:FutureWarning")
def test_epochs_from_fake_dataset(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    channels: tuple[str, ...],
    sfreq: float,
    target: float | None,
    mode: str,
    h_expected: float,
) -> None:
    raw = _fake_raw(monkeypatch, tmp_path, channels, sfreq)
    assert raw.info["sfreq"] == sfreq and "stim" in raw.ch_names  # the stim channel must be dropped
    out = epochs_from_raw(raw, sfreq=target, channels=mode, stride=256)
    rate = target or sfreq
    n_expected = (int(21 * rate) - 512) // 256 + 1
    eeg = out["eeg"]
    assert eeg.shape == (n_expected, 128, 512) and eeg.dtype == np.float32
    assert np.isfinite(eeg).all()
    np.testing.assert_array_equal(out["start"], np.arange(n_expected) * 256)
    assert out["start"].dtype == np.int64
    assert out["sfreq"] == rate and out["h_freq_used"] == pytest.approx(h_expected)
    assert out["n_channels_orig"] == len(channels)
    mask = out["channel_mask"]
    assert mask.shape == (128,) and mask.dtype == bool
    np.testing.assert_allclose(eeg.std(-1), 1.0, atol=1e-3)  # z-scored rows, none flat
    if mode == "tile":
        assert mask.sum() == len(channels) and mask[: len(channels)].all()
        np.testing.assert_array_equal(eeg[:, len(channels)], eeg[:, 0])
    else:
        assert 1 <= mask.sum() < 128


def test_epochs_from_raw_interpolate_without_montage_fails_clearly() -> None:
    raw = mne.io.RawArray(np.zeros((3, 2000)), mne.create_info(["C3", "Cz", "C4"], 250.0, "eeg"), verbose=False)
    with pytest.raises(ValueError, match="channels='tile'"):
        epochs_from_raw(raw, channels="interpolate")
    assert epochs_from_raw(raw, channels="tile")["eeg"].shape == (3, 128, 512)
