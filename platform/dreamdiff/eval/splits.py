"""Split protocols on paired rows: which EEGs are held out, and the sentence that says so.

A figure means little without its split. EEG-to-image papers differ exactly here: DreamDiffusion (after
Spampinato et al. 2017) splits by IMAGE, so no test image was seen in training, but every test subject and
session was; holding out whole presentation blocks tests generalisation over recording time (the block-design
critique of ImageNet-EEG, Li et al. 2020); leaving a subject out tests generalisation to a new brain. Each
protocol returns train and test row indices plus a description that evaluation writes beside every number.

Pure numpy on metadata columns (``subject``, ``dataset``, ``block``, ``split``, ``image_id``), one entry per
paired row, so it is testable on hand-made metadata and independent of how the rows were read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dreamdiff.errors import DreamdiffError

Protocol = Literal["by_image", "by_block", "leave_subject_out"]
PROTOCOLS: tuple[str, ...] = ("by_image", "by_block", "leave_subject_out")


@dataclass(frozen=True)
class Split:
    """Row indices (sorted, disjoint) of the train and test sides and what the protocol held out."""

    protocol: str
    train: np.ndarray
    test: np.ndarray
    description: str


def _column(meta: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in meta:
        raise DreamdiffError(f"split: the paired rows lack a {name!r} column (expected paired shards)")
    return np.asarray(meta[name])


def _image_overlap(meta: Mapping[str, np.ndarray], train: np.ndarray, test: np.ndarray) -> tuple[int, int]:
    """(test images that also occur on the train side, distinct test images)."""
    images = _column(meta, "image_id")
    test_images = set(images[test].tolist())
    return len(test_images & set(images[train].tolist())), len(test_images)


def by_image(meta: Mapping[str, np.ndarray]) -> Split:
    """The paper's protocol: the stored ``split`` column ("test" rows vs "train" rows; "val" rows on neither
    side). The stored split promises that no test image is a train image; a violation is an error."""
    split = _column(meta, "split")
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if not len(test):
        found = sorted(set(split.tolist()))
        raise DreamdiffError(f"protocol 'by_image': no row has split == 'test' (splits found: {found})")
    shared, num_images = _image_overlap(meta, train, test)
    if shared:
        raise DreamdiffError(
            f"protocol 'by_image': {shared} of the {num_images} test images also occur in train rows; the stored "
            "split column is not a split by image"
        )
    description = (
        f"by_image: the stored split column; {len(test)} test rows showing {num_images} images that no train row "
        f"shows ({len(train)} train rows; val rows excluded); subjects and sessions are shared with training"
    )
    return Split("by_image", train, test, description)


def by_block(meta: Mapping[str, np.ndarray], test_blocks: int = 1) -> Split:
    """Hold out the last ``test_blocks`` presentation blocks of every (dataset, subject); the other blocks
    train. Tests generalisation over recording time; images may recur across the cut (the description
    counts them), so it is not a test on unseen images."""
    if test_blocks < 1:
        raise DreamdiffError(f"test_blocks must be >= 1, got {test_blocks}")
    block = _column(meta, "block").astype(np.int64)
    keys = np.char.add(np.char.add(_column(meta, "dataset").astype(str), "/"), _column(meta, "subject").astype(str))
    is_test = np.zeros(len(block), dtype=bool)
    for key in np.unique(keys):
        rows = keys == key
        blocks = np.unique(block[rows])
        if len(blocks) <= test_blocks:
            raise DreamdiffError(
                f"protocol 'by_block': subject {key} has {len(blocks)} block(s); holding out test_blocks="
                f"{test_blocks} would leave none to train on"
            )
        is_test |= rows & np.isin(block, blocks[-test_blocks:])
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    shared, num_images = _image_overlap(meta, train, test)
    description = (
        f"by_block: the last {test_blocks} block(s) of each of {len(np.unique(keys))} subject(s) held out; "
        f"{len(test)} test rows, {len(train)} train rows; {shared} of the {num_images} test images also occur "
        "in train rows (other blocks or subjects)"
    )
    return Split("by_block", train, test, description)


def leave_subject_out(meta: Mapping[str, np.ndarray], subject: int | None) -> Split:
    """Every row of ``subject`` is test, every other subject's row trains: generalisation to a new brain."""
    subjects = _column(meta, "subject").astype(np.int64)
    known = sorted(set(subjects.tolist()))
    if subject is None or subject not in known:
        raise DreamdiffError(f"protocol 'leave_subject_out': test_subject must be one of {known}, got {subject!r}")
    if len(known) < 2:
        raise DreamdiffError(f"protocol 'leave_subject_out': needs 2 or more subjects, the rows hold {known}")
    is_test = subjects == subject
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    shared, num_images = _image_overlap(meta, train, test)
    description = (
        f"leave_subject_out: subject {subject} held out ({len(test)} test rows) of subjects {known} "
        f"({len(train)} train rows); {shared} of the {num_images} test images were shown to training subjects"
    )
    return Split("leave_subject_out", train, test, description)


def split_rows(
    meta: Mapping[str, np.ndarray], protocol: str, *, test_blocks: int = 1, test_subject: int | None = None
) -> Split:
    """Dispatch to a protocol by name (as configs spell it)."""
    if protocol == "by_image":
        return by_image(meta)
    if protocol == "by_block":
        return by_block(meta, test_blocks)
    if protocol == "leave_subject_out":
        return leave_subject_out(meta, test_subject)
    raise DreamdiffError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
