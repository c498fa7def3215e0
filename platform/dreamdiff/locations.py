"""The path fields of a config, found by their type, and the URI check every stage gets from the CLI.

A config field that names a file or folder is typed `Location` (read or written through dreamdiff.storage: a local
path or a URI), `LocalPath` or `ModelRef` (dreamdiff.config.paths). `path_fields` walks a config and yields every
such field that is set, so whatever handles paths (this check, the demo's run folder, Serve's replicas) needs no
list of names. A remote URI is taken only by a `Location` of the stage being run: where a stage's config sits
inside another's (the sweep's base, the demo's sections), the outer stage reads and writes those paths locally.
Everywhere else a remote URI is refused with the field named (no folder called "s3:" appears), and a file:// URI
becomes its local path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import BaseModel

from dreamdiff.config.paths import PathKind, path_kind
from dreamdiff.config.stages import STAGES
from dreamdiff.errors import DreamdiffError
from dreamdiff.storage import REMOTE_SCHEMES, normalise, scheme

_STAGE_CONFIGS = tuple(stage.config for stage in STAGES.values())


@dataclass(frozen=True)
class PathField:
    """A path field that is set in a config: where it is, its type and its value."""

    key: str  # dotted, from the config's top level
    owner: BaseModel  # the section that holds it
    name: str
    kind: PathKind
    value: str
    nested: bool  # inside another stage's config (the sweep's base, a demo section)

    def set(self, value: str) -> None:
        setattr(self.owner, self.name, value)


def path_fields(cfg: BaseModel, prefix: str = "", nested: bool = False) -> Iterator[PathField]:
    """Every path field of `cfg` that holds a value, in nested sections and lists of sections too."""
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        key = f"{prefix}{name}"
        kind = path_kind(field)
        if kind is not None:
            if isinstance(value, str):
                yield PathField(key, cfg, name, kind, value, nested)
            continue
        items = [(f"{key}.{i}.", v) for i, v in enumerate(value)] if isinstance(value, list) else [(f"{key}.", value)]
        for child_prefix, child in items:
            if isinstance(child, BaseModel):
                yield from path_fields(child, child_prefix, nested or isinstance(child, _STAGE_CONFIGS))


def _uri_fields() -> str:
    """Which stages take URIs, and in which fields (for the error message)."""
    taken = {
        name: [key for key, field in stage.config.model_fields.items() if path_kind(field) is PathKind.LOCATION]
        for name, stage in STAGES.items()
    }
    return "; ".join(f"{name}: {', '.join(keys)}" for name, keys in taken.items() if keys)


def check_locations(stage: str, cfg: BaseModel) -> None:
    """Refuse a remote URI where `stage` cannot use one, naming the field; file:// URIs become local paths."""
    for found in list(path_fields(cfg)):
        kind = scheme(found.value)
        if kind is None:
            continue
        if kind != "file" and kind not in REMOTE_SCHEMES:
            schemes = ", ".join(f"{s}://" for s in ("file", *REMOTE_SCHEMES))
            raise DreamdiffError(
                f"{found.key}: unknown URI scheme {kind!r} in {found.value}; expected a path or {schemes}"
            )
        if found.kind is PathKind.LOCATION and not found.nested:
            continue
        if kind != "file":
            raise DreamdiffError(
                f"{found.key}: the {stage} stage reads and writes local (or shared-filesystem) paths only, got the "
                f"URI {found.value}; URIs are taken by {_uri_fields()}"
            )
        found.set(normalise(found.value))
