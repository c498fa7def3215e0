"""Reading shards for training: only subjects whose preprocessing finished, only the columns asked.

`path` is a local folder or a URI (dreamdiff.storage); files come back in the same form, so a local run
gets plain paths and a cluster run gets URIs that every node can open.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import ray.data

from dreamdiff import storage
from dreamdiff.data.schema import DONE
from dreamdiff.errors import DreamdiffError

TRAIN_COLUMNS = ("eeg", "channel_mask")


def shard_files(path: str | Path) -> list[str]:
    """Parquet files listed by the done-markers under `path` (a half-written subject is never read)."""
    root = storage.normalise(path)
    if not storage.exists(root) or storage.is_file(root):
        raise DreamdiffError(f"data: no such shard folder {path} (run `dreamdiff preprocess` first)")
    files = []
    for marker in storage.find(root, DONE):
        folder = storage.parent(marker)
        files += [storage.join(folder, name) for name in json.loads(storage.read_text(marker))["files"]]
    if not files:
        raise DreamdiffError(f"data: {path} holds no finished shards (no {DONE} markers below it)")
    return files


def read_epochs(path: str | Path, columns: Sequence[str] = TRAIN_COLUMNS) -> ray.data.Dataset:
    """The epochs under `path` as a Ray Dataset (EEG as float16 [128, T] tensors)."""
    return ray.data.read_parquet(shard_files(path)).select_columns(list(columns))
