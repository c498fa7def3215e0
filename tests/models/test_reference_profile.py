"""The generator side of `profile: reference`: the time conditioner, its path through the UNet, training and
checkpoints, the reference's PLMS timesteps, and the spec's profile."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import Tensor

from dreamdiff.config import FinetuneConfig
from dreamdiff.errors import DreamdiffError
from dreamdiff.models.conditioner import ConditionerConfig, TimeConditioner
from dreamdiff.models.diffusion import SDComponents, build_tiny_sd, load_sd_components
from dreamdiff.models.diffusion_config import TinyDiffusionConfig
from dreamdiff.models.eeg_diffusion import EEGDiffusion, GeneratorSpec, build_eeg_diffusion
from dreamdiff.models.generator import SPEC_FILE, WEIGHTS_FILE, Generator, make_sampler, save_generator
from dreamdiff.models.msm import MSMConfig
from dreamdiff.train.finetune import generator_spec
from dreamdiff.train.finetune_step import build_finetune_optimizer, finetune_train_step, trainable_parameters

# diffusers 0.42's DPMSolverMultistepScheduler calls np.array on a torch tensor, which numpy 2 flags
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

CONTEXT_DIM, TIME_DIM = 64, 128  # the tiny SD's cross_attention_dim and time-embedding width (32 * 4)


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD whose GroupNorms hold several channels per group: with one channel per group (the shared
    `tiny_sd`), a ResNet's GroupNorm removes any per-channel shift, so the time embedding changes nothing."""
    torch.manual_seed(0)
    cfg = TinyDiffusionConfig(
        sample_size=8,
        block_out_channels=[32, 32],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        norm_num_groups=8,
    )
    return build_tiny_sd(cfg, tmp_path_factory.mktemp("sd") / "grouped")


def _spec(sd: Path, profile: str = "dreamdiff", time_cond: bool = True, drop: float = 0.0) -> GeneratorSpec:
    return GeneratorSpec(
        base_model=str(sd),
        msm=MSMConfig(preset="tiny", profile=profile),
        conditioner=ConditionerConfig(context_dim=CONTEXT_DIM, clip_dim=32, time_cond=time_cond, cond_drop_prob=drop),
        image_size=8,
        profile=profile,
    )


def _model(spec: GeneratorSpec) -> tuple[EEGDiffusion, SDComponents]:
    torch.manual_seed(0)
    components = load_sd_components(spec.base_model, time_cond=spec.conditioner.time_cond)
    return build_eeg_diffusion(spec, components), components


def _batch(size: int = 2) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "eeg": torch.randn(size, 128, 512, generator=g),
        "latents": torch.rand(size, 3, 8, 8, generator=g) * 2 - 1,
        "clip_target": torch.randn(size, 32, generator=g),
    }


def _unet_calls(unet: UNet2DConditionModel) -> tuple[list[dict], torch.utils.hooks.RemovableHandle]:
    """Record the timestep and keyword arguments of every call of `unet`."""
    calls: list[dict] = []

    def record(module: UNet2DConditionModel, args: tuple, kwargs: dict) -> None:
        calls.append({"t": int(args[1]), **kwargs})

    return calls, unet.register_forward_pre_hook(record, with_kwargs=True)


def test_time_conditioner_is_two_token_convolutions_then_a_linear() -> None:
    torch.manual_seed(0)
    layer = TimeConditioner(context_tokens=7, context_dim=5, time_embed_dim=11)
    context = torch.randn(3, 7, 5)
    (w1, b1), (w2, b2) = ((conv.weight[..., 0], conv.bias) for conv in layer.token_mixer)
    assert w1.shape == (3, 7) and w2.shape == (1, 3)  # 7 -> 7 // 2 -> 1 tokens
    pooled = torch.einsum("ot,btd->bod", w1, context) + b1[None, :, None]
    pooled = torch.einsum("ot,btd->bod", w2, pooled) + b2[None, :, None]
    expected = torch.einsum("ed,bd->be", layer.proj.weight, pooled[:, 0]) + layer.proj.bias
    out = layer(context)
    assert out.shape == (3, 11)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"context must be \[batch, 7, 5\]"):
        layer(torch.randn(3, 5, 7))
    with pytest.raises(ValidationError, match="time_cond needs context_tokens >= 2"):
        ConditionerConfig(context_tokens=1, time_cond=True)


