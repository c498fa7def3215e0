"""The sweep stage: the probe objective, search-space checks, a 4-trial ASHA sweep on local Ray, and resumption."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.tune.search.sample import Categorical, Float

from dreamdiff.cli import main as cli
from dreamdiff.config import ConfigError, SweepConfig, load_config, validate_config
from dreamdiff.data import signal, synthetic
from dreamdiff.data.preprocess import run as preprocess
from dreamdiff.data.reader import shard_files
from dreamdiff.errors import DreamdiffError
from dreamdiff.eval.probe import encoder_features, linear_probe, load_probe_sets
from dreamdiff.models.msm import PRESETS, MSMConfig, build_msm
from dreamdiff.train.msm_step import msm_train_step
from dreamdiff.train.optim import build_optimizer
from dreamdiff.train.pretrain import ENCODER_FILE, SPLIT_FILE
from dreamdiff.train.worker import METRICS_FILE
from dreamdiff.tune.sweep import (
    BEST_FILE,
    PLOT_FILE,
    RESULTS_FILE,
    _ReapPlacementGroups,
    _RecordPlacementGroup,
    best_trial,
    check_search_space,
    max_concurrent_trials,
    param_space,
)
from dreamdiff.tune.sweep import run as sweep

# ------------------------------------------------------------------------------------ probe


def test_linear_probe_separates_separable_features_and_not_shuffled_labels() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 80)
    features = rng.normal(size=(400, 16))
    features[np.arange(400), labels] += 8.0  # class k shifts feature k far: linearly separable
    train, test = np.arange(400) % 4 != 0, np.arange(400) % 4 == 0
    assert linear_probe(features[train], labels[train], features[test], labels[test]) > 0.95
    shuffled = rng.permutation(labels)
    score = linear_probe(features[train], shuffled[train], features[test], shuffled[test])
    assert abs(score - 0.2) < 0.1, score  # chance: 5 balanced classes


def test_encoder_features_are_mean_pooled_tokens_in_eval_mode() -> None:
    torch.manual_seed(0)
    encoder = build_msm(MSMConfig(preset="tiny")).encoder.train()
    eeg = torch.randn(5, 128, 512).half().numpy()
    mask = np.ones((5, 128), dtype=np.uint8)
    features = encoder_features(encoder, eeg, mask, batch=2)
    assert features.shape == (5, 64) and encoder.training  # the caller's mode is restored
    with torch.no_grad():
        expected = encoder.eval()(torch.as_tensor(eeg).float(), torch.as_tensor(mask)).mean(dim=1).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)


def _synth_eeg(cfg: synthetic.SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SynthEEG-Image trials through the pipeline's signal steps (band-pass 5-95 Hz, z-score): EEG, labels, split."""
    eeg, labels, splits = [], [], []
    for subject in range(cfg.num_subjects):
        trials = synthetic.generate_subject(cfg, subject)
        filtered, _ = signal.bandpass(trials["eeg"], cfg.sfreq, 5.0, 95.0)
        eeg.append(signal.normalise(filtered, mode="zscore", clip=20.0).astype(np.float16))
        labels.append(trials["label"])
        splits += [synthetic.image_split(cfg, int(i)) for i in trials["image_index"]]
    return np.concatenate(eeg), np.concatenate(labels), np.asarray(splits) == "train"


