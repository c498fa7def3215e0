"""Reading the DreamDiffusion reference code's checkpoints without running anything in them.

Its checkpoints are `torch.save` pickles. Besides tensors they hold the run's config as a pickled instance of the
reference's `config.Config_MBM_EEG` (pretraining) or `config.Config_Generative_Model` (generation), which
`torch.load(weights_only=True)` refuses. `load_reference_checkpoint` admits exactly those two names, mapped onto
`ReferenceConfig`, an inert record that keeps plain values (numbers, strings, booleans, None and lists, tuples and
dicts of them) and nothing else. Every other global (a function, a class, `os.system`) is refused by torch's
weights-only unpickler before it is called.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from dreamdiff.errors import DreamdiffError, first_line
from dreamdiff.storage import sha256_of

Kind = Literal["pretrain", "generator"]
# the top-level keys that identify each kind of checkpoint
KEYS: dict[Kind, str] = {"pretrain": "model", "generator": "model_state_dict"}
COMMAND = {"pretrain": "dreamdiff import-reference pretrain", "generator": "dreamdiff import-reference generator"}


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class ReferenceConfig:
    """The reference's pickled config, as data: `values` holds its plain attributes, `dropped` the names of
    any others (whose values are not kept). It has no behaviour for a pickle to trigger."""

    values: dict[str, Any]
    dropped: list[str]

    def __new__(cls) -> ReferenceConfig:  # what unpickling calls (no arguments); a pickle with no state skips BUILD
        record = super().__new__(cls)
        record.values, record.dropped = {}, []
        return record

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"a reference config's state must be a dict, got {type(state).__name__}")
        self.values = {k: v for k, v in state.items() if isinstance(k, str) and _plain(v)}
        self.dropped = sorted(str(k) for k in state if k not in self.values)


class PretrainConfigRecord(ReferenceConfig):
    """Stands in for the reference's `config.Config_MBM_EEG`."""


class GenerativeConfigRecord(ReferenceConfig):
    """Stands in for the reference's `config.Config_Generative_Model`."""


STAND_INS = [
    (PretrainConfigRecord, "config.Config_MBM_EEG"),
    (GenerativeConfigRecord, "config.Config_Generative_Model"),
]


def _refusal(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, from its long message."""
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global[^\n]*)?$", str(err), re.M)
    return (found.group(1) if found else first_line(err))[:200]


def sha256(path: Path, kind: Kind) -> str:
    """The file's sha256 (the import's identity); a missing file fails here, naming what was expected."""
    if not path.is_file():
        raise DreamdiffError(f"CHECKPOINT: no such file {path}; expected a reference {kind} checkpoint (.pth)")
    return sha256_of(path)


def load_reference_checkpoint(path: str | Path, kind: Kind) -> dict[str, Any]:
    """The checkpoint's top-level dict, with `config` as a `ReferenceConfig` (or absent); checked to be `kind`.

    Truncated or corrupt files, refused pickles and checkpoints of the other kind fail with one line that says
    which.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(STAND_INS):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        raise DreamdiffError(
            f"CHECKPOINT: {path} holds an object that is not allowed, and nothing in it was run: only tensors, "
            f"plain values and the reference's config classes are read ({_refusal(err)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise DreamdiffError(
            f"CHECKPOINT: cannot read {path} as a torch checkpoint ({first_line(err)[:200]}); "
            "it is truncated or corrupt: download it again"
        ) from None
    if not isinstance(data, dict):
        raise DreamdiffError(
            f"CHECKPOINT: {path} holds a {type(data).__name__}; expected a reference {kind} checkpoint"
        )
    other: Kind = "generator" if kind == "pretrain" else "pretrain"
    if KEYS[kind] not in data:
        if KEYS[other] in data:
            raise DreamdiffError(
                f"CHECKPOINT: {path} is a reference {other} checkpoint (it holds {KEYS[other]!r}); "
                f"import it with `{COMMAND[other]}`"
            )
        raise DreamdiffError(
            f"CHECKPOINT: {path} is not a reference {kind} checkpoint: expected the key {KEYS[kind]!r}, "
            f"found {sorted(map(str, data))[:8]}"
        )
    state = data[KEYS[kind]]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise DreamdiffError(f"CHECKPOINT: {path}: {KEYS[kind]!r} must map tensor names to tensors")
    config = data.get("config")
    if isinstance(config, dict) and _plain(config):  # a config saved as a plain dict
        record = ReferenceConfig()
        record.__setstate__(config)
        data["config"] = config = record
    if config is not None and not isinstance(config, ReferenceConfig):
        raise DreamdiffError(
            f"CHECKPOINT: {path}: 'config' is a {type(config).__name__}; expected the reference's config object"
        )
    return data
