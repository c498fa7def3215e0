"""Every YAML in cluster/ and configs/ is what its consumer accepts, and names only things that exist.

The cluster launcher config is checked against the JSON schema inside the installed ray package (and by Ray's own
config preparation); KubeRay manifests for the fields the operator requires; every job entrypoint, config and Serve
application they name is loaded the way the cluster would load it.
"""

from __future__ import annotations

import copy
import json
import re
import runpy
import shlex
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from dreamdiff.config import STAGES, load_config
from dreamdiff.locations import check_locations

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
IMAGE_TAG = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, m) for p in MANIFESTS if (m := _load(p))["kind"] == kind]


def _driver_stage(script: Path) -> str:
    """The stage a jobs/ driver runs: the first argument it hands to dreamdiff.cli.main."""
    found = re.search(r'main\(\["(\w+)", \*sys\.argv\[1:\]\]\)', script.read_text())
    assert found, f"{script.name}: not a thin `main([stage, *sys.argv[1:]])` driver"
    return found.group(1)


# ------------------------------------------------------------------------------- cluster launcher


def _ray_schema() -> dict[str, Any]:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_config_validates_against_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(CLUSTER / "aws.yaml")
    jsonschema.validate(config, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs: defaults filled in, then checked
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(broken, _ray_schema())


def test_launcher_has_cpu_head_and_autoscaling_gpu_and_cpu_workers_with_token_auth() -> None:
    config = _load(CLUSTER / "aws.yaml")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu, cpu = types["gpu_worker"], types["cpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("p", "g"))  # AWS GPU families
    assert cpu["node_config"]["InstanceType"].startswith(("m", "c", "r"))
    for worker in (gpu, cpu):
        assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert (
        config["file_mounts"]["~/dreamdiff"] == "."
        and "pip install --no-cache-dir -e ~/dreamdiff" in config["setup_commands"]
    )
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]  # reached through `ray dashboard`


def test_every_image_runs_the_installed_ray_version() -> None:
    versions = {IMAGE_TAG.search(_load(CLUSTER / "aws.yaml")["docker"]["image"]).group(1)}
    versions.add(IMAGE_TAG.search((CLUSTER / "Dockerfile").read_text()).group(1))
    for path in MANIFESTS:
        spec = _cluster_spec(_load(path))
        if spec is not None:
            versions.add(spec["rayVersion"])
    assert versions == {ray.__version__}


# ----------------------------------------------------------------------------------- KubeRay


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any] | None:
    spec = manifest["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}.get(
        manifest["kind"]
    )


def _check_pod(template: dict[str, Any], where: str) -> None:
    pod = template["spec"]
    containers = pod["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for container in containers:
        mounts = container.get("volumeMounts", [])
        assert {m["name"] for m in mounts} <= volumes, f"{where}: a volumeMount names no volume"
        shared = [m["mountPath"] for m in mounts if m["name"] == "shared"]
        assert shared == ["/shared"], f"{where}: the shared claim goes at /shared, the configs' one root, once"
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], f"{where}: requests != limits"


def _check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    """The fields the KubeRay operator requires, and ours: token auth, autoscaling, a CPU-only head."""
    assert spec["authOptions"] == {"mode": "token", "secretName": "dreamdiff-ray-token"}, where
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams take strings"
    assert head["rayStartParams"]["num-cpus"] == "0", where
    _check_pod(head["template"], f"{where} head")
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups), f"{where}: groupNames must be unique"
    for group in groups:
        name = f"{where} group {group['groupName']}"
        assert isinstance(group["rayStartParams"], dict), name
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert group["maxReplicas"] >= 1, name
        _check_pod(group["template"], name)


