"""SynthEEG-Image: shapes, determinism, splits, visual distinctness, and a calibrated EEG signal."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.linear_model import Ridge, RidgeClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dreamdiff.data.synthetic import (
    FEATURE_NAMES,
    SynthConfig,
    electrode_positions,
    generate_subject,
    generate_unlabeled,
    image_class,
    image_features,
    image_split,
)
from dreamdiff.data.synthetic_images import class_attributes, render_image

SMALL = SynthConfig(num_classes=3, images_per_class=4, repeats=2, image_size=16)


def _binned(eeg: np.ndarray, width: int = 16) -> np.ndarray:
    """Trial features: raw EEG averaged in `width`-sample bins, flattened."""
    n, c, t = eeg.shape
    return eeg[..., : t // width * width].reshape(n, c, t // width, width).mean(-1).reshape(n, -1)


def _paired(cfg: SynthConfig) -> dict[str, np.ndarray]:
    """All subjects' trials as a linear probe sees them."""
    start = time.perf_counter()
    subjects = [generate_subject(cfg, s) for s in range(cfg.num_subjects)]
    elapsed = time.perf_counter() - start
    images = np.concatenate([d["image_index"] for d in subjects])
    return {
        "x": np.concatenate([_binned(d["eeg"]) for d in subjects]),
        "label": np.concatenate([d["label"] for d in subjects]),
        "image_index": images,
        "split": np.array([image_split(cfg, int(i)) for i in images]),
        "features": np.stack([image_features(cfg, int(i)) for i in images]),
        "seconds": np.array(elapsed),
    }


@pytest.fixture(scope="module")
def default_data() -> dict[str, np.ndarray]:
    return _paired(SynthConfig())


def _held_out_accuracy(data: dict[str, np.ndarray]) -> float:
    train = data["split"] == "train"
    assert not set(data["image_index"][train]) & set(data["image_index"][~train]), "split must be by image"
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1000.0))
    probe.fit(data["x"][train], data["label"][train])
    return float(probe.score(data["x"][~train], data["label"][~train]))


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad",
    [
        {"num_classes": 41},
        {"num_classes": 1},
        {"snr": -0.1},
        {"image_size": 7},
        {"blink_prob": 1.5},
        {"split_fractions": (0.5, 0.2, 0.2)},
        {"split_fractions": (0.0, 0.5, 0.5)},
        {"num_samples": 128},  # 0.128 s at 1 kHz cannot hold components up to 350 ms
        {"line_freq": 600.0},  # above Nyquist
        {"unknown_key": 1},
    ],
)
def test_bad_config_is_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        SynthConfig(**bad)


def test_defaults_match_imagenet_eeg_shapes() -> None:
    cfg = SynthConfig()
    assert (cfg.num_channels, cfg.num_samples, cfg.sfreq) == (128, 512, 1000.0)
    assert SynthConfig(num_classes=40).num_classes == 40


# ------------------------------------------------------------------------------------------- images


def test_class_attributes_are_distinct_for_40_classes() -> None:
    attrs = class_attributes(SynthConfig(num_classes=40))
    assert len(attrs) == 40
    triplets = {(a["shape"], a["colour"], a["texture"]) for a in attrs}
    assert len(triplets) == 40
    # any two classes share at most one of shape and colour
    pairs = {(a["shape"], a["colour"]) for a in attrs}
    assert len(pairs) == 40
    assert len(class_attributes(SynthConfig(num_classes=7))) == 7


def test_render_image_shape_dtype_and_determinism() -> None:
    for size in (8, 16, 64):
        cfg = SynthConfig(image_size=size)
        img = render_image(cfg, 5)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, render_image(SynthConfig(image_size=size), 5))
    cfg = SynthConfig(image_size=32)
    assert not np.array_equal(render_image(cfg, 0), render_image(cfg, 1))  # same class, other jitter
    assert not np.array_equal(render_image(cfg, 0), render_image(SynthConfig(image_size=32, seed=1), 0))
    assert render_image(cfg, 0).std() > 10  # a figure on a background, not a flat field


