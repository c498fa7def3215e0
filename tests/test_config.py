"""Config loading: every shipped YAML validates; bad keys, types and files fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dreamdiff.config import (
    REPO_CONFIGS,
    STAGES,
    ConfigError,
    PretrainConfig,
    apply_overrides,
    load_config,
    record_config,
    validate_config,
)
from dreamdiff.models.sampling import torch_compile_mode

STAGE_OF = {"demo.yaml": "demo"}
NOT_STAGE_CONFIGS = {"serve-app.yaml"}  # a Ray Serve deploy config (checked in tests/serve/test_configs.py)


def _stage_of(path: Path) -> str:
    return STAGE_OF.get(path.name, path.stem.split("-")[0])


@pytest.mark.parametrize(
    "path", sorted(p for p in REPO_CONFIGS.glob("*.yaml") if p.name not in NOT_STAGE_CONFIGS), ids=lambda p: p.name
)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(_stage_of(path), path)
    assert isinstance(cfg, STAGES[_stage_of(path)].config)


def test_every_stage_has_a_demo_config() -> None:
    names = {_stage_of(p) for p in REPO_CONFIGS.glob("*.yaml")}
    assert set(STAGES) <= names


def test_dotted_overrides_parse_yaml_values() -> None:
    cfg = load_config("pretrain", "pretrain-demo", ["model.depth=3", "optim.betas=[0.8, 0.9]", "scaling.use_gpu=true"])
    assert isinstance(cfg, PretrainConfig)
    assert cfg.model.depth == 3 and isinstance(cfg.model.depth, int)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.scaling.use_gpu is True


def test_preset_fills_unset_model_fields_and_keeps_given_ones() -> None:
    cfg = load_config("pretrain", "pretrain-large", ["model.mask_ratio=0.5"])
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (1024, 24, 16)
    assert cfg.model.mask_ratio == 0.5


def test_unknown_key_names_key_file_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    data = yaml.safe_load((REPO_CONFIGS / "pretrain-demo.yaml").read_text())
    data["optim"]["learning_rate"] = 0.1
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config("pretrain", path)
    message = str(err.value)
    assert str(path) in message and "optim.learning_rate: unknown key" in message
    assert "\n" not in message


def test_wrong_type_names_key_expected_type_and_origin() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("pretrain", "pretrain-demo", ["model.depth=deep"])
    message = str(err.value)
    assert "model.depth" in message and "integer" in message and "'deep'" in message
    assert "from the command line" in message


def test_compile_takes_false_true_or_reduce_overhead_and_names_the_choices() -> None:
    for stage, name in (("finetune", "finetune-demo"), ("serve", "serve-demo"), ("generate", "generate-demo")):
        assert load_config(stage, name, ["compile=reduce-overhead"]).compile == "reduce-overhead"
        assert load_config(stage, name, ["compile=true"]).compile is True
        assert torch_compile_mode(load_config(stage, name, ["compile=true"]).compile) is None  # torch's default
    with pytest.raises(ConfigError) as err:
        load_config("evaluate", "evaluate-demo", ["compile=max-speed"])
    message = str(err.value)
    assert "compile: expected false, true or reduce-overhead (got 'max-speed')" in message


def test_missing_file_and_malformed_override_and_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("pretrain", "nope.yaml")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config("pretrain", "pretrain-demo", ["model.depth"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config("pretrain", broken)


def test_semantic_checks_name_the_field() -> None:
    with pytest.raises(ConfigError, match="model.mask_ratio"):
        load_config("pretrain", "pretrain-demo", ["model.mask_ratio=1.0"])
    with pytest.raises(ConfigError, match="sources.1.subjects.*at least one"):
        load_config("preprocess", "preprocess-demo", ["sources.1.subjects=[]"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config("preprocess", "preprocess-demo", ["sources.7.subjects=[1]"])


def test_apply_overrides_creates_nested_keys() -> None:
    assert apply_overrides({}, ["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    assert apply_overrides({"s": [{"k": 1}, {"k": 2}]}, ["s.1.k=3"]) == {"s": [{"k": 1}, {"k": 3}]}


def test_run_folder_records_resolved_config_and_refuses_a_different_one(run_dir: Path) -> None:
    cfg = load_config("pretrain", "pretrain-demo")
    path = record_config(cfg, run_dir)
    recorded = yaml.safe_load(path.read_text())
    assert recorded["model"]["embed_dim"] == cfg.model.embed_dim  # preset values written out
    assert recorded["optim"]["weight_decay"] == 0.05  # defaults written out
    record_config(cfg, run_dir)  # the same config again: a resume, allowed
    other = load_config("pretrain", "pretrain-demo", ["epochs=99"])
    with pytest.raises(ConfigError, match="different config.*epochs"):
        record_config(other, run_dir)
    assert yaml.safe_load(path.read_text())["epochs"] == cfg.epochs  # the old record is intact


def test_a_record_from_before_a_new_field_still_resumes(run_dir: Path) -> None:
    """A run recorded by an older dreamdiff lacks the fields added since; their defaults are no change."""
    cfg = load_config("pretrain", "pretrain-demo")
    path = record_config(cfg, run_dir)
    older = yaml.safe_load(path.read_text())
    del older["model"]["profile"], older["inject_failure_at_step"]  # written before these existed
    path.write_text(yaml.safe_dump(older))
    record_config(cfg, run_dir)  # a resume, allowed
    with pytest.raises(ConfigError, match="model.profile"):  # a non-default value is a change
        record_config(load_config("pretrain", "pretrain-demo", ["model.profile=reference"]), run_dir)


def test_finetune_profile_and_an_explicit_encoder_profile_must_agree() -> None:
    base = {"data": "d", "output": "o", "tiny_sd": {"sample_size": 16}, "encoder": {"preset": "tiny"}}
    assert validate_config("finetune", {**base, "profile": "reference"}, "t").profile == "reference"  # follows
    wrong = {**base, "encoder": {"preset": "tiny", "profile": "reference"}}
    with pytest.raises(ConfigError, match="profile: is 'dreamdiff' but encoder.profile is 'reference'"):
        validate_config("finetune", wrong, "t")
