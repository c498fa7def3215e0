"""EEG signal processing for preprocessing: pure numpy/scipy/MNE, no Ray.

Arrays are channels x samples (``[C, T]``) in float, or ``[n, C, T]`` where a function says
so; time is always the last axis. The pipeline (``epochs_from_raw``) runs: pick EEG ->
band-pass -> resample -> harmonise channels to 128 -> window -> normalise. Every step is a
plain function here so that the Ray pipelines, the paired-set builder and the tests share
one implementation.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import signal as sps

from dreamdiff.errors import DreamdiffError

if TYPE_CHECKING:
    import mne

NormaliseMode = Literal["zscore", "fixed", "none"]
ChannelMode = Literal["tile", "interpolate"]

#: Fraction of the sampling rate the upper band edge may reach: a margin below Nyquist (0.5)
#: so the filter's transition band fits.
NYQUIST_MARGIN = 0.45
_ZSCORE_BLOCK = 64


class SignalError(DreamdiffError, ValueError):
    """A signal-processing argument or recording that cannot be processed as asked."""


def bandpass(
    x: np.ndarray, sfreq: float, l_freq: float = 5.0, h_freq: float = 95.0, order: int = 4
) -> tuple[np.ndarray, float]:
    """Zero-phase Butterworth band-pass along the last axis; returns (filtered, upper edge used).

    Why an IIR (``scipy.signal.sosfiltfilt``) rather than MNE's FIR: a 5 Hz high-pass FIR
    needs a ~1.65 s kernel, longer than an ImageNet-EEG trial (~0.5 s), while the
    forward-backward IIR works on short trials and long recordings alike at a cost
    independent of the band. Forward-backward doubles the order (8 per edge at ``order=4``)
    and makes each edge a -6 dB point. The upper edge is clipped to
    ``NYQUIST_MARGIN * sfreq`` so that low-rate recordings (e.g. 128 Hz) stay valid; the edge
    actually used is returned for the preprocess manifest.
    """
    if sfreq <= 0:
        raise SignalError(f"sfreq must be > 0 Hz, got {sfreq}")
    h_used = float(min(h_freq, NYQUIST_MARGIN * sfreq))
    if not 0 < l_freq < h_used:
        raise SignalError(
            f"l_freq must lie in (0, effective h_freq): got l_freq={l_freq} Hz, effective "
            f"h_freq={h_used:g} Hz = min(h_freq={h_freq}, {NYQUIST_MARGIN} * sfreq={sfreq})"
        )
    sos = sps.butter(order, [l_freq, h_used], btype="bandpass", fs=sfreq, output="sos")
    y = sps.sosfiltfilt(sos, x, axis=-1)
    if np.issubdtype(np.asarray(x).dtype, np.floating):
        y = y.astype(np.asarray(x).dtype, copy=False)
    return y, h_used


#: Largest term of the resampling fraction up/down: polyphase filtering builds a filter of
#: about 20 * max(up, down) taps, so the terms bound its cost (and ratios to 1000x either way).
MAX_RESAMPLE_TERM = 1000


def resample_factors(sfreq: float, target_sfreq: float) -> tuple[int, int]:
    """(up, down): the fraction ``resample`` uses for ``target_sfreq / sfreq``, both terms <= MAX_RESAMPLE_TERM.

    Exact for every common EEG rate pair; other ratios are approximated by the nearest fraction with
    small terms. Ratios beyond MAX_RESAMPLE_TERM either way (and non-finite or non-positive rates) are
    refused, so that neither the filter nor the output can grow without bound.
    """
    if not (math.isfinite(sfreq) and math.isfinite(target_sfreq) and sfreq > 0 and target_sfreq > 0):
        raise SignalError(f"sfreq and target_sfreq must be finite and > 0 Hz, got {sfreq} and {target_sfreq}")
    ratio = target_sfreq / sfreq
    if not 1 / MAX_RESAMPLE_TERM <= ratio <= MAX_RESAMPLE_TERM:
        raise SignalError(
            f"resampling {sfreq:g} Hz -> {target_sfreq:g} Hz changes the rate {ratio:.3g}-fold; at most "
            f"{MAX_RESAMPLE_TERM}-fold either way is supported"
        )
    if ratio <= 1:
        frac = Fraction(ratio).limit_denominator(MAX_RESAMPLE_TERM)
    else:  # bound the numerator instead: limit_denominator alone lets it grow with the ratio
        frac = 1 / Fraction(1 / ratio).limit_denominator(MAX_RESAMPLE_TERM)
    return frac.numerator, frac.denominator


def resampled_rate(sfreq: float, target_sfreq: float) -> float:
    """The rate ``resample`` actually delivers (equal to the target unless it is irrational-ish)."""
    up, down = resample_factors(sfreq, target_sfreq)
    return float(sfreq * Fraction(up, down))


def resampled_length(n_samples: int, sfreq: float, target_sfreq: float) -> int:
    """Samples that ``resample`` returns for ``n_samples``, computed without resampling: ceil(n * up / down)."""
    up, down = resample_factors(sfreq, target_sfreq)
    return -(-n_samples * up // down)


def resample(x: np.ndarray, sfreq: float, target_sfreq: float) -> np.ndarray:
    """Polyphase resampling along the last axis (``scipy.signal.resample_poly``).

    The ratio is approximated by a fraction with both terms <= MAX_RESAMPLE_TERM (exact for
    every common EEG rate; see ``resample_factors``); ``resampled_rate`` gives the rate
    obtained and ``resampled_length`` the output length. Polyphase filtering applies its own
    anti-alias low-pass and, unlike FFT resampling, assumes no periodicity; edges are padded
    with zeros, right for band-passed (zero-mean) EEG. Returns ``x`` itself when the rates
    are equal.
    """
    up, down = resample_factors(sfreq, target_sfreq)
    if up == down:
        return x
    return sps.resample_poly(x, up, down, axis=-1)


def window(x: np.ndarray, size: int = 512, stride: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``[C, T]`` into windows ``[n, C, size]`` starting every ``stride`` samples.

    Returns (windows, start samples). The windows are a read-only strided view of ``x`` (no
    copy): the first real copy happens at normalisation. A signal shorter than ``size``
    gives ``(0, C, size)``.
    """
    if size < 1 or stride < 1:
        raise SignalError(f"window size and stride must be >= 1, got size={size}, stride={stride}")
    if x.ndim != 2:
        raise SignalError(f"window expects x as [channels, samples], got shape {x.shape}")
    n_ch, n_t = x.shape
    if n_t < size:
        return np.empty((0, n_ch, size), dtype=x.dtype), np.empty(0, dtype=np.int64)
    views = np.lib.stride_tricks.sliding_window_view(x, size, axis=-1)[:, ::stride]  # [C, n, size]
    starts = np.arange(views.shape[1], dtype=np.int64) * stride
    return np.moveaxis(views, 1, 0), starts


