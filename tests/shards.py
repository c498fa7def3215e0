"""Shards written straight through the schema module, as preprocess writes them (one Parquet file and a done-marker
per subject folder), for tests that need shard files without running preprocess."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dreamdiff.data.schema import DONE, epoch_schema, paired_schema, to_table


def epoch_columns(dataset: str, subject: int, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """The EEG-only columns of `n` random 128 x 512 windows of one subject, one session and run."""
    start = np.arange(n) * 512
    return {
        "epoch_id": [f"{dataset}/{subject}/0/0/{s}" for s in start],
        "eeg": rng.standard_normal((n, 128, 512)).astype(np.float16),
        "channel_mask": np.ones((n, 128), dtype=np.uint8),
        "dataset": [dataset] * n,
        "subject": np.full(n, subject, dtype=np.int32),
        "session": ["0"] * n,
        "run": ["0"] * n,
        "start": start,
        "sfreq": np.full(n, 250.0, dtype=np.float32),
        "n_channels_orig": np.full(n, 128, dtype=np.int16),
    }


def write_subject(folder: Path, columns: dict[str, Any], paired: bool = False) -> Path:
    """One subject's shard folder (paired or EEG-only schema); returns its Parquet file."""
    folder.mkdir(parents=True)
    path = folder / "part-00000.parquet"
    pq.write_table(to_table(columns, paired_schema() if paired else epoch_schema()), path)
    (folder / DONE).write_text(json.dumps({"files": [path.name]}))
    return path
