"""ImageNet-EEG as the reference code reads it (`profile: reference`), and split files read unambiguously."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from scipy.interpolate import interp1d
from tests.data.test_preprocess import _make_release

from dreamdiff.cli import main
from dreamdiff.config import REPO_CONFIGS, PreprocessConfig, load_config, validate_config
from dreamdiff.data import imagenet_eeg, moabb_source, signal
from dreamdiff.data.preprocess import (
    IMAGENET_EEG_SFREQ,
    SubjectTask,
    _imagenet_rows,
    plan,
    process_subject,
    write_manifest,
)
from dreamdiff.errors import DreamdiffError

LENGTHS = [440, 450, 600, 610, 520]  # subject 1's trials: the first and the fourth lie outside 450..600


def _reference(eeg: np.ndarray) -> np.ndarray:
    """The reference code's own recipe: scipy's interp1d from the kept samples' [0, 1] grid onto 512 points."""
    kept = eeg[:, 20:460]
    return interp1d(np.linspace(0, 1, kept.shape[-1]), kept)(np.linspace(0, 1, 512))


def _splits(path: Path, split: dict[str, list[int]]) -> Path:
    torch.save({"splits": [split]}, path)
    return path


def _config(root: Path, lengths: list[int], **source: Any) -> PreprocessConfig:
    """The test release's images and classes (image 5's JPEG is corrupt, so trials show images 0..4) with trials
    of subject 1 of the given lengths, and a split listing every trial."""
    eeg_file, _, image_dir, _ = _make_release(root)
    release = torch.load(eeg_file, weights_only=True)
    rng = np.random.default_rng(1)
    release["dataset"] = [
        {
            "eeg": torch.from_numpy(3 * rng.standard_normal((128, n)).astype(np.float32) + 1),
            "label": (i % 5) // 3,
            "image": i % 5,
            "subject": 1,
        }
        for i, n in enumerate(lengths)
    ]
    torch.save(release, eeg_file)
    splits = _splits(root / "splits.pth", {"train": list(range(len(lengths)))})
    data = {
        "output": str(root / "shards"),
        "sources": [
            {"kind": "imagenet_eeg", "eeg_file": str(eeg_file), "splits_file": str(splits), "image_dir": str(image_dir)}
            | source
        ],
    }
    return validate_config("preprocess", data, "test")


