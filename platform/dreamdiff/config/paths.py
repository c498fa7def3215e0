"""The types of a config's path fields.

A field that names a file or folder is typed with one of the path types below, so the code that handles paths
(the URI check, the demo's run folder, Serve's replicas) finds such fields by their type instead of by a list of
names.
"""

from __future__ import annotations

import types
from enum import Enum
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic.fields import FieldInfo


class PathKind(Enum):
    """What a path field may hold (the value is its description in error messages)."""

    LOCATION = "a local path or a URI"
    LOCAL = "a local path"
    MODEL_REF = "a model name or a local path"


# A folder or file the stage reads or writes through dreamdiff.storage: a local path or a URI (s3://, gs://, ...).
Location = Annotated[str, PathKind.LOCATION]
# A local (or shared-filesystem) path: a file:// URI becomes its path, any other URI is refused naming the field.
LocalPath = Annotated[str, PathKind.LOCAL]
# A name its library resolves (a Hugging Face id, an open_clip tag) or a local path: a relative value is a path
# only where one exists, so it is moved (into a run folder, made absolute) only then.
ModelRef = Annotated[str, PathKind.MODEL_REF]


def path_kind(field: FieldInfo) -> PathKind | None:
    """The path type of a config field (`Location`, `Location | None`, ...), or None for a field that is no path."""
    found = [meta for meta in field.metadata if isinstance(meta, PathKind)]
    return found[0] if found else _kind_in(field.annotation)


def _kind_in(annotation: Any) -> PathKind | None:
    """Pydantic keeps the metadata of a top-level Annotated in FieldInfo.metadata, but of `X | None` in X."""
    origin = get_origin(annotation)
    if origin is Annotated:
        found = [meta for meta in annotation.__metadata__ if isinstance(meta, PathKind)]
        return found[0] if found else _kind_in(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        kinds = {kind for arg in get_args(annotation) if (kind := _kind_in(arg)) is not None}
        return kinds.pop() if len(kinds) == 1 else None
    return None
