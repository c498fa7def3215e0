"""The EEG conditioner (tokens -> SD context), condition dropout, the CLIP head and the alignment loss."""

from __future__ import annotations

import pytest
import torch

from dreamdiff.models.conditioner import ClipHead, ConditionerConfig, EEGConditioner, clip_alignment_loss


def _tokens(batch: int = 3, dim: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 128, dim, generator=torch.Generator().manual_seed(seed))


def test_conditioner_maps_encoder_tokens_to_the_sd_context() -> None:
    cond = EEGConditioner.from_config(ConditionerConfig(), embed_dim=32)
    assert cond(_tokens()).shape == (3, 77, 768)
    mixer = cond.token_mixer
    assert (mixer[0].in_channels, mixer[0].out_channels, mixer[1].out_channels) == (128, 64, 77)
    assert cond.null is None and "null" not in cond.state_dict()  # no dropout: nothing untrained is saved


def test_conditioner_rejects_tokens_of_the_wrong_shape() -> None:
    cond = EEGConditioner(embed_dim=32)
    with pytest.raises(ValueError, match=r"\[batch, 128, 32\]"):
        cond(torch.zeros(2, 64, 32))


def test_drop_mask_replaces_exactly_the_dropped_rows_with_the_null_context() -> None:
    cond = EEGConditioner(embed_dim=32, context_dim=16, cond_drop_prob=0.3).eval()
    tokens = _tokens(4)
    clean = cond(tokens)
    mask = torch.tensor([True, False, True, False])
    out = cond(tokens, drop_mask=mask)
    torch.testing.assert_close(out[~mask], clean[~mask])
    torch.testing.assert_close(out[mask], cond.null_context(2))
    assert cond.null_context(5).shape == (5, 77, 16)


def test_random_dropout_happens_in_training_only() -> None:
    torch.manual_seed(0)
    cond = EEGConditioner(embed_dim=32, context_dim=16, cond_drop_prob=0.5)
    tokens = _tokens(64)
    clean = cond.eval()(tokens)
    out = cond.train()(tokens)
    dropped = (out - cond.null).abs().amax(dim=(1, 2)) == 0
    kept = (out - clean).abs().amax(dim=(1, 2)) < 1e-6
    assert (dropped ^ kept).all()  # every row is one or the other
    assert 16 < int(dropped.sum()) < 48
    torch.testing.assert_close(cond.eval()(tokens), clean)


def test_null_context_gets_a_gradient_even_when_no_sample_is_dropped() -> None:
    cond = EEGConditioner(embed_dim=32, context_dim=16, cond_drop_prob=0.1).train()
    cond(_tokens(2), drop_mask=torch.zeros(2, dtype=torch.bool)).sum().backward()
    assert cond.null.grad is not None  # DDP needs every parameter in the graph


def test_guidance_without_a_trained_null_context_is_an_error() -> None:
    cond = EEGConditioner(embed_dim=32)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        cond.null_context(1)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        cond(_tokens(1), drop_mask=torch.ones(1, dtype=torch.bool))


def test_clip_head_pools_tokens_into_one_clip_vector() -> None:
    head = ClipHead.from_config(ConditionerConfig(clip_dim=64), embed_dim=32)
    assert head(_tokens(5)).shape == (5, 64)
    assert (head.pool.in_channels, head.pool.out_channels) == (128, 1)


def test_clip_alignment_loss_is_one_minus_cosine() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert clip_alignment_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert clip_alignment_loss(a, 5 * a).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert clip_alignment_loss(a, a.flip(1)).item() == pytest.approx(1.0)
    assert clip_alignment_loss(a, -a).item() == pytest.approx(2.0)
    mixed = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    assert clip_alignment_loss(a, mixed).item() == pytest.approx((1.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="batch, dim"):
        clip_alignment_loss(a, a[:1])


def test_centred_clip_targets_subtract_the_training_mean_and_uncentred_ones_are_untouched() -> None:
    plain = ClipHead(embed_dim=8, num_tokens=4, clip_dim=3)
    centred = ClipHead.from_config(ConditionerConfig(clip_dim=3, clip_center=True), embed_dim=8, num_tokens=4)
    emb = torch.tensor([[10.0, 1.0, 0.0], [10.0, -1.0, 0.0]])
    assert plain.target(emb) is emb and "target_mean" not in plain.state_dict()
    centred.target_mean.copy_(emb.mean(0))
    assert torch.equal(centred.target(emb), torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]))
    assert "target_mean" in centred.state_dict()  # saved with the generator checkpoint
    # why it matters: two images sharing one dominant direction are near-identical to the paper's raw loss
    pred = torch.tensor([[0.0, 1.0, 0.0]])
    assert clip_alignment_loss(pred + torch.tensor([[10.0, 0.0, 0.0]]), emb[1:]) < 0.02
    assert clip_alignment_loss(pred, centred.target(emb[1:])) == pytest.approx(2.0)
