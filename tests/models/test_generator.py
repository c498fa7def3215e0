"""Generator checkpoints (only the trained tensors) and sampling: seeds, samplers, guidance, encoder init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamdiff.errors import DreamdiffError
from dreamdiff.models.conditioner import ConditionerConfig
from dreamdiff.models.diffusion import load_sd_components
from dreamdiff.models.eeg_diffusion import GeneratorSpec, build_eeg_diffusion
from dreamdiff.models.generator import FORMAT_VERSION, SPEC_FILE, WEIGHTS_FILE, Generator, save_generator
from dreamdiff.models.msm import MSMConfig, build_msm
from dreamdiff.train.finetune_step import build_finetune_optimizer, finetune_train_step

# diffusers 0.42's DPMSolverMultistepScheduler calls np.array on a torch tensor, which numpy 2 flags
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _spec(tiny_sd: Path, trainable: str = "cross_attention", cond_drop_prob: float = 0.0) -> GeneratorSpec:
    return GeneratorSpec(
        base_model=str(tiny_sd),
        msm=MSMConfig(preset="tiny"),
        conditioner=ConditionerConfig(context_dim=64, clip_dim=32, cond_drop_prob=cond_drop_prob),
        trainable=trainable,
        image_size=8,
    )


def _generator(spec: GeneratorSpec, encoder_weights: Path | None = None) -> Generator:
    """A fresh model on a fresh copy of the base SD, wrapped for sampling (weights stay trainable)."""
    torch.manual_seed(0)
    components = load_sd_components(spec.base_model)
    return Generator(build_eeg_diffusion(spec, components, encoder_weights), components)


def _eeg(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 128, 512, generator=torch.Generator().manual_seed(seed))


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference in [0, 1] units."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() / 255)


@pytest.fixture(scope="module")
def trained(tiny_sd: Path) -> Generator:
    """The whole UNet trained for a moment on 8 smooth images, so that samples are images rather than clamped
    noise and sampler comparisons mean something."""
    gen = _generator(_spec(tiny_sd, trainable="all"))
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    colours = torch.rand(8, 3, 1, 1, generator=g) * 2 - 1
    batch = {
        "eeg": _eeg(8, seed=1),
        "latents": (0.5 * colours + 0.25 * colours.flip(0) * (xx + yy)).clamp(-1, 1),
        "clip_target": torch.randn(8, 32, generator=g),
    }
    optimizer = build_finetune_optimizer(gen.model, lr=2e-3)
    for _ in range(100):
        out = finetune_train_step(
            gen.model, gen.components.noise_scheduler, optimizer, batch, lr=2e-3, grad_clip=1.0, clip_weight=1.0
        )
    assert out["sd_loss"] < 0.1
    return Generator(gen.model, gen.components)


def test_checkpoint_holds_only_trained_tensors_and_round_trips_exactly(tiny_sd: Path, tmp_path: Path) -> None:
    gen = _generator(_spec(tiny_sd))
    unet = dict(gen.model.unet.named_parameters())
    with torch.no_grad():  # stand-in for training: move every trained UNet tensor away from the base model
        for name in gen.model.unet_trainable:
            unet[name].add_(torch.randn_like(unet[name]) * 0.2)
    folder = save_generator(gen.model, gen.spec, tmp_path / "gen", info={"step": 7})

    tensors = load_file(str(folder / WEIGHTS_FILE))
    unet_keys = {k.removeprefix("unet.") for k in tensors if k.startswith("unet.")}
    assert unet_keys == set(gen.model.unet_trainable) and len(unet_keys) == 28
    assert not any("resnets" in k or ".attn1." in k or "conv_in" in k for k in unet_keys)
    assert {k.split(".")[0] for k in tensors} == {"encoder", "conditioner", "clip_head", "unet"}
    meta = json.loads((folder / SPEC_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["info"] == {"step": 7}
    assert meta["spec"]["base_model"] == str(tiny_sd.resolve()) and meta["spec"]["trainable"] == "cross_attention"

    loaded = Generator.load(folder)
    base = _generator(_spec(tiny_sd))  # the same encoder init, the untouched base UNet
    eeg = _eeg(2)
    images = gen.generate(eeg, num_images=2, steps=5, seed=3)
    assert np.array_equal(loaded.generate(eeg, num_images=2, steps=5, seed=3), images)
    assert not np.array_equal(base.generate(eeg, num_images=2, steps=5, seed=3), images)  # the deltas count


def test_all_mode_saves_the_whole_unet_and_none_saves_none(trained: Generator, tiny_sd: Path, tmp_path: Path) -> None:
    folder = save_generator(trained.model, trained.spec, tmp_path / "all")
    unet_keys = {k for k in load_file(str(folder / WEIGHTS_FILE)) if k.startswith("unet.")}
    assert unet_keys == {f"unet.{k}" for k in trained.model.unet.state_dict()}
    eeg = _eeg(1)
    images = trained.generate(eeg, steps=5, seed=0)
    assert np.array_equal(Generator.load(folder).generate(eeg, steps=5, seed=0), images)
    half = Generator.load(folder, dtype=torch.bfloat16).generate(eeg, steps=5, seed=np.int64(0))
    autocast = Generator.load(folder, autocast_dtype=torch.bfloat16).generate(eeg, steps=5, seed=0)
    assert _distance(half, images) < 0.05 and _distance(autocast, images) < 0.05

    frozen = _generator(_spec(tiny_sd, trainable="none"))
    folder = save_generator(frozen.model, frozen.spec, tmp_path / "none")
    assert not any(k.startswith("unet.") for k in load_file(str(folder / WEIGHTS_FILE)))


def test_seeds_fix_the_images(trained: Generator) -> None:
    eeg = _eeg(2)
    images = trained.generate(eeg, num_images=2, steps=10, seed=0)
    assert images.shape == (2, 2, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(trained.generate(eeg.numpy(), num_images=2, steps=10, seed=0), images)
    other = trained.generate(eeg, num_images=2, steps=10, seed=1)
    assert _distance(other, images) > 0.05
    assert _distance(images[0, 0], images[0, 1]) > 0.05  # images of one EEG differ


def test_an_image_depends_on_its_eeg_seed_and_index_only(trained: Generator) -> None:
    a, b = _eeg(1, seed=1), _eeg(1, seed=2)
    pair = trained.generate(torch.cat([a, b]), num_images=2, steps=10, seed=[10, 20])
    alone = trained.generate(b, num_images=2, steps=10, seed=[20])
    assert np.array_equal(pair[1], alone[0])
    assert np.array_equal(trained.generate(torch.cat([a, b]), num_images=2, steps=10, seed=19)[1], alone[0])
    assert np.array_equal(trained.generate(b, num_images=1, steps=10, seed=20)[0, 0], alone[0, 0])


def test_dpm_solver_25_steps_matches_ddim_and_plms_250(trained: Generator) -> None:
    eeg = _eeg(2)
    fast = trained.generate(eeg, num_images=2, steps=25, sampler="dpm++", seed=0)
    ddim = trained.generate(eeg, num_images=2, steps=250, sampler="ddim", seed=0)
    plms = trained.generate(eeg, num_images=2, steps=250, sampler="plms", seed=0)
    other_seed = trained.generate(eeg, num_images=2, steps=25, sampler="dpm++", seed=1)
    seeds_apart = _distance(fast, other_seed)
    report = f"DPM++25 vs DDIM250 {_distance(fast, ddim):.4f}, vs PLMS250 {_distance(fast, plms):.4f}"
    print(f"{report}, different seeds {seeds_apart:.4f} (mean |pixel difference|, [0, 1] units)")
    assert _distance(fast, ddim) < 0.05 * seeds_apart
    assert _distance(fast, plms) < 0.05 * seeds_apart


def test_guidance_needs_a_null_context(trained: Generator, tiny_sd: Path) -> None:
    with pytest.raises(DreamdiffError, match="guidance_scale=3.0 needs a null context"):
        trained.generate(_eeg(1), steps=2, guidance_scale=3.0, seed=0)
    guided = _generator(_spec(tiny_sd, cond_drop_prob=0.1))
    plain = guided.generate(_eeg(1), steps=5, seed=0)
    assert not np.array_equal(guided.generate(_eeg(1), steps=5, guidance_scale=3.0, seed=0), plain)


def test_encoder_weights_come_from_an_msm_export(tiny_sd: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    msm = build_msm(MSMConfig(preset="tiny"))
    export = tmp_path / "msm.safetensors"
    save_file({k: v.contiguous() for k, v in msm.state_dict().items()}, str(export))
    loaded = _generator(_spec(tiny_sd), encoder_weights=export).model.encoder.state_dict()
    scratch = _generator(_spec(tiny_sd)).model.encoder.state_dict()
    for name, value in msm.encoder.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    assert not torch.equal(scratch["blocks.0.attn.qkv.weight"], loaded["blocks.0.attn.qkv.weight"])

    save_file({"decoder.x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DreamdiffError, match="no 'encoder.\\*' tensors"):
        _generator(_spec(tiny_sd), encoder_weights=tmp_path / "bad.safetensors")
    small = build_msm(MSMConfig(preset="tiny", embed_dim=32))
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "small.safetensors"))
    with pytest.raises(DreamdiffError, match="do not fit the spec's msm sizes"):
        _generator(_spec(tiny_sd), encoder_weights=tmp_path / "small.safetensors")


def test_bad_requests_are_named(trained: Generator, tiny_sd: Path, tmp_path: Path) -> None:
    with pytest.raises(DreamdiffError, match=r"eeg must be \[batch, 128, 512\]"):
        trained.generate(torch.zeros(1, 64, 512))
    with pytest.raises(DreamdiffError, match="NaN"):
        trained.generate(torch.full((1, 128, 512), float("nan")))
    with pytest.raises(DreamdiffError, match="channel_mask must be"):
        trained.generate(_eeg(1), steps=2, channel_mask=np.ones((1, 64), bool))
    with pytest.raises(DreamdiffError, match="seed must be"):
        trained.generate(_eeg(2), steps=2, seed=[1])
    with pytest.raises(DreamdiffError, match="sampler must be"):
        trained.generate(_eeg(1), steps=2, sampler="euler")
    spec = _spec(tiny_sd).model_copy(update={"conditioner": ConditionerConfig(context_dim=48)})
    with pytest.raises(DreamdiffError, match="cross_attention_dim"):
        build_eeg_diffusion(spec, load_sd_components(str(tiny_sd)))
    folder = save_generator(trained.model, trained.spec, tmp_path / "gen")
    with pytest.raises(DreamdiffError, match="base_model"):
        Generator.load(folder, base_model=str(tmp_path / "nowhere"))
    (folder / SPEC_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DreamdiffError, match="format_version 99"):
        Generator.load(folder)


def test_the_clip_target_centre_travels_with_the_checkpoint(tiny_sd: Path, tmp_path: Path) -> None:
    spec = _spec(tiny_sd)
    spec = spec.model_copy(update={"conditioner": spec.conditioner.model_copy(update={"clip_center": True})})
    gen = _generator(spec)
    gen.model.clip_head.target_mean.copy_(torch.arange(32.0))
    loaded = Generator.load(save_generator(gen.model, gen.spec, tmp_path / "centred"))
    assert torch.equal(loaded.model.clip_head.target_mean, torch.arange(32.0))
