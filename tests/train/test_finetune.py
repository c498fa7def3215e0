"""The finetune stage on real local Ray: precompute once, learn, export the generator, resume, refuse bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamdiff.cli import main
from dreamdiff.config import PrecomputeSection, validate_config
from dreamdiff.data.preprocess import run as preprocess
from dreamdiff.data.reader import shard_files
from dreamdiff.data.schema import DONE, precomputed_schema
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.clip import load_clip_image_encoder, save_random_clip
from dreamdiff.models.diffusion import build_tiny_sd, encode_images, load_sd_components
from dreamdiff.models.diffusion_config import TinyDiffusionConfig
from dreamdiff.models.generator import SPEC_FILE, WEIGHTS_FILE, Generator
from dreamdiff.models.msm import MSMConfig, build_msm
from dreamdiff.train.finetune import GENERATOR_DIR, PRECOMPUTED_DIR, paired_files
from dreamdiff.train.finetune import run as finetune
from dreamdiff.train.finetune_loop import PREVIEW_FILE
from dreamdiff.train.precompute import FrozenModels, decode_images, precompute
from dreamdiff.train.pretrain import ENCODER_FILE
from dreamdiff.train.worker import FAILED_ONCE, METRICS_FILE

# diffusers 0.42's DPMSolverMultistepScheduler calls np.array on a torch tensor, which numpy 2 flags
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

TINY_SD = {
    "sample_size": 16,
    "block_out_channels": [32, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "cross_attention_dim": 32,
}


@pytest.fixture(scope="module")
def shards(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SynthEEG-Image pairs, 4 classes x 6 images x 1 subject at 16 px: 16 train, 4 val, 4 test rows; plus an
    unlabeled (epoch-only) shard beside them, which fine-tuning must ignore."""
    out = tmp_path_factory.mktemp("shards")
    sources = [
        {"kind": "synthetic", "synth": {"num_classes": 4, "images_per_class": 6, "num_subjects": 1, "image_size": 16}},
        {"kind": "synthetic", "labeled": False, "unlabeled_epochs_per_subject": 8, "synth": {"num_subjects": 1}},
    ]
    preprocess(validate_config("preprocess", {"output": str(out), "sources": sources}, "test"))
    return out


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrain export without its run: a MaskedSignalModel state dict in msm.safetensors, no config.yaml."""
    folder = tmp_path_factory.mktemp("pretrain")
    torch.manual_seed(0)
    model = build_msm(MSMConfig(preset="tiny"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / ENCODER_FILE))
    return folder


def _config(shards: Path, output: Path, **extra: object) -> dict:
    return {
        "data": str(shards),
        "output": str(output),
        "tiny_sd": TINY_SD,
        "encoder": {"preset": "tiny"},
        "trainable": "all",
        "conditioner": {"context_dim": 32, "clip_dim": 64},
        "clip_model": "dreamdiff-tiny",
        "clip_pretrained": None,
        "optim": {"lr": 2e-3, "min_lr": 2e-3, "grad_clip": 1.0},
        "epochs": 4,
        "batch_size": 8,
        "precision": "fp32",
        "log_every_steps": 2,
        "checkpoint": {"every_steps": 4},
        "preview": {"eegs": 3, "images_per_eeg": 2, "steps": 3},
        "scaling": {"num_workers": 1},
        **extra,
    }


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]


def test_precompute_stores_latents_and_embeddings_once(shards: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = build_tiny_sd(TinyDiffusionConfig(**TINY_SD, use_vae=True, vae_block_out_channels=[32, 32]), tmp_path / "sd")
    clip = save_random_clip("dreamdiff-tiny", tmp_path / "clip.safetensors", seed=3)
    models = FrozenModels(str(base), "dreamdiff-tiny", str(clip), 16, (4, 8, 8), 64)
    files = paired_files(shards)
    out = tmp_path / "pre"
    first = precompute(files, out, models, ["train"], PrecomputeSection(batch_size=5))
    assert not first.skipped and first.rows == 16 and shard_files(out) == first.files
    table = pq.read_table(first.files)
    assert table.schema == precomputed_schema((4, 8, 8), 64)  # the schema module's contract, nullability included
    assert set(table.column("split").to_pylist()) == {"train"}

    # the stored outputs are the frozen models' outputs for the stimulus of the same epoch
    source = pq.read_table(files, columns=["epoch_id", "image"]).to_pydict()
    row = source["epoch_id"].index(table.column("epoch_id")[0].as_py())
    image = torch.from_numpy(decode_images([source["image"][row]], 16)).permute(0, 3, 1, 2)
    latent = encode_images(load_sd_components(str(base)), image.float() / 127.5 - 1, sample=False)[0]
    stored = table.column("latents").combine_chunks().to_numpy_ndarray()
    torch.testing.assert_close(torch.tensor(stored[0]).float(), latent, atol=2e-3, rtol=1e-2)
    embedding = table.column("clip_embedding").combine_chunks().to_numpy_ndarray().astype(np.float32)
    expected = load_clip_image_encoder("dreamdiff-tiny", str(clip))(image)[0]
    torch.testing.assert_close(torch.from_numpy(embedding[0]), expected, atol=2e-3, rtol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=2e-3)

    marker = (out / DONE).stat().st_mtime_ns
    again = precompute(files, out, models, ["train"], PrecomputeSection(batch_size=5))
    assert again.skipped and again.files == first.files and (out / DONE).stat().st_mtime_ns == marker


def test_one_worker_learns_and_exports_a_loadable_generator(shards: Path, encoder_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _config(
        shards,
        out,
        encoder_checkpoint=str(encoder_run),
        tiny_sd={**TINY_SD, "cross_attention_dim": 64},  # the base model's context is the 64-wide CLIP embedding
        tiny_sd_pretrain={"steps": 6, "batch_size": 8, "log_every_steps": 3},
        trainable="cross_attention",
        conditioner={"context_dim": 64, "clip_dim": 64},
        epochs=20,
        log_every_steps=5,
        checkpoint={"every_steps": 20},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2022)  # FinetuneConfig's default seed: the random tiny SD the driver builds first
        random_base = build_tiny_sd(TinyDiffusionConfig(**cfg["tiny_sd"]), tmp_path / "random")
    final = finetune(validate_config("finetune", cfg, "test"))
    lines = _metrics(out)
    assert final["step"] == lines[-1]["step"] == 40  # 16 training rows / 8 per step x 20 epochs
    assert np.mean([m["loss"] for m in lines[-2:]]) < 0.8 * np.mean([m["loss"] for m in lines[:2]]), lines
    assert json.loads((out / PRECOMPUTED_DIR / DONE).read_text())["rows"] == 16

    # the tiny SD learned to draw first (in a Ray task), on the precomputed training rows; fine-tuning used it
    base = out / "tiny-sd"
    pretrained = json.loads((base / "pretrained.json").read_text())
    assert pretrained["rows"] == 16 and [h["step"] for h in pretrained["history"]] == [3, 6]
    assert (base / "preview.png").stat().st_size > 0
    trained, random = (load_sd_components(str(f)).unet.state_dict() for f in (base, random_base))
    assert trained.keys() == random.keys() and any(not torch.equal(v, random[k]) for k, v in trained.items())

    # only what was trained: encoder, conditioner, CLIP head and the UNet's cross-attention, plus the spec
    folder = out / GENERATOR_DIR
    assert sorted(p.name for p in folder.iterdir()) == sorted([SPEC_FILE, WEIGHTS_FILE])
    unet_keys = [k for k in load_file(str(folder / WEIGHTS_FILE)) if k.startswith("unet.")]
    assert unet_keys and all(".attn2." in k or ".norm2." in k for k in unet_keys)
    meta = json.loads((folder / SPEC_FILE).read_text())
    assert meta["spec"]["base_model"] == str(out.resolve() / "tiny-sd") and meta["info"]["step"] == 40
    assert meta["info"]["encoder_init"] == str((encoder_run / ENCODER_FILE).resolve())

    generator = Generator.load(folder)
    eeg = pq.read_table(paired_files(shards)[0], columns=["eeg"]).column("eeg").combine_chunks()
    images = generator.generate(eeg.to_numpy_ndarray()[:2].astype(np.float32), num_images=2, steps=3, seed=0)
    assert images.shape == (2, 2, 16, 16, 3) and images.dtype == np.uint8
    assert (out / "plots" / PREVIEW_FILE).stat().st_size > 0


@pytest.mark.slow
def test_rerun_resumes_from_the_last_checkpoint_on_two_ddp_workers(shards: Path, tmp_path: Path) -> None:
    """A run dies at step 6 (checkpoint at 4); the same command again continues from step 4, not from 0. Two DDP
    workers with clip_weight 0: the untrained CLIP head must be frozen, or DDP fails on its missing gradients."""
    out = tmp_path / "run"
    cfg = validate_config(
        "finetune",
        _config(shards, out, epochs=5, clip_weight=0.0, inject_failure_at_step=6, scaling={"num_workers": 2}),
        "t",
    )
    with pytest.raises(Exception, match="injected failure at step 6"):
        finetune(cfg)
    assert (out / FAILED_ONCE).exists() and not (out / GENERATOR_DIR).exists()
    final = finetune(cfg)
    lines = _metrics(out)
    assert [m["step"] for m in lines] == [2, 4, 6, 8, 10]  # steps 5-6 retrained once, nothing from 0
    assert [m["resumed_at"] for m in lines] == [0, 0, 4, 4, 4]
    assert final["step"] == 10 and (out / GENERATOR_DIR / SPEC_FILE).is_file()
    assert all(m["clip_loss"] > 0 for m in lines)  # still measured, with no weight
    assert json.loads((out / GENERATOR_DIR / SPEC_FILE).read_text())["info"]["clip_weight"] == 0.0


def test_bad_input_fails_with_one_line_before_any_work(
    shards: Path, encoder_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fails(match: str, **extra: object) -> None:
        output = tmp_path / "out"
        with pytest.raises(DreamdiffError, match=match):
            finetune(validate_config("finetune", {**_config(shards, output), **extra}, "test"))
        assert not output.exists()  # nothing written, nothing lost

    fails("data: no such shard folder", data=str(tmp_path / "nowhere"))
    fails(f"encoder_checkpoint: .* holds no {ENCODER_FILE}", encoder_checkpoint=str(tmp_path))
    deeper = {"preset": "tiny", "depth": 3}
    fails("encoder_checkpoint: .* does not fit encoder sizes", encoder_checkpoint=str(encoder_run), encoder=deeper)
    run = tmp_path / "pretrain-run"  # a pretrain run records its sizes in config.yaml; `encoder` must agree
    run.mkdir()
    (run / ENCODER_FILE).symlink_to(encoder_run / ENCODER_FILE)
    (run / "config.yaml").write_text(json.dumps({"model": {"preset": "tiny"}}))
    fails("encoder: sizes .* differ from those of the pretrain run", encoder_checkpoint=str(run), encoder=deeper)
    fails("conditioner.context_dim: 64 must equal .* cross_attention_dim \\(32\\)", conditioner={"context_dim": 64})
    fails("conditioner.clip_dim: 768 must equal .* \\(64\\)", conditioner={"context_dim": 32})
    fails(
        "tiny_sd_pretrain: .* conditioner.clip_dim \\(64\\) must equal tiny_sd.cross_attention_dim \\(32\\)",
        tiny_sd_pretrain={},
    )
    fails("preview.split: no rows of split 'holdout'", preview={"split": "holdout"})
    fails("batch_size: 32 is larger than the 16 rows", batch_size=32)
    fails("clip model 'ViT-Tiny' is unknown", clip_model="ViT-Tiny")

    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps(_config(tmp_path / "missing", tmp_path / "out")))
    assert main(["finetune", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dreamdiff finetune: error: data: no such shard folder" in err[0]