def test_kuberay_manifests_have_known_kinds_and_the_fields_the_operator_requires() -> None:
    kinds = {}
    for path in MANIFESTS:
        manifest = _load(path)
        kinds[path.name] = manifest["kind"]
        expected_api = "v1" if manifest["kind"] == "PersistentVolumeClaim" else "ray.io/v1"
        assert manifest["apiVersion"] == expected_api, path.name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"]), path.name
        spec = _cluster_spec(manifest)
        if manifest["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert spec is not None, f"{path.name}: no cluster spec"
            _check_cluster_spec(spec, path.name)
    assert sorted(kinds.values()) == ["PersistentVolumeClaim", "RayCluster", "RayJob", "RayJob", "RayJob", "RayService"]
    images = set(re.findall(r"image: (\S+)", "".join(p.read_text() for p in MANIFESTS)))
    assert len(images) == 1, f"every pod must run the one dreamdiff image (cluster/Dockerfile): {images}"
    gpu_groups = [g for g in _load(KUBERAY / "raycluster.yaml")["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjobs_run_existing_drivers_on_configs_that_load_with_the_runtime_env_file() -> None:
    runtime_env = _load(CLUSTER / "runtime_env.yaml")
    stages = set()
    for path, job in _kind("RayJob"):
        spec = job["spec"]
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), path.name
        assert spec["shutdownAfterJobFinishes"] is True, path.name
        assert yaml.safe_load(spec["runtimeEnvYAML"]) == runtime_env, f"{path.name}: runtimeEnvYAML drifted"
        argv = shlex.split(spec["entrypoint"])
        assert argv[:2] == ["python", argv[1]] and argv[2] == "--config", path.name
        script, config = REPO / argv[1], REPO / argv[3]
        assert script.is_file() and script.parent == REPO / "jobs", f"{path.name}: no driver {argv[1]}"
        assert config.is_file() and config.parent == REPO / "configs", f"{path.name}: no config {argv[3]}"
        stage = _driver_stage(script)
        cfg = load_config(stage, config, argv[4:])
        check_locations(stage, cfg)  # no URI where the stage cannot take one
        train = cfg.base if stage == "sweep" else cfg  # a sweep's trials train as its base config says
        workers = max(1, train.scaling.num_workers)
        accum = train.optim.grad_accum
        assert train.batch_size % (workers * accum) == 0, f"{path.name}: the batch does not split over the workers"
        gpus = sum(
            g["maxReplicas"] * int(_limits(g).get("nvidia.com/gpu", 0))
            for g in spec["rayClusterSpec"]["workerGroupSpecs"]
        )
        assert gpus >= (workers if train.scaling.use_gpu else 0), f"{path.name}: {gpus} GPUs for {workers} workers"
        stages.add(stage)
    assert stages == {"pretrain", "finetune", "sweep"}


def _limits(group: dict[str, Any]) -> dict[str, str]:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_rayservice_serves_the_serve_app_config_with_serve_gpu_args_and_autoscales() -> None:
    from ray.serve.schema import ServeDeploySchema

    from dreamdiff.serve.app import build_app, config_from_args

    [(path, service)] = _kind("RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])  # KubeRay hands this string to Serve
    ServeDeploySchema.model_validate(serve_config)
    app_file = _load(REPO / "configs" / "serve-app.yaml")
    assert serve_config["applications"] == app_file["applications"]
    [app] = serve_config["applications"]
    assert app["import_path"] == "dreamdiff.serve.app:build_app" and callable(build_app)
    assert app["args"] == _load(REPO / "configs" / "serve-gpu.yaml")
    assert config_from_args(app["args"]) == load_config("serve", REPO / "configs" / "serve-gpu.yaml")
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # the proxy must answer on the pod's address
    scaling = app["args"]["autoscaling"]
    [gpu] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert scaling["min_replicas"] >= 1 and gpu["minReplicas"] >= 1  # an endpoint is up before its first request
    container = gpu["template"]["spec"]["containers"][0]
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpu["maxReplicas"] * gpus_per_pod >= scaling["max_replicas"] * app["args"]["num_gpus"], (
        "the autoscaler cannot give Serve's largest replica count its GPUs"
    )
    assert app["args"]["auth"]["token_env"] in {e["name"] for e in container.get("env", [])}


# ------------------------------------------------------------------------------ runtime env, jobs


def test_runtime_env_file_is_a_valid_ray_runtime_env_of_existing_paths() -> None:
    from ray.runtime_env import RuntimeEnv

    data = _load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**data)  # Ray's own validation of the fields
    assert (REPO / data["working_dir"]).resolve() == REPO
    assert all((REPO / module / "__init__.py").is_file() for module in data["py_modules"])
    assert all(isinstance(v, str) for v in data["env_vars"].values())


def test_one_thin_driver_per_stage_each_running_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    drivers = {_driver_stage(p): p for p in sorted((REPO / "jobs").glob("*.py"))}
    assert set(drivers) == set(STAGES), f"stages without a jobs/ driver: {set(STAGES) - set(drivers)}"
    for stage, script in drivers.items():
        saved = sys.argv
        sys.argv = [str(script), "--print-config"]
        try:
            with pytest.raises(SystemExit) as done:
                runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved
        assert done.value.code == 0, f"{script.name}: exit {done.value.code}"
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed == load_config(stage, STAGES[stage].default_config).model_dump(mode="json"), script.name


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_with_its_stage(path: Path) -> None:
    if path.name == "serve-app.yaml":  # a Serve deploy config, not a stage config
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(_load(path))
        return
    stage = path.stem.split("-")[0]
    assert stage in STAGES, f"{path.name}: name it <stage>-<scale>.yaml with a stage of {sorted(STAGES)}"
    check_locations(stage, load_config(stage, path))


def test_cluster_guide_names_only_files_that_exist() -> None:
    text = (REPO / "docs" / "cluster.md").read_text()
    named = set(re.findall(r"(?<![\w/.])((?:cluster|configs|jobs|tests)/[\w./-]+\.(?:yaml|py))\b", text))
    assert named, "the guide names no files"
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"docs/cluster.md names missing files: {missing}"
