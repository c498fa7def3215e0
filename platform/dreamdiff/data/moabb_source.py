"""MOABB as a source of unlabeled EEG: which (dataset, subject) pairs to read, and their recordings.

Any dataset of MOABB's catalogue is named by its class name (``BNCI2014_001``) or its code
(``BNCI2014-001``); ``all`` takes the whole catalogue. Real data download through MOABB into
MNE_DATA on first use. ``FakeDataset`` entries stand in offline: each entry of the source's
``fake`` list is one FakeDataset with its own channels, sampling rate and duration, named
``FakeDataset-<i>`` so rows from different layouts never collide.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING

from dreamdiff.errors import DreamdiffError

if TYPE_CHECKING:
    import mne
    from moabb.datasets.base import BaseDataset

    from dreamdiff.config import FakeMOABBSection, MOABBSource

FAKE = "FakeDataset"


@cache
def catalogue() -> dict[str, type]:
    """Every MOABB dataset class by class name and by code."""
    from moabb.datasets import utils

    by_name = {cls.__name__: cls for cls in utils.dataset_list if cls.__name__ != FAKE}
    return by_name


def _by_code(name: str) -> type | None:
    for cls in catalogue().values():
        try:
            if cls().code == name:
                return cls
        except Exception:  # a dataset whose constructor needs arguments cannot be named by code
            continue
    return None


def _fake(section: FakeMOABBSection, index: int) -> BaseDataset:
    from moabb.datasets.fake import FakeDataset

    kwargs = {"channels": tuple(section.channels)} if section.channels else {}
    return FakeDataset(
        n_subjects=section.n_subjects,
        n_sessions=section.n_sessions,
        n_runs=section.n_runs,
        sfreq=section.sfreq,
        duration=section.duration,
        seed=section.seed + index,
        **kwargs,
    )


def datasets(source: MOABBSource) -> dict[str, BaseDataset]:
    """Dataset name -> MOABB dataset instance; unknown names fail before any work starts."""
    names = list(catalogue()) if source.datasets == "all" else source.datasets
    if FAKE in names and not source.fake:
        raise DreamdiffError(f"sources: dataset {FAKE!r} needs at least one entry in 'fake' (its layouts)")
    out: dict[str, BaseDataset] = {}
    for name in names:
        if name == FAKE:
            out.update({f"{FAKE}-{i}": _fake(section, i) for i, section in enumerate(source.fake)})
            continue
        cls = catalogue().get(name) or _by_code(name)
        if cls is None:
            close = difflib.get_close_matches(name, list(catalogue()), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see moabb.datasets.utils.dataset_list"
            raise DreamdiffError(f"sources.datasets: unknown MOABB dataset {name!r}{hint}")
        out[name] = cls()
    return out


def subjects(dataset: BaseDataset, wanted: list[int] | str, name: str) -> list[int]:
    """The subjects to read: all of the dataset's, or the requested ones (which must exist)."""
    available = list(dataset.subject_list)
    if wanted == "all":
        return available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise DreamdiffError(
            f"sources.subjects: {name} has no subject {unknown} (it has {available[0]}..{available[-1]})"
        )
    return list(wanted)


def recordings(dataset: BaseDataset, subject: int) -> Iterator[tuple[str, str, mne.io.BaseRaw]]:
    """(session, run, raw) of one subject, in MOABB's order."""
    data = dataset.get_data(subjects=[subject])
    for session, runs in data[subject].items():
        for run, raw in runs.items():
            yield str(session), str(run), raw