def test_class_labels_are_added_to_the_timestep_embedding(sd: Path) -> None:
    """The UNet loaded with `time_cond` and given the conditioner's vector as class_labels equals the plain base
    UNet whose timestep-embedding module (`time_embedding`) has that vector added to its output by a hook: the
    addition happens there, per sample, and nowhere else. The override adds no parameter."""
    base = load_sd_components(str(sd)).unet.eval()
    unet = load_sd_components(str(sd), time_cond=True).unet.eval()
    assert unet.config.class_embed_type == "identity" and base.config.class_embed_type is None
    assert unet.state_dict().keys() == base.state_dict().keys()
    torch.manual_seed(0)
    layer = TimeConditioner(context_tokens=77, context_dim=CONTEXT_DIM, time_embed_dim=TIME_DIM)
    x, t, context = torch.randn(2, 3, 8, 8), torch.tensor([10, 600]), torch.randn(2, 77, CONTEXT_DIM)
    with torch.no_grad():
        labels = layer(context) * 10  # large enough to change the output visibly
        handle = base.time_embedding.register_forward_hook(lambda module, args, out: out + labels)
        by_hand = base(x, t, context).sample
        handle.remove()
        plain = base(x, t, context).sample
        given = unet(x, t, context, class_labels=labels).sample
        swapped = unet(x, t, context, class_labels=labels.flip(0)).sample
    torch.testing.assert_close(given, by_hand, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(given, plain, atol=1e-3)
    assert not torch.allclose(given, swapped, atol=1e-3)  # each sample gets its own vector


def test_a_step_trains_the_time_conditioner_and_the_checkpoint_keeps_it(sd: Path, tmp_path: Path) -> None:
    spec = _spec(sd)
    model, components = _model(spec)
    assert model.time_conditioner is not None and model.time_conditioner.proj.out_features == TIME_DIM
    owned = {id(p) for p in model.time_conditioner.parameters()}
    assert owned <= {id(p) for p in trainable_parameters(model)}

    batch = _batch()
    sd_loss, _ = model(batch["eeg"], batch["latents"], components.noise_scheduler, generator=torch.Generator())
    sd_loss.backward()
    grads = [p.grad for p in model.time_conditioner.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)

    before = [p.detach().clone() for p in model.time_conditioner.parameters()]
    optimizer = build_finetune_optimizer(model, lr=1e-3)
    finetune_train_step(model, components.noise_scheduler, optimizer, batch, lr=1e-3, grad_clip=1.0, clip_weight=1.0)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.time_conditioner.parameters(), strict=True))

    folder = save_generator(model, spec, tmp_path / "gen")
    saved = {k for k in load_file(str(folder / WEIGHTS_FILE)) if k.startswith("time_conditioner.")}
    assert saved == {f"time_conditioner.{k}" for k in model.time_conditioner.state_dict()}
    loaded = Generator.load(folder)
    assert loaded.components.unet.config.class_embed_type == "identity"
    eeg = batch["eeg"][:1]
    images = Generator(model, components).generate(eeg, num_images=2, steps=4, sampler="ddim", seed=5)
    assert np.array_equal(loaded.generate(eeg, num_images=2, steps=4, sampler="ddim", seed=5), images)
    with torch.no_grad():
        loaded.model.time_conditioner.proj.bias.add_(5.0)
    assert not np.array_equal(loaded.generate(eeg, num_images=2, steps=4, sampler="ddim", seed=5), images)


def test_every_unet_call_gets_the_time_vector_of_its_own_context(sd: Path) -> None:
    """With guidance the UNet sees [null contexts, EEG contexts]; the vector added to each sample's timestep
    embedding must come from the context that sample cross-attends to."""
    model, components = _model(_spec(sd, drop=0.5))
    generator = Generator(model, components)
    calls, handle = _unet_calls(components.unet)
    try:
        generator.generate(_batch()["eeg"], steps=3, sampler="ddim", guidance_scale=3.0, seed=0)
    finally:
        handle.remove()
    assert len(calls) == 3
    with torch.no_grad():
        for call in calls:
            context = call["encoder_hidden_states"]
            torch.testing.assert_close(call["class_labels"], model.time_conditioner(context))
            torch.testing.assert_close(context[:2], model.conditioner.null_context(2))


