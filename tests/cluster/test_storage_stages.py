"""Stages given a URI write and read exactly what they do with a plain path (real Ray, real pyarrow filesystems)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from dreamdiff import storage
from dreamdiff.config import PreprocessConfig, dump_config, load_config, validate_config
from dreamdiff.data.preprocess import plan, process_subject, run, write_manifest
from dreamdiff.data.reader import shard_files
from dreamdiff.data.schema import DONE
from dreamdiff.train import pretrain, worker

ROWS = 2 * (30 * 128 // 512) + 2 * 40 + 3 * 4  # FakeDataset: 2 runs x 7 windows; unlabeled 2 x 40; paired 3 x 4


def _config(output: str) -> PreprocessConfig:
    return validate_config(
        "preprocess",
        {
            "output": output,
            "sources": [
                {"kind": "moabb", "datasets": ["FakeDataset"], "fake": [{"n_subjects": 1, "duration": 30}]},
                {
                    "kind": "synthetic",
                    "labeled": False,
                    "unlabeled_epochs_per_subject": 40,
                    "synth": {"num_subjects": 2},
                },
                {
                    "kind": "synthetic",
                    "labeled": True,
                    "synth": {"num_classes": 3, "images_per_class": 4, "num_subjects": 1, "image_size": 16},
                },
            ],
            "signal": {"sfreq": 128.0},
            "rows_per_shard": 16,
        },
        "test",
    )


def _files(root: str) -> dict[str, str]:
    """Relative shard path -> sha256 of its bytes, for every finished shard under `root`."""
    base = storage.normalise(root).rstrip("/") + "/"
    return {f.removeprefix(base): hashlib.sha256(storage.read_bytes(f)).hexdigest() for f in shard_files(root)}


def _markers(root: str) -> dict[str, dict]:
    """Each subject's marker without its timing."""
    base = storage.normalise(root).rstrip("/") + "/"
    out = {}
    for marker in storage.find(root, DONE):
        summary = json.loads(storage.read_text(marker))
        summary.pop("seconds")
        out[marker.removeprefix(base)] = summary
    return out


@pytest.mark.slow
def test_preprocess_to_a_file_uri_writes_the_same_shards_as_to_a_path(ray_local: None, tmp_path: Path) -> None:
    plain, uri = tmp_path / "plain", f"file://{tmp_path}/as-uri"
    run(_config(str(plain)))
    run(_config(uri))
    files = _files(str(plain))
    assert len(files) >= 6 and files == _files(uri)  # same relative files, byte for byte
    assert _markers(str(plain)) == _markers(uri)
    manifests = [json.loads(storage.read_text(storage.join(r, "manifest.json"))) for r in (str(plain), uri)]
    assert manifests[0]["totals"] == manifests[1]["totals"] and manifests[0]["totals"]["rows"] == ROWS
    assert not (Path.cwd() / "file:").exists()  # no folder named after the scheme


def _write_in_process(output: str) -> None:
    """The preprocess stage without Ray: each subject task, then the manifest, as each Ray Data task runs them."""
    cfg = _config(output)
    tasks = plan(cfg)
    write_manifest(cfg, tasks, [process_subject(cfg, task) for task in tasks], 0.0)


@pytest.fixture(scope="module")
def in_process_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    output = str(tmp_path_factory.mktemp("in-process") / "shards")
    _write_in_process(output)
    return output


def test_preprocess_to_an_object_store_writes_the_same_bytes_as_to_a_folder(in_process_shards: str) -> None:
    """The remote branch of every write (no rename, no local folders) on Arrow's in-memory filesystem."""
    bucket = "mock:///dreamdiff-bucket/shards"
    _write_in_process(bucket)
    files = _files(in_process_shards)
    assert len(files) >= 6 and _files(bucket) == files
    assert _markers(bucket) == _markers(in_process_shards)
    manifest = json.loads(storage.read_text(f"{bucket}/manifest.json"))
    assert manifest["totals"]["rows"] == ROWS and manifest["totals"]["subjects_failed"] == 0


@pytest.mark.slow
def test_pretrain_writes_its_run_folder_to_an_object_store(ray_local: None, in_process_shards: str) -> None:
    """Config, data split, metrics, plots and weights reach a remote `output` (rank 0 stages and copies them up).
    The loop runs in this process (num_workers=0), where Arrow's in-memory filesystem is the same one."""
    run = "mock:///dreamdiff-bucket/runs/pretrain"
    cfg = load_config(
        "pretrain",
        "pretrain-demo",
        [f"data={in_process_shards}/epochs", f"output={run}", "epochs=2", "batch_size=16", "scaling.num_workers=0",
         "checkpoint.every_steps=4", "log_every_steps=2", "plot_every_epochs=2"],
    )  # fmt: skip
    metrics = pretrain.run(cfg)
    lines = [json.loads(x) for x in storage.read_text(f"{run}/{worker.METRICS_FILE}").splitlines()]
    assert lines[-1]["step"] == metrics["step"] > 0 and len(lines) == metrics["step"] // 2
    assert storage.find(run, "reconstruction-epoch0002.png") == [f"{run}/plots/reconstruction-epoch0002.png"]
    assert storage.read_text(f"{run}/config.yaml") == dump_config(cfg)
    weights = load(storage.read_bytes(f"{run}/{pretrain.ENCODER_FILE}"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert not Path("mock:").exists()
