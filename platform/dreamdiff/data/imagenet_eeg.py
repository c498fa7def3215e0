"""The ImageNet-EEG release (Spampinato et al., CVPR 2017) as a paired source.

The release is a torch file ``{"dataset": [{"eeg": Tensor[128, T], "label": int, "image": int,
"subject": int}, ...], "labels": [wnid, ...], "images": [image_name, ...]}``, a splits file
``{"splits": [{"train": [i, ...], "val": [...], "test": [...]}, ...]}`` of indices into
``dataset``, and an image folder ``<wnid>/<image_name>.JPEG``. Both torch files are loaded with
``weights_only=True``: only tensors and plain containers are unpickled, never code.

A splits file's indices count either the whole ``dataset`` list ("global") or the list of the
selected subjects' trials in release order ("subject", as the reference code reads a split under a
subject filter). The file does not say which, so a file that does not fit the configured
``split_indexing`` is an error, never silently read the other way.

The reference profile reproduces the reference code's loading: samples 20..460 of each trial
stretched to 512, nothing else, and only trials of 450..600 samples (both bounds included, as its
``450 <= T <= 600``).

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
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from dreamdiff.data import signal
from dreamdiff.errors import DreamdiffError

TRIAL_KEYS = {"eeg", "label", "image", "subject"}
SPLIT_NAMES = ("train", "val", "test")
REFERENCE_CROP = (20, 460)  # samples kept of each trial
REFERENCE_WINDOW = 512  # samples the kept part is stretched to
REFERENCE_LENGTHS = (450, 600)  # raw trial lengths kept, both bounds included
SplitIndexing = Literal["global", "subject"]


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


def load_splits(
    splits_file: str, split_index: int, release: dict[str, Any], selected: list[int], indexing: SplitIndexing
) -> np.ndarray:
    """Per-trial split name ("train" | "val" | "test", "none" for trials no split lists) over ``dataset``."""
    data = _load(splits_file, "splits_file")
    if not isinstance(data, dict) or not isinstance(data.get("splits"), list):
        raise DreamdiffError(f"sources.splits_file: {splits_file}: expected a dict with a 'splits' list")
    if split_index >= len(data["splits"]):
        raise DreamdiffError(
            f"sources.split_index: {split_index} is out of range; {splits_file} has {len(data['splits'])} splits"
        )
    split = data["splits"][split_index]
    lists = {name: np.asarray(split.get(name, []), dtype=np.int64).ravel() for name in SPLIT_NAMES}
    of_selected = np.isin([int(t["subject"]) for t in release["dataset"]], selected)
    where = f"{splits_file} split {split_index}"
    if indexing == "subject":
        lists = _subject_to_global(lists, np.flatnonzero(of_selected), where, selected)
    else:
        _check_global(lists, of_selected, where, selected)
    names = np.full(len(of_selected), "none", dtype=object)
    for name, idx in lists.items():
        names[idx] = name
    return names


def _subject_to_global(
    lists: dict[str, np.ndarray], trials: np.ndarray, where: str, selected: list[int]
) -> dict[str, np.ndarray]:
    """Subject-local indices (into the selected subjects' trials, in release order) -> indices into ``dataset``."""
    for name, idx in lists.items():
        bad = idx[(idx < 0) | (idx >= len(trials))]
        if bad.size:
            raise DreamdiffError(
                f"sources.split_indexing: subject expects indices in 0..{len(trials) - 1} (the {len(trials)} trials "
                f"of subjects {selected}), but {where} {name!r} holds {int(bad[0])}; for indices into the whole "
                "release set split_indexing: global"
            )
    return {name: trials[idx] for name, idx in lists.items()}


def _check_global(lists: dict[str, np.ndarray], of_selected: np.ndarray, where: str, selected: list[int]) -> None:
    """Refuse indices outside ``dataset``, and under a subject filter a split that looks subject-local.

    A subject-local file read as global points mostly at other subjects' trials, while every index stays below
    the selected subjects' trial count; a global file made for these subjects points at their trials, and one
    made for all subjects reaches past that count.
    """
    for name, idx in lists.items():
        if idx.size and (idx.min() < 0 or idx.max() >= len(of_selected)):
            raise DreamdiffError(
                f"sources.splits_file: split {name!r} holds indices outside 0..{len(of_selected) - 1} "
                f"(found {int(idx.min() if idx.min() < 0 else idx.max())} in {where})"
            )
    every = np.concatenate(list(lists.values()))
    if every.size == 0 or of_selected.all():
        return
    share = float(of_selected[every].mean())
    hint = "if they count the selected subjects' trials, set split_indexing: subject"
    if share == 0:
        raise DreamdiffError(
            f"sources.split_indexing: global, but none of the {every.size} indices of {where} points to a trial "
            f"of subjects {selected}; {hint}"
        )
    if every.max() < of_selected.sum() and share < 0.5:
        raise DreamdiffError(
            f"sources.split_indexing: global, but every index of {where} is below {int(of_selected.sum())} (the "
            f"trial count of subjects {selected}) and {1 - share:.0%} point to other subjects' trials: they look "
            f"subject-local; {hint}"
        )


def reference_keeps(eeg: np.ndarray) -> bool:
    """Whether the reference code keeps a trial: its raw length lies within 450..600 samples."""
    low, high = REFERENCE_LENGTHS
    return low <= eeg.shape[-1] <= high


def reference_window(eeg: np.ndarray) -> np.ndarray:
    """The reference's window of a [C, T] trial: ``eeg[:, 20:460]`` stretched to 512, no filter, no normalisation.

    The reference interpolates with ``interp1d(linspace(0, 1, L), ...)(linspace(0, 1, 512))``: the first and last
    kept samples land on the first and last outputs (``align_corners=True`` in torch's terms), which is what
    ``signal.crop_and_interpolate`` computes. Trials shorter than 460 samples keep what they have past sample 20.
    """
    start, stop = REFERENCE_CROP
    return signal.crop_and_interpolate(eeg, start=start, stop=min(stop, eeg.shape[-1]), size=REFERENCE_WINDOW)


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
