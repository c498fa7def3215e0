"""An imported reference generator in every stage that takes one: fine-tuning continues from it, Serve answers with
it, batch generation draws with it (real local Ray)."""

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
from tests.serve.conftest import TOKEN, running_app
from tests.shards import epoch_columns, write_subject

from dreamdiff.config import GenerateConfig, validate_config
from dreamdiff.models.generator import SPEC_FILE, WEIGHTS_FILE, read_generator_meta
from dreamdiff.reference.import_generator import import_generator
from dreamdiff.serve.batch import run as generate
from dreamdiff.serve.client import ServeClient
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
    cfg = {
        "data": str(world["shards"]),
        "output": str(out),
        "base_model": str(world["base"]),
        "init_from": str(world["generator"]),
        "profile": "reference",
        "conditioner": {"context_dim": 64, "clip_dim": 64, "mid_tokens": 8},
        "clip_model": "dreamdiff-tiny",
        "clip_pretrained": None,
        "optim": {"lr": 1e-4, "min_lr": 1e-4, "warmup_steps": 0},
        "epochs": 1,
        "batch_size": 8,  # one step
        "precision": "fp32",
        "log_every_steps": 1,
        "preview": {"eegs": 0},
        "scaling": {"num_workers": 1},
    }
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

    # settings that do not fit the generator fail before any work, naming what to set
    with pytest.raises(Exception, match=r"init_from: .* set .*conditioner\.mid_tokens=8"):
        finetune(validate_config("finetune", {**cfg, "conditioner": {"context_dim": 64, "clip_dim": 64}}, "t"))


@pytest.mark.slow
def test_serve_and_batch_generation_use_an_imported_generator(
    ray_local: None, world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert (world["generator"] / SPEC_FILE).is_file()
    app = running_app(world["generator"], tmp_path_factory)
    cfg = next(app)
    try:
        eeg = np.random.default_rng(1).standard_normal((128, 512)).astype(np.float32)
        result = ServeClient(f"http://127.0.0.1:{cfg.port}", token=TOKEN, timeout=120).generate(
            eeg, num_images=2, seed=3
        )
        assert len(result.images) == 2 and result.metadata["seed"] == 3
    finally:
        next(app, None)
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
