"""A linear probe on frozen encoder features: the sweep's objective (no Ray).

Reconstruction loss does not compare across mask ratios (masking 75% of the tokens is a harder task than
masking 25%), so a sweep scores each pretrained encoder on what it is for: how linearly the classes of
held-out labelled EEG separate in its features. Features are the encoder's time tokens, mean-pooled; the
probe is a standardised multinomial logistic regression fitted on the paired set's train split and scored
on its held-out rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from dreamdiff.errors import DreamdiffError

PROBE_COLUMNS = ("eeg", "channel_mask", "label", "split")


@torch.no_grad()
def encoder_features(
    encoder: nn.Module,
    eeg: np.ndarray | torch.Tensor,
    channel_mask: np.ndarray | torch.Tensor | None = None,
    batch: int = 64,
) -> np.ndarray:
    """Mean-pooled encoder tokens [N, D] of EEG [N, C, T], in eval mode; the encoder's mode is restored after."""
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for start in range(0, len(eeg), batch):
            x = torch.as_tensor(eeg[start : start + batch]).to(device, torch.float32)
            mask = None if channel_mask is None else torch.as_tensor(channel_mask[start : start + batch]).to(device)
            out.append(encoder(x, mask).float().mean(dim=1).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out).numpy()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a standardised logistic regression fitted on the train features (seeded, deterministic)."""
    from sklearn.linear_model import LogisticRegression  # here: a second per Ray worker that never probes
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def chance_accuracy(train_y: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy of always answering the train split's most frequent class: the floor a probe must beat."""
    values, counts = np.unique(train_y, return_counts=True)
    return float(np.mean(test_y == values[np.argmax(counts)]))


def load_probe_sets(files: Sequence[str], max_rows: int) -> dict[str, np.ndarray]:
    """Up to `max_rows` train-split and `max_rows` held-out (any other split) rows of paired shards.

    Returns train_/test_ eeg (float16 [N, C, T]), channel_mask and label arrays. Files without labels
    (epoch-only shards) are skipped.
    """
    tables: dict[bool, list[pa.Table]] = {True: [], False: []}
    have = {True: 0, False: 0}
    for file in files:
        if min(have.values()) >= max_rows:
            break
        if not set(PROBE_COLUMNS) <= set(pq.read_schema(file).names):
            continue
        table = pq.read_table(file, columns=list(PROBE_COLUMNS))
        is_train = pc.equal(table.column("split"), "train")
        for side in (True, False):
            part = table.filter(is_train if side else pc.invert(is_train)).slice(0, max_rows - have[side])
            tables[side].append(part)
            have[side] += part.num_rows
    sets = {}
    for side, prefix in ((True, "train"), (False, "test")):
        if not have[side]:
            kind = "train-split" if side else "held-out (non-train split)"
            raise DreamdiffError(f"probe_data: no labelled {kind} rows; the probe needs paired shards with both")
        table = pa.concat_tables(tables[side])
        sets[f"{prefix}_eeg"] = table.column("eeg").combine_chunks().to_numpy_ndarray()
        sets[f"{prefix}_channel_mask"] = table.column("channel_mask").combine_chunks().to_numpy_ndarray()
        sets[f"{prefix}_label"] = table.column("label").to_numpy()
    if len(np.unique(sets["train_label"])) < 2:
        raise DreamdiffError("probe_data: the train split holds a single class; a probe needs two or more")
    return sets


def probe_encoder(encoder: nn.Module, sets: dict[str, np.ndarray], batch: int = 64) -> float:
    """Probe accuracy of an encoder on the arrays of `load_probe_sets`."""
    train_x = encoder_features(encoder, sets["train_eeg"], sets["train_channel_mask"], batch)
    test_x = encoder_features(encoder, sets["test_eeg"], sets["test_channel_mask"], batch)
    return linear_probe(train_x, sets["train_label"], test_x, sets["test_label"])
