"""Scoring generated images against their stimuli: arrays and tensors in, numbers out (no Ray, no files).

:func:`score_batch` keeps per-image scores of one batch (so a caller never holds all images), :func:`summarise`
turns them into figures, and :func:`evaluate_images` does both for any image source, e.g. the stimuli themselves
as an upper bound. Each figure carries its chance level and what that chance is:

* n-way top-k (the paper's): ground truth = the classifier's argmax on the stimulus image; a generated
  image scores against ``n_way - 1`` random other classes, ``trials`` times; mean over EEGs and samples.
  Chance = top_k / n_way. Also per subject, as the paper reports one subject's figure.
* CLIP image-image similarity: cosine of CLIP embeddings, generated vs its stimulus; baseline: the mean
  over all (generated, stimulus of a test EEG showing another image) pairs.
* SSIM and PCC: generated vs stimulus at a common size; baseline: each generated image against the
  stimulus of the next EEG of its batch that shows another image.
* EEG -> image retrieval top-1 / top-5 (:func:`eeg_image_retrieval`): the generator's CLIP head on the EEG
  against the CLIP embeddings of the distinct test images (a gallery, so an image shown in several trials is
  one candidate); chance k / M.
* FID (:func:`fid_or_reason`), or the reason it was skipped where torch-fidelity or the Inception weights are
  missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamdiff.errors import DreamdiffError
from dreamdiff.eval import metrics
from dreamdiff.eval.classifier import ImageClassifier

MIN_SSIM_SIDE = 6  # SSIM's 11-px Gaussian window pads by 5 px per side
RETRIEVAL_KS = (1, 5)


def float_images(images: np.ndarray | Tensor) -> Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    return x.movedim(-1, -3).float() / 255.0


def _resize(images: Tensor, side: int) -> Tensor:
    if images.shape[-1] == side and images.shape[-2] == side:
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _in_batches(fn: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(chunk).float().cpu() for chunk in images.split(batch_size)])


def score_batch(
    stimuli: np.ndarray,
    generated: np.ndarray,
    image_ids: Sequence[str],
    classifier: ImageClassifier,
    clip: nn.Module | None,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """Per-image scores of one batch: stimuli uint8 [B, H, W, 3], generated uint8 [B, S, h, w, 3].

    Returns classifier probabilities (``stim_probs`` [B, K], ``gen_probs`` [B, S, K]), CLIP embeddings
    (``stim_emb`` [B, d], ``gen_emb`` [B, S, d], when ``clip``), ``ssim`` / ``pcc`` [B, S] at the smaller of the
    two sizes, and their mismatched baselines ``ssim_mismatch`` / ``pcc_mismatch`` [B, S] against the next EEG's
    stimulus in the batch (NaN where that shows the same image, or the batch has one EEG).
    """
    if stimuli.ndim != 4 or generated.ndim != 5 or len(stimuli) != len(generated) or len(stimuli) != len(image_ids):
        raise ValueError(
            f"stimuli [B, H, W, 3], generated [B, S, h, w, 3] and image_ids [B] must agree, got "
            f"{list(stimuli.shape)}, {list(generated.shape)}, {len(image_ids)}"
        )
    b, s = generated.shape[:2]
    stim, gen = float_images(stimuli), float_images(generated).flatten(0, 1)
    out = {
        "stim_probs": _in_batches(classifier.predict_proba, stim, batch_size),
        "gen_probs": _in_batches(classifier.predict_proba, gen, batch_size).view(b, s, -1),
    }
    if clip is not None:
        out["stim_emb"] = _in_batches(clip, stim, batch_size)
        out["gen_emb"] = _in_batches(clip, gen, batch_size).view(b, s, -1)
    side = min(stim.shape[-1], stim.shape[-2], gen.shape[-1], gen.shape[-2])
    gen_c, stim_c = _resize(gen, side), _resize(stim, side)
    partner = torch.roll(torch.arange(b), -1)
    same = torch.tensor([image_ids[i] == image_ids[int(j)] for i, j in enumerate(partner)])
    for name, fn in (("ssim", metrics.ssim), ("pcc", metrics.pcc)):
        if name == "ssim" and side < MIN_SSIM_SIDE:
            continue
        own = fn(gen_c, stim_c.repeat_interleave(s, 0)).float()
        other = fn(gen_c, stim_c[partner].repeat_interleave(s, 0)).float()
        out[name] = own.view(b, s)
        out[f"{name}_mismatch"] = other.view(b, s).masked_fill(same[:, None], float("nan"))
    return out


def concat_scores(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Scores of consecutive batches -> scores of all rows."""
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _mean(values: Tensor) -> float | None:
    values = values[~torch.isnan(values)]
    return float(values.double().mean()) if len(values) else None


