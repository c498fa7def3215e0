"""The fine-tuning step: it learns, the CLIP weight gates the head, and only the trainable set moves."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from dreamdiff.models.conditioner import ConditionerConfig
from dreamdiff.models.diffusion import SDComponents, load_sd_components
from dreamdiff.models.eeg_diffusion import EEGDiffusion, GeneratorSpec, build_eeg_diffusion, compile_for_training
from dreamdiff.models.msm import MSMConfig
from dreamdiff.train.finetune_step import build_finetune_optimizer, finetune_train_step, trainable_parameters

CLIP_DIM = 32


def _model(tiny_sd: Path, trainable: str = "cross_attention") -> tuple[EEGDiffusion, SDComponents]:
    torch.manual_seed(0)
    spec = GeneratorSpec(
        base_model=str(tiny_sd),
        msm=MSMConfig(preset="tiny"),
        conditioner=ConditionerConfig(context_dim=64, clip_dim=CLIP_DIM),
        trainable=trainable,
        image_size=8,
    )
    components = load_sd_components(str(tiny_sd))
    return build_eeg_diffusion(spec, components), components


def _batch(size: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "eeg": torch.randn(size, 128, 512, generator=g).half(),  # as stored
        "latents": torch.rand(size, 3, 8, 8, generator=g) * 2 - 1,  # pixel space: images in [-1, 1]
        "clip_target": torch.randn(size, CLIP_DIM, generator=g),
    }


def _step(
    model: EEGDiffusion,
    components: SDComponents,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor | None],
    clip_weight: float = 1.0,
) -> dict[str, float]:
    """The same timesteps and noise every step: the objective is fixed, so its loss must fall."""
    generator = torch.Generator().manual_seed(2)
    return finetune_train_step(
        model,
        components.noise_scheduler,
        optimizer,
        batch,
        lr=1e-3,
        grad_clip=1.0,
        clip_weight=clip_weight,
        generator=generator,
    )


def test_loss_decreases_on_a_fixed_batch(tiny_sd: Path) -> None:
    model, components = _model(tiny_sd)
    optimizer = build_finetune_optimizer(model, lr=1e-3)
    batch = _batch()
    history = [_step(model, components, optimizer, batch) for _ in range(30)]
    first, last = history[0], history[-1]
    assert set(first) == {"loss", "sd_loss", "clip_loss", "grad_norm", "lr"}
    assert first["loss"] == pytest.approx(first["sd_loss"] + first["clip_loss"], rel=1e-5)
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["sd_loss"] < 0.9 * first["sd_loss"] and last["clip_loss"] < 0.1 * first["clip_loss"]
    assert all(math.isfinite(h["grad_norm"]) and h["lr"] == 1e-3 for h in history)


def test_clip_weight_zero_gives_the_clip_term_no_influence(tiny_sd: Path) -> None:
    model, components = _model(tiny_sd)
    twin = copy.deepcopy(model)
    head_before = {k: v.clone() for k, v in model.clip_head.state_dict().items()}
    with_target = _step(model, components, build_finetune_optimizer(model, lr=1e-3), _batch(), clip_weight=0.0)
    no_target = {**_batch(), "clip_target": None}
    without = _step(twin, components, build_finetune_optimizer(twin, lr=1e-3), no_target, clip_weight=0.0)
    assert 0 < with_target["clip_loss"] < 2 and math.isnan(without["clip_loss"])  # still measured when given
    assert with_target["loss"] == without["loss"] == with_target["sd_loss"]
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the same update, bit for bit
    for name, value in model.clip_head.state_dict().items():
        torch.testing.assert_close(value, head_before[name], rtol=0, atol=0)  # the head got no gradient


def test_only_the_trainable_set_changes(tiny_sd: Path) -> None:
    model, components = _model(tiny_sd)
    trainable = trainable_parameters(model)
    heads = [model.encoder, model.conditioner, model.clip_head]
    assert len(trainable) == sum(len(list(m.parameters())) for m in heads) + len(model.unet_trainable)
    assert all(".attn2." in n or ".norm2." in n for n in model.unet_trainable)
    optimizer = build_finetune_optimizer(model, lr=1e-3)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable}
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.encoder.norm.weight) in no_decay and id(model.clip_head.proj.bias) in no_decay
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, components, optimizer, _batch())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    unet_changed = {k.removeprefix("unet.") for k in changed if k.startswith("unet.")}
    assert unet_changed and unet_changed <= set(model.unet_trainable)
    assert not any("resnets" in k or ".attn1." in k or "conv_in" in k for k in unet_changed)
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("conditioner.") for k in changed)


def test_bad_batches_are_named(tiny_sd: Path) -> None:
    model, components = _model(tiny_sd, trainable="none")
    assert model.unet_trainable == []
    optimizer = build_finetune_optimizer(model, lr=1e-3)
    with pytest.raises(ValueError, match="no clip_target"):
        _step(model, components, optimizer, {**_batch(), "clip_target": None}, clip_weight=1.0)
    with pytest.raises(ValueError, match="latents must be"):
        _step(model, components, optimizer, {**_batch(), "latents": torch.zeros(3, 3, 8, 8)})
    with pytest.raises(ValueError, match="clip_target must be"):
        _step(model, components, optimizer, {**_batch(), "clip_target": torch.zeros(4, 7)})


def test_encoder_lr_scale_slows_only_the_encoder(tiny_sd: Path) -> None:
    """encoder_lr_scale 0.1: the encoder's groups step at a tenth of the rate, every other group at the full rate,
    so after one Adam step (update about lr per weight) the encoder has moved about ten times less."""
    moved = {}
    for scale in (1.0, 0.1):
        model, components = _model(tiny_sd)
        before = copy.deepcopy(model.state_dict())
        optimizer = build_finetune_optimizer(model, lr=1e-3, encoder_lr_scale=scale)
        _step(model, components, optimizer, _batch())
        encoder_ids = {id(p) for p in model.encoder.parameters()}
        for group in optimizer.param_groups:
            for param in group["params"]:
                assert group["lr"] == pytest.approx(1e-3 * (scale if id(param) in encoder_ids else 1.0))
        after = model.state_dict()
        moved[scale] = {
            part: max((after[k] - before[k]).abs().max().item() for k in after if k.startswith(part))
            for part in ("encoder.", "conditioner.")
        }
    assert moved[0.1]["encoder."] == pytest.approx(moved[1.0]["encoder."] / 10, rel=0.05)
    assert moved[0.1]["conditioner."] == pytest.approx(moved[1.0]["conditioner."], rel=1e-4)


@pytest.mark.slow  # compiling the tiny UNet's forward and backward takes over a minute on two cores
def test_a_compiled_model_trains_as_the_eager_one(tiny_sd: Path) -> None:
    """FinetuneConfig.compile (here reduce-overhead, the SD 1.5 config's; on a CPU torch runs it without CUDA
    graphs): the UNet and every encoder block compiled, the same losses and trained weights as eager."""
    runs = {}
    for compiled in (False, True):
        model, components = _model(tiny_sd)
        if compiled:
            compile_for_training(model, components, "reduce-overhead")
            assert all(block._compiled_call_impl is not None for block in model.encoder.blocks)
            assert components.unet._compiled_call_impl is not None
        optimizer = build_finetune_optimizer(model, lr=1e-3)
        losses = [_step(model, components, optimizer, _batch())["loss"] for _ in range(3)]
        runs[compiled] = losses, model.state_dict()
    (eager_losses, eager_state), (losses, state) = runs[False], runs[True]
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    assert losses[-1] < losses[0]
    assert state.keys() == eager_state.keys()  # the checkpoint's names do not change
    cross_attention = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    for name in (cross_attention, "encoder.blocks.0.attn.qkv.weight", "encoder.norm.weight"):
        torch.testing.assert_close(state[name], eager_state[name], rtol=1e-4, atol=1e-5)
