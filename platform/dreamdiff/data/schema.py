"""The Arrow schemas of dreamdiff's Parquet shards: the one place that defines them.

Two row kinds share one set of epoch columns:

* epoch rows (pretraining): one EEG window plus where it came from;
* paired rows (fine-tuning, evaluation): an epoch plus the stimulus image and its labels.

A third, precomputed rows (fine-tuning input, see dreamdiff.train.precompute), keeps a paired row's
EEG and labels and replaces the image by the frozen VAE's latents and CLIP's image embedding.

EEG is a fixed-shape tensor column (Arrow's canonical ``arrow.fixed_shape_tensor``) stored as
float16 [channels, samples]: half the bytes of float32, and Ray Data reads it straight into
numpy / torch batches. The channel mask (True = a real electrode, not a repeat or an
interpolation far from any real one) is a uint8 tensor of [channels].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

EPOCH_COLUMNS = (
    "epoch_id",
    "eeg",
    "channel_mask",
    "dataset",
    "subject",
    "session",
    "run",
    "start",
    "sfreq",
    "n_channels_orig",
)
PAIRED_COLUMNS = ("image", "image_id", "label", "class_name", "split", "block")
# written last into each finished shard folder (a subject's, or precomputed rows'); readers take only marked folders
DONE = "_SUCCESS.json"


def eeg_type(num_channels: int = 128, num_samples: int = 512) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.float16(), [num_channels, num_samples])


def epoch_schema(num_channels: int = 128, num_samples: int = 512) -> pa.Schema:
    """Columns of an epoch row; `epoch_id` is unique and stable across re-runs."""
    return pa.schema(
        [
            pa.field("epoch_id", pa.string(), nullable=False),
            pa.field("eeg", eeg_type(num_channels, num_samples), nullable=False),
            pa.field("channel_mask", pa.fixed_shape_tensor(pa.uint8(), [num_channels]), nullable=False),
            pa.field("dataset", pa.string(), nullable=False),
            pa.field("subject", pa.int32(), nullable=False),
            pa.field("session", pa.string(), nullable=False),
            pa.field("run", pa.string(), nullable=False),
            pa.field("start", pa.int64(), nullable=False),
            pa.field("sfreq", pa.float32(), nullable=False),
            pa.field("n_channels_orig", pa.int16(), nullable=False),
        ]
    )


def paired_schema(num_channels: int = 128, num_samples: int = 512) -> pa.Schema:
    """Epoch columns plus the stimulus: encoded image bytes, ids, class, split and block."""
    extra = [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("block", pa.int32(), nullable=False),
    ]
    return pa.schema([*epoch_schema(num_channels, num_samples), *extra])


PRECOMPUTED_COLUMNS = ("epoch_id", "eeg", "channel_mask", "image_id", "label", "split", "latents", "clip_embedding")


def precomputed_schema(
    latent_shape: tuple[int, int, int], clip_dim: int, num_channels: int = 128, num_samples: int = 512
) -> pa.Schema:
    """A fine-tuning row with the frozen models' outputs stored beside its EEG (written once, read every epoch).

    `latents` [c, h, w] is what the UNet diffuses (scaled VAE posterior mean, or the image in [-1, 1] in pixel
    space); `clip_embedding` [clip_dim] the L2-normalised CLIP image embedding of the stimulus. Both float16.
    """
    return pa.schema(
        [
            pa.field("epoch_id", pa.string(), nullable=False),
            pa.field("eeg", eeg_type(num_channels, num_samples), nullable=False),
            pa.field("channel_mask", pa.fixed_shape_tensor(pa.uint8(), [num_channels]), nullable=False),
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("latents", pa.fixed_shape_tensor(pa.float16(), list(latent_shape)), nullable=False),
            pa.field("clip_embedding", pa.fixed_shape_tensor(pa.float16(), [clip_dim]), nullable=False),
        ]
    )


def to_table(columns: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """Build a table in `schema` from numpy arrays / lists; tensor columns from ndarrays."""
    missing = [f.name for f in schema if f.name not in columns]
    extra = sorted(set(columns) - set(schema.names))
    if missing or extra:
        raise ValueError(f"shard columns do not match the schema: missing {missing}, unexpected {extra}")
    arrays = []
    for field in schema:
        value = columns[field.name]
        if isinstance(field.type, pa.FixedShapeTensorType):
            data = np.ascontiguousarray(value, dtype=field.type.value_type.to_pandas_dtype())
            expected = tuple(field.type.shape)
            if data.shape[1:] != expected:
                raise ValueError(f"column {field.name!r}: expected rows of shape {expected}, got {data.shape[1:]}")
            arrays.append(pa.FixedShapeTensorArray.from_numpy_ndarray(data))
        else:
            arrays.append(pa.array(value, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
