r"""SynthEEG-Image: a synthetic paired (EEG, image) benchmark with known ground truth; its EEG model.

Pure numpy. Every public function is a pure function of its arguments: all randomness
comes from ``np.random.default_rng(np.random.SeedSequence([cfg.seed, TAG, ...]))`` keyed by
what it describes (an image, a class, a subject, a chunk of trials), never from global state.
The stimulus images themselves are drawn by :mod:`dreamdiff.data.synthetic_images`.

Images
------
``N = K * images_per_class`` stimulus images; image ``i`` has class ``k(i) = i // images_per_class``
and draws a jitter vector ``phi(i) ~ U(-1, 1)^F`` (``F = 7``, names in :data:`FEATURE_NAMES`): hue
shift, scale, position, rotation, texture frequency and background of the rendered image, and the
input of the EEG's image-feature map below.

EEG (one trial = one presentation of image i to subject s)
----------------------------------------------------------
Time ``t_n = n / sfreq`` (s), ``n = 0..T-1``; the epoch starts at stimulus onset. ``J`` latent
sources, ``L = 4`` evoked components with latencies ``mu = (100, 170, 250, 350)`` ms, widths
``sigma = (15, 20, 30, 40)`` ms and carriers ``f = (10, 8, 6, 5)`` Hz::

    g_l(t)    = c_l * exp(-(t - mu_l)^2 / (2 sigma_l^2)) * cos(2 pi f_l (t - mu_l)),
                c_l such that mean_t g_l(t)^2 = 1 over the epoch
    A_jl      = [ sqrt(.25) m_jl + sqrt(.45) a_{k,jl} + sqrt(.15) (B_jl . phi(i)) + sqrt(.15) eps_jl ]
                / sqrt(J L)
    s_j(t)    = sum_l A_jl g_l(t - d_s - delta)
    x_sig(t)  = G_s s(t)                                   (C x J mixing, C = num_channels)

``m ~ N(0, 1)`` is the common ERP (every image evokes it), ``a_k ~ N(0, 1)^{J x L}`` the class code
of class ``k``, ``B ~ N(0, 3 / F)^{J x L x F}`` the linear image-feature map (so ``Var(B . phi) = 1``
and within-class image identity is weakly decodable), ``eps ~ N(0, 1)`` per-trial amplitude
variability, ``delta ~ N(0, (8 ms)^2)`` per-trial latency jitter and ``d_s ~ N(0, (5 ms)^2)`` a
per-subject latency offset. ``m``, ``a``, ``B`` are shared by all subjects. The columns of
``G_s`` are dipole potentials ``V_cj = p_j . (e_c - r_j) / |e_c - r_j|^3`` of source ``j`` at
``r_j`` (radius 0.45-0.65 in a unit head, posterior/visual template plus per-subject jitter,
moment ``p_j`` with per-subject jitter) seen at electrode ``e_c`` on the unit sphere (a
Fibonacci lattice over the cap ``z >= -0.25``; ``x`` right, ``y`` nose, ``z`` up); each
column is scaled to mean-square 1 over channels. Hence, with all draws independent and zero
mean, ``E[mean_{c,t} x_sig^2] = 1``.

Noise (pink, alpha and line each have unit expected power per channel and sample before weighting)::

    x_noise = (sqrt(1.0) pink + sqrt(0.4) alpha + sqrt(0.05) line + blink) / sqrt(P_noise)

* pink: ``1/f^noise_exponent`` power spectrum (default 2, the steep end of scalp EEG; DC removed),
  generated over ``1.25 T`` samples and cropped (not periodic),
  spatially correlated by ``Sigma^{1/2}`` with ``Sigma_cc' = 0.9 exp(-|e_c - e_c'| / 0.5) + 0.1 I``.
* alpha: two occipital generators (left/right), each
  ``a (1 + 0.6 sin(2 pi f_m t + psi)) cos(2 pi f_a t + phi)`` with ``f_a`` = subject alpha
  frequency ``~ U(8.5, 12)`` Hz + ``N(0, 0.3^2)`` Hz per trial, ``f_m ~ U(0.5, 3)`` Hz envelope,
  ``a`` log-normal with ``E[a^2] = 1``; Gaussian occipital maps (mean-square 1).
* line: ``sqrt(2) h_c sin(2 pi line_freq t + phi)``, per-subject electrode gains ``h`` (log-normal,
  mean-square 1), one random phase per trial.
* blink: with probability ``blink_prob`` a positive Gaussian deflection (sigma 50 ms) centred
  uniformly in the epoch, peak ``U(0.6, 1.4) * 10`` (about 8x the ambient s.d. of 1.2) at the most
  frontal electrodes, decaying away from the eyes (Gaussian map, width 0.35 head radii).

``P_noise = 1.45 + blink_prob * E[blink power]`` (computed, not estimated), so the noise has unit
expected power per channel and sample. Finally::

    eeg = sqrt(snr) * x_sig + x_noise          (float32)

SNR is the ratio of expected signal power to expected noise power; ``snr = 0`` means no
stimulus information at all. Units: dimensionless "noise units" (background has unit variance
per sample and channel); multiply by about 10 to read them as microvolts.

Splits are by IMAGE, stratified per class. Trials of a subject are presented in a seeded random
order (every image once per repeat, classes interleaved, no block-design confound) in blocks of
50 trials (as ImageNet-EEG's 50-image blocks).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from pydantic import Field, model_validator

from dreamdiff.configbase import StrictModel

FEATURE_NAMES = ("hue_shift", "scale", "x", "y", "rotation", "texture_freq", "background")

# second SeedSequence word: which kind of draw (keeps the streams of images, classes, subjects... apart)
_TAG_IMAGE, _TAG_SPLIT, _TAG_CODE, _TAG_ERP = 1, 2, 3, 4
_TAG_SUBJECT, _TAG_ORDER, _TAG_TRIALS, _TAG_UNLABELED = 5, 6, 7, 8
_CHUNK = 64  # trials generated per vectorised chunk (bounds memory; fixes RNG streams per chunk)
_BLOCK_TRIALS = 50

_LATENCIES_S = np.array([0.100, 0.170, 0.250, 0.350])
_WIDTHS_S = np.array([0.015, 0.020, 0.030, 0.040])
_CARRIERS_HZ = np.array([10.0, 8.0, 6.0, 5.0])
_W_COMMON, _W_CLASS, _W_FEATURE, _W_TRIAL = 0.25, 0.45, 0.15, 0.15
_TRIAL_JITTER_S, _SUBJECT_JITTER_S = 0.008, 0.005

_PINK_POWER, _ALPHA_POWER, _LINE_POWER = 1.0, 0.4, 0.05
_BLINK_PEAK, _BLINK_SIGMA_S = 10.0, 0.05
_ALPHA_DEPTH = 0.6


class SynthConfig(StrictModel):
    """Size, signal and noise of a SynthEEG-Image dataset."""

    num_classes: int = Field(10, ge=2, le=40)
    images_per_class: int = Field(20, ge=1)
    num_subjects: int = Field(2, ge=1)
    repeats: int = Field(1, ge=1, description="trials per image per subject")
    image_size: int = Field(64, ge=8, description="px, square RGB")
    num_channels: int = Field(128, ge=1)
    num_samples: int = Field(512, ge=16)
    sfreq: float = Field(1000.0, gt=0, description="Hz")
    snr: float = Field(0.2, ge=0, description="expected signal power / expected noise power")
    num_sources: int = Field(8, ge=1)
    line_freq: float = Field(50.0, gt=0, description="Hz")
    noise_exponent: float = Field(
        2.0, ge=0, le=3, description="aperiodic background: power ~ 1/f**noise_exponent (scalp EEG: about 1-2)"
    )
    blink_prob: float = Field(0.1, ge=0, le=1)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if any(f < 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {self.split_fractions}")
        if self.split_fractions[0] <= 0:
            raise ValueError("split_fractions[0] (train) must be > 0")
        if self.num_samples / self.sfreq < 0.4:
            raise ValueError(
                f"num_samples / sfreq = {self.num_samples / self.sfreq:.3f} s; the epoch must last at least "
                "0.4 s to hold the evoked components (100-350 ms)"
            )
        if self.line_freq >= self.sfreq / 2:
            raise ValueError(f"line_freq ({self.line_freq} Hz) must be below Nyquist (sfreq / 2 = {self.sfreq / 2} Hz)")
        return self


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _num_images(cfg: SynthConfig) -> int:
    return cfg.num_classes * cfg.images_per_class


def _check_image(cfg: SynthConfig, image_index: int) -> None:
    if not 0 <= image_index < _num_images(cfg):
        raise IndexError(f"image_index must be in [0, {_num_images(cfg)}), got {image_index}")


# ------------------------------------------------------------------------------ stimulus images


def image_class(cfg: SynthConfig, image_index: int) -> int:
    """Class of a stimulus image (images are numbered class by class)."""
    _check_image(cfg, image_index)
    return image_index // cfg.images_per_class


def image_features(cfg: SynthConfig, image_index: int) -> np.ndarray:
    """The image's jitter vector ``phi`` in [-1, 1], float64 [F], in the order of FEATURE_NAMES."""
    _check_image(cfg, image_index)
    return _rng(cfg.seed, _TAG_IMAGE, image_index).uniform(-1.0, 1.0, len(FEATURE_NAMES))


