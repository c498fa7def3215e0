"""Training state in safetensors + JSON: model weights, optimizer moments, and where the run stood.

No pickles: tensors go to safetensors, the optimizer's non-tensor state (hyper-parameters, the
parameter-group layout) and the run's position (step, epoch) to JSON. Loading a checkpoint never
executes code from the file. A file that cannot be read (truncated, corrupt) fails with a `DreamdiffError` naming
it: `check_training_state` reads the headers only (drivers call it before any work), `load_training_state` the
rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dreamdiff.errors import DreamdiffError, unreadable_file

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
REMEDY = (
    "give another checkpoint (resume_from), or remove this checkpoint_* folder so that a re-run resumes from the "
    "one before it"
)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_model(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return Path(path)


def save_training_state(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, position: dict[str, Any]
) -> Path:
    """Write model, optimizer and `position` (step, epoch, ...) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / MODEL_FILE)
    opt = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().contiguous().cpu()
        for index, slots in opt["state"].items()
        for name, value in slots.items()
        if torch.is_tensor(value)
    }
    save_file(tensors, str(folder / OPTIMIZER_FILE))
    (folder / STATE_FILE).write_text(json.dumps({"position": position, "param_groups": opt["param_groups"]}))
    return folder


def _read_position(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved["position"], dict) or not isinstance(saved["param_groups"], list):
            raise TypeError("position must be an object and param_groups a list")
    except FileNotFoundError:
        raise DreamdiffError(f"{folder}: not a training checkpoint (no {STATE_FILE}); {REMEDY}") from None
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise unreadable_file(path, "a training checkpoint's state", err, REMEDY) from err
    return saved


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise unreadable_file(path, "safetensors weights", err, REMEDY) from err


def check_training_state(folder: str | Path) -> dict[str, Any]:
    """Check that `folder` holds a whole training checkpoint (its JSON and safetensors headers, no tensor data);
    returns the saved position."""
    folder = Path(folder)
    saved = _read_position(folder)
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        try:
            with safe_open(str(folder / name), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise unreadable_file(folder / name, "safetensors weights", err, REMEDY) from err
    return saved["position"]


def load_training_state(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore what `save_training_state` wrote; returns the saved position."""
    folder = Path(folder)
    saved = _read_position(folder)
    unwrap(model).load_state_dict(_load_tensors(folder / MODEL_FILE))
    if optimizer is not None:
        device = next(unwrap(model).parameters()).device
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in _load_tensors(folder / OPTIMIZER_FILE, str(device)).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    return saved["position"]
