"""Pretraining the tiny SD (plain torch, no Ray): it learns to draw what the CLIP embedding says, replaces the
folder's UNet, and refuses to be redone with other settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from dreamdiff.config import TinySDPretrainSection
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.diffusion import build_tiny_sd, load_sd_components
from dreamdiff.models.diffusion_config import TinyDiffusionConfig
from dreamdiff.train import tiny_sd_pretrain

# diffusers 0.42's DPMSolverMultistepScheduler calls np.array on a torch tensor, which numpy 2 flags
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

TINY = TinyDiffusionConfig(
    sample_size=8,
    block_out_channels=[32, 32],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    cross_attention_dim=8,
    prediction_type="v_prediction",
)


def _rows(folder: Path) -> tuple[list[str], np.ndarray]:
    """64 precomputed rows of two 'classes': red images whose CLIP embedding points along e0, blue along e1."""
    rng = np.random.default_rng(0)
    red = np.tile(np.array([0.8, -0.8, -0.8], np.float32)[:, None, None], (1, 8, 8))
    latents = np.stack([red if i % 2 == 0 else red[::-1] for i in range(64)])
    clip = rng.normal(0, 0.1, (64, 8)).astype(np.float32)
    clip[::2, 0] += 1.0
    clip[1::2, 1] += 1.0
    table = pa.table(
        {
            "latents": pa.FixedShapeTensorArray.from_numpy_ndarray(latents.astype(np.float16)),
            "clip_embedding": pa.FixedShapeTensorArray.from_numpy_ndarray(clip.astype(np.float16)),
        }
    )
    path = folder / "rows.parquet"
    pq.write_table(table, path)
    return [str(path)], clip


def test_the_pretrained_tiny_sd_draws_what_the_clip_embedding_says(tmp_path: Path) -> None:
    base = build_tiny_sd(TINY, tmp_path / "tiny-sd")
    random_unet = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    files, clip = _rows(tmp_path)
    section = TinySDPretrainSection(steps=150, batch_size=16, lr=3e-3, log_every_steps=50)
    preview = {
        "image": np.zeros((2, 8, 8, 3), np.uint8),
        "clip_embedding": torch.from_numpy(clip[:2]),
        "class_name": ["red", "blue"],
    }
    summary = tiny_sd_pretrain.pretrain(base, section, files, seed=0, preview=preview)

    assert summary["rows"] == 64 and [h["step"] for h in summary["history"]] == [50, 100, 150]
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert (base / "preview.png").stat().st_size > 0
    trained = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == random_unet.keys() and any(not torch.equal(trained[k], random_unet[k]) for k in trained)
    assert sorted(p.name for p in base.iterdir()) == [
        "pretrained.json",
        "preview.png",
        "scheduler",
        "tiny_config.json",
        "unet",
    ]

    # what a user relies on: the drawing follows the condition (red for the e0 embedding, blue for e1)
    components = load_sd_components(str(base))
    mean, std = torch.from_numpy(clip.mean(0)), torch.from_numpy(clip.std(0))
    context = tiny_sd_pretrain.clip_context(torch.tensor([[1.0] + [0.0] * 7, [0.0, 1.0] + [0.0] * 6]), mean, std)
    context = context.repeat_interleave(4, dim=0)
    images = tiny_sd_pretrain.draw(components, context, list(range(8)), steps=10).astype(float)
    redness = images[..., 0].mean(axis=(1, 2)) - images[..., 2].mean(axis=(1, 2))
    assert redness[:4].min() > 50 and redness[4:].max() < -50, redness

    # done once for these settings; other settings refuse rather than change the base under its fine-tunings
    assert tiny_sd_pretrain.pretrained_marker(base, section)
    assert json.loads((base / "pretrained.json").read_text())["settings"]["steps"] == 150
    with pytest.raises(DreamdiffError, match="tiny_sd_pretrain: .* was pretrained with"):
        tiny_sd_pretrain.pretrained_marker(base, section.model_copy(update={"steps": 10}))
    assert not tiny_sd_pretrain.pretrained_marker(tmp_path, section)


def test_the_clip_width_must_be_the_context_width(tmp_path: Path) -> None:
    base = build_tiny_sd(TINY.model_copy(update={"cross_attention_dim": 16}), tmp_path / "tiny-sd")
    files, _ = _rows(tmp_path)
    with pytest.raises(DreamdiffError, match="CLIP embeddings are 8 wide but tiny_sd.cross_attention_dim is 16"):
        tiny_sd_pretrain.pretrain(base, TinySDPretrainSection(steps=1), files, seed=0)


def test_a_rerun_gives_the_same_base_model(tmp_path: Path) -> None:
    files, _ = _rows(tmp_path)
    section = TinySDPretrainSection(steps=5, batch_size=8, log_every_steps=5)
    weights = []
    for name in ("first", "second"):
        base = build_tiny_sd(TINY, tmp_path / name)  # random UNets that differ: torch is not seeded here
        tiny_sd_pretrain.pretrain(base, section, files, seed=3)
        weights.append(load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
