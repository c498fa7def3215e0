"""Which config fields may hold a remote URI, and the check every stage gets before it starts (from the CLI).

A stage that reads or writes a field through dreamdiff.storage lists it in URI_FIELDS. Everywhere else a remote URI
is refused with the field named (no folder called "s3:" appears), and a file:// URI becomes its local path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from dreamdiff.errors import DreamdiffError
from dreamdiff.storage import REMOTE_SCHEMES, normalise, scheme

# Config fields (dotted, per stage) whose stage reads/writes them through dreamdiff.storage. Every other path field
# takes local paths (and file:// URIs, turned into paths by `check_locations`); a remote URI there is refused.
URI_FIELDS: dict[str, tuple[str, ...]] = {
    "preprocess": ("output",),
    "pretrain": ("data", "output", "probe_data"),
}


def _string_fields(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, str | int, str]]:
    """(dotted key, parent, key in parent, value) of every string in a config, except `ray` sections."""
    if isinstance(node, BaseModel):
        items: Any = ((name, getattr(node, name)) for name in type(node).model_fields if name != "ray")
    elif isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        dotted = f"{prefix}{key}"
        if isinstance(value, str):
            yield dotted, node, key, value
        else:
            yield from _string_fields(value, f"{dotted}.")


def check_locations(stage: str, cfg: BaseModel) -> None:
    """Refuse a remote URI where `stage` cannot use one, naming the field; file:// URIs become local paths."""
    allowed = URI_FIELDS.get(stage, ())
    for key, parent, name, value in list(_string_fields(cfg)):
        kind = scheme(value)
        if kind is None:
            continue
        if kind != "file" and kind not in REMOTE_SCHEMES:
            schemes = ", ".join(f"{s}://" for s in ("file", *REMOTE_SCHEMES))
            raise DreamdiffError(f"{key}: unknown URI scheme {kind!r} in {value}; expected a path or {schemes}")
        if kind != "file" and key not in allowed:
            where = "; ".join(f"{s}: {', '.join(f)}" for s, f in URI_FIELDS.items())
            raise DreamdiffError(
                f"{key}: the {stage} stage reads and writes local (or shared-filesystem) paths only, got the URI "
                f"{value}; URIs are taken by {where}"
            )
        if kind == "file" and key not in allowed:
            if isinstance(parent, BaseModel):
                setattr(parent, str(name), normalise(value))
            else:
                parent[name] = normalise(value)