def test_without_time_cond_the_unet_gets_no_class_labels(sd: Path) -> None:
    model, components = _model(_spec(sd, time_cond=False))
    assert model.time_conditioner is None and components.unet.config.class_embed_type is None
    calls, handle = _unet_calls(components.unet)
    try:
        Generator(model, components).generate(_batch()["eeg"], steps=2, sampler="ddim", seed=0)
    finally:
        handle.remove()
    assert [call["class_labels"] for call in calls] == [None, None]
    with pytest.raises(DreamdiffError, match=r"conditioner.time_cond is True: load the base model"):
        build_eeg_diffusion(_spec(sd), components)


def test_reference_plms_runs_the_reference_timesteps() -> None:
    config = DDPMScheduler(num_train_timesteps=1000).config
    reference = make_sampler("plms", config, "reference")
    reference.set_timesteps(250)
    ours = make_sampler("plms", config)
    ours.set_timesteps(250)
    steps = reference.timesteps.tolist()
    # 250 steps, the first one a Heun step that evaluates the UNet twice (PNDM lists 993 twice)
    assert len(steps) == 251 and steps[:3] == [997, 993, 993] and steps[-1] == 1
    assert sorted(set(steps)) == list(range(1, 1000, 4))
    assert ours.timesteps.tolist()[:3] == [999, 995, 995] and ours.timesteps[-1] == 3
    for name in ("dpm++", "ddim"):  # the profile changes PLMS only
        a, b = make_sampler(name, config, "reference"), make_sampler(name, config)
        a.set_timesteps(25)
        b.set_timesteps(25)
        assert torch.equal(a.timesteps, b.timesteps)


def test_the_generator_samples_at_its_profiles_timesteps(sd: Path) -> None:
    for profile, first in (("reference", [901, 801, 801]), ("dreamdiff", [999, 899, 899])):
        model, components = _model(_spec(sd, profile=profile, time_cond=False))
        calls, handle = _unet_calls(components.unet)
        try:
            Generator(model, components).generate(_batch()["eeg"][:1], steps=10, sampler="plms", seed=0)
        finally:
            handle.remove()
        assert [call["t"] for call in calls[:3]] == first


def test_the_spec_has_one_profile_and_old_records_load(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"profile \('reference'\) must equal msm.profile \('dreamdiff'\)"):
        GeneratorSpec(
            base_model="x",
            msm=MSMConfig(preset="tiny"),
            conditioner=ConditionerConfig(),
            image_size=8,
            profile="reference",
        )
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "old"))
    meta = json.loads((folder / SPEC_FILE).read_text())
    del meta["spec"]["profile"], meta["spec"]["msm"]["profile"], meta["spec"]["conditioner"]["time_cond"]
    (folder / SPEC_FILE).write_text(json.dumps(meta))
    loaded = Generator.load(folder)
    assert loaded.spec.profile == "dreamdiff" and loaded.model.time_conditioner is None


def test_the_finetune_profile_sets_the_encoder_and_time_cond(tmp_path: Path) -> None:
    recorded = MSMConfig(preset="tiny", profile="reference")  # as a pretrain run may have recorded it
    common = {"data": str(tmp_path), "output": str(tmp_path), "tiny_sd": {}, "encoder": {"preset": "tiny"}}
    ours = generator_spec(FinetuneConfig(**common), recorded, "sd", 8)
    assert ours.profile == ours.msm.profile == "dreamdiff" and not ours.conditioner.time_cond
    assert ours.conditioner == ConditionerConfig() and ours.msm.embed_dim == recorded.embed_dim
    reference = generator_spec(FinetuneConfig(**common, profile="reference"), MSMConfig(preset="tiny"), "sd", 8)
    assert reference.profile == reference.msm.profile == "reference" and reference.conditioner.time_cond
