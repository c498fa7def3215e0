"""The frozen CLIP image tower: real open_clip loading of a saved tiny checkpoint, preprocessing, errors."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamdiff.errors import DreamdiffError
from dreamdiff.models.clip import load_clip_image_encoder, save_random_clip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_clip("dreamdiff-tiny", tmp_path_factory.mktemp("clip") / "tiny.safetensors", seed=3)


def _images(batch: int = 3, size: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_saved_checkpoint_loads_back_through_open_clip(checkpoint: Path) -> None:
    enc = load_clip_image_encoder("dreamdiff-tiny", str(checkpoint))
    saved = load_file(str(checkpoint))
    for name, value in enc.visual.state_dict().items():
        torch.testing.assert_close(value, saved[f"visual.{name}"], rtol=0, atol=0)
    again = load_clip_image_encoder("dreamdiff-tiny", str(checkpoint))
    torch.testing.assert_close(enc(_images()), again(_images()), rtol=0, atol=0)
    other = load_clip_image_encoder(
        "dreamdiff-tiny",
        str(save_random_clip("dreamdiff-tiny", checkpoint.with_name("other.safetensors"), seed=4)),
    )
    assert not torch.allclose(enc(_images()), other(_images()))


def test_embeddings_are_unit_norm_and_the_tower_is_frozen(checkpoint: Path) -> None:
    enc = load_clip_image_encoder("dreamdiff-tiny", str(checkpoint))
    assert (enc.embed_dim, enc.image_size) == (64, (32, 32))
    torch.testing.assert_close(enc.mean.flatten(), torch.tensor(open_clip.OPENAI_DATASET_MEAN))
    torch.testing.assert_close(enc.std.flatten(), torch.tensor(open_clip.OPENAI_DATASET_STD))
    emb = enc(_images())
    assert emb.shape == (3, 64) and emb.grad_fn is None
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.visual.training


def test_uint8_and_float_images_agree_and_any_size_is_resized_and_cropped(checkpoint: Path) -> None:
    enc = load_clip_image_encoder("dreamdiff-tiny", str(checkpoint))
    images = _images()
    torch.testing.assert_close(enc(images), enc(images.float() / 255))
    wide = torch.rand(2, 3, 24, 64)
    assert enc.preprocess(wide).shape == (2, 3, 32, 32)
    centre = torch.rand(2, 3, 32, 32)
    padded = torch.cat([torch.rand(2, 3, 32, 8), centre, torch.rand(2, 3, 32, 8)], dim=3)
    torch.testing.assert_close(enc.preprocess(padded), enc.preprocess(centre))  # centre crop, no resize


def test_unknown_names_and_weights_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DreamdiffError, match=r"'ViT-L-15' is unknown; available: .*dreamdiff-tiny"):
        load_clip_image_encoder("ViT-L-15", None)
    with pytest.raises(DreamdiffError, match=r"'openia' is neither a file nor a tag; known tags .*openai"):
        load_clip_image_encoder("ViT-L-14", "openia")
    with pytest.raises(DreamdiffError, match="neither a file nor a tag"):
        load_clip_image_encoder("dreamdiff-tiny", str(tmp_path / "missing.safetensors"))
    with pytest.raises(DreamdiffError, match=r"\.safetensors"):
        save_random_clip("dreamdiff-tiny", tmp_path / "tiny.pt")


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(DreamdiffError, match="could not load clip 'dreamdiff-tiny'"):
        load_clip_image_encoder("dreamdiff-tiny", str(wrong))


def test_openai_weights_switch_on_quick_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI's CLIP was trained with QuickGELU; open_clip only warns when the config lacks it."""
    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_create_model(name: str, **kwargs: object) -> None:
        seen.update(kwargs, name=name)
        raise Stop

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(Stop):
        load_clip_image_encoder("ViT-L-14", "openai")
    assert seen["force_quick_gelu"] is True and seen["pretrained"] == "openai"
    with pytest.raises(Stop):
        load_clip_image_encoder("ViT-L-14", "laion2b_s32b_b82k")
    assert seen["force_quick_gelu"] is False
