"""The temporal masked signal model: config presets, shapes, masking, the masked-only loss, channel masks."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from dreamdiff.models.msm import (
    MSMConfig,
    MSMEncoder,
    build_msm,
    masked_mse,
    msm_param_counts,
    msm_train_flops_per_sample,
    patchify,
    random_masking,
    unpatchify,
)

TINY = MSMConfig(preset="tiny")


def _eeg(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 128, 512, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_preset_fills_only_missing_fields_and_resolved_config_lists_everything() -> None:
    cfg = MSMConfig.model_validate({"preset": "small", "mask_ratio": 0.5, "depth": 3})
    dumped = cfg.model_dump()
    assert dumped["embed_dim"] == 384 and dumped["depth"] == 3 and dumped["mask_ratio"] == 0.5
    assert set(dumped) == set(MSMConfig.model_fields)
    assert MSMConfig.model_validate(dumped) == cfg  # the resolved config round-trips


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"preset": "tiny", "num_samples": 510}, "num_samples"),
        ({"preset": "tiny", "num_heads": 3}, "embed_dim"),
        ({"preset": "tiny", "mask_ratio": 1.0}, "mask_ratio"),
        ({"preset": "huge"}, "preset"),
        ({"embed_dim": 64}, "depth"),
        ({"preset": "tiny", "bogus": 1}, "bogus"),
    ],
)
def test_bad_config_names_the_field(fields: dict, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        MSMConfig.model_validate(fields)


def test_preset_parameter_counts() -> None:
    large = msm_param_counts(MSMConfig(preset="large"))  # on the meta device: no memory
    small = msm_param_counts(MSMConfig(preset="small"))
    assert abs(large["encoder"] / 297e6 - 1) < 0.05
    assert abs(small["encoder"] / 18.3e6 - 1) < 0.05
    assert abs(large["total"] / 329e6 - 1) < 0.01  # docs/reference-figures.md: 329 M with decoder
    reference = msm_param_counts(MSMConfig(preset="large", mlp_ratio=1.0))
    assert abs(reference["total"] / 165e6 - 1) < 0.01  # the reference code's config: 165 M
    assert build_msm(TINY).num_params() == msm_param_counts(TINY)


def test_flops_match_benchmarks_mfu() -> None:
    # docs/reference-figures.md: 762 samples/s at 3.2% MFU (mlp 1.0), 447 at 3.7% (mlp 4.0), against 989 TFLOP/s.
    for mlp, rate, mfu in ((1.0, 762, 0.032), (4.0, 447, 0.037)):
        flops = msm_train_flops_per_sample(MSMConfig(preset="large", mlp_ratio=mlp))
        assert flops * rate / 989e12 == pytest.approx(mfu, abs=0.0005)


def test_patchify_round_trip_and_layout() -> None:
    eeg = _eeg(2)
    patches = patchify(eeg, 4)
    assert patches.shape == (2, 128, 4 * 128)
    assert torch.equal(patches[1, 5, 2 * 128 + 7], eeg[1, 7, 5 * 4 + 2])  # channel fastest
    assert torch.equal(unpatchify(patches, 128), eeg)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exact_count(ratio: float) -> None:
    tokens = torch.randn(3, 128, 8)
    kept, mask, ids_restore = random_masking(tokens, ratio, _gen())
    keep = round(128 * (1 - ratio))
    assert kept.shape == (3, keep, 8)
    assert (mask.sum(1) == 128 - keep).all()
    # the kept tokens are exactly the unmasked ones, in some order
    padded = torch.cat([kept, torch.zeros(3, 128 - keep, 8)], 1)
    restored = padded.gather(1, ids_restore[..., None].expand(-1, -1, 8))
    assert torch.equal(restored[mask == 0], tokens[mask == 0])


def test_forward_shapes_and_fixed_generator_fixes_mask() -> None:
    model = build_msm(TINY)
    out = model(_eeg(), generator=_gen(1))
    assert out.pred.shape == (4, 128, 4 * 128) and out.mask.shape == (4, 128)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert (out.mask.sum(1) == 128 - TINY.num_visible).all()
    assert torch.equal(model(_eeg(), generator=_gen(1)).mask, out.mask)
    assert (model(_eeg(), mask_ratio=0.5, generator=_gen(1)).mask.sum(1) == 64).all()


def test_loss_counts_masked_tokens_only() -> None:
    model = build_msm(TINY)
    eeg = _eeg()
    with torch.no_grad():
        out = model(eeg, generator=_gen(2))
    target = patchify(eeg, 4)
    base = masked_mse(out.pred, target, out.mask)
    assert base == out.loss
    visible, masked = out.mask == 0, out.mask == 1
    assert masked_mse(out.pred, target + 5.0 * visible[..., None], out.mask) == base
    assert masked_mse(out.pred, target + 5.0 * masked[..., None], out.mask) != base


def test_encoder_never_sees_masked_tokens() -> None:
    model = build_msm(TINY).eval()
    eeg = _eeg()
    out = model(eeg, generator=_gen(3))
    time_masked = out.mask.repeat_interleave(4, dim=1).bool()[:, None, :]
    changed = torch.where(time_masked, eeg + 3.0, eeg)  # new values under the mask only
    out2 = model(changed, generator=_gen(3))
    assert torch.allclose(out2.pred, out.pred, atol=1e-6)
    assert out2.loss != out.loss  # the targets moved


@pytest.mark.parametrize("norm_target", [False, True])
def test_non_real_channels_do_not_change_loss(norm_target: bool) -> None:
    model = build_msm(MSMConfig(preset="tiny", norm_target=norm_target))
    eeg = _eeg()
    channel_mask = torch.ones(4, 128, dtype=torch.bool)
    channel_mask[:, 100:] = False
    channel_mask[0, :10] = False
    garbage = eeg.clone()
    garbage[~channel_mask] = 1e4 * torch.randn(int((~channel_mask).sum()), 512)
    a = model(eeg, channel_mask=channel_mask, generator=_gen(4)).loss
    b = model(garbage, channel_mask=channel_mask, generator=_gen(4)).loss
    assert torch.isfinite(a) and a == b
    assert model(garbage, generator=_gen(4)).loss != a  # without the mask they count


def test_encoder_alone_is_deterministic_and_shaped() -> None:
    encoder = MSMEncoder(TINY).eval()
    eeg = _eeg(3)
    tokens = encoder(eeg)
    assert tokens.shape == (3, 128, 64)
    assert torch.equal(encoder(eeg), tokens)
    with pytest.raises(ValueError, match=r"\[batch, 128, 512\]"):
        encoder(torch.randn(3, 64, 512))


def test_encoder_weights_move_between_models() -> None:
    model = build_msm(TINY)
    encoder = MSMEncoder(TINY)
    encoder.load_state_dict(model.encoder.state_dict())  # positions are buffers rebuilt from config
    assert "pos_embed" not in encoder.state_dict()
    assert torch.equal(encoder.eval()(_eeg(2)), model.encoder.eval()(_eeg(2)))
