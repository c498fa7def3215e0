"""Evaluation metrics for generated images: the paper's n-way top-k, retrieval, PCC, SSIM, CLIP, FID.

Pure torch (+ torchmetrics): no Ray, so the same functions run in a worker, a notebook or the GPU
benchmark machine.

n-way top-k (DreamDiffusion, after MinD-Vis): an ImageNet classifier labels each stimulus image (its
argmax is the ground-truth class, :func:`ground_truth_from_classifier`); for a generated image, one
trial draws ``n_way - 1`` distinct classes other than the ground truth uniformly at random and scores a
hit when the ground truth is among the ``top_k`` most probable of those ``n_way`` classes. The paper
reports 50-way top-1 over 50 trials per image, averaged over test EEGs and samples; chance is
``top_k / n_way`` (:func:`n_way_chance`).

Ties are broken uniformly at random, in expectation: with ``r`` drawn classes strictly above the ground
truth and ``t`` tied with it, a trial scores ``clip((top_k - r) / (t + 1), 0, 1)``. So a degenerate
classifier output (constant, or probabilities underflowed to 0) scores chance, never 0 or 1. Only the
order of the scores matters: logits or log-probabilities give the same result as probabilities, with
fewer ties.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance


def n_way_chance(n_way: int, top_k: int = 1) -> float:
    """Expected n-way top-k accuracy of an uninformative generator: top_k / n_way."""
    return top_k / n_way


def _tie_aware_hits(above: Tensor, tied: Tensor, top_k: int) -> Tensor:
    """Expected hit under random tie-breaking, given counts strictly above and tied with the target."""
    return ((top_k - above).float() / (tied + 1).float()).clamp(0.0, 1.0)


def n_way_top_k(
    probs: Tensor,
    gt: Tensor,
    n_way: int = 50,
    top_k: int = 1,
    trials: int = 50,
    generator: torch.Generator | None = None,
) -> float:
    """The paper's n-way top-k accuracy of generated images, as a mean hit rate over rows and trials.

    probs: [N, num_classes] classifier scores of the generated images (probabilities, or any monotone
    transform of them); gt: [N] long ground-truth classes (from the stimulus images). ``generator``
    (on probs' device) makes the class draws reproducible.
    """
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be [N, num_classes] with N >= 1, got {list(probs.shape)}")
    n, num_classes = probs.shape
    if gt.shape != (n,) or gt.dtype != torch.long:
        raise ValueError(f"gt must be a long tensor of shape [{n}], got {gt.dtype} {list(gt.shape)}")
    if not 2 <= n_way <= num_classes:
        raise ValueError(f"n_way must be in [2, num_classes={num_classes}], got {n_way}")
    if not 1 <= top_k < n_way:
        raise ValueError(f"top_k must be in [1, n_way={n_way}), got {top_k}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    gt = gt.to(probs.device)
    if bool(((gt < 0) | (gt >= num_classes)).any()):
        raise ValueError(f"gt must hold classes in [0, {num_classes}), got values {int(gt.min())}..{int(gt.max())}")
    if bool(torch.isnan(probs).any()):
        raise ValueError("probs must not contain NaN")

    target = probs.gather(1, gt[:, None])  # [N, 1]
    is_gt = F.one_hot(gt, num_classes).bool()
    hits = torch.zeros((), dtype=torch.float64, device=probs.device)
    for _ in range(trials):
        # uniform random keys, the ground truth pushed last: the n_way - 1 smallest keys are a uniform
        # random subset of the other classes, drawn independently for every row
        keys = torch.rand(n, num_classes, generator=generator, device=probs.device).masked_fill(is_gt, 2.0)
        drawn = probs.gather(1, keys.topk(n_way - 1, dim=1, largest=False, sorted=False).indices)
        hits += _tie_aware_hits((drawn > target).sum(1), (drawn == target).sum(1), top_k).sum()
    return float(hits) / (n * trials)


def ground_truth_from_classifier(probs_of_stimulus: Tensor) -> Tensor:
    """Ground-truth classes [N] (long): the classifier's argmax on each stimulus image, as in the paper.

    The stimulus set's own labels (e.g. ImageNet-EEG's 40 synsets) are not used: the generated image is
    judged in the classifier's label space, against what the classifier sees in the stimulus.
    """
    if probs_of_stimulus.dim() != 2:
        raise ValueError(f"probs_of_stimulus must be [N, num_classes], got {list(probs_of_stimulus.shape)}")
    return probs_of_stimulus.argmax(dim=1)


def _check_pairs(name_a: str, a: Tensor, name_b: str, b: Tensor, dims: int | None) -> None:
    """a and b: one shape, N >= 1 rows, exactly `dims` dimensions (None: at least 2)."""
    bad_dims = a.dim() < 2 if dims is None else a.dim() != dims
    if bad_dims or a.shape != b.shape or a.shape[0] == 0:
        form = "[N, ...]" if dims is None else f"{dims}-d"
        raise ValueError(
            f"{name_a} and {name_b} must have the same {form} shape with N >= 1, "
            f"got {list(a.shape)} and {list(b.shape)}"
        )


def retrieval_top_k(query: Tensor, keys: Tensor, k: int) -> float:
    """Fraction of queries whose own key (same row) is among the k keys most cosine-similar to it.

    EEG -> image retrieval through the CLIP head: query = head(EEG) [N, d], keys = CLIP image
    embeddings [N, d] of the matching stimuli. Chance is k / N. Ties count in expectation, as above.
    """
    _check_pairs("query", query, "keys", keys, 2)
    n = query.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    sim = F.normalize(query.float(), dim=1) @ F.normalize(keys.float(), dim=1).T  # [N, N]
    own = sim.diagonal()[:, None]
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    above = ((sim > own) & off).sum(1)
    tied = ((sim == own) & off).sum(1)
    return float(_tie_aware_hits(above, tied, k).mean())


def pcc(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each image pair over all its pixels and channels: [N].

    A constant image has no defined correlation; it scores 0 (no linear relation), so means stay finite.
    """
    _check_pairs("a", a, "b", b, None)
    x = a.flatten(1).double()
    y = b.flatten(1).double()
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    return F.cosine_similarity(x, y, dim=1, eps=1e-12).float()


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Structural similarity of each image pair [N]: images [N, 3, H, W] in [0, 1], Gaussian window 11/1.5."""
    _check_pairs("a", a, "b", b, 4)
    return structural_similarity_index_measure(a.float(), b.float(), data_range=1.0, reduction="none")


def clip_similarity(emb_a: Tensor, emb_b: Tensor) -> Tensor:
    """Cosine similarity of each embedding pair [N] (e.g. CLIP image embeddings of generated vs stimulus)."""
    _check_pairs("emb_a", emb_a, "emb_b", emb_b, 2)
    return F.cosine_similarity(emb_a.float(), emb_b.float(), dim=1)


def fid(
    real: Tensor,
    fake: Tensor,
    feature_extractor: nn.Module | int = 2048,
    batch_size: int = 64,
) -> float:
    """Frechet distance between the feature statistics of real and fake images [N, 3, H, W] in [0, 1].

    An int picks that layer (64, 192, 768, 2048) of torchmetrics' FID InceptionV3: it needs the
    ``torch-fidelity`` package and its InceptionV3 weights reachable (downloaded on first use, or in
    the torch hub cache); images are resized to 299 px. An ``nn.Module`` is used as the feature
    extractor instead: it gets the float images as given and must return [batch, d] (a ``num_features``
    attribute saves a probe forward). FID is biased upwards for small N and needs N >= 2 on each side;
    compare values only at equal N and image size.
    """
    for name, images in (("real", real), ("fake", fake)):
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 2:
            raise ValueError(f"{name} must be [N >= 2, 3, H, W] in [0, 1], got {list(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    metric = FrechetInceptionDistance(
        feature=feature_extractor, normalize=True, input_img_size=tuple(real.shape[1:])
    ).to(real.device)
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for batch in images.float().split(batch_size):
                metric.update(batch.to(real.device), real=is_real)
        return float(metric.compute())
