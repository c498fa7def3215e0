"""Training state in safetensors + JSON: model weights, optimizer moments, and where the run stood.

No pickles: tensors go to safetensors, the optimizer's non-tensor state (hyper-parameters, the
parameter-group layout) and the run's position (step, epoch) to JSON. Loading a checkpoint never
executes code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


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


def load_training_state(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore what `save_training_state` wrote; returns the saved position."""
    folder = Path(folder)
    unwrap(model).load_state_dict(load_file(str(folder / MODEL_FILE)))
    saved = json.loads((folder / STATE_FILE).read_text())
    if optimizer is not None:
        device = next(unwrap(model).parameters()).device
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in load_file(str(folder / OPTIMIZER_FILE), device=str(device)).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    return saved["position"]
