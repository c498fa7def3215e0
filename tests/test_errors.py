"""One answer, not a traceback: truncated or corrupt input files and a failed training worker end the CLI with one
stderr line `dreamdiff <stage>: error: ...` naming the file (or the stage) and what to do, and exit status 2 for bad
input, 1 for a failure of the stage's own work.

The files are real (shards written through the schema module, the session's tiny generator, a training checkpoint
saved by the training code) and then cut short or overwritten, as a full disk or a copy that stopped would leave
them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from tests.shards import epoch_columns, write_subject

from dreamdiff.cli import main
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.generator import SPEC_FILE, WEIGHTS_FILE
from dreamdiff.train.checkpoint import MODEL_FILE, save_training_state

ROWS = 24  # per subject: one batch of 16 and a held-out subject


def _write_subject(folder: Path, subject: int, rows: int = ROWS) -> Path:
    """An EEG-only shard as preprocess writes it (done-marker listing it); returns the Parquet file."""
    return write_subject(folder, epoch_columns("Rest", subject, rows, np.random.default_rng(subject)))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _shards(root: Path, subjects: int = 2) -> tuple[Path, list[Path]]:
    files = [_write_subject(root / "shards" / f"subject-{s}", s) for s in range(1, subjects + 1)]
    return root / "shards", files


def _cli(stage: str, config: dict[str, Any], folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = folder / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main([stage, "--config", str(path)])
    return code, capsys.readouterr().err


def _one_line(err: str, stage: str) -> str:
    """The one error line (Ray's own progress log lines may sit beside it on stderr), and no traceback."""
    # an artifact of capturing in-process: a logger of Ray's may keep the closed stream of an earlier test's capture
    err = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", err, flags=re.S)
    lines = [line for line in err.splitlines() if line.startswith(f"dreamdiff {stage}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "Error:" not in err.replace(lines[0], ""), err
    return lines[0]


def _generate_config(root: Path, shards: Path, checkpoint: Path) -> dict[str, Any]:
    return {
        "input": str(shards),
        "output": str(root / "out"),
        "checkpoint": str(checkpoint),
        "num_images": 1,
        "steps": 2,
    }


def _pretrain_config(shards: Path, output: Path, **extra: Any) -> dict[str, Any]:
    return {
        "data": str(shards),
        "output": str(output),
        "model": {"preset": "tiny"},
        "batch_size": 16,
        "epochs": 1,
        "precision": "fp32",
        "val_rows": 8,
        "val_fraction": 0.5,
        "scaling": {"num_workers": 0},
        "ray": {"num_cpus": 4},
        **extra,
    }


def test_a_truncated_shard_is_named_by_generate(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards, files = _shards(tmp_path)
    _truncate(files[1])
    code, err = _cli("generate", _generate_config(tmp_path, shards, tiny_checkpoint), tmp_path, capsys)
    line = _one_line(err, "generate")
    assert code == 2 and str(files[1]) in line and "Parquet shard" in line and "dreamdiff preprocess" in line
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_truncated_shard_is_named_by_pretrain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards, files = _shards(tmp_path, subjects=3)
    _truncate(files[0])
    code, err = _cli("pretrain", _pretrain_config(shards, tmp_path / "run"), tmp_path, capsys)
    line = _one_line(err, "pretrain")
    assert code == 2 and str(files[0]) in line and "truncated or corrupt" in line


@pytest.mark.parametrize("damage", ["truncated weights", "corrupt json", "json of another kind"])
def test_a_damaged_generator_is_named(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    shards, _ = _shards(tmp_path, subjects=1)
    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "generator"))
    if damage == "truncated weights":
        broken = checkpoint / WEIGHTS_FILE
        _truncate(broken)
    elif damage == "corrupt json":
        broken = checkpoint / SPEC_FILE
        broken.write_text(broken.read_text()[:100])
    else:
        broken = checkpoint / SPEC_FILE
        meta = json.loads(broken.read_text())
        broken.write_text(json.dumps({**meta, "spec": {"base_model": 3}}))
    code, err = _cli("generate", _generate_config(tmp_path, shards, checkpoint), tmp_path, capsys)
    line = _one_line(err, "generate")
    assert code == 2 and str(broken) in line and "run finetune again" in line
    assert not (tmp_path / "out").exists()


def test_a_truncated_training_checkpoint_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards, _ = _shards(tmp_path, subjects=3)
    model = torch.nn.Linear(4, 2)
    checkpoint = save_training_state(tmp_path / "ckpt", model, torch.optim.AdamW(model.parameters()), {"step": 3})
    _truncate(checkpoint / MODEL_FILE)
    config = _pretrain_config(shards, tmp_path / "run", resume_from=str(checkpoint))
    code, err = _cli("pretrain", config, tmp_path, capsys)
    line = _one_line(err, "pretrain")
    assert code == 2 and line.startswith("dreamdiff pretrain: error: resume_from: ")
    assert str(checkpoint / MODEL_FILE) in line and "checkpoint" in line


def test_load_training_state_names_a_corrupt_state_file(tmp_path: Path) -> None:
    """What a worker meets when Ray Train restores a damaged checkpoint of its own (the CLI then prints it)."""
    from dreamdiff.train.checkpoint import STATE_FILE, load_training_state

    model = torch.nn.Linear(4, 2)
    folder = save_training_state(tmp_path / "ckpt", model, torch.optim.AdamW(model.parameters()), {"step": 3})
    (folder / STATE_FILE).write_text('{"position": {"step"')
    with pytest.raises(DreamdiffError, match=f"{folder / STATE_FILE}: cannot read it"):
        load_training_state(folder, model)


def test_a_shard_damaged_inside_is_named_by_the_training_read(ray_local: None, tmp_path: Path) -> None:
    """Footer whole, data pages overwritten: only reading the rows fails, inside Ray Data, which names no file."""
    from dreamdiff.train.trainer import training_dataset

    _, files = _shards(tmp_path, subjects=2)
    data = bytearray(files[1].read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # inside the EEG column's pages
    files[1].write_bytes(bytes(data))
    assert pq.read_schema(files[1]).names  # the footer still reads
    with pytest.raises(DreamdiffError, match=f"{files[1]}: cannot read it as a Parquet shard"):
        training_dataset([str(f) for f in files], ("eeg", "channel_mask"), seed=0, cache=True)


@pytest.mark.parametrize(
    "workers", [pytest.param(1, marks=pytest.mark.slow), 0], ids=["ray-train-worker", "in-process"]
)
def test_a_failed_training_worker_is_one_line_and_exit_1(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    shards, _ = _shards(tmp_path, subjects=3)
    output = tmp_path / "run"
    config = _pretrain_config(
        shards,
        output,
        inject_failure_at_step=2,
        max_failures=0,
        checkpoint={"every_steps": 1},
        scaling={"num_workers": workers, "cpus_per_worker": 1},
    )
    code, err = _cli("pretrain", config, tmp_path, capsys)
    line = _one_line(err, "pretrain")
    assert code == 1, err
    assert line.startswith("dreamdiff pretrain: error: pretrain training failed (")
    assert f"{'rank 0: ' if workers else ''}RuntimeError: injected failure at step 2" in line
    assert "max_failures (now 0)" in line and "re-run" in line
    if workers:  # a Ray Train worker's checkpoints are kept (in-process, Ray keeps them in memory only)
        assert f"its 1 finished checkpoint(s) are kept in {output / 'ray' / 'train'}" in line
        assert (
            len(list((output / "ray" / "train").glob("checkpoint_*/trainer_state.json"))) == 1
        )  # the step-1 checkpoint
