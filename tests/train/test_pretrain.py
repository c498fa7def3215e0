"""The pretrain stage on real local Ray Train: DDP learning, resuming, and recovering from a worker failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreamdiff.config import PretrainConfig, validate_config
from dreamdiff.data.preprocess import run as preprocess
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.msm import MSMEncoder
from dreamdiff.train.pretrain import ENCODER_FILE, latest_checkpoint
from dreamdiff.train.pretrain import run as pretrain
from dreamdiff.train.worker import FAILED_ONCE, METRICS_FILE, drop_metrics_after


@pytest.fixture(scope="module")
def shards(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unlabeled SynthEEG windows: 2 subjects x 160, in shards of 32 (10 files, one held out)."""
    out = tmp_path_factory.mktemp("shards")
    source = {"kind": "synthetic", "labeled": False, "unlabeled_epochs_per_subject": 160, "synth": {"num_subjects": 2}}
    preprocess(validate_config("preprocess", {"output": str(out), "sources": [source], "rows_per_shard": 32}, "t"))
    return out / "epochs"


def _config(shards: Path, output: Path, **extra: object) -> PretrainConfig:
    data = {
        "data": str(shards),
        "output": str(output),
        "model": {"preset": "tiny"},
        "optim": {"lr": 3e-3, "warmup_steps": 20},
        "batch_size": 16,
        "precision": "fp32",
        "log_every_steps": 5,
        "plot_every_epochs": 10,
        "val_rows": 16,
        **extra,
    }
    return validate_config("pretrain", data, "test")


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_two_ddp_workers_learn_well_below_zero_prediction(shards: Path, tmp_path: Path) -> None:
    cfg = _config(
        shards,
        tmp_path / "run",
        epochs=50,
        scaling={"num_workers": 2},
        checkpoint={"every_steps": 450},
        log_every_steps=50,
        plot_every_epochs=25,
    )
    final = pretrain(cfg)
    lines = _metrics(tmp_path / "run")
    steps_per_epoch = (288 // 2) // 8  # 288 training windows, 2 workers, 8 per worker per step
    assert final["step"] == lines[-1]["step"] == 50 * steps_per_epoch
    assert lines[-1]["epoch"] == pytest.approx(50.0)
    zero = lines[-1]["val_loss_zero_prediction"]
    assert lines[-1]["val_loss"] < 0.8 * zero, (lines[0], lines[-1])
    assert lines[-1]["val_loss"] < lines[0]["val_loss"]
    assert max(line["lr"] for line in lines) <= 3e-3 and lines[-1]["lr"] < 0.01 * 3e-3  # cosine down to ~0
    # the encoder is exported in safetensors and loads into the encoder alone
    weights = load_file(str(tmp_path / "run" / ENCODER_FILE))
    encoder = MSMEncoder(cfg.model)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")})
    assert encoder(torch.randn(2, 128, 512)).shape == (2, 128, cfg.model.embed_dim)
    assert sorted(p.name for p in (tmp_path / "run" / "plots").glob("*.png")) == [
        "reconstruction-epoch0025.png",
        "reconstruction-epoch0050.png",
    ]
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and (checkpoint / "config.yaml").is_file()
    assert not list(checkpoint.glob("*.pt")) and not list(checkpoint.glob("*.pkl"))  # safetensors + JSON only
    assert (tmp_path / "run" / "config.yaml").exists()


@pytest.fixture(scope="module")
def recovered(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 2-epoch run on one worker that fails once at step 17 (checkpoints every 10 steps, metrics every 5) and is
    restarted by Ray Train from step 10: its folder and final result. The failed attempt had logged step 15, which
    the restarted one logs again. The failure test checks it; the resume test starts from it."""
    output = tmp_path_factory.mktemp("recovered") / "run"
    cfg = _config(
        shards,
        output,
        epochs=2,
        scaling={"num_workers": 1},
        checkpoint={"every_steps": 10},
        max_failures=1,
        inject_failure_at_step=17,
    )
    return output, pretrain(cfg)


def test_worker_failure_restarts_from_checkpoint_and_finishes(recovered: tuple[Path, dict]) -> None:
    run, final = recovered
    assert (run / FAILED_ONCE).exists()  # the failure did happen
    lines = _metrics(run)
    total = 2 * (288 // 16)
    logged = sorted({*range(5, total + 1, 5), total})
    assert [line["step"] for line in lines] == logged  # every step accounted for, once: strictly increasing
    assert [line["resumed_at"] for line in lines] == [0, 0] + [10] * (len(lines) - 2)  # from the step-10 checkpoint
    assert final["step"] == total and lines[-1]["epoch"] == pytest.approx(2.0)
    with safe_open(str(run / ENCODER_FILE), "pt") as f:
        assert f.metadata()["step"] == str(total)


def test_resume_from_another_run_continues_step_count(
    shards: Path, recovered: tuple[Path, dict], tmp_path: Path
) -> None:
    first, _ = recovered
    before = _metrics(first)[-1]
    second = _config(shards, tmp_path / "b", epochs=3, scaling={"num_workers": 1}, resume_from=str(first))
    pretrain(second)
    after = _metrics(tmp_path / "b")
    assert before["step"] == 36 and after[0]["step"] == 40 and after[-1]["step"] == 54
    assert after[0]["resumed_at"] == 36
    assert after[0]["val_loss"] < before["val_loss"] * 1.2  # it started from the trained weights, not afresh


def test_bad_batch_and_missing_data_fail_before_training(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(DreamdiffError, match="batch_size: 15 must divide evenly into 2 worker"):
        pretrain(_config(shards, tmp_path / "x", batch_size=15, scaling={"num_workers": 2}))
    with pytest.raises(DreamdiffError, match="no such shard folder"):
        pretrain(_config(tmp_path / "nowhere", tmp_path / "y"))
    with pytest.raises(DreamdiffError, match="resume_from"):
        pretrain(_config(shards, tmp_path / "z", resume_from=str(tmp_path)))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_restart_drops_the_metrics_rows_logged_after_its_checkpoint(tmp_path: Path) -> None:
    """What rank 0 does at restore: rows of steps after the restored one go (they are logged again), so do a line
    a kill cut short; earlier rows stay byte for byte, and a log with nothing to drop is not rewritten."""
    rows = [{"step": s, "loss": 1.0 / s} for s in (5, 10, 15, 20)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 25, "lo'
    (tmp_path / METRICS_FILE).write_text(text)
    assert drop_metrics_after(tmp_path, 10) == 3
    assert _metrics(tmp_path) == rows[:2]
    assert (tmp_path / METRICS_FILE).read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
    modified = (tmp_path / METRICS_FILE).stat().st_mtime_ns
    assert drop_metrics_after(tmp_path, 10) == 0 and (tmp_path / METRICS_FILE).stat().st_mtime_ns == modified
    assert drop_metrics_after(tmp_path / "absent", 0) == 0
    assert [p.name for p in tmp_path.iterdir()] == [METRICS_FILE]  # no temporary file left
