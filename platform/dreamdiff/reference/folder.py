"""The output folder of an import: refused if it holds anything else, skipped if it holds this same import, and
published whole (written beside it under a temporary name, then renamed into place)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dreamdiff.errors import DreamdiffError

IMPORT_FILE = "import.json"


def previous_import(out: Path, digest: str) -> dict[str, Any] | None:
    """The record of an earlier import of the same file (by sha256) into `out`, or None when `out` is new or empty;
    an `out` holding anything else is refused."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DreamdiffError(f"--out: {out} is a file; expected a new or empty folder")
    record = out / IMPORT_FILE
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
            saved["source"]["sha256"]
        except (ValueError, TypeError, KeyError) as err:
            raise DreamdiffError(
                f"--out: {record} is not an import record ({type(err).__name__}); choose a new folder"
            ) from None
        if saved["source"]["sha256"] == digest:
            return saved
        raise DreamdiffError(
            f"--out: {out} holds an import of another file ({saved.get('source', {}).get('path')}); choose a new folder"
        )
    if any(out.iterdir()):
        raise DreamdiffError(f"--out: {out} is not empty; choose a new or empty folder")
    return None


@contextmanager
def published(out: Path) -> Iterator[Path]:
    """A staging folder beside `out` to write the import into (its record last, `write_record`); on success the
    folder becomes `out`. On failure nothing is left."""
    stage = out.parent / f".{out.name}.import-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        yield stage
        if not (stage / IMPORT_FILE).is_file():
            raise RuntimeError(f"an import into {out} wrote no {IMPORT_FILE}")
        if out.exists():
            out.rmdir()  # empty: previous_import checked it
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_record(stage: Path, record: dict[str, Any]) -> None:
    """The import's record, `import.json`: where it came from and what became of every tensor."""
    (stage / IMPORT_FILE).write_text(json.dumps(record, indent=2))