@pytest.fixture
def both_cores() -> Iterator[None]:
    """Plain torch with nothing else running takes both cores (the suite's default is one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_probe_scores_a_pretrained_encoder_above_an_untrained_one(both_cores: None) -> None:
    """600 MSM steps on the unlabelled train-split windows lift the probe on held-out windows above the same encoder
    untrained. One seed's gain varies with the library versions' numerics, so the gain is averaged over three."""
    eeg, labels, train = _synth_eeg(synthetic.SynthConfig(num_classes=10, images_per_class=40, image_size=16))
    windows = torch.as_tensor(eeg[train]).float()

    def probe(encoder: torch.nn.Module) -> float:
        features = encoder_features(encoder, eeg)
        return linear_probe(features[train], labels[train], features[~train], labels[~train])

    gains = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_msm(MSMConfig(preset="tiny", mask_ratio=0.75))
        untrained = probe(model.encoder)
        optimizer, order = build_optimizer(model, 5e-3, (0.9, 0.95), 0.05), torch.Generator().manual_seed(seed)
        for _ in range(600):
            batch = windows[torch.randint(0, len(windows), (16,), generator=order)]
            stats = msm_train_step(
                model, optimizer, [{"eeg": batch}], lr=5e-3, grad_clip=0.8, device=torch.device("cpu")
            )
        trained = probe(model.encoder)
        print(f"seed {seed}: probe on SynthEEG held-out windows untrained {untrained:.3f}, trained {trained:.3f}")
        assert stats["loss"] < 0.8  # it did learn to reconstruct (untrained: about 1.0)
        assert trained > 3 * 0.1  # 10 balanced classes
        gains.append(trained - untrained)
    assert np.mean(gains) > 0.08, gains


# ------------------------------------------------------------------------------ search space


def _sweep_config(tmp_path: Path, search_space: dict, **extra: object) -> SweepConfig:
    data = {
        "base": {"data": str(tmp_path / "shards"), "model": {"preset": "tiny"}, "batch_size": 16},
        "probe_data": str(tmp_path / "paired"),
        "search_space": search_space,
        "output": str(tmp_path / "sweep"),
        **extra,
    }
    cfg = validate_config("sweep", data, "test")
    assert isinstance(cfg, SweepConfig)
    return cfg


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"model.maskratio": {"grid": [0.5]}}, "search_space model.maskratio=0.5: model.maskratio: unknown key"),
        ({"model.mask_ratio": {"grid": []}}, "search_space.model.mask_ratio: grid needs a non-empty list"),
        ({"model.mask_ratio": {"grid": [0.5, -0.25]}}, "model.mask_ratio=-0.25: model.mask_ratio: Input should be"),
        ({"model.mask_ratio": {"choice": [0.5, 1.0]}}, "model.mask_ratio=1.0: model.mask_ratio: Input should be less"),
        ({"model.mask_ratio": {"range": [0.1, 0.9]}}, "search_space.model.mask_ratio: unknown spec kind 'range'"),
        ({"model.mask_ratio": [0.5, 0.75]}, "search_space.model.mask_ratio: expected one of {grid: [values]}"),
        ({"optim.lr": {"loguniform": [0, 1e-3]}}, "search_space.optim.lr: loguniform needs lo > 0"),
        ({"optim.lr": {"uniform": [1e-3, 1e-4]}}, "search_space.optim.lr: uniform needs lo < hi"),
        ({"epochs": {"uniform": [1, 4]}}, "epochs=2.5: epochs: Input should be a valid integer"),
        ({"output": {"grid": ["elsewhere"]}}, "search_space.output: the sweep sets output for every trial"),
        (
            {"model.embed_dim": {"grid": [40]}, "model.num_heads": {"grid": [16]}},
            "model.embed_dim=40, model.num_heads=16: model: embed_dim (40) must be divisible by num_heads (16)",
        ),
    ],
)
def test_bad_search_space_fails_before_any_trial_naming_the_entry(tmp_path: Path, space: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        sweep(_sweep_config(tmp_path, space))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "sweep").exists()  # nothing started, nothing written


def test_yaml_search_space_becomes_tune_samplers_and_every_candidate_is_checked(tmp_path: Path) -> None:
    space = {
        "model.mask_ratio": {"grid": [0.5, 0.75]},
        "model.embed_dim": {"choice": [32, 64]},
        "optim.lr": {"loguniform": [1.0e-4, 1.0e-3]},
        "optim.weight_decay": {"uniform": [0.0, 0.1]},
    }
    samplers = param_space(_sweep_config(tmp_path, space))["overrides"]
    assert samplers["model.mask_ratio"] == {"grid_search": [0.5, 0.75]}
    assert isinstance(samplers["model.embed_dim"], Categorical) and samplers["model.embed_dim"].categories == [32, 64]
    for key, sampler in (("optim.lr", "_LogUniform"), ("optim.weight_decay", "_Uniform")):
        domain = samplers[key]
        assert isinstance(domain, Float) and type(domain.get_sampler()).__name__ == sampler
        assert [domain.lower, domain.upper] == space[key]["loguniform" if key == "optim.lr" else "uniform"]
    # the paper's grid as shipped: 3 ratios x 2 presets x the learning rate's bounds and middle, each preset's sizes
    paper = load_config("sweep", "sweep-paper.yaml")
    assert isinstance(paper, SweepConfig)
    configs = check_search_space(paper)
    assert len(configs) == 18 and {(c.model.mask_ratio, c.model.embed_dim, c.model.depth) for c in configs} == {
        (r, PRESETS[p]["embed_dim"], PRESETS[p]["depth"]) for r in (0.25, 0.5, 0.75) for p in ("small", "large")
    }
    assert sorted({c.optim.lr for c in configs}) == pytest.approx([1e-4, 10**-3.5, 1e-3])


def test_max_concurrent_trials_follow_each_trials_scaling_config(ray_local: None, tmp_path: Path) -> None:
    """4 logical CPUs, one left to Ray Data: 1-worker trials (1.25 CPUs with their Tune driver) run 2 at once."""
    one = _sweep_config(tmp_path, {"model.mask_ratio": {"grid": [0.5, 0.75]}})
    assert max_concurrent_trials(one, check_search_space(one)) == 2
    two = _sweep_config(tmp_path, {"scaling.num_workers": {"grid": [1, 2]}})  # sized by the 2-worker trials
    assert max_concurrent_trials(two, check_search_space(two)) == 1
    fixed = _sweep_config(tmp_path, {"scaling.num_workers": {"grid": [1, 2]}}, max_concurrent_trials=3)
    assert max_concurrent_trials(fixed, check_search_space(fixed)) == 3


def test_placement_group_workaround_fails_loudly_if_ray_changes_what_it_relies_on(tmp_path: Path) -> None:
    """The workaround uses Ray 2.60 internals; a Ray that moves them must fail with a message, never hang trials."""
    with pytest.raises(DreamdiffError, match="keeps a worker group's placement group elsewhere than Ray 2.60"):
        _RecordPlacementGroup(tmp_path / "group").after_worker_group_start(object())  # a worker group of another API
    reaper = _ReapPlacementGroups(tmp_path)
    reaper.ended = {"failed-before-training": False, "trained": True}  # neither recorded a placement group
    with pytest.raises(DreamdiffError, match="trial trained trained but no placement group was recorded"):
        reaper.reap()
    assert reaper.ended == {"trained": True}


def test_probe_data_is_given_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="probe_data: differs from base.probe_data"):
        validate_config(
            "sweep",
            {"base": {"data": "d", "probe_data": "p1"}, "probe_data": "p2", "search_space": {}, "output": "o"},
            "test",
        )


# ---------------------------------------------------------------------------- sweeps on Ray


@pytest.fixture(scope="module")
def shards(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SynthEEG-Image: 320 labelled pairs (10 classes x 16 images x 2 subjects; paired/) and 288 unlabelled windows
    of the same two subjects (epochs/: 240 for training, one file of 48 held out)."""
    out = tmp_path_factory.mktemp("shards")
    sources = [
        {"kind": "synthetic", "synth": {"num_classes": 10, "images_per_class": 16, "image_size": 16}},
        {"kind": "synthetic", "labeled": False, "unlabeled_epochs_per_subject": 144, "synth": {"num_subjects": 2}},
    ]
    preprocess(validate_config("preprocess", {"output": str(out), "sources": sources, "rows_per_shard": 48}, "t"))
    return out