def _all_features(cfg: SynthConfig) -> np.ndarray:
    return np.stack([image_features(cfg, i) for i in range(_num_images(cfg))])


def image_split(cfg: SynthConfig, image_index: int) -> str:
    """Split of an image, "train", "val" or "test": a seeded per-class permutation cut by split_fractions."""
    k = image_class(cfg, image_index)
    n = cfg.images_per_class
    _, f_val, f_test = cfg.split_fractions
    n_test = min(round(f_test * n), n - 1)
    n_val = min(round(f_val * n), n - 1 - n_test)
    rank = int(np.argsort(_rng(cfg.seed, _TAG_SPLIT, k).permutation(n))[image_index % n])
    if rank < n_val:
        return "val"
    if rank < n_val + n_test:
        return "test"
    return "train"


# ---------------------------------------------------------------------------------------- sensors


@lru_cache(maxsize=8)
def _electrodes(num_channels: int) -> np.ndarray:
    """Fibonacci lattice over the cap z >= -0.25 of the unit sphere, [C, 3] (x right, y nose, z up)."""
    i = np.arange(num_channels) + 0.5
    z = 1.0 - 1.25 * i / num_channels
    rho = np.sqrt(1.0 - z**2)
    ang = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([rho * np.cos(ang), rho * np.sin(ang), z], axis=1)


