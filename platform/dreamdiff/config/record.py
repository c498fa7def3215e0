"""Recording a run's config in its folder, so that a re-run resumes and a different config is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from dreamdiff import storage
from dreamdiff.config.loader import ConfigError, dump_config


def record_config(cfg: BaseModel, run_dir: str | Path) -> Path | str:
    """Write `config.yaml` into a run folder; refuse to mix runs of different configs.

    Re-running the same config into the same folder is how stages resume, so an identical
    record is fine (where Ray runs, the `ray` section, may change); a different one means two
    experiments would share checkpoints. `run_dir` may be a URI (dreamdiff.storage); a local one gives a Path.
    """
    folder = storage.normalise(run_dir)
    storage.makedirs(folder)
    path = storage.join(folder, "config.yaml")
    text = dump_config(cfg)
    old = (yaml.safe_load(storage.read_text(path)) or {}) if storage.exists(path) else None
    if old is not None:
        old = _with_current_defaults(cfg, old)
    changed = [] if old is None else [k for k in _changed_keys(old, yaml.safe_load(text)) if not k.startswith("ray.")]
    if changed:
        raise ConfigError(
            f"{folder} holds a run made with a different config (changed: {', '.join(changed[:8])}); "
            "use another output folder or remove this one"
        )
    storage.write_text(path, text)
    return path if storage.is_remote(path) else Path(path)


def _with_current_defaults(cfg: BaseModel, old: Any) -> Any:
    """The recorded config as this version of dreamdiff reads it: a field added since the record was written takes
    its default, so that a re-run resumes instead of seeing a change. A record that no longer validates is
    compared as written."""
    try:
        return yaml.safe_load(dump_config(type(cfg).model_validate(old)))
    except ValueError:
        return old


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]
