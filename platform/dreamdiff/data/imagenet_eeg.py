"""The ImageNet-EEG release (Spampinato et al., CVPR 2017) as a paired source.

The release is a torch file ``{"dataset": [{"eeg": Tensor[128, T], "label": int, "image": int,
"subject": int}, ...], "labels": [wnid, ...], "images": [image_name, ...]}``, a splits file
``{"splits": [{"train": [i, ...], "val": [...], "test": [...]}, ...]}`` of indices into
``dataset``, and an image folder ``<wnid>/<image_name>.JPEG``. Both torch files are loaded with
``weights_only=True``: only tensors and plain containers are unpickled, never code.

The recording shows the 50 images of a class in one block; the release does not store the
block, so ``block`` here is the rank of the class's block in the subject's presentation order
(the order in which the subject's trials first meet each class). Splits that keep whole blocks
apart use it.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamdiff.errors import DreamdiffError

TRIAL_KEYS = {"eeg", "label", "image", "subject"}


def _load(path: str, what: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise DreamdiffError(f"sources.{what}: no such file {path}")
    mmap = torch.serialization._is_zipfile(open(file, "rb"))  # noqa: SIM115  (closed by torch.load)
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DreamdiffError(
            f"sources.{what}: {path} is not a weights-only torch file of the ImageNet-EEG release ({first})"
        ) from None


def load_release(eeg_file: str) -> dict[str, Any]:
    """The release's dict, after checking it has the ImageNet-EEG layout."""
    data = _load(eeg_file, "eeg_file")
    if not isinstance(data, dict) or not {"dataset", "labels", "images"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DreamdiffError(
            f"sources.eeg_file: {eeg_file} is not an ImageNet-EEG release: expected a dict with keys "
            f"dataset, labels, images; got {keys}"
        )
    trials = data["dataset"]
    if not isinstance(trials, list) or not trials or not all(isinstance(t, dict) for t in trials):
        raise DreamdiffError(f"sources.eeg_file: {eeg_file}: 'dataset' must be a non-empty list of trial dicts")
    missing = TRIAL_KEYS - set(trials[0])
    if missing:
        raise DreamdiffError(f"sources.eeg_file: {eeg_file}: trials lack the keys {sorted(missing)}")
    return data


def load_splits(splits_file: str, split_index: int, num_trials: int) -> np.ndarray:
    """Per-trial split name ("train" | "val" | "test", "none" for trials no split lists)."""
    data = _load(splits_file, "splits_file")
    if not isinstance(data, dict) or not isinstance(data.get("splits"), list):
        raise DreamdiffError(f"sources.splits_file: {splits_file}: expected a dict with a 'splits' list")
    if split_index >= len(data["splits"]):
        raise DreamdiffError(
            f"sources.split_index: {split_index} is out of range; {splits_file} has {len(data['splits'])} splits"
        )
    names = np.full(num_trials, "none", dtype=object)
    for name in ("train", "val", "test"):
        idx = np.asarray(data["splits"][split_index].get(name, []), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= num_trials):
            raise DreamdiffError(f"sources.splits_file: split {name!r} holds indices outside 0..{num_trials - 1}")
        names[idx] = name
    return names


def subjects(release: dict[str, Any], wanted: list[int] | str) -> list[int]:
    available = sorted({int(t["subject"]) for t in release["dataset"]})
    if wanted == "all":
        return available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise DreamdiffError(f"sources.subjects: the release has no subject {unknown} (it has {available})")
    return list(wanted)


def image_path(image_dir: str, release: dict[str, Any], trial: dict[str, Any]) -> Path:
    name = release["images"][int(trial["image"])]
    wnid = release["labels"][int(trial["label"])]
    return Path(image_dir) / wnid / f"{name}.JPEG"


def read_image(path: Path) -> bytes:
    """The file's bytes, after a full decode proves they are an image (truncated files fail here)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
    return data


def subject_trials(
    release: dict[str, Any], splits: np.ndarray, image_dir: str, subject: int
) -> Iterator[dict[str, Any] | tuple[str, str]]:
    """Each trial of `subject` in presentation order as a dict, or (image path, reason) if unusable."""
    block_of: dict[int, int] = {}
    for index, trial in enumerate(release["dataset"]):
        if int(trial["subject"]) != subject:
            continue
        label = int(trial["label"])
        block = block_of.setdefault(label, len(block_of))
        path = image_path(image_dir, release, trial)
        try:
            image = read_image(path)
        except (OSError, SyntaxError, ValueError) as err:
            yield str(path), f"{type(err).__name__}: {err}"
            continue
        yield {
            "index": index,
            "eeg": trial["eeg"].float().numpy(),
            "label": label,
            "class_name": str(release["labels"][label]),
            "image_id": str(release["images"][int(trial["image"])]),
            "image": image,
            "split": str(splits[index]),
            "block": block,
        }