def test_image_features_and_class() -> None:
    cfg = SynthConfig(num_classes=4, images_per_class=5)
    phi = image_features(cfg, 7)
    assert phi.shape == (len(FEATURE_NAMES),) and phi.dtype == np.float64
    assert np.all(np.abs(phi) <= 1.0)
    np.testing.assert_array_equal(phi, image_features(SynthConfig(num_classes=4, images_per_class=5), 7))
    assert not np.array_equal(phi, image_features(cfg, 8))
    assert not np.array_equal(phi, image_features(SynthConfig(num_classes=4, images_per_class=5, seed=3), 7))
    assert [image_class(cfg, i) for i in range(20)] == [i // 5 for i in range(20)]
    for bad in (-1, 20):
        with pytest.raises(IndexError):
            image_class(cfg, bad)


def test_splits_are_by_image_stratified_and_deterministic() -> None:
    cfg = SynthConfig(num_classes=10, images_per_class=20)
    splits = np.array([image_split(cfg, i) for i in range(200)])
    classes = np.array([image_class(cfg, i) for i in range(200)])
    assert set(splits) == {"train", "val", "test"}  # one label per image: disjoint by construction
    for k in range(10):
        counts = {s: int(np.sum((classes == k) & (splits == s))) for s in ("train", "val", "test")}
        assert counts == {"train": 16, "val": 2, "test": 2}
    assert [image_split(cfg, i) for i in range(200)] == list(splits)
    other = [image_split(SynthConfig(seed=9), i) for i in range(200)]
    assert other != list(splits)
    # tiny classes still have training images
    tiny = SynthConfig(num_classes=5, images_per_class=2, split_fractions=(0.2, 0.4, 0.4))
    for k in range(5):
        assert "train" in {image_split(tiny, 2 * k + j) for j in range(2)}


@pytest.mark.parametrize(("num_classes", "images_per_class", "min_accuracy"), [(10, 20, 0.6), (40, 10, 0.3)])
def test_classes_are_visually_distinct_at_16px(num_classes: int, images_per_class: int, min_accuracy: float) -> None:
    cfg = SynthConfig(num_classes=num_classes, images_per_class=images_per_class, image_size=16)
    n = num_classes * images_per_class
    pixels = np.stack([render_image(cfg, i).astype(np.float32).ravel() for i in range(n)])
    labels = np.array([image_class(cfg, i) for i in range(n)])
    train = np.array([image_split(cfg, i) == "train" for i in range(n)])
    means = np.stack([pixels[train & (labels == k)].mean(0) for k in range(num_classes)])
    nearest = np.argmin(((pixels[~train, None] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = float(np.mean(nearest == labels[~train]))
    assert accuracy >= min_accuracy, f"nearest-class-mean accuracy {accuracy:.2f} (chance {1 / num_classes:.3f})"


# ---------------------------------------------------------------------------------------------- EEG


def test_generate_subject_shapes_and_presentation_order() -> None:
    d = generate_subject(SMALL, 0)
    n = 3 * 4 * 2
    assert d["eeg"].shape == (n, 128, 512) and d["eeg"].dtype == np.float32
    for key in ("label", "image_index", "block", "trial"):
        assert d[key].shape == (n,) and d[key].dtype == np.int64, key
    assert np.all(np.isfinite(d["eeg"]))
    np.testing.assert_array_equal(d["label"], d["image_index"] // 4)
    np.testing.assert_array_equal(np.bincount(d["image_index"]), np.full(12, 2))  # each image once per repeat
    np.testing.assert_array_equal(d["trial"], np.arange(n))
    np.testing.assert_array_equal(d["block"], np.arange(n) // 50)
    assert not np.array_equal(d["image_index"], np.sort(d["image_index"]))  # shuffled
    assert not np.array_equal(d["image_index"], generate_subject(SMALL, 1)["image_index"])  # per subject
    big = generate_subject(SynthConfig(num_classes=10, images_per_class=12, snr=0.0, num_channels=4), 0)
    assert big["eeg"].shape == (120, 4, 512) and set(big["block"]) == {0, 1, 2}


def test_generation_is_deterministic() -> None:
    a, b = generate_subject(SMALL, 1), generate_subject(SMALL.model_copy(), 1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["eeg"], generate_subject(SMALL.model_copy(update={"seed": 1}), 1)["eeg"])
    assert not np.array_equal(a["eeg"], generate_subject(SMALL, 0)["eeg"])


def test_generate_unlabeled_is_a_deterministic_stream() -> None:
    cfg = SynthConfig(num_classes=3, images_per_class=2)
    x = generate_unlabeled(cfg, 0, 10, offset=60)
    assert x.shape == (10, 128, 512) and x.dtype == np.float32 and np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, generate_unlabeled(cfg, 0, 10, offset=60))
    np.testing.assert_array_equal(x[4:], generate_unlabeled(cfg, 0, 6, offset=64))  # epoch e is fixed
    assert not np.array_equal(x[:5], generate_unlabeled(cfg, 0, 5, offset=0))
    assert not np.array_equal(x, generate_unlabeled(cfg, 1, 10, offset=60))
    assert not np.array_equal(x, generate_unlabeled(cfg.model_copy(update={"seed": 4}), 0, 10, offset=60))
    assert generate_unlabeled(cfg, 0, 0).shape == (0, 128, 512)
    with pytest.raises(ValueError):
        generate_unlabeled(cfg, 0, 3, offset=-1)


def test_snr_is_signal_power_over_unit_noise_power() -> None:
    base = SynthConfig(num_classes=10, images_per_class=10, num_subjects=1)
    noise_power = float(np.mean(generate_subject(base.model_copy(update={"snr": 0.0}), 0)["eeg"] ** 2))
    assert 0.85 < noise_power < 1.15
    loud = generate_subject(base.model_copy(update={"snr": 1e4}), 0)["eeg"]
    assert 0.7 < float(np.mean(loud.astype(np.float64) ** 2)) / 1e4 < 1.3


def test_noise_has_the_documented_ingredients() -> None:
    cfg = SynthConfig(num_classes=4, images_per_class=10, snr=0.0, blink_prob=0.0)
    eeg = generate_subject(cfg, 0)["eeg"].astype(np.float64)
    psd = np.mean(np.abs(np.fft.rfft(eeg, axis=-1)) ** 2, axis=(0, 1))
    freqs = np.fft.rfftfreq(cfg.num_samples, 1.0 / cfg.sfreq)

    def band(lo: float, hi: float) -> float:
        return float(psd[(freqs >= lo) & (freqs < hi)].mean())

    assert band(49, 51) > 3 * band(55, 65)  # line noise
    assert band(8, 12.5) > 3 * band(14, 20)  # alpha peak
    assert band(2, 6) > 3 * band(30, 45)  # 1/f background
    pos = electrode_positions(cfg)
    assert pos.shape == (128, 3) and np.allclose(np.linalg.norm(pos, axis=1), 1.0)
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    corr = np.corrcoef(eeg.transpose(1, 0, 2).reshape(128, -1))
    near = corr[(dist > 0) & (dist < 0.3)].mean()
    far = corr[dist > 1.2].mean()
    assert near > 0.3 and far < near - 0.2, (near, far)  # volume conduction: neighbours correlate
    blinky = generate_subject(cfg.model_copy(update={"blink_prob": 1.0}), 0)["eeg"].astype(np.float64)
    extra = np.mean(blinky**2, axis=(0, 2)) / np.mean(eeg**2, axis=(0, 2))  # per-channel power ratio
    assert extra.max() > 5 * np.median(extra), "blinks should dominate a few channels"
    assert pos[np.argmax(extra), 1] > 0.5, "blinks are frontal (y points to the nose)"


def test_eeg_carries_class_information_at_default_snr(default_data: dict[str, np.ndarray]) -> None:
    accuracy = _held_out_accuracy(default_data)
    assert 0.4 <= accuracy < 0.95, f"held-out accuracy {accuracy:.3f} (chance 0.1)"


def test_eeg_carries_no_class_information_at_zero_snr() -> None:
    accuracy = _held_out_accuracy(_paired(SynthConfig(snr=0.0)))
    assert accuracy < 0.2, f"held-out accuracy {accuracy:.3f} at snr=0 (chance 0.1)"


def test_image_features_are_weakly_decodable(default_data: dict[str, np.ndarray]) -> None:
    train = default_data["split"] == "train"
    probe = make_pipeline(StandardScaler(), Ridge(alpha=3000.0))
    probe.fit(default_data["x"][train], default_data["features"][train])
    predicted = probe.predict(default_data["x"][~train])
    truth = default_data["features"][~train]
    corr = [np.corrcoef(predicted[:, f], truth[:, f])[0, 1] for f in range(truth.shape[1])]
    assert 0.1 < np.mean(corr) < 0.9, corr


def test_generation_is_vectorised(default_data: dict[str, np.ndarray]) -> None:
    # 2 subjects x 200 trials x 128 x 512 take about 1 s on one core; a loop over samples would take minutes
    assert float(default_data["seconds"]) < 10.0
