"""Metrics: the paper's n-way top-k against closed forms, retrieval, PCC/SSIM/CLIP similarity, FID."""

from __future__ import annotations

from math import comb

import pytest
import torch
from torch import Tensor, nn

from dreamdiff.eval.metrics import (
    clip_similarity,
    fid,
    ground_truth_from_classifier,
    n_way_chance,
    n_way_top_k,
    pcc,
    retrieval_top_k,
    ssim,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _probs_where_gt_beats(beats: Tensor, num_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random probabilities and, per row, a ground truth that beats exactly beats[i] other classes."""
    probs = torch.rand(len(beats), num_classes, generator=_gen(seed)).softmax(dim=1)
    ranks = probs.argsort(dim=1)  # ascending: ranks[i, m] beats exactly m classes
    return probs, ranks.gather(1, beats[:, None]).squeeze(1)


def _hit_probability(num_classes: int, beaten: int, n_way: int, top_k: int) -> float:
    """Closed form: of the n_way - 1 classes drawn from the num_classes - 1 others, fewer than top_k are
    among the num_classes - 1 - beaten that outrank the ground truth (hypergeometric)."""
    above = num_classes - 1 - beaten
    draws = n_way - 1
    hits = sum(comb(above, j) * comb(beaten, draws - j) for j in range(top_k))
    return hits / comb(num_classes - 1, draws)


def test_gt_highest_scores_one_and_lowest_scores_zero() -> None:
    probs = torch.rand(20, 100, generator=_gen()).softmax(dim=1)
    assert n_way_top_k(probs, probs.argmax(1), trials=5, generator=_gen(1)) == 1.0
    assert n_way_top_k(probs, probs.argmin(1), trials=5, generator=_gen(1)) == 0.0
    assert n_way_top_k(probs, probs.argmin(1), n_way=100, top_k=99, trials=3) == 0.0


@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_hypergeometric_closed_form(top_k: int) -> None:
    num_classes, n_way = 1000, 50
    beats = torch.linspace(900, 998, 200).long()  # hit rates from ~0.005 to ~1
    probs, gt = _probs_where_gt_beats(beats, num_classes)
    estimate = n_way_top_k(probs, gt, n_way=n_way, top_k=top_k, trials=100, generator=_gen(2))
    exact = sum(_hit_probability(num_classes, int(m), n_way, top_k) for m in beats) / len(beats)
    assert 0.1 < exact < 0.9
    assert estimate == pytest.approx(exact, abs=0.01)  # 20,000 draws: s.d. <= 0.0035


def test_only_the_order_of_scores_matters() -> None:
    probs, gt = _probs_where_gt_beats(torch.arange(30, 60), 60)
    a = n_way_top_k(probs, gt, n_way=10, trials=20, generator=_gen(3))
    b = n_way_top_k(probs.log(), gt, n_way=10, trials=20, generator=_gen(3))
    assert a == b


def test_random_probabilities_score_chance() -> None:
    # a row's hit rate is about u^49 for the ground truth's quantile u: heavy-tailed, so many rows
    probs = torch.rand(4000, 200, generator=_gen(4))
    gt = torch.randint(0, 200, (4000,), generator=_gen(5))
    acc = n_way_top_k(probs, gt, n_way=50, trials=10, generator=_gen(6))
    assert acc == pytest.approx(n_way_chance(50, 1), abs=0.006)
    acc5 = n_way_top_k(probs, gt, n_way=20, top_k=5, trials=20, generator=_gen(7))
    assert acc5 == pytest.approx(n_way_chance(20, 5), abs=0.02)


def test_ties_score_chance_exactly() -> None:
    """A collapsed classifier (constant output, or probabilities underflowed to 0) is no better than chance."""
    probs = torch.full((8, 100), 0.01)
    gt = torch.arange(8)
    assert n_way_top_k(probs, gt, n_way=50, top_k=1, trials=3) == pytest.approx(1 / 50)
    assert n_way_top_k(probs, gt, n_way=10, top_k=3, trials=3) == pytest.approx(3 / 10)


def test_seeded_generator_is_reproducible() -> None:
    probs, gt = _probs_where_gt_beats(torch.full((50,), 95), 100)
    first = n_way_top_k(probs, gt, n_way=20, trials=10, generator=_gen(8))
    assert first == n_way_top_k(probs, gt, n_way=20, trials=10, generator=_gen(8))
    assert first != n_way_top_k(probs, gt, n_way=20, trials=10, generator=_gen(9))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(n_way=11), "n_way"),
        (dict(n_way=1), "n_way"),
        (dict(n_way=5, top_k=5), "top_k"),
        (dict(top_k=0, n_way=5), "top_k"),
        (dict(trials=0, n_way=5), "trials"),
        (dict(probs=torch.rand(4)), "probs"),
        (dict(gt=torch.zeros(3, dtype=torch.long)), "gt"),
        (dict(gt=torch.zeros(4)), "gt"),
        (dict(gt=torch.tensor([0, 1, 2, 10])), "gt"),
        (dict(probs=torch.full((4, 10), float("nan"))), "probs"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, name: str) -> None:
    args = dict(probs=torch.rand(4, 10), gt=torch.tensor([0, 1, 2, 3]), n_way=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        n_way_top_k(**args)


def test_ground_truth_is_the_classifier_argmax() -> None:
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert ground_truth_from_classifier(probs).tolist() == [1, 0]
    with pytest.raises(ValueError, match="probs_of_stimulus"):
        ground_truth_from_classifier(torch.rand(3))


def test_retrieval_identity_and_shuffled() -> None:
    query = torch.randn(1000, 32, generator=_gen(10))
    assert retrieval_top_k(query, query * 3.0, k=1) == 1.0
    keys = query[torch.randperm(1000, generator=_gen(11))]
    assert retrieval_top_k(query, keys, k=50) == pytest.approx(50 / 1000, abs=0.025)
    assert retrieval_top_k(query, torch.ones(1000, 32), k=10) == pytest.approx(10 / 1000)  # all tied
    with pytest.raises(ValueError, match="k must"):
        retrieval_top_k(query, keys, k=0)
    with pytest.raises(ValueError, match="query and keys"):
        retrieval_top_k(query, keys[:10], k=1)


def test_pcc() -> None:
    a = torch.rand(4, 3, 8, 8, generator=_gen(12))
    assert torch.allclose(pcc(a, a), torch.ones(4))
    assert torch.allclose(pcc(a, 0.5 * a + 0.2), torch.ones(4), atol=1e-6)  # affine-invariant
    assert torch.allclose(pcc(a, 1.0 - a), -torch.ones(4))
    b = torch.rand(4, 3, 8, 8, generator=_gen(13))
    assert pcc(a, b).abs().max() < 0.3
    assert pcc(a, torch.full_like(a, 0.5)).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="a and b"):
        pcc(a, b[:2])


def test_ssim() -> None:
    a = torch.rand(3, 3, 16, 16, generator=_gen(14))
    b = torch.rand(3, 3, 16, 16, generator=_gen(15))
    assert torch.allclose(ssim(a, a), torch.ones(3))
    assert ssim(a, b).shape == (3,)
    assert ssim(a, b).max() < 0.2
    with pytest.raises(ValueError, match="a and b"):
        ssim(a[0], b[0])


def test_clip_similarity() -> None:
    e = torch.randn(5, 16, generator=_gen(16))
    assert torch.allclose(clip_similarity(e, 2.0 * e), torch.ones(5))
    assert torch.allclose(clip_similarity(e, -e), -torch.ones(5))
    x, y = torch.eye(4)[:2], torch.eye(4)[2:]
    assert clip_similarity(x, y).tolist() == [0.0, 0.0]


class _TinyFeatures(nn.Module):
    """A fixed random projection of 4x4-pooled images: 8 features."""

    def __init__(self, with_num_features: bool) -> None:
        super().__init__()
        if with_num_features:
            self.num_features = 8
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 8))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


@pytest.mark.parametrize("with_num_features", [True, False])
def test_fid_with_a_custom_feature_extractor(with_num_features: bool) -> None:
    extractor = _TinyFeatures(with_num_features)
    real = torch.rand(64, 3, 16, 16, generator=_gen(17))
    assert abs(fid(real, real, extractor, batch_size=20)) < 1e-3
    other = torch.rand(64, 3, 16, 16, generator=_gen(18))
    shifted = (other * 0.6 + 0.4).clamp(0, 1)
    same_distribution = fid(real, other, extractor)
    assert fid(real, shifted, extractor) > 10 * max(same_distribution, 1e-3)
    with pytest.raises(ValueError, match="fake"):
        fid(real, real[:1], extractor)
