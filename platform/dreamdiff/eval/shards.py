"""The paired rows the evaluate stage reads: every row's metadata first (to pick the test rows), then the EEG,
channel masks and stimulus images of the chosen rows only."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from dreamdiff.errors import DreamdiffError

META_COLUMNS = ("epoch_id", "dataset", "subject", "block", "split", "image_id", "label", "class_name")


def read_paired_meta(data: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The paired shard files under ``data`` and their rows' metadata, sorted by epoch_id (so selections do not
    depend on how rows were sharded); ``_file`` / ``_row`` locate each row. Epoch-only shards are ignored."""
    from dreamdiff.data.reader import read_schema, read_table, shard_files  # imports Ray: only when shards are read

    files = [f for f in shard_files(data) if "image" in read_schema(f).names]  # an unreadable shard fails naming it
    if not files:
        raise DreamdiffError(f"data: {data} holds no paired shards (rows with an image column); give paired shards")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*META_COLUMNS, "_file", "_row")}
    for index, file in enumerate(files):
        table = read_table(file, columns=META_COLUMNS)
        for name in META_COLUMNS:
            parts[name].append(table.column(name).to_numpy(zero_copy_only=False))
        parts["_file"].append(np.full(table.num_rows, index))
        parts["_row"].append(np.arange(table.num_rows))
    meta = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    order = np.argsort(meta["epoch_id"].astype(str), kind="stable")
    return files, {name: values[order] for name, values in meta.items()}


def load_rows(files: Sequence[str], meta: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, Any]:
    """EEG (float32 [N, C, T]), channel masks (bool [N, C]) and encoded stimulus images of ``rows`` (indices
    into ``meta``), in that order; one shard file in memory at a time."""
    from dreamdiff.data.reader import read_table  # imports Ray: only when shards are read

    eeg: list[np.ndarray | None] = [None] * len(rows)
    mask: list[np.ndarray | None] = [None] * len(rows)
    images: list[bytes | None] = [None] * len(rows)
    for index in np.unique(meta["_file"][rows]):
        mine = np.flatnonzero(meta["_file"][rows] == index)
        table = read_table(files[index], columns=["eeg", "channel_mask", "image"])
        table = table.take(pa.array(meta["_row"][rows[mine]])).combine_chunks()
        file_eeg = table.column("eeg").combine_chunks().to_numpy_ndarray().astype(np.float32)
        file_mask = table.column("channel_mask").combine_chunks().to_numpy_ndarray().astype(bool)
        for k, position in enumerate(mine):
            eeg[position], mask[position] = file_eeg[k], file_mask[k]
            images[position] = table.column("image")[k].as_py()
    return {"eeg": np.stack(eeg), "channel_mask": np.stack(mask), "image": images}


def decode_stimulus(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3]: centre square crop, bicubic resize (as a generated image's frame)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC))
