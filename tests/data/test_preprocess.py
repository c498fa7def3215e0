"""The preprocess stage on real local Ray, MOABB FakeDataset raws and a made-up ImageNet-EEG release."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal as sig
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from dreamdiff.cli import main
from dreamdiff.config import ConfigError, PreprocessConfig, load_config, validate_config
from dreamdiff.data import moabb_source, signal
from dreamdiff.data.preprocess import run
from dreamdiff.data.reader import read_epochs, shard_files
from dreamdiff.data.schema import DONE
from dreamdiff.errors import DreamdiffError

LAYOUTS = [
    {"n_subjects": 1, "sfreq": 128, "duration": 20, "n_runs": 1},
    {
        "n_subjects": 2,
        "sfreq": 250,
        "duration": 20,
        "n_runs": 1,
        "channels": ["C3", "Cz", "C4", "Fz", "Pz", "Oz"],
    },
    {
        "n_subjects": 1,
        "sfreq": 512,
        "duration": 12,
        "n_runs": 1,
        "channels": ["Fp1", "Fp2", "F3", "F4", "C3", "C4", "P3", "P4", "O1", "O2", "T7", "T8"],
    },
]


def _config(output: Path, **signal_kw: object) -> PreprocessConfig:
    data = {
        "output": str(output),
        "sources": [
            {"kind": "moabb", "datasets": ["FakeDataset"], "fake": LAYOUTS},
            {
                "kind": "synthetic",
                "labeled": True,
                "synth": {"num_classes": 3, "images_per_class": 4, "num_subjects": 1, "image_size": 16},
            },
            {
                "kind": "synthetic",
                "labeled": False,
                "unlabeled_epochs_per_subject": 10,
                "synth": {"num_subjects": 1},
            },
        ],
        "signal": {"sfreq": None, **signal_kw},
        "rows_per_shard": 16,
    }
    return validate_config("preprocess", data, "test")


def _table(folder: Path):
    return pq.read_table(sorted(folder.glob("part-*.parquet"))).combine_chunks() if folder.exists() else None


def _np(column) -> np.ndarray:
    return column.combine_chunks().to_numpy_ndarray()


def _content_hash(output: Path) -> dict[str, str]:
    """epoch_id -> hash of its EEG bytes, over every finished shard."""
    out = {}
    for file in shard_files(output):
        table = pq.read_table(file, columns=["epoch_id", "eeg"])
        eeg = _np(table["eeg"])
        for epoch_id, row in zip(table["epoch_id"].to_pylist(), eeg, strict=True):
            assert epoch_id not in out, f"duplicate row {epoch_id}"
            out[epoch_id] = hashlib.sha256(row.tobytes()).hexdigest()
    return out


def test_fake_layouts_synthetic_and_manifest(ray_local: None, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "shards")
    manifest = run(cfg)
    expected_rows = {  # whole 512-sample windows of each layout's run, at its own rate
        "FakeDataset-0": int(20 * 128) // 512,
        "FakeDataset-1": int(20 * 250) // 512,
        "FakeDataset-2": int(12 * 512) // 512,
    }
    subjects = {(s["dataset"], s["subject"]): s for s in manifest["subjects"]}
    assert len(subjects) == 1 + 2 + 1 + 1 + 1 and manifest["totals"]["subjects_failed"] == 0
    for name, rows in expected_rows.items():
        entry = subjects[(name, 1)]
        assert entry["rows"] == rows
        table = _table(tmp_path / "shards" / "epochs" / name / "subject-0001")
        eeg = _np(table["eeg"])
        mask = _np(table["channel_mask"])
        assert eeg.shape == (rows, 128, 512) and eeg.dtype == np.float16 and np.isfinite(eeg).all()
        n_real = {"FakeDataset-0": 3, "FakeDataset-1": 6, "FakeDataset-2": 12}[name]
        assert (mask.sum(axis=1) == n_real).all() and entry["n_channels_orig"] == n_real
        # tiled: row i repeats real channel i % n_real, so the data carries no invented channel
        assert np.array_equal(eeg[:, n_real], eeg[:, 0])
        assert table["sfreq"].to_numpy()[0] == entry["sfreq"]
    # the upper band edge is clipped below Nyquist at 128 Hz, and the manifest says so
    assert subjects[("FakeDataset-0", 1)]["h_freq_used"] < 64
    assert manifest["signal"]["upper_edge_clipped_to_hz"] == [subjects[("FakeDataset-0", 1)]["h_freq_used"]]
    assert {"ray", "mne", "moabb", "pyarrow"} <= set(manifest["versions"])
    # paired synthetic rows carry decodable images, labels, splits by image and blocks
    paired = _table(tmp_path / "shards" / "paired" / "SynthEEG-Image" / "subject-0000")
    assert paired.num_rows == 12 and set(paired["label"].to_pylist()) == {0, 1, 2}
    img = Image.open(io.BytesIO(paired["image"][0].as_py()))
    assert img.size == (16, 16)
    splits = {}
    for image_id, split in zip(paired["image_id"].to_pylist(), paired["split"].to_pylist(), strict=True):
        assert splits.setdefault(image_id, split) == split  # one split per image
    unlabeled = _table(tmp_path / "shards" / "epochs" / "SynthEEG" / "subject-0000")
    assert unlabeled.num_rows == 10 and "label" not in unlabeled.column_names
    # shards respect rows_per_shard and the reader sees every finished row through Ray Data
    assert max(pq.ParquetFile(f).metadata.num_rows for f in shard_files(tmp_path / "shards")) <= 16
    ds = read_epochs(tmp_path / "shards" / "epochs")
    assert ds.count() == manifest["totals"]["rows"] - 12
    batch = next(iter(ds.iter_torch_batches(batch_size=4)))
    assert batch["eeg"].shape == (4, 128, 512) and batch["eeg"].dtype == torch.float16

    # a second run skips every finished subject and leaves their files untouched
    before = {f: os.stat(f).st_mtime_ns for f in shard_files(tmp_path / "shards")}
    again = run(cfg)
    assert again["totals"] == manifest["totals"]
    assert {f: os.stat(f).st_mtime_ns for f in shard_files(tmp_path / "shards")} == before


def test_interpolate_mode_matches_mne_directly(ray_local: None, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "shards", channels="interpolate")
    cfg.sources = cfg.sources[:1]
    cfg.sources[0].fake = LAYOUTS[1:2]
    run(cfg)
    table = _table(tmp_path / "shards" / "epochs" / "FakeDataset-0" / "subject-0001")
    mask = _np(table["channel_mask"])[0].astype(bool)
    assert 0 < mask.sum() < 128  # template electrodes near the 6 real ones
    dataset = moabb_source.datasets(cfg.sources[0])["FakeDataset-0"]
    _, _, raw = next(moabb_source.recordings(dataset, 1))
    direct = signal.epochs_from_raw(raw, channels="interpolate", montage="biosemi128", sfreq=None, clip=20.0)
    np.testing.assert_allclose(
        _np(table["eeg"]).astype(np.float32), direct["eeg"].astype(np.float16).astype(np.float32), atol=1e-3
    )
    assert np.array_equal(mask, direct["channel_mask"])


def _make_release(root: Path) -> tuple[Path, Path, Path, list[str]]:
    """A tiny release in the ImageNet-EEG format: 2 subjects x 2 classes x 3 images, one JPEG corrupt."""
    rng = np.random.default_rng(0)
    wnids = ["n01111111", "n02222222"]
    images = [f"{wnids[c]}_{i}" for c in range(2) for i in range(3)]
    image_dir = root / "images"
    for name in images:
        (image_dir / name.split("_")[0]).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / name.split("_")[0] / f"{name}.JPEG", format="JPEG")
    corrupt = image_dir / "n02222222" / "n02222222_2.JPEG"
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    dataset = [
        {
            "eeg": torch.from_numpy(rng.standard_normal((128, 480 + 10 * s)).astype(np.float32)),
            "label": i // 3,
            "image": i,
            "subject": s,
        }
        for s in (1, 2)
        for i in range(6)
    ]
    eeg_file = root / "eeg_5_95_std.pth"
    torch.save({"dataset": dataset, "labels": wnids, "images": images}, eeg_file)
    splits = root / "block_splits_by_image_all.pth"
    torch.save({"splits": [{"train": [0, 1, 3, 4, 6, 7, 9, 10], "val": [2, 8], "test": [5, 11]}]}, splits)
    return eeg_file, splits, image_dir, [str(corrupt)]


def test_imagenet_eeg_release_to_paired_shards(ray_local: None, tmp_path: Path) -> None:
    eeg_file, splits, image_dir, corrupt = _make_release(tmp_path)
    data = {
        "output": str(tmp_path / "shards"),
        "sources": [
            {
                "kind": "imagenet_eeg",
                "eeg_file": str(eeg_file),
                "splits_file": str(splits),
                "image_dir": str(image_dir),
            }
        ],
    }
    manifest = run(validate_config("preprocess", data, "test"))
    assert [img["path"] for img in manifest["skipped_images"]] == corrupt * 2  # both subjects saw it
    table = pq.read_table(shard_files(tmp_path / "shards")).combine_chunks()
    assert table.num_rows == 10  # 12 trials less the two of the corrupt image
    assert _np(table["eeg"]).shape == (10, 128, 512)
    by_index = dict(zip(table["start"].to_pylist(), table["split"].to_pylist(), strict=True))
    assert by_index == {
        0: "train",
        1: "train",
        2: "val",
        3: "train",
        4: "train",
        6: "train",
        7: "train",
        8: "val",
        9: "train",
        10: "train",
    }
    assert set(table["class_name"].to_pylist()) == {"n01111111", "n02222222"}
    assert set(table["block"].to_pylist()) == {0, 1}


def test_bad_inputs_fail_clearly_and_damage_nothing(ray_local: None, tmp_path: Path) -> None:
    good = _config(tmp_path / "shards")
    good.sources = good.sources[1:2]
    run(good)
    before = _content_hash(tmp_path / "shards")
    eeg_file, splits, image_dir, _ = _make_release(tmp_path / "release")
    not_release = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(3)}, not_release)
    cases = [
        ({"kind": "moabb", "datasets": ["NotADataset2099"]}, "unknown MOABB dataset 'NotADataset2099'"),
        ({"kind": "moabb", "datasets": ["BNCI2014_00"]}, "did you mean"),
        (
            {
                "kind": "imagenet_eeg",
                "eeg_file": str(eeg_file),
                "splits_file": str(splits),
                "image_dir": str(tmp_path / "nope"),
            },
            "image_dir: no such folder",
        ),
        (
            {
                "kind": "imagenet_eeg",
                "eeg_file": str(not_release),
                "splits_file": str(splits),
                "image_dir": str(image_dir),
            },
            "not an ImageNet-EEG release",
        ),
    ]
    for source, message in cases:
        cfg = validate_config("preprocess", {"output": str(tmp_path / "shards"), "sources": [source]}, "t")
        with pytest.raises(DreamdiffError, match=message) as err:
            run(cfg)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="subjects: must list at least one"):
        validate_config(
            "preprocess",
            {"output": "x", "sources": [{"kind": "moabb", "datasets": ["FakeDataset"], "subjects": []}]},
            "t",
        )
    assert _content_hash(tmp_path / "shards") == before


def _interruptible() -> None:
    """Child processes take Ctrl-C as from a terminal: a test run started in the background ignores SIGINT, and
    its children inherit that."""
    sig.signal(sig.SIGINT, sig.SIG_DFL)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_rows(ray_local: None, tmp_path: Path) -> None:
    subjects = 10  # enough that Ctrl-C lands part-way even on a loaded machine
    layouts = [{"n_subjects": subjects, "sfreq": 250, "duration": 30, "n_runs": 1}]
    base = load_config("preprocess", "preprocess-demo").model_dump(mode="json")
    base.update(
        rows_per_shard=8,
        ray={"num_cpus": 1},
        sources=[{"kind": "moabb", "datasets": ["FakeDataset"], "fake": layouts}],
    )
    for name in ("killed", "whole"):
        cfg_file = tmp_path / f"{name}.yaml"
        cfg_file.write_text(yaml.safe_dump({**base, "output": str(tmp_path / name)}))
    cmd = [sys.executable, "-m", "dreamdiff", "preprocess", "--config"]
    proc = subprocess.Popen(
        [*cmd, str(tmp_path / "killed.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_interruptible,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list((tmp_path / "killed").rglob(DONE))) < 2:
        time.sleep(0.2)
    proc.send_signal(sig.SIGINT)  # Ctrl-C in the middle of the corpus
    proc.wait(timeout=120)
    finished = len(list((tmp_path / "killed").rglob(DONE)))
    assert 2 <= finished < subjects, "the run should have been interrupted part-way"
    for name in ("killed", "whole"):  # the same command again, then an uninterrupted run, on the session's Ray
        assert main(["preprocess", "--config", str(tmp_path / f"{name}.yaml")]) == 0
    resumed = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert resumed["totals"]["subjects_done"] == subjects
    assert _content_hash(tmp_path / "killed") == _content_hash(tmp_path / "whole")
