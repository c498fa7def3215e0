"""Loading a stage's config: YAML files, dotted command-line overrides, validation, one-line errors.

A YAML file in ``configs/`` holds every knob of a stage; the command line may override any of them with
``dotted.key=value`` (the value is parsed as YAML, so ``model.depth=2`` is an int and ``data.subjects=[1,2]`` a
list). Unknown keys and wrong types fail at load time with the file, the key and the expected form named.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dreamdiff.config.stages import STAGES
from dreamdiff.configbase import StrictModel
from dreamdiff.errors import DreamdiffError

REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"


class ConfigError(DreamdiffError):
    """A config problem, reported as one line that names the file and the key."""


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, else a file of the repository's configs/ folder (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (REPO_CONFIGS / path.name, REPO_CONFIGS / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``dotted.key=value`` pairs in a nested dict (values parsed as YAML)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. model.depth=2")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = _child(node, part, item)
        if isinstance(node, list):
            node[_index(node, parts[-1], item)] = value
        else:
            node[parts[-1]] = value
    return data


def _index(node: list[Any], part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {item!r}: {part!r} is not an index of a list of {len(node)} entries")
    return int(part)


def _child(node: Any, part: str, item: str) -> Any:
    """Step into a mapping key or a list index, creating mappings on the way."""
    if isinstance(node, list):
        return node[_index(node, part, item)]
    child = node.get(part)
    if not isinstance(child, dict | list):
        child = {}
        node[part] = child
    return child


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str] | None:
    """Field names of the config section that `loc` points into (for 'unknown key' messages)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _describe(model: type[BaseModel], err: Mapping[str, Any], overridden: set[str]) -> str:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p in {"moabb", "synthetic", "imagenet_eeg"})]
    key = ".".join(str(p) for p in loc) or "(top level)"
    origin = " (from the command line)" if key in overridden else ""
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1]) or []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; allowed: {', '.join(allowed)}" if allowed else "")
        return f"{key}: unknown key{origin}{hint}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    got = err.get("input")
    return f"{key}: {err['msg'].removeprefix('Value error, ')} (got {got!r}){origin}"


def validate_config(stage: str, data: dict[str, Any], source: str, overridden: Sequence[str] = ()) -> StrictModel:
    """Validate a raw dict as the config of `stage`; errors become one-line ConfigErrors."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    model = STAGES[stage].config
    try:
        return model.model_validate(data)
    except ValidationError as err:
        keys = {o.partition("=")[0] for o in overridden}
        problems = "; ".join(_describe(model, e, keys) for e in err.errors())
        raise ConfigError(f"{source}: {problems}") from None


def load_config(stage: str, path: str | Path, overrides: Sequence[str] = ()) -> StrictModel:
    """Read a stage's YAML, apply dotted overrides, validate. Raises ConfigError."""
    resolved = resolve_config_path(path)
    data = apply_overrides(read_yaml(resolved), overrides)
    return validate_config(stage, data, str(resolved), overrides)


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (every default written out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