def _config(shards: Path, output: Path, search_space: dict, base: dict, **extra: object) -> SweepConfig:
    defaults = {
        "data": str(shards / "epochs"),
        "model": {"preset": "tiny"},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "batch_size": 16,  # 15 steps per epoch
        "precision": "fp32",
        "val_rows": 16,
        "log_every_steps": 5,
        "plot_every_epochs": 10,
        "probe_rows": 128,
        "checkpoint": {"every_steps": 5, "keep": 1},  # a report to Tune every 5 steps
        "scaling": {"num_workers": 1},
    }
    data = {
        "base": {**defaults, **base},
        "probe_data": str(shards / "paired"),
        "search_space": search_space,
        "max_concurrent_trials": 2,
        "output": str(output),
        **extra,
    }
    cfg = validate_config("sweep", data, "test")
    assert isinstance(cfg, SweepConfig)
    return cfg


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under a folder: its bytes and modification time."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def _rows(output: Path) -> list[dict[str, str]]:
    with open(output / RESULTS_FILE) as f:
        return list(csv.DictReader(f))


def test_probe_sets_need_labelled_train_and_held_out_rows(shards: Path) -> None:
    sets = load_probe_sets(shard_files(shards), 40)  # epoch-only shards beside the pairs are skipped
    assert sets["train_eeg"].shape == (40, 128, 512) and sets["test_eeg"].shape == (40, 128, 512)
    assert set(np.unique(sets["train_label"])) <= set(range(10))
    with pytest.raises(DreamdiffError, match="probe_data: no labelled train-split rows"):
        load_probe_sets(shard_files(shards / "epochs"), 40)