def electrode_positions(cfg: SynthConfig) -> np.ndarray:
    """Electrode positions on the unit sphere, float64 [C, 3] (x right, y nose, z up); one cap for all."""
    return _electrodes(cfg.num_channels).copy()


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _scalp_map(num_channels: int, centre: tuple[float, float, float], width: float) -> np.ndarray:
    d2 = np.sum((_electrodes(num_channels) - _unit(np.array(centre))) ** 2, axis=1)
    return np.exp(-d2 / (2.0 * width**2))


def _mean_square_one(x: np.ndarray, axis: int = 0) -> np.ndarray:
    return x / np.sqrt(np.mean(x**2, axis=axis, keepdims=True))


@lru_cache(maxsize=8)
def _noise_sqrt_cov(num_channels: int) -> np.ndarray:
    e = _electrodes(num_channels)
    dist = np.linalg.norm(e[:, None] - e[None], axis=-1)
    cov = 0.9 * np.exp(-dist / 0.5) + 0.1 * np.eye(num_channels)
    w, v = np.linalg.eigh(cov)
    return ((v * np.sqrt(np.clip(w, 0.0, None))) @ v.T).astype(np.float32)


# ------------------------------------------------------------------------------------ generative model


def _class_codes(cfg: SynthConfig) -> np.ndarray:
    """a_k: [K, J, L], class k's code independent of num_classes."""
    shape = (cfg.num_sources, len(_LATENCIES_S))
    return np.stack([_rng(cfg.seed, _TAG_CODE, k).standard_normal(shape) for k in range(cfg.num_classes)])


