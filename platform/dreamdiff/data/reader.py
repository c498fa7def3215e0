"""Reading shards for training: only subjects whose preprocessing finished, only the columns asked."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import ray.data

from dreamdiff.data.preprocess import DONE
from dreamdiff.errors import DreamdiffError

TRAIN_COLUMNS = ("eeg", "channel_mask")


def shard_files(path: str | Path) -> list[str]:
    """Parquet files listed by the done-markers under `path` (a half-written subject is never read)."""
    root = Path(path)
    if not root.is_dir():
        raise DreamdiffError(f"data: no such shard folder {path} (run `dreamdiff preprocess` first)")
    files = []
    for marker in sorted(root.rglob(DONE)):
        files += [str(marker.parent / name) for name in json.loads(marker.read_text())["files"]]
    if not files:
        raise DreamdiffError(f"data: {path} holds no finished shards (no {DONE} markers below it)")
    return files


def read_epochs(path: str | Path, columns: Sequence[str] = TRAIN_COLUMNS) -> ray.data.Dataset:
    """The epochs under `path` as a Ray Dataset (EEG as float16 [128, T] tensors)."""
    return ray.data.read_parquet(shard_files(path)).select_columns(list(columns))