@pytest.mark.slow
def test_four_trial_sweep_stops_early_and_writes_table_plot_and_a_trainable_best_config(
    shards: Path, tmp_path: Path
) -> None:
    space = {"model.mask_ratio": {"grid": [0.5, 0.75]}, "model.embed_dim": {"grid": [16, 64]}}
    cfg = _config(shards, tmp_path / "sweep", space, base={"epochs": 2}, grace_period=1)  # 30 steps, 6 reports
    free_before = ray.available_resources().get("CPU", 0)
    result = sweep(cfg)
    deadline = time.monotonic() + 30  # the workers of stopped trials are freed (Ray 2.60 alone leaks them)
    while ray.available_resources().get("CPU", 0) < free_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= free_before

    rows = _rows(tmp_path / "sweep")
    assert len(rows) == 4 and {(r["model.mask_ratio"], r["model.embed_dim"]) for r in rows} == {
        ("0.5", "16"),
        ("0.5", "64"),
        ("0.75", "16"),
        ("0.75", "64"),
    }
    statuses = [r["status"] for r in rows]
    assert "early-stopped" in statuses and "error" not in statuses, rows
    for row in rows:
        assert 0 <= float(row["probe_accuracy"]) <= 1 and float(row["probe_chance"]) == pytest.approx(0.1, abs=0.05)
        assert float(row["samples_per_s"]) > 0 and float(row["wall_s"]) > 0 and float(row["val_loss"]) > 0
        finished = int(row["step"]) == int(row["total_steps"]) == 30
        assert finished == (row["status"] == "completed") and int(row["reports"]) == int(row["step"]) // 5
    assert float(rows[0]["probe_accuracy"]) == max(float(r["probe_accuracy"]) for r in rows)  # best first
    assert (tmp_path / "sweep" / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sweep" / "config.yaml").is_file()

    # the best completed trial's config, as is, for `dreamdiff pretrain`; here shortened
    best = result["best_trial"]
    assert [r["status"] for r in rows if r["trial_id"] == best] == ["completed"]
    path = tmp_path / "sweep" / BEST_FILE
    cfg_best = load_config("pretrain", path)
    assert cfg_best.probe_data == str(shards / "paired")
    assert cfg_best.output == str(tmp_path / "sweep" / "best-pretrain")
    trial = load_config("pretrain", tmp_path / "sweep" / "trials" / best / "config.yaml")
    assert cfg_best.model_dump(exclude={"output"}) == trial.model_dump(exclude={"output"})
    shorter = ["epochs=1", "checkpoint.every_steps=7"]
    assert cli(["pretrain", "--config", str(path), *shorter]) == 0  # `dreamdiff pretrain`
    lines = [json.loads(line) for line in (Path(cfg_best.output) / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines if "probe_accuracy" in line] == [7, 14, 15]  # 240 rows, 16 a step
    assert 0 <= lines[-1]["probe_accuracy"] <= 1 and (Path(cfg_best.output) / ENCODER_FILE).is_file()


@pytest.mark.slow
def test_interrupted_sweep_resumes_the_failed_trial_and_reruns_no_finished_one(shards: Path, tmp_path: Path) -> None:
    # trial B fails at step 8 (its last checkpoint: step 5); trial A finishes; grace_period = max_t: no early stops
    space = {"inject_failure_at_step": {"grid": [None, 8]}}
    cfg = _config(shards, tmp_path / "sweep", space, base={"epochs": 1}, grace_period=3)
    sweep(cfg)
    first = {r["inject_failure_at_step"]: r for r in _rows(tmp_path / "sweep")}
    assert first[""]["status"] == "completed" and first["8"]["status"] == "error"
    assert "injected failure at step 8" in first["8"]["error"]
    trials = tmp_path / "sweep" / "trials"
    finished = trials / first[""]["trial_id"]
    finished_before = _snapshot(finished)
    assert {ENCODER_FILE, SPLIT_FILE, "config.yaml"} <= set(finished_before)  # files a re-run would rewrite

    result = sweep(cfg)  # the same config again: restore, continue what did not finish

    assert _snapshot(finished) == finished_before  # not re-run: every file of the finished trial left untouched
    again = {r["inject_failure_at_step"]: r for r in _rows(tmp_path / "sweep")}
    assert again[""] == first[""]
    assert again["8"]["status"] == "completed" and again["8"]["step"] == "15"
    resumed = [json.loads(line) for line in (trials / first["8"]["trial_id"] / METRICS_FILE).read_text().splitlines()]
    assert [(m["step"], m["resumed_at"]) for m in resumed] == [(5, 0), (10, 5), (15, 5)]  # from its checkpoint
    assert len(result["trials"]) == 2


def test_the_best_trial_is_the_best_completed_one() -> None:
    """An early-stopped trial was scored after fewer steps: the sweep (and the demo's report) recommend the best
    trial that completed, falling back to any scored trial only when none completed."""
    rows = [
        {"trial_id": "a", "status": "early-stopped", "probe_accuracy": 0.30},
        {"trial_id": "b", "status": "completed", "probe_accuracy": 0.20},
        {"trial_id": "c", "status": "completed", "probe_accuracy": 0.25},
        {"trial_id": "d", "status": "error", "probe_accuracy": float("nan")},
    ]
    assert best_trial(rows)["trial_id"] == "c"
    assert best_trial([rows[0], rows[3]])["trial_id"] == "a"
    assert best_trial([rows[3]]) is None
