"""SD components through diffusers: the tiny SD-layout folder, loading, the trainable subset, the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention import BasicTransformerBlock
from pydantic import ValidationError
from safetensors.torch import load_file

from dreamdiff.errors import DreamdiffError
from dreamdiff.models.diffusion import (
    build_tiny_sd,
    decode_latents,
    diffusion_loss,
    encode_images,
    load_sd_components,
    select_trainable,
)
from dreamdiff.models.diffusion_config import TinyDiffusionConfig


@pytest.fixture(scope="module")
def pixel_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return build_tiny_sd(TinyDiffusionConfig(), tmp_path_factory.mktemp("sd") / "tiny")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=_gen(1)) * 2 - 1


def test_tiny_model_is_saved_in_the_sd_layout_and_loads_back(pixel_sd: Path) -> None:
    assert {p.name for p in pixel_sd.iterdir()} == {"unet", "scheduler", "tiny_config.json"}
    sd = load_sd_components(str(pixel_sd))
    assert sd.pixel_space and sd.latent_scale == 1.0 and sd.sample_size == 16
    saved = load_file(str(pixel_sd / "unet" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == sd.unet.state_dict().keys()
    for name, value in sd.unet.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    assert sd.unet.config.cross_attention_dim == 64 and sd.unet.config.in_channels == 3
    assert not hasattr(sd.unet.down_blocks[0], "attentions")  # no attention at full resolution
    assert sd.noise_scheduler.config.prediction_type == "epsilon"
    assert sd.noise_scheduler.config.beta_schedule == "scaled_linear"
    out = sd.unet(_images(), torch.tensor([0, 10, 100, 999]), encoder_hidden_states=torch.randn(4, 77, 64)).sample
    assert out.shape == (4, 3, 16, 16)


def test_pixel_space_encode_is_identity_and_decode_maps_to_unit_range(pixel_sd: Path) -> None:
    sd = load_sd_components(str(pixel_sd))
    images = _images()
    assert encode_images(sd, images) is images
    torch.testing.assert_close(decode_latents(sd, images), (images + 1) / 2)


def test_tiny_vae_model_diffuses_scaled_latents(tmp_path: Path) -> None:
    cfg = TinyDiffusionConfig(use_vae=True, vae_scaling_factor=0.5)
    sd = load_sd_components(str(build_tiny_sd(cfg, tmp_path / "vae_sd")))
    assert not sd.pixel_space and sd.latent_scale == 0.5 and sd.sample_size == 16
    assert sd.unet.config.sample_size == 8 and sd.unet.config.in_channels == 4
    assert not sd.vae.training and not any(p.requires_grad for p in sd.vae.parameters())
    images = _images(2)
    latents = encode_images(sd, images, sample=False)
    torch.testing.assert_close(latents, sd.vae.encode(images).latent_dist.mean * 0.5)
    assert decode_latents(sd, latents).shape == (2, 3, 16, 16)
    assert diffusion_loss(sd.unet, sd.noise_scheduler, latents, torch.randn(2, 77, 64)).ndim == 0


def test_cross_attention_mode_trains_exactly_attn2_and_norm2_of_transformer_blocks(pixel_sd: Path) -> None:
    unet = load_sd_components(str(pixel_sd)).unet
    expected = {
        f"{block_name}.{part}.{param_name}"
        for block_name, block in unet.named_modules()
        if isinstance(block, BasicTransformerBlock)
        for part in ("attn2", "norm2")
        for param_name, _ in getattr(block, part).named_parameters()
    }
    names = select_trainable(unet, "cross_attention")
    assert names == sorted(expected) and len(names) > 0
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" in names
    assert "down_blocks.1.attentions.0.transformer_blocks.0.norm2.weight" in names
    assert not any(".resnets." in n for n in names)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == expected

    assert select_trainable(unet, "none") == []
    assert not any(p.requires_grad for p in unet.parameters())
    assert select_trainable(unet, "all") == sorted(n for n, _ in unet.named_parameters())
    assert all(p.requires_grad for p in unet.parameters())
    with pytest.raises(DreamdiffError, match="cross_attention"):
        select_trainable(unet, "attn")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_loss_targets_follow_the_prediction_type(pixel_sd: Path, kind: str) -> None:
    sd = load_sd_components(str(pixel_sd))
    scheduler = DDPMScheduler.from_config(sd.noise_scheduler.config, prediction_type=kind)
    x0, context = _images(), torch.randn(4, 77, 64, generator=_gen(2))
    with torch.no_grad():
        loss = diffusion_loss(sd.unet, scheduler, x0, context, generator=_gen(5))
        g = _gen(5)
        t = torch.randint(0, 1000, (4,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        pred = sd.unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {"epsilon": noise, "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * x0, "sample": x0}[kind]
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())


def test_the_condition_reaches_the_unet(pixel_sd: Path) -> None:
    sd = load_sd_components(str(pixel_sd))
    with torch.no_grad():
        a = diffusion_loss(sd.unet, sd.noise_scheduler, _images(), torch.randn(4, 77, 64), generator=_gen(7))
        b = diffusion_loss(sd.unet, sd.noise_scheduler, _images(), torch.randn(4, 77, 64), generator=_gen(7))
    assert a != b


def test_diffusion_loss_decreases_when_training_the_tiny_unet(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sd = load_sd_components(str(build_tiny_sd(TinyDiffusionConfig(sample_size=8), tmp_path / "sd8")))
    select_trainable(sd.unet, "all")
    sd.unet.train()
    opt = torch.optim.Adam(sd.unet.parameters(), lr=1e-3)
    images, context = _images(size=8), torch.randn(4, 77, 64, generator=_gen(3))

    def loss() -> torch.Tensor:  # the same timesteps and noise every step: one fixed objective
        return diffusion_loss(sd.unet, sd.noise_scheduler, images, context, generator=_gen(11))

    first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.5 * first


def test_missing_or_incomplete_base_models_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DreamdiffError, match=r"'.*nowhere' is not a folder; expected a local Stable Diffusion"):
        load_sd_components(str(tmp_path / "nowhere"))
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(DreamdiffError, match=r"missing subfolder\(s\) \['scheduler'\]"):
        load_sd_components(str(tmp_path / "half"))


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"block_out_channels": [32, 64]}, "same length"),
        ({"sample_size": 10}, "divisible by 4"),
        ({"use_vae": True, "sample_size": 20}, "divisible by 8"),
        ({"block_out_channels": [32, 48, 64]}, "norm_num_groups"),
        ({"prediction_type": "x0"}, "prediction_type"),
    ],
)
def test_tiny_config_rejects_impossible_shapes(fields: dict, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        TinyDiffusionConfig(**fields)
