"""An imported reference generator in every stage that takes one: fine-tuning continues from it, a Serve replica's
engine answers with it, batch generation draws with it (real local Ray for the stages that run on it).

These run after the Serve tests in the session: a Ray Serve app started in the session's Ray after this module's
Ray Train and Ray Data runs has been seen to fail to find its controller (tests/serve/test_schema_fuzz.py), so they
come after the Serve apps."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tests.reference.reference_files import generation_checkpoint
from tests.shards import epoch_columns, write_subject

from dreamdiff.config import GenerateConfig, validate_config
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.diffusion import build_tiny_sd
from dreamdiff.models.diffusion_config import TinyDiffusionConfig
from dreamdiff.models.generator import WEIGHTS_FILE, read_generator_meta
from dreamdiff.reference.import_generator import import_generator
from dreamdiff.serve.api import GenerationItem
from dreamdiff.serve.app import config_from_args
from dreamdiff.serve.batch import run as generate
from dreamdiff.serve.engine import GenerationEngine
from dreamdiff.train.finetune import GENERATOR_DIR
from dreamdiff.train.finetune import run as finetune
from dreamdiff.train.worker import METRICS_FILE

# diffusers 0.42's DPMSolverMultistepScheduler calls np.array on a torch tensor, which numpy 2 flags
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
SPLITS = ["train"] * 8 + ["test"] * 2


def _png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (colour, 255 - colour, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("round-trip")
    generator = root / "imported"
    import_generator(generation_checkpoint(root / "reference.pth", tiny_sd), str(tiny_sd), generator)
    columns = epoch_columns("Synth", 1, len(SPLITS), np.random.default_rng(0))
    columns.update(
        image=[_png(20 * i) for i in range(len(SPLITS))],
        image_id=[f"img-{i}" for i in range(len(SPLITS))],
        label=np.arange(len(SPLITS), dtype=np.int32) % 2,
        class_name=[f"class-{i % 2}" for i in range(len(SPLITS))],
        split=SPLITS,
        block=np.zeros(len(SPLITS), dtype=np.int32),
    )
    write_subject(root / "shards" / "subject-1", columns, paired=True)
    return {"root": root, "generator": generator, "shards": root / "shards", "base": tiny_sd}


@pytest.mark.slow
def test_fine_tuning_continues_from_an_imported_generator(ray_local: None, world: dict[str, Path]) -> None:
    out = world["root"] / "finetune"
    cfg = _finetune_config(
        world,
        out,
        optim={"lr": 1e-4, "min_lr": 1e-4, "warmup_steps": 0},
        epochs=1,  # 8 training rows, batch 8: one step
        precision="fp32",
        log_every_steps=1,
        scaling={"num_workers": 1},
    )
    final = finetune(validate_config("finetune", cfg, "test"))
    assert final["step"] == 1
    assert [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()] == [1]
    meta = read_generator_meta(out / GENERATOR_DIR)
    assert meta["spec"].profile == "reference" and meta["spec"].conditioner.time_cond
    assert meta["info"]["encoder_init"] == str(world["generator"].resolve())
    before, after = (load_file(str(folder / WEIGHTS_FILE)) for folder in (world["generator"], out / GENERATOR_DIR))
    assert before.keys() == after.keys()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert "time_conditioner.proj.weight" in moved and any(k.startswith("unet.") for k in moved)
    step = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < step < 1e-2  # one small step away from the import, not a fresh start


def _finetune_config(world: dict[str, Path], out: Path, **extra: object) -> dict:
    return {
        "data": str(world["shards"]),
        "output": str(out),
        "base_model": str(world["base"]),
        "init_from": str(world["generator"]),
        "profile": "reference",
        "conditioner": {"context_dim": 64, "clip_dim": 64, "mid_tokens": 8},
        "clip_model": "dreamdiff-tiny",
        "clip_pretrained": None,
        "batch_size": 8,
        "preview": {"eegs": 0},
        **extra,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"conditioner": {"context_dim": 64, "clip_dim": 64}}, r"init_from: .* set conditioner\.mid_tokens=8"),
        ({"profile": "dreamdiff"}, r"init_from: .* set profile=reference"),
        ({"trainable": "all"}, r"init_from: .* set trainable=cross_attention"),
        ({"base_model": "OTHER"}, r"init_from: its UNet tensors do not fit base_model"),
    ],
)
def test_settings_that_do_not_fit_the_generator_fail_before_any_work(
    world: dict[str, Path], tmp_path: Path, change: dict, message: str
) -> None:
    if change.get("base_model") == "OTHER":  # same image size, other widths
        torch.manual_seed(1)
        other = TinyDiffusionConfig(
            sample_size=8,
            block_out_channels=[32, 64],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            cross_attention_dim=64,
        )
        change = {"base_model": str(build_tiny_sd(other, tmp_path / "other-sd"))}
    out = tmp_path / "run"
    with pytest.raises(DreamdiffError, match=message):
        finetune(validate_config("finetune", _finetune_config(world, out, **change), "test"))
    assert not out.exists()  # nothing recorded, nothing started


def test_a_serve_replica_answers_with_an_imported_generator(world: dict[str, Path]) -> None:
    """What a Serve replica runs for a request (its engine: load once, sample a batch), without Ray, on the imported
    generator: the reference profile's time conditioning and PLMS reach the endpoint's answers."""
    cfg = config_from_args({"config": "serve-demo", "checkpoint": str(world["generator"])})
    engine = GenerationEngine.load(cfg)
    assert engine.generator.spec.profile == "reference" and engine.info.shape().channels == 128
    eeg = np.random.default_rng(1).standard_normal((128, 512)).astype(np.float32)
    item = GenerationItem(eeg, np.ones(128, bool), seed=3, num_images=2, steps=3, sampler="plms", guidance_scale=1.0)
    (answer,) = engine.run_batch([item])
    assert answer["images"].shape == (2, 8, 8, 3) and answer["images"].dtype == np.uint8


@pytest.mark.slow
def test_batch_generation_uses_an_imported_generator(ray_local: None, world: dict[str, Path]) -> None:
    summary = generate(
        GenerateConfig(
            input=str(world["shards"]),
            output=str(world["root"] / "generated"),
            checkpoint=str(world["generator"]),
            num_images=1,
            sampler="plms",
            steps=3,
            splits=["test"],
        )
    )
    assert (summary["selected"], summary["generated"], summary["images"]) == (2, 2, 2)
