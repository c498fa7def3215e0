"""Serve configs: the `serve build`-style YAML, the application builder's argument forms, the deployment options."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from dreamdiff.config import REPO_CONFIGS, ConfigError, ServeConfig, load_config
from dreamdiff.serve.app import build_app, config_from_args


def test_serve_app_yaml_is_a_serve_config_whose_args_are_serve_gpu_yaml() -> None:
    data = yaml.safe_load((REPO_CONFIGS / "serve-app.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "dreamdiff.serve.app:build_app" and app.route_prefix == "/"
    assert app.args == yaml.safe_load((REPO_CONFIGS / "serve-gpu.yaml").read_text())
    cfg = config_from_args(app.args)
    assert cfg == load_config("serve", "serve-gpu")
    assert (cfg.num_gpus, cfg.defaults.num_images, cfg.defaults.sampler, cfg.defaults.steps) == (1, 5, "dpm++", 25)
    assert cfg.autoscaling.min_replicas == 1 and cfg.autoscaling.max_replicas > 1 and cfg.auth.enabled


def test_builder_takes_a_config_file_with_overrides_or_the_fields(tmp_path: Path) -> None:
    cfg = config_from_args({"config": "configs/serve-demo.yaml", "batching.max_batch_size": "6", "port": "9100"})
    assert cfg.batching.max_batch_size == 6 and cfg.port == 9100 and cfg.eeg.sfreq == 250
    merged = config_from_args({"config": "serve-demo", "autoscaling": {"max_replicas": 3}})
    assert merged.autoscaling.max_replicas == 3 and merged.autoscaling.target_ongoing_requests == 4  # kept
    direct = config_from_args({"checkpoint": str(tmp_path), "limits": {"max_steps": 50}})
    assert direct.checkpoint == str(tmp_path) and direct.limits.max_steps == 50


def test_relative_local_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gen").mkdir()
    (tmp_path / "token").write_text("t")
    monkeypatch.chdir(tmp_path)
    cfg = config_from_args({"checkpoint": "gen", "auth": {"enabled": True, "token_file": "token"}})
    assert cfg.checkpoint == str(tmp_path / "gen") and cfg.auth.token_file == str(tmp_path / "token")
    assert config_from_args({"checkpoint": "/elsewhere/gen"}).checkpoint == "/elsewhere/gen"  # not checked here


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"config": "serve-demo", "batching.max_size": "4"}, "batching.max_size: unknown key"),
        ({"config": "serve-demo", "autoscaling.min_replicas": "3"}, "must not exceed max_replicas"),
        ({"config": "serve-demo", "batching.max_ongoing_requests": "2"}, "keeps batches from filling"),
        ({"config": "serve-demo", "limits.max_steps": "10"}, "max_steps is below defaults.steps"),
        ({"config": "serve-demo", "route_prefix": "api"}, "route_prefix"),
        ({"num_gpus": 1}, "checkpoint: required key is missing"),
        ({"config": "no-such-serve-file"}, "config file not found"),
    ],
)
def test_bad_builder_args_name_the_key(args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_args(args)


def test_deployments_take_their_options_from_the_config() -> None:
    cfg = config_from_args({"config": "serve-gpu", "batching.max_ongoing_requests": "null"})
    app = build_app(cfg.model_dump(mode="json"))
    ingress = app._bound_deployment  # Serve's Application has no public accessor for what it binds
    generator = ingress.init_args[0]._bound_deployment
    assert ingress.name == "ingress" and generator.name == "generator"
    assert ingress.max_ongoing_requests == cfg.ingress_max_ongoing_requests
    assert generator.ray_actor_options["num_gpus"] == 1 and generator.ray_actor_options["num_cpus"] == 4
    assert generator.max_ongoing_requests == 2 * cfg.batching.max_batch_size  # null: one batch runs, one fills
    scaling = generator._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 8)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (30, 600)
    assert ServeConfig.model_validate(generator.init_args[0]) == cfg