def crop_and_interpolate(x: np.ndarray, start: int = 20, stop: int = 460, size: int = 512) -> np.ndarray:
    """ImageNet-EEG rule of the paper: keep samples ``[start, stop)``, stretch them to ``size``.

    Linear interpolation along time mapping the first kept sample to output 0 and the last
    (``stop - 1``) to output ``size - 1``, as the reference's ``interp1d(linspace(0, 1, L),
    ...)(linspace(0, 1, size))``. Works on ``[C, T]`` and ``[n, C, T]``.
    """
    n_t = x.shape[-1]
    if not 0 <= start < stop <= n_t or stop - start < 2:
        raise SignalError(
            f"crop needs 0 <= start < stop <= samples ({n_t}) and at least 2 kept samples, "
            f"got start={start}, stop={stop}"
        )
    if size < 2:
        raise SignalError(f"size must be >= 2, got {size}")
    kept = x[..., start:stop]
    pos = np.linspace(0.0, stop - start - 1, size)
    left = np.minimum(pos.astype(np.int64), stop - start - 2)
    frac = pos - left
    out = kept[..., left] * (1.0 - frac) + kept[..., left + 1] * frac
    return out.astype(np.result_type(x.dtype, np.float32), copy=False)


def tile_channels(x: np.ndarray, n_out: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Repeat channels cyclically up to ``n_out`` rows (``[..., C, T] -> [..., n_out, T]``).

    This is what the DreamDiffusion reference code does to feed any montage to its
    128-channel encoder: row ``i`` is channel ``i % C``. With more than ``n_out`` channels it
    keeps the first ``n_out`` (the reference picks a random contiguous block per sample, an
    augmentation that belongs to the loader, not to stored shards). The mask is True on the
    rows holding the first copy of a real channel and False on repeats.
    """
    if n_out < 1:
        raise SignalError(f"n_out must be >= 1, got {n_out}")
    if x.ndim < 2 or x.shape[-2] < 1:
        raise SignalError(f"tile_channels expects [..., channels, samples], got shape {x.shape}")
    n_ch = x.shape[-2]
    rows = np.arange(n_out) % n_ch
    return np.take(x, rows, axis=-2), np.arange(n_out) < n_ch


def _eeg_positions(info: mne.Info, picks: np.ndarray) -> np.ndarray:
    """Head-frame positions of ``picks``; raises if any is missing (NaN or at the origin)."""
    pos = np.array([info["chs"][i]["loc"][:3] for i in picks], dtype=float)
    missing = ~np.isfinite(pos).all(axis=1) | (np.abs(pos).sum(axis=1) == 0)
    if missing.any():
        names = [info["ch_names"][i] for i in np.asarray(picks)[missing]]
        raise SignalError(
            f"interpolation needs digitised electrode positions: the recording has none for "
            f"channels {names}; set a montage first (raw.set_montage(...))"
        )
    return pos


def interpolate_channels(
    raw: mne.io.BaseRaw,
    montage: str = "biosemi128",
    *,
    max_dist: float = 0.02,
    origin: str | tuple[float, float, float] | None = None,
) -> tuple[mne.io.BaseRaw, np.ndarray]:
    """Map the recording's EEG onto a standard montage with MNE's minimum-norm interpolation.

    Uses ``raw.interpolate_to(montage, method="MNE")`` (MNE >= 1.10; good EEG channels only;
    non-EEG channels are kept). Returns the new raw and a bool mask over the template's
    electrodes, True where a template electrode lies within ``max_dist`` metres of a real one
    (the rest are spatial extrapolations). ``origin`` is the sphere centre of the field
    model; None fits it to the template montage, which works with any number of source
    electrodes (MNE's ``"auto"`` needs >= 4 and drifts with the montage) and is the same for
    every recording.
    """
    import mne

    picks = mne.pick_types(raw.info, eeg=True, exclude="bads")
    if len(picks) == 0:
        raise SignalError("interpolation needs at least one good EEG channel; the recording has none")
    if raw.get_montage() is None:
        raise SignalError(
            "interpolation needs digitised electrode positions: the recording has no montage; "
            "set one first (raw.set_montage(...))"
        )
    src = _eeg_positions(raw.info, picks)
    template = mne.channels.make_standard_montage(montage)
    if origin is None:
        info_t = mne.create_info(template.ch_names, raw.info["sfreq"], "eeg")
        info_t.set_montage(template)
        _, origin, _ = mne.bem.fit_sphere_to_headshape(info_t, dig_kinds=("eeg",), units="m", verbose=False)
    out = raw.interpolate_to(template, method="MNE", origin=origin)
    dst = _eeg_positions(out.info, mne.pick_channels(out.ch_names, template.ch_names, ordered=True))
    nearest = np.sqrt(((dst[:, None, :] - src[None, :, :]) ** 2).sum(-1)).min(axis=1)
    return out, nearest <= max_dist


def normalise(
    epochs: np.ndarray,
    mode: NormaliseMode = "zscore",
    *,
    scale: float = 1e6,
    clip: float | None = None,
    eps: float = 1e-12,
) -> np.ndarray:
    """Normalise windows ``[n, C, T]`` into a new float32 array.

    - ``"zscore"``: per epoch and channel, subtract the mean over time and divide by the std.
      Channels with std <= ``eps`` (flat, zero-padded) become exactly 0 instead of inf/NaN.
      ``clip`` then bounds values to +-``clip`` std, taming artifacts.
    - ``"fixed"``: multiply by ``scale``. The reference fed amplitudes unnormalised in
      microvolts (MNE holds volts, hence the default 1e6); its pretraining loader further
      divides by 10 ("reduce an order"), i.e. ``scale=1e5``. ``clip`` bounds the result.
    - ``"none"``: a float32 copy (``clip`` still applies).
    Statistics are computed in float64, block by block: the only full-size allocation is the
    output.
    """
    if epochs.ndim != 3:
        raise SignalError(f"normalise expects epochs as [n, channels, samples], got shape {epochs.shape}")
    if clip is not None and clip <= 0:
        raise SignalError(f"clip must be > 0 or None, got {clip}")
    out = np.empty(epochs.shape, dtype=np.float32)
    if mode == "zscore":
        for i in range(0, len(epochs), _ZSCORE_BLOCK):  # blocks bound the float64 temporaries
            block, dst = epochs[i : i + _ZSCORE_BLOCK], out[i : i + _ZSCORE_BLOCK]
            mean = block.mean(axis=-1, keepdims=True, dtype=np.float64)
            std = block.std(axis=-1, keepdims=True, dtype=np.float64)
            std[std <= eps] = np.inf
            np.subtract(block, mean, out=dst, casting="same_kind")
            np.divide(dst, std, out=dst, casting="same_kind")
    elif mode == "fixed":
        np.multiply(epochs, scale, out=out, casting="same_kind")
    elif mode == "none":
        out[...] = epochs
    else:
        raise SignalError(f"normalise mode must be one of 'zscore', 'fixed', 'none', got {mode!r}")
    if clip is not None:
        np.clip(out, -clip, clip, out=out)
    return out


def epochs_from_raw(
    raw: mne.io.BaseRaw,
    *,
    l_freq: float = 5.0,
    h_freq: float = 95.0,
    sfreq: float | None = None,
    size: int = 512,
    stride: int = 512,
    channels: ChannelMode = "tile",
    montage: str = "biosemi128",
    normalise_mode: NormaliseMode = "zscore",
    scale: float = 1e6,
    clip: float | None = None,
    n_channels: int = 128,
) -> dict[str, np.ndarray | float | int]:
    """One recording -> fixed-size, 128-channel, normalised windows, plus what the manifest needs.

    Good EEG channels only; band-pass (upper edge also kept below the target rate's Nyquist
    so the band is ours, not the resampler's), resample to ``sfreq`` (None keeps the
    recording's rate), harmonise to ``n_channels`` by tiling (the paper) or by interpolation
    onto ``montage``, cut windows, normalise. Work happens on the C original channels as long
    as possible: filtering and resampling before interpolation, normalising before tiling.

    Returns ``eeg`` float32 [n, n_channels, size], ``start`` int64 [n] (first sample of each
    window, at the output rate), ``channel_mask`` bool [n_channels] (real rows: first copies
    when tiling, template electrodes near a real one when interpolating), ``sfreq`` (output
    rate), ``h_freq_used``, ``n_channels_orig``.
    """
    import mne

    if channels not in ("tile", "interpolate"):
        raise SignalError(f"channels must be 'tile' or 'interpolate', got {channels!r}")
    picks = mne.pick_types(raw.info, eeg=True, exclude="bads")
    if len(picks) == 0:
        raise SignalError("the recording has no good EEG channel to process")
    template = None
    if channels == "interpolate":
        template = mne.channels.make_standard_montage(montage)
        if len(template.ch_names) != n_channels:
            raise SignalError(
                f"montage {montage!r} has {len(template.ch_names)} electrodes but n_channels={n_channels}; "
                "choose a montage with n_channels electrodes"
            )
        if raw.get_montage() is None:
            raise SignalError(
                "channels='interpolate' needs digitised electrode positions: the recording has no "
                "montage; use channels='tile' or set a montage"
            )
        _eeg_positions(raw.info, picks)  # fail before the heavy work

    sfreq_in = float(raw.info["sfreq"])
    sfreq_out = sfreq_in if sfreq is None else resampled_rate(sfreq_in, sfreq)
    # tiling keeps only the first n_channels rows: skip work on the rest
    used = picks[:n_channels] if channels == "tile" else picks
    data = raw.get_data(picks=used)  # [C, T] float64, the one copy of the recording
    data, h_used = bandpass(data, sfreq_in, l_freq, min(h_freq, NYQUIST_MARGIN * sfreq_out))
    data = resample(data, sfreq_in, sfreq_out)

    if channels == "interpolate":
        info = mne.create_info([raw.ch_names[i] for i in picks], sfreq_out, "eeg")
        info.set_montage(raw.get_montage())
        harmonised, mask = interpolate_channels(mne.io.RawArray(data, info, verbose=False), montage)
        del data
        data = harmonised.get_data(picks=template.ch_names)
        del harmonised
    windows, starts = window(data, size, stride)
    eeg = normalise(windows, normalise_mode, scale=scale, clip=clip)
    if channels == "tile":
        eeg, mask = tile_channels(eeg, n_channels)
    return {
        "eeg": eeg,
        "start": starts,
        "channel_mask": mask,
        "sfreq": sfreq_out,
        "h_freq_used": h_used,
        "n_channels_orig": len(picks),
    }
