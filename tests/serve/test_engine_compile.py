"""`compile: true` on the sampling side: the engine compiles when it loads, not on a user's first request, and
answers with the images it gives without compiling."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from dreamdiff.config import ServeConfig
from dreamdiff.serve.engine import GenerationEngine

pytestmark = [
    pytest.mark.slow,  # compiling the tiny UNet takes about a minute on two cores
    # diffusers 0.42's DPMSolverMultistepScheduler calls np.array on a torch tensor, which numpy 2 flags
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]


def test_a_compiled_engine_compiles_at_load_and_gives_the_eager_images(
    tiny_checkpoint: Path, make_eeg: Callable[..., np.ndarray]
) -> None:
    cfg = ServeConfig(checkpoint=str(tiny_checkpoint))
    eager = GenerationEngine.load(cfg)
    torch._dynamo.reset()
    compiled = GenerationEngine.load(cfg.model_copy(update={"compile": True}))
    graphs_at_load = counters["stats"]["unique_graphs"]
    assert graphs_at_load > 0

    eeg = torch.from_numpy(make_eeg())[None]
    num_images = cfg.defaults.num_images  # the size the engine warmed up on
    want = eager.generator.generate(eeg, num_images=num_images, steps=4, seed=3)
    got = compiled.generator.generate(eeg, num_images=num_images, steps=4, seed=3)
    assert counters["stats"]["unique_graphs"] == graphs_at_load  # the request compiled nothing new
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2  # float reordering only: within 2 of 255
    # compiling leaves the modules' names alone, so checkpoints saved from a compiled model load anywhere
    assert compiled.generator.model.state_dict().keys() == eager.generator.model.state_dict().keys()
