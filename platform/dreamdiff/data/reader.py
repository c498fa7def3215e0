"""Reading shards for training: only subjects whose preprocessing finished, only the columns asked.

`path` is a local folder or a URI (dreamdiff.storage); files come back in the same form, so a local run
gets plain paths and a cluster run gets URIs that every node can open.

A shard that cannot be read (truncated, corrupt) fails with a `DreamdiffError` naming the file: `read_schema`,
`read_table` and `row_counts` do it for one file; after a read of many files failed (Ray Data says not which),
`locate_unreadable` finds the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from dreamdiff import storage
from dreamdiff.data.schema import DONE
from dreamdiff.errors import DreamdiffError, unreadable_file

SHARD_HINT = "remove the folder of the subject it belongs to and run `dreamdiff preprocess` again to rewrite it"
READ_ERRORS = (pa.ArrowException, OSError)  # what pyarrow raises for a file that is not whole Parquet

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


def unreadable_shard(file: str, err: BaseException) -> DreamdiffError:
    """The error for a shard file that cannot be read."""
    return unreadable_file(file, "a Parquet shard", err, SHARD_HINT)


def read_schema(file: str) -> pa.Schema:
    """A shard's schema (its footer); an unreadable file fails naming it."""
    fs, path = storage.resolve(file)
    try:
        return pq.read_schema(path, filesystem=fs)
    except READ_ERRORS as err:
        raise unreadable_shard(file, err) from err


def read_table(file: str, columns: Sequence[str] | None = None) -> pa.Table:
    """`columns` of a shard (all when None); an unreadable file fails naming it."""
    try:
        return storage.read_parquet(file, columns=None if columns is None else list(columns))
    except READ_ERRORS as err:
        raise unreadable_shard(file, err) from err


def row_counts(files: list[str]) -> list[int]:
    """Row counts of shard files, from their footers; an unreadable file fails naming it."""
    try:
        return storage.parquet_rows(files)
    except READ_ERRORS as err:
        raise locate_unreadable(files) or unreadable_shard(", ".join(files[:3]), err) from err


def locate_unreadable(files: Sequence[str]) -> DreamdiffError | None:
    """After a read of several shard files failed: the error naming the first one that cannot be read on its
    own (footers first, then whole files), or None when every file reads."""
    for whole in (False, True):
        for file in files:
            fs, path = storage.resolve(file)
            try:
                with fs.open_input_file(path) as f:
                    parquet = pq.ParquetFile(f)
                    if whole:
                        parquet.read()
            except READ_ERRORS as err:
                return unreadable_shard(file, err)
    return None