def _rows(cfg: PreprocessConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    info: dict[str, Any] = {}
    chunks = list(_imagenet_rows(SubjectTask(0, "ImageNet-EEG", 1, "paired"), cfg.sources[0], cfg.signal, info))
    return {k: np.concatenate([np.asarray(c[k]) for c in chunks]) for k in ("start", "eeg")}, info


@pytest.mark.parametrize("length", [450, 459, 460, 600])
def test_reference_window_is_the_reference_interpolation(length: int) -> None:
    eeg = np.random.default_rng(length).standard_normal((128, length)).astype(np.float32)
    window = imagenet_eeg.reference_window(eeg)
    assert window.shape == (128, 512) and window.dtype == np.float32
    np.testing.assert_allclose(window, _reference(eeg), atol=1e-5, rtol=0)


def test_reference_window_keeps_the_end_samples() -> None:
    """The reference's grid puts the first and last kept samples on the first and last outputs (not torch's
    default align_corners=False, whose outputs fall between samples)."""
    eeg = np.random.default_rng(0).standard_normal((4, 500)).astype(np.float32)
    window = imagenet_eeg.reference_window(eeg)
    np.testing.assert_array_equal(window[:, [0, -1]], eeg[:, [20, 459]])
    shifted = torch.nn.functional.interpolate(torch.from_numpy(eeg[None, :, 20:460]), size=512, mode="linear")
    assert np.abs(shifted[0].numpy() - window).max() > 0.1


def test_reference_profile_skips_signal_and_drops_trials_by_length(tmp_path: Path) -> None:
    cfg = _config(tmp_path, LENGTHS, profile="reference")
    assert cfg.signal.normalise == "zscore" and cfg.signal.l_freq == 5.0  # the section the profile bypasses
    rows, info = _rows(cfg)
    assert rows["start"].tolist() == [1, 2, 4]  # 450, 600 and 520 kept; 440 and 610 dropped
    assert info["trials_dropped_by_length"] == 2 and info["profile"] == "reference"
    release = torch.load(cfg.sources[0].eeg_file, weights_only=True)
    expected = np.stack([_reference(release["dataset"][i]["eeg"].numpy()) for i in (1, 2, 4)])
    np.testing.assert_allclose(rows["eeg"], expected, atol=1e-5, rtol=0)


def test_dropped_trials_are_counted_in_the_manifest(tmp_path: Path) -> None:
    cfg = _config(tmp_path, LENGTHS, profile="reference")
    tasks = plan(cfg)
    summary = process_subject(cfg, tasks[0])
    manifest = write_manifest(cfg, tasks, [summary], 0.0)
    assert [(s["rows"], s["trials_dropped_by_length"]) for s in manifest["subjects"]] == [(3, 2)]


def test_default_profile_keeps_every_trial_and_applies_signal(tmp_path: Path) -> None:
    cfg = _config(tmp_path, LENGTHS)
    rows, info = _rows(cfg)
    assert rows["start"].tolist() == [0, 1, 2, 3, 4]
    assert "trials_dropped_by_length" not in info and "profile" not in info
    release = torch.load(cfg.sources[0].eeg_file, weights_only=True)
    sig = cfg.signal
    crops = []
    for trial in release["dataset"]:
        filtered, _ = signal.bandpass(trial["eeg"].numpy(), IMAGENET_EEG_SFREQ, sig.l_freq, sig.h_freq)
        crops.append(signal.crop_and_interpolate(filtered, 20, min(460, filtered.shape[-1]), sig.window))
    expected = signal.normalise(np.stack(crops), mode=sig.normalise, scale=sig.scale, clip=sig.clip)
    np.testing.assert_array_equal(rows["eeg"], expected)


def test_reference_profile_needs_512_sample_windows(tmp_path: Path) -> None:
    cfg = _config(tmp_path, LENGTHS, profile="reference")
    cfg.signal.window = 256
    with pytest.raises(DreamdiffError, match=r"sources\[0\].profile: .* signal.window must be 512 \(got 256\)"):
        plan(cfg)


# ----------------------------------------------------------------------------------------------- split files

SUBJECTS = [1, 2, 1, 2, 1, 2, 2]  # trial i's subject; subject 2's trials are 1, 3, 5, 6
RELEASE = {"dataset": [{"subject": s} for s in SUBJECTS]}


def _names(
    tmp_path: Path, split: dict[str, list[int]], selected: list[int], indexing: imagenet_eeg.SplitIndexing
) -> list[str]:
    path = _splits(tmp_path / "splits.pth", split)
    return imagenet_eeg.load_splits(str(path), 0, RELEASE, selected, indexing).tolist()


def test_subject_indexing_counts_the_selected_subjects_trials(tmp_path: Path) -> None:
    split = {"train": [0, 2], "val": [1], "test": [3]}
    names = _names(tmp_path, split, [2], "subject")
    assert names == ["none", "train", "none", "val", "none", "train", "test"]
    assert _names(tmp_path, split, [1, 2], "subject") == _names(tmp_path, split, [1, 2], "global")


def test_a_global_split_of_every_subject_fits_a_subject_filter(tmp_path: Path) -> None:
    names = _names(tmp_path, {"train": [0, 1, 2, 3, 4], "test": [5, 6]}, [2], "global")
    assert [names[i] for i in (1, 3, 5, 6)] == ["train", "train", "test", "test"]


@pytest.mark.parametrize(
    ("split", "selected", "indexing", "message"),
    [
        ({"train": [0, 4]}, [2], "subject", r"split_indexing: subject expects indices in 0\.\.3 .* holds 4"),
        ({"train": [0], "test": [-1]}, [2], "subject", r"split_indexing: subject .* holds -1"),
        ({"train": [0, 2], "test": [4]}, [2], "global", r"split_indexing: global, but none of the 3 indices"),
        ({"train": [0, 1, 2], "test": [0]}, [2], "global", r"split_indexing: global, .* below 4 .* look subject-local"),
        ({"train": [0, 7]}, [2], "global", r"splits_file: split 'train' holds indices outside 0\.\.6 \(found 7"),
        ({"train": [0, 7]}, [1, 2], "global", r"splits_file: split 'train' holds indices outside 0\.\.6"),
    ],
)
def test_a_split_file_that_does_not_fit_its_indexing_fails_in_one_line(
    tmp_path: Path,
    split: dict[str, list[int]],
    selected: list[int],
    indexing: imagenet_eeg.SplitIndexing,
    message: str,
) -> None:
    with pytest.raises(DreamdiffError, match=message) as err:
        _names(tmp_path, split, selected, indexing)
    assert "\n" not in str(err.value) and "splits.pth split 0" in str(err.value)


# ------------------------------------------------------------------------------------------- shipped configs


def test_the_imagenet_eeg_config_prints_as_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preprocess", "--config", str(REPO_CONFIGS / "preprocess-imagenet-eeg.yaml"), "--print-config"]) == 0
    (source,) = yaml.safe_load(capsys.readouterr().out)["sources"]
    assert source["profile"] == "reference" and source["subjects"] == [4]
    assert source["splits_file"].endswith("block_splits_by_image_all.pth") and source["split_indexing"] == "global"
    assert source["eeg_file"].endswith("eeg_5_95_std.pth")


def test_the_moabb_pretrain_config_reaches_400_subjects() -> None:
    cfg = load_config("preprocess", REPO_CONFIGS / "preprocess-moabb-pretrain.yaml")
    (source,) = cfg.sources
    counts = {name: len(dataset.subject_list) for name, dataset in moabb_source.datasets(source).items()}
    assert source.subjects == "all" and sum(counts.values()) >= 400, counts
    comments = (REPO_CONFIGS / "preprocess-moabb-pretrain.yaml").read_text()
    for name, count in counts.items():  # each dataset's count beside it is MOABB's
        assert f"- {name}" in comments and f"# {count:3d} subjects" in comments.split(f"- {name}")[1].split("\n")[0]
