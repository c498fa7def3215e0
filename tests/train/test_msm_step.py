"""The MSM training step, the optimiser set-up, the lr schedule and the reconstruction plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dreamdiff.models.msm import MSMConfig, build_msm
from dreamdiff.train.msm_plot import plot_reconstructions
from dreamdiff.train.msm_step import msm_eval_loss, msm_train_step
from dreamdiff.train.optim import WarmupCosine, build_optimizer, param_groups, warmup_cosine

TINY = MSMConfig(preset="tiny")


def _eeg(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 128, 512, generator=torch.Generator().manual_seed(seed))


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = build_msm(TINY)
    optimizer = build_optimizer(model, lr=3e-3)
    # a learnable signal: smooth waves, shared across channels up to a gain
    t = torch.linspace(0, 8 * math.pi, 512)
    eeg = torch.sin(t * torch.rand(8, 1, 1) + torch.rand(8, 1, 1)) * torch.randn(1, 128, 1)
    eeg = {"eeg": eeg.half(), "channel_mask": torch.ones(8, 128, dtype=torch.bool)}  # as stored
    first = msm_eval_loss(model, eeg, generator=torch.Generator().manual_seed(0))
    for _ in range(30):
        stats = msm_train_step(model, optimizer, [eeg], lr=3e-3, grad_clip=0.8, autocast_dtype=None)
        assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0 and stats["lr"] == 3e-3
    last = msm_eval_loss(model, eeg, generator=torch.Generator().manual_seed(0))
    assert last < 0.7 * first
    assert model.training  # eval restored the mode


def test_two_micro_batches_equal_one_batch() -> None:
    """Plain SGD at lr 1 turns the step's accumulated gradient into the parameter change, so the two
    updates must agree. The same generator seed draws the same masks: 8 rows at once or 4 + 4 in turn."""
    eeg = _eeg(8)
    torch.manual_seed(0)
    start = build_msm(TINY).state_dict()
    updated = []
    for batches in ([eeg], [eeg[:4], eeg[4:]]):
        model = build_msm(TINY)
        model.load_state_dict(start)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        gen = torch.Generator().manual_seed(7)
        msm_train_step(model, sgd, batches, lr=1.0, grad_clip=None, generator=gen)
        assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)
        updated.append(model.state_dict())
    for name, value in updated[0].items():
        assert not torch.equal(value, start[name]), name  # every parameter moved
        torch.testing.assert_close(updated[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_grad_clip_bounds_the_update_and_reports_the_raw_norm() -> None:
    torch.manual_seed(0)
    model = build_msm(TINY)
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = msm_train_step(model, sgd, [_eeg(4)], lr=1.0, grad_clip=1e-3)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert stats["grad_norm"] > 1e-3
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_float16_autocast_is_refused() -> None:
    model = build_msm(TINY)
    with pytest.raises(ValueError, match="bfloat16"):
        msm_train_step(
            model, build_optimizer(model, 1e-3), [_eeg(2)], lr=1e-3, grad_clip=1.0, autocast_dtype=torch.float16
        )


def test_bf16_autocast_step_runs() -> None:
    model = build_msm(TINY)
    stats = msm_train_step(
        model, build_optimizer(model, 1e-3), [_eeg(2)], lr=1e-3, grad_clip=1.0, autocast_dtype=torch.bfloat16
    )
    assert math.isfinite(stats["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_param_groups_exempt_norms_biases_and_tokens() -> None:
    model = build_msm(TINY)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    exempt = {n for n, p in model.named_parameters() if id(p) in ids}
    expected = {
        "encoder.cls_token",
        "decoder.mask_token",
        "encoder.norm.weight",
        "encoder.norm.bias",
        "encoder.blocks.0.norm1.weight",
        "encoder.blocks.0.attn.qkv.bias",
        "encoder.patch_embed.bias",
    }
    assert expected <= exempt
    assert all(p.ndim < 2 for p in no_decay["params"]) and all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    optimizer = build_optimizer(model, lr=2.5e-4)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and not optimizer.defaults["fused"]


def test_warmup_cosine_at_known_steps() -> None:
    kw = {"warmup_steps": 10, "total_steps": 110, "base_lr": 1.0, "min_lr": 0.1}
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(4, **kw) == pytest.approx(0.5)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine(500, **kw) == pytest.approx(0.1)
    schedule = WarmupCosine(base_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert [schedule(s) for s in range(0, 120, 7)] == [warmup_cosine(s, **kw) for s in range(0, 120, 7)]


@pytest.mark.parametrize("norm_target", [False, True])
def test_plot_reconstructions_writes_png(tmp_path: Path, norm_target: bool) -> None:
    model = build_msm(MSMConfig(preset="tiny", norm_target=norm_target))
    channel_mask = torch.ones(2, 128, dtype=torch.bool)
    channel_mask[:, 1] = False
    path = plot_reconstructions(
        model,
        _eeg(2),
        tmp_path / "recon" / "epoch_001.png",
        channels=(0, 1, 5),
        channel_mask=channel_mask,
        generator=torch.Generator().manual_seed(0),
        title="epoch 1",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.training