def summarise(
    scores: dict[str, Tensor],
    image_ids: Sequence[str],
    *,
    n_way: int,
    top_k: int,
    trials: int,
    seed: int,
    subjects: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Figures from per-image scores (see the module docstring). ``subjects`` (one per EEG) adds the n-way
    top-k per subject. Returns {metric: {"value", "chance", "chance_is", ...}}."""
    n, s, num_classes = scores["gen_probs"].shape
    if not 2 <= n_way <= num_classes:
        raise DreamdiffError(f"n_way ({n_way}) must be at most the classifier's number of classes ({num_classes})")
    gt = metrics.ground_truth_from_classifier(scores["stim_probs"])

    def top(rows: np.ndarray) -> float:  # every subset draws its trials from the same seed
        probs, truth = scores["gen_probs"][rows].flatten(0, 1), gt[rows].repeat_interleave(s)
        return metrics.n_way_top_k(probs, truth, n_way, top_k, trials, torch.Generator().manual_seed(seed))

    every = np.arange(n)
    n_way_entry: dict[str, Any] = {
        "value": top(every),
        "chance": metrics.n_way_chance(n_way, top_k),
        "chance_is": "top_k / n_way",
        "n_way": n_way,
        "top_k": top_k,
        "trials": trials,
        "ground_truth": "classifier argmax on the stimulus image",
    }
    if subjects is not None:
        keys = np.asarray(subjects)
        n_way_entry["by_subject"] = {
            str(key): {"value": top(np.flatnonzero(keys == key)), "num_eeg": int((keys == key).sum())}
            for key in np.unique(keys).tolist()
        }
    figures: dict[str, dict[str, Any]] = {f"n_way_top_{top_k}": n_way_entry}
    if "gen_emb" in scores:
        gen_emb, stim_emb = scores["gen_emb"], scores["stim_emb"]
        own = metrics.clip_similarity(gen_emb.flatten(0, 1), stim_emb.repeat_interleave(s, 0))
        ids = np.asarray(image_ids)
        other = torch.from_numpy(ids[:, None] != ids[None, :]).repeat_interleave(s, 0)  # [N * S, N]
        cross = F.normalize(gen_emb.flatten(0, 1), dim=1) @ F.normalize(stim_emb, dim=1).T
        figures["clip_similarity"] = {
            "value": _mean(own),
            "chance": _mean(cross[other]),
            "chance_is": "mean over pairs of a generated image and a test stimulus showing another image",
        }
    for name in ("ssim", "pcc"):
        if name in scores:
            figures[name] = {
                "value": _mean(scores[name].flatten()),
                "chance": _mean(scores[f"{name}_mismatch"].flatten()),
                "chance_is": "each generated image against the stimulus of the next EEG of its batch, where that "
                "shows another image",
            }
        else:
            figures[name] = {"skipped": f"images under {MIN_SSIM_SIDE} px are too small for an 11-px SSIM window"}
    return figures


def evaluate_images(
    stimuli: np.ndarray,
    generated: np.ndarray,
    image_ids: Sequence[str],
    classifier: ImageClassifier,
    clip: nn.Module | None = None,
    *,
    n_way: int,
    top_k: int = 1,
    trials: int = 50,
    seed: int = 0,
    subjects: Sequence[int] | None = None,
    batch_size: int = 32,
) -> dict[str, dict[str, Any]]:
    """Score generated images [N, S, h, w, 3] against their stimuli [N, H, W, 3] (uint8), from any image
    source: the pure core of the stage (no files, no generator)."""
    parts = []
    for i in range(0, len(stimuli), batch_size):
        chunk = slice(i, i + batch_size)
        parts.append(score_batch(stimuli[chunk], generated[chunk], image_ids[chunk], classifier, clip, batch_size))
    scores = concat_scores(parts)
    return summarise(scores, image_ids, n_way=n_way, top_k=top_k, trials=trials, seed=seed, subjects=subjects)


def eeg_image_retrieval(
    eeg_emb: Tensor, stim_emb: Tensor, image_ids: Sequence[str], ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, dict[str, Any]]:
    """EEG -> image retrieval: for each EEG's CLIP-head vector, is its own image among the k most
    cosine-similar of the M distinct test images? Ties count in expectation. k is capped at M."""
    if eeg_emb.dim() != 2 or eeg_emb.shape != stim_emb.shape or len(eeg_emb) != len(image_ids):
        raise ValueError(
            f"eeg_emb and stim_emb must be [N, d] with N = len(image_ids), got {list(eeg_emb.shape)}, "
            f"{list(stim_emb.shape)}, {len(image_ids)}"
        )
    gallery_ids, first, own = np.unique(np.asarray(image_ids), return_index=True, return_inverse=True)
    keys = F.normalize(stim_emb[torch.from_numpy(first)].float(), dim=1)
    sim = F.normalize(eeg_emb.float(), dim=1) @ keys.T  # [N, M]
    target = sim.gather(1, torch.from_numpy(own.reshape(-1))[:, None])
    above, tied = (sim > target).sum(1), (sim == target).sum(1) - 1
    m = len(gallery_ids)
    out = {}
    for k in ks:
        k_used = min(k, m)
        hits = ((k_used - above).float() / (tied + 1).float()).clamp(0, 1)
        out[f"retrieval_top_{k}"] = {
            "value": float(hits.mean()),
            "chance": k_used / m,
            "chance_is": "k / gallery size",
            "k": k_used,
            "gallery_size": m,
        }
    return out


def fid_or_reason(real: Tensor, fake: Tensor) -> dict[str, Any]:
    """FID with torchmetrics' InceptionV3 (2048 features), or why it could not run (no torch-fidelity, weights
    unreachable offline, fewer than 2 images); never fails the evaluation."""
    if len(real) < 2 or len(fake) < 2:
        return {"skipped": f"FID needs >= 2 real and fake images, got {len(real)} and {len(fake)}"}
    try:
        value = metrics.fid(real, fake)
    except (ImportError, OSError, RuntimeError) as err:
        return {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()}
    return {
        "value": value,
        "features": "InceptionV3 pool 2048 (torchmetrics)",
        "num_real": len(real),
        "num_fake": len(fake),
        "note": "biased upwards at small N: compare only at equal N and image size",
    }