def _erp_model(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Common ERP m [J, L], feature map B [J, L, F], source template positions and moments [J, 3]."""
    rng = _rng(cfg.seed, _TAG_ERP)
    j, n_l, f = cfg.num_sources, len(_LATENCIES_S), len(FEATURE_NAMES)
    common = rng.standard_normal((j, n_l))
    feat_map = rng.standard_normal((j, n_l, f)) * math.sqrt(3.0 / f)
    direction = np.stack([rng.uniform(-0.8, 0.8, j), rng.uniform(-1.0, -0.2, j), rng.uniform(-0.1, 0.8, j)], 1)
    moment = _unit(rng.standard_normal((j, 3)))
    return common, feat_map, _unit(direction), moment


def _components(cfg: SynthConfig, latency_shift: np.ndarray) -> np.ndarray:
    """g_l(t - shift): [n, L, T] float32 with latency_shift [n] in s."""
    t = np.arange(cfg.num_samples) / cfg.sfreq
    nominal = t[None] - _LATENCIES_S[:, None]
    g0 = np.exp(-(nominal**2) / (2 * _WIDTHS_S[:, None] ** 2)) * np.cos(2 * np.pi * _CARRIERS_HZ[:, None] * nominal)
    norm = 1.0 / np.sqrt(np.mean(g0**2, axis=1))
    tau = t[None, None] - _LATENCIES_S[None, :, None] - latency_shift[:, None, None]
    g = np.exp(-(tau**2) / (2 * _WIDTHS_S[None, :, None] ** 2)) * np.cos(2 * np.pi * _CARRIERS_HZ[None, :, None] * tau)
    return (g * norm[None, :, None]).astype(np.float32)


def _subject_model(cfg: SynthConfig, subject: int) -> dict[str, np.ndarray | float]:
    """Everything fixed within a subject: mixing, latency offset, alpha, line gains."""
    if subject < 0:
        raise ValueError(f"subject must be >= 0, got {subject}")
    rng = _rng(cfg.seed, _TAG_SUBJECT, subject)
    _, _, direction, moment = _erp_model(cfg)
    j, c = cfg.num_sources, cfg.num_channels
    pos = _unit(direction + 0.2 * rng.standard_normal((j, 3))) * rng.uniform(0.45, 0.65, (j, 1))
    mom = _unit(moment + 0.5 * rng.standard_normal((j, 3)))
    diff = _electrodes(c)[:, None, :] - pos[None]  # [C, J, 3]
    gain = np.sum(mom[None] * diff, axis=-1) / np.linalg.norm(diff, axis=-1) ** 3
    alpha_maps = np.stack([_scalp_map(c, (sx, -0.85, 0.3), 0.5) for sx in (-0.35, 0.35)], axis=1)
    return {
        "mixing": _mean_square_one(gain).astype(np.float32),
        "latency": float(rng.normal(0.0, _SUBJECT_JITTER_S)),
        "alpha_freq": float(rng.uniform(8.5, 12.0)),
        "alpha_maps": _mean_square_one(alpha_maps).astype(np.float32),
        "line_gain": _mean_square_one(np.exp(0.5 * rng.standard_normal(c))).astype(np.float32),
        "blink_map": _scalp_map(c, (0.0, 0.95, -0.3), 0.35).astype(np.float32),
    }


def _blink_power(cfg: SynthConfig, blink_map: np.ndarray) -> float:
    """Expected mean-square power of one blink (amplitude, centre and map averaged)."""
    t = np.arange(cfg.num_samples) / cfg.sfreq
    centres = np.linspace(0.0, t[-1], 101)
    shape_power = np.mean(np.exp(-((t[None] - centres[:, None]) ** 2) / _BLINK_SIGMA_S**2))
    amp_power = _BLINK_PEAK**2 * (0.6**2 + 0.6 * 1.4 + 1.4**2) / 3.0  # E[U(0.6, 1.4)^2] * peak^2
    return float(amp_power * np.mean(blink_map.astype(np.float64) ** 2) * shape_power)


def _pink(cfg: SynthConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """Spatially correlated 1/f^noise_exponent noise, unit expected power, [n, C, T] float32."""
    n_fft = cfg.num_samples + cfg.num_samples // 4  # crop: the epoch is not periodic
    freqs = np.fft.rfftfreq(n_fft, 1.0 / cfg.sfreq)
    h = np.zeros_like(freqs)
    h[1:-1] = freqs[1:-1] ** (-cfg.noise_exponent / 2)
    h *= 1.0 / math.sqrt(4.0 / n_fft**2 * np.sum(h**2))
    shape = (n, cfg.num_channels, freqs.size)
    spec = rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)
    x = np.fft.irfft(spec * h.astype(np.float32), n=n_fft, axis=-1)[..., : cfg.num_samples].astype(np.float32)
    return np.matmul(_noise_sqrt_cov(cfg.num_channels), x)


def _synthesize(
    cfg: SynthConfig, model: dict, classes: np.ndarray, feats: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """EEG of trials with the given classes [n] and image features [n, F]: float32 [n, C, T]."""
    n = len(classes)
    common, feat_map, _, _ = _erp_model(cfg)
    j, n_l = common.shape
    t = (np.arange(cfg.num_samples) / cfg.sfreq).astype(np.float32)

    # evoked signal
    amp = (
        math.sqrt(_W_COMMON) * common[None]
        + math.sqrt(_W_CLASS) * _class_codes(cfg)[classes]
        + math.sqrt(_W_FEATURE) * np.einsum("jlf,nf->njl", feat_map, feats)
        + math.sqrt(_W_TRIAL) * rng.standard_normal((n, j, n_l))
    ) / math.sqrt(j * n_l)
    shift = model["latency"] + rng.normal(0.0, _TRIAL_JITTER_S, n)
    sources = np.matmul(amp.astype(np.float32), _components(cfg, shift))  # [n, J, T]
    eeg = np.matmul(model["mixing"], sources)
    eeg *= np.float32(math.sqrt(cfg.snr))

    # noise: pink + alpha + line + blink, then scaled to unit expected power
    noise = _pink(cfg, rng, n)
    f_alpha = model["alpha_freq"] + rng.normal(0.0, 0.3, (n, 2, 1))
    f_mod = rng.uniform(0.5, 3.0, (n, 2, 1))
    amp_alpha = np.exp(0.4 * rng.standard_normal((n, 2, 1)) - 0.4**2)  # E[a^2] = 1
    phases = rng.uniform(0.0, 2 * np.pi, (n, 2, 2))
    gens = (
        amp_alpha
        * (1.0 + _ALPHA_DEPTH * np.sin(2 * np.pi * f_mod * t + phases[..., :1]))
        * np.cos(2 * np.pi * f_alpha * t + phases[..., 1:])
    ) * math.sqrt(2.0 / (1.0 + _ALPHA_DEPTH**2 / 2) / 2.0)
    noise += math.sqrt(_ALPHA_POWER) * np.matmul(model["alpha_maps"], gens.astype(np.float32))
    line = math.sqrt(2.0 * _LINE_POWER) * np.sin(2 * np.pi * cfg.line_freq * t + rng.uniform(0, 2 * np.pi, (n, 1)))
    noise += model["line_gain"][None, :, None] * line[:, None, :].astype(np.float32)
    blink_on = rng.random(n) < cfg.blink_prob
    centres = rng.uniform(0.0, t[-1], n)
    peaks = _BLINK_PEAK * rng.uniform(0.6, 1.4, n) * blink_on
    blinks = peaks[:, None] * np.exp(-((t[None] - centres[:, None]) ** 2) / (2 * _BLINK_SIGMA_S**2))
    noise += model["blink_map"][None, :, None] * blinks[:, None, :].astype(np.float32)
    p_noise = _PINK_POWER + _ALPHA_POWER + _LINE_POWER + cfg.blink_prob * _blink_power(cfg, model["blink_map"])
    noise *= np.float32(1.0 / math.sqrt(p_noise))

    eeg += noise
    return eeg


# ------------------------------------------------------------------------------------ public EEG API


def generate_subject(cfg: SynthConfig, subject: int) -> dict[str, np.ndarray]:
    """All trials of one subject in presentation order.

    Returns ``eeg`` float32 [n, C, T], ``label``, ``image_index``, ``block``, ``trial`` (int64 [n]),
    with ``n = num_classes * images_per_class * repeats``.
    """
    model = _subject_model(cfg, subject)
    order_rng = _rng(cfg.seed, _TAG_ORDER, subject)
    images = np.concatenate([order_rng.permutation(_num_images(cfg)) for _ in range(cfg.repeats)]).astype(np.int64)
    labels = images // cfg.images_per_class
    feats = _all_features(cfg)[images]
    n = len(images)
    eeg = np.empty((n, cfg.num_channels, cfg.num_samples), dtype=np.float32)
    for chunk, start in enumerate(range(0, n, _CHUNK)):
        sl = slice(start, start + _CHUNK)
        rng = _rng(cfg.seed, _TAG_TRIALS, subject, chunk)
        eeg[sl] = _synthesize(cfg, model, labels[sl], feats[sl], rng)
    trial = np.arange(n, dtype=np.int64)
    return {
        "eeg": eeg,
        "label": labels,
        "image_index": images,
        "block": trial // _BLOCK_TRIALS,
        "trial": trial,
    }


def generate_unlabeled(cfg: SynthConfig, subject: int, num_epochs: int, offset: int = 0) -> np.ndarray:
    """Epochs ``offset .. offset + num_epochs - 1`` of a subject's unlabeled stream: float32 [n, C, T].

    Same generator, but each epoch shows a fresh virtual image (uniform random class, features
    ~ U(-1, 1)), never one of the stimulus set. Epoch ``e`` depends only on (cfg, subject, e), so
    overlapping ranges agree and disjoint ranges are independent.
    """
    if num_epochs < 0 or offset < 0:
        raise ValueError(f"num_epochs and offset must be >= 0, got {num_epochs} and {offset}")
    model = _subject_model(cfg, subject)
    out = np.empty((num_epochs, cfg.num_channels, cfg.num_samples), dtype=np.float32)
    first, last = offset // _CHUNK, (offset + max(num_epochs, 1) - 1) // _CHUNK
    for chunk in range(first, last + 1):
        rng = _rng(cfg.seed, _TAG_UNLABELED, subject, chunk)
        classes = rng.integers(0, cfg.num_classes, _CHUNK)
        feats = rng.uniform(-1.0, 1.0, (_CHUNK, len(FEATURE_NAMES)))
        lo, hi = max(offset, chunk * _CHUNK), min(offset + num_epochs, (chunk + 1) * _CHUNK)
        block = _synthesize(cfg, model, classes, feats, rng)
        out[lo - offset : hi - offset] = block[lo - chunk * _CHUNK : hi - chunk * _CHUNK]
    return out
