"""The evaluate stage: generate images for held-out EEG and score them as the paper does, and more.

One process, torch alone (no Ray): read the paired rows' metadata, pick the test rows by split protocol
(:mod:`dreamdiff.eval.splits`), load generator, classifier and CLIP tower (all before the expensive part, so
bad input fails in seconds), then generate ``samples_per_eeg`` images per EEG batch by batch, writing PNGs
and scoring each batch as it comes (:func:`score_batch`), so memory holds per-image scores, not all images.
:func:`summarise` turns the scores into figures; :func:`evaluate_images` (both, on arrays) is the pure
entry point that tests and notebooks use with any image source, e.g. the stimuli themselves as an upper bound.

Figures, each with its protocol, seed, counts and chance level (results.json):

* n-way top-k (the paper's): ground truth = the classifier's argmax on the stimulus image; a generated
  image scores against ``n_way - 1`` random other classes, ``trials`` times; mean over EEGs and samples.
  Chance = top_k / n_way. Also per subject (the paper's 45.8 % is subject 4).
* CLIP image-image similarity: cosine of CLIP embeddings, generated vs its stimulus; baseline: the mean
  over all (generated, stimulus of a test EEG showing another image) pairs.
* SSIM and PCC: generated vs stimulus at a common size; baseline: each generated image against the
  stimulus of the next EEG of its batch that shows another image.
* EEG -> image retrieval top-1 / top-5: the generator's CLIP head on the EEG against the CLIP embeddings of
  the distinct test images (a gallery, so an image shown in several trials is one candidate); chance k / M.
* FID only when asked, skipped with the reason where torch-fidelity or the Inception weights are missing.

Seeds: EEG ``e`` gets the sampling seed :func:`eeg_seed` ``(cfg.seed, epoch_id)``, so its images do not
depend on the batch, the protocol or ``max_eeg``; trial draws use ``cfg.seed``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn

from dreamdiff.config import EvaluateConfig, read_yaml, record_config, validate_config
from dreamdiff.models.sampling import torch_compile_mode
from dreamdiff.data.synthetic import SynthConfig, render_image
from dreamdiff.errors import DreamdiffError
from dreamdiff.eval import metrics
from dreamdiff.eval.classifier import (
    VIT_H14_SWAG,
    ImageClassifier,
    load_image_classifier,
    save_classifier,
    train_synthetic_classifier,
)
from dreamdiff.eval.splits import Split, split_rows
from dreamdiff.models.clip import FrozenClipImage, load_clip_image_encoder
from dreamdiff.models.generator import SPEC_FILE, Generator, inference_dtype
from dreamdiff.report import image_grid, write_report

log = logging.getLogger(__name__)

META_COLUMNS = ("epoch_id", "dataset", "subject", "block", "split", "image_id", "label", "class_name")
SYNTH_DATASET = "SynthEEG-Image"
MIN_SSIM_SIDE = 6  # SSIM's 11-px Gaussian window pads by 5 px per side
RETRIEVAL_KS = (1, 5)
PAPER_CLIP = ("ViT-L-14", "openai")


# ----------------------------------------------------------------------------------------- reading rows


def read_paired_meta(data: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The paired shard files under ``data`` and their rows' metadata, sorted by epoch_id (so selections do not
    depend on how rows were sharded); ``_file`` / ``_row`` locate each row. Epoch-only shards are ignored."""
    from dreamdiff.data.reader import shard_files  # imports Ray: keep the scoring core importable without it

    files = [f for f in shard_files(data) if "image" in pq.read_schema(f).names]
    if not files:
        raise DreamdiffError(f"data: {data} holds no paired shards (rows with an image column); give paired shards")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*META_COLUMNS, "_file", "_row")}
    for index, file in enumerate(files):
        table = pq.read_table(file, columns=list(META_COLUMNS))
        for name in META_COLUMNS:
            parts[name].append(table.column(name).to_numpy(zero_copy_only=False))
        parts["_file"].append(np.full(table.num_rows, index))
        parts["_row"].append(np.arange(table.num_rows))
    meta = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    order = np.argsort(meta["epoch_id"].astype(str), kind="stable")
    return files, {name: values[order] for name, values in meta.items()}


def load_rows(files: Sequence[str], meta: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, Any]:
    """EEG (float32 [N, C, T]), channel masks (bool [N, C]) and encoded stimulus images of ``rows`` (indices
    into ``meta``), in that order; one shard file in memory at a time."""
    eeg: list[np.ndarray | None] = [None] * len(rows)
    mask: list[np.ndarray | None] = [None] * len(rows)
    images: list[bytes | None] = [None] * len(rows)
    for index in np.unique(meta["_file"][rows]):
        mine = np.flatnonzero(meta["_file"][rows] == index)
        table = pq.read_table(files[index], columns=["eeg", "channel_mask", "image"])
        table = table.take(pa.array(meta["_row"][rows[mine]])).combine_chunks()
        file_eeg = table.column("eeg").combine_chunks().to_numpy_ndarray().astype(np.float32)
        file_mask = table.column("channel_mask").combine_chunks().to_numpy_ndarray().astype(bool)
        for k, position in enumerate(mine):
            eeg[position], mask[position] = file_eeg[k], file_mask[k]
            images[position] = table.column("image")[k].as_py()
    return {"eeg": np.stack(eeg), "channel_mask": np.stack(mask), "image": images}


def decode_stimulus(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3]: centre square crop, bicubic resize (as a generated image's frame)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC))


def eeg_seed(seed: int, epoch_id: str) -> int:
    """The sampling seed of one EEG: a hash of (seed, epoch_id), 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch_id}".encode()).digest()[:8], "big") >> 1


def png_name(epoch_id: str, sample: int) -> str:
    """A file name for a generated image that is safe on any filesystem and unique per epoch_id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", epoch_id).strip("._")[:80]
    return f"{safe}-{hashlib.sha1(epoch_id.encode()).hexdigest()[:8]}_s{sample}.png"


# ---------------------------------------------------------------------------------------- image source


@dataclass(frozen=True)
class GenerationBatch:
    """What an image source gets for one batch of test EEGs."""

    eeg: Tensor  # float32 [B, C, T]
    channel_mask: Tensor  # bool [B, C], True = real electrode
    seeds: list[int]  # one per EEG (eeg_seed)
    epoch_ids: list[str]
    num_images: int


ImageSource = Callable[[GenerationBatch], np.ndarray]  # -> uint8 [B, num_images, H, W, 3]


def generator_source(generator: Generator, cfg: EvaluateConfig) -> ImageSource:
    """The fine-tuned generator with the config's sampler, steps and guidance."""

    def source(batch: GenerationBatch) -> np.ndarray:
        return generator.generate(
            batch.eeg, batch.num_images, cfg.steps, cfg.sampler, cfg.guidance_scale, batch.seeds, batch.channel_mask
        )

    return source


# -------------------------------------------------------------------------------------------- scoring


def _floats(images: np.ndarray | Tensor) -> Tensor:
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
    stim, gen = _floats(stimuli), _floats(generated).flatten(0, 1)
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


# ------------------------------------------------------------------------------------ models to load


def _device(cfg: EvaluateConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DreamdiffError("device: 'cuda' asked but torch sees no CUDA device; use 'auto' or 'cpu'")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _synth_config(data: Path) -> tuple[SynthConfig, Path]:
    """The SynthEEG-Image config that made the shards: from preprocess's config.yaml in ``data`` or above."""
    for folder in (data, *list(data.resolve().parents)[:3]):
        record = folder / "config.yaml"
        if not record.is_file():
            continue
        raw = read_yaml(record)
        if "sources" not in raw:
            continue
        cfg = validate_config("preprocess", raw, str(record))
        synths = [s.synth for s in cfg.sources if s.kind == "synthetic" and s.labeled]
        if len(synths) != 1:
            raise DreamdiffError(
                f"train_classifier_if_missing: {record} has {len(synths)} labelled synthetic sources; expected one"
            )
        return synths[0], record
    raise DreamdiffError(
        f"train_classifier_if_missing: no preprocess record (config.yaml with sources) in {data} or its parents; "
        "train and save a classifier first (dreamdiff.eval.classifier) and name its folder"
    )


def _train_classifier(
    cfg: EvaluateConfig, meta: dict[str, np.ndarray], rows: dict[str, Any], test: np.ndarray
) -> dict[str, Any]:
    """Train the SynthEEG classifier on the TRAIN-split stimuli and save it at cfg.classifier.

    The judge must come from the same synthetic world as the shards: its config is read from the shards'
    preprocess record and checked against a stored stimulus before any training."""
    synth_rows = np.flatnonzero(meta["dataset"][test] == SYNTH_DATASET)
    if not len(synth_rows):
        raise DreamdiffError(
            f"train_classifier_if_missing: needs {SYNTH_DATASET} rows, the test rows hold "
            f"{sorted(set(meta['dataset'][test].tolist()))}; for ImageNet-EEG use classifier: {VIT_H14_SWAG}"
        )
    synth, record = _synth_config(Path(cfg.data))
    if cfg.n_way > synth.num_classes:
        raise DreamdiffError(f"n_way ({cfg.n_way}) exceeds the {synth.num_classes} classes of the synthetic set")
    position = int(synth_rows[0])
    image_id = str(meta["image_id"][test[position]])
    with Image.open(io.BytesIO(rows["image"][position])) as image:
        stored = np.asarray(image.convert("RGB"))
    index = int(image_id.removeprefix("synth-"))
    if not np.array_equal(stored, render_image(synth, index)):
        raise DreamdiffError(
            f"train_classifier_if_missing: the synthetic config in {record} does not render stimulus {image_id} of "
            f"the shards; is {cfg.data} the output of that preprocess run?"
        )
    model = train_synthetic_classifier(synth, seed=cfg.seed)
    save_classifier(model, cfg.classifier)
    return {"trained_now": True, "trained_on": f"{SYNTH_DATASET} train-split stimuli of {record}", "seed": cfg.seed}


def _classifier(
    cfg: EvaluateConfig, meta: dict[str, np.ndarray], rows: dict[str, Any], test: np.ndarray, device: torch.device
) -> tuple[ImageClassifier, dict[str, Any]]:
    """The judge of the n-way metric (trained first where asked and missing) and what to record about it."""
    info: dict[str, Any] = {"spec": cfg.classifier, "trained_now": False}
    folder = Path(cfg.classifier)
    if cfg.classifier != VIT_H14_SWAG and cfg.train_classifier_if_missing and not (folder / "classifier.json").exists():
        info.update(_train_classifier(cfg, meta, rows, test))
    classifier = load_image_classifier(cfg.classifier, device)
    info["num_classes"] = classifier.num_classes
    if cfg.n_way > classifier.num_classes:
        raise DreamdiffError(
            f"n_way ({cfg.n_way}) exceeds the classifier's {classifier.num_classes} classes ({cfg.classifier})"
        )
    return classifier, info


def _checkpoint_info(checkpoint: str) -> dict[str, Any]:
    """What fine-tuning recorded beside the weights (generator.json "info": CLIP, train splits, step...)."""
    return json.loads((Path(checkpoint) / SPEC_FILE).read_text()).get("info") or {}


def _clip(
    cfg: EvaluateConfig, info: dict[str, Any], device: torch.device
) -> tuple[FrozenClipImage | None, dict[str, Any]]:
    """The frozen CLIP tower of the CLIP metrics and what to record about it. Retrieval is only meaningful in
    the space the generator's CLIP head was aligned to, so the checkpoint's own CLIP is the default."""
    if not cfg.clip_metrics:
        return None, {"skipped": "clip_metrics is false"}
    recorded = (info.get("clip_model"), info.get("clip_pretrained"))
    if cfg.clip_model is None and recorded[0]:
        model, source = recorded[0], "checkpoint"
    else:
        model, source = cfg.clip_model or PAPER_CLIP[0], "config" if cfg.clip_model else "paper default"
    pretrained = cfg.clip_pretrained or (recorded[1] if model == recorded[0] and recorded[1] else PAPER_CLIP[1])
    clip = load_clip_image_encoder(model, pretrained, device)
    return clip, {"model": model, "pretrained": pretrained, "source": source, "embed_dim": clip.embed_dim}


def _seen_in_finetuning(info: dict[str, Any], splits: np.ndarray) -> int | None:
    """How many test rows belong to the splits the checkpoint was fine-tuned on (None: not recorded)."""
    trained = info.get("train_splits")
    return None if trained is None else int(np.isin(splits, list(trained)).sum())


# ------------------------------------------------------------------------------------------ the stage


def _select(cfg: EvaluateConfig, meta: dict[str, np.ndarray]) -> tuple[Split, np.ndarray]:
    split = split_rows(meta, cfg.protocol, test_blocks=cfg.test_blocks, test_subject=cfg.test_subject)
    test = split.test
    if cfg.max_eeg is not None and cfg.max_eeg < len(test):
        pick = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1])).choice(len(test), cfg.max_eeg, False)
        test = test[np.sort(pick)]
    return split, test


def _retrieval_skip_reason(clip: FrozenClipImage | None, clip_info: dict[str, Any], generator: Generator) -> str | None:
    """Why EEG -> image retrieval cannot run (None: it can): it needs the CLIP space the head was aligned to."""
    head_dim = generator.spec.conditioner.clip_dim
    if clip is None:
        return clip_info["skipped"]
    if clip.embed_dim != head_dim:
        return (
            f"CLIP {clip_info['model']} embeds in {clip.embed_dim} dims, the generator's CLIP head in {head_dim}: "
            "name the CLIP the generator was fine-tuned against"
        )
    return None


@dataclass
class _Pass:
    """What one pass over the test EEGs keeps: per-image scores, never all the images (except for FID)."""

    scores: dict[str, Tensor]
    eeg_emb: Tensor | None
    files: list[list[str]]  # generated PNG names per EEG
    report_images: dict[int, tuple[np.ndarray, np.ndarray]]  # EEG position -> (stimulus, samples)
    fid_real: Tensor | None
    fid_fake: Tensor | None


def _generate_and_score(
    cfg: EvaluateConfig,
    rows: dict[str, Any],
    ids: list[str],
    image_ids: list[str],
    size: int,
    source: ImageSource,
    classifier: ImageClassifier,
    clip: FrozenClipImage | None,
    head: Generator | None,
    output: Path,
) -> _Pass:
    """Generate batch by batch; write PNGs, score, and embed the EEG through ``head``'s CLIP head if given."""
    n = len(ids)
    shown = set(np.unique(np.linspace(0, n - 1, min(cfg.report_eegs, n)).round().astype(int)).tolist())
    parts, eeg_emb, files, report_images, real, fake = [], [], [], {}, [], []
    for start in range(0, n, cfg.batch_size):
        idx = np.arange(start, min(start + cfg.batch_size, n))
        stimuli = np.stack([decode_stimulus(rows["image"][i], size) for i in idx])
        batch = GenerationBatch(
            eeg=torch.from_numpy(rows["eeg"][idx]),
            channel_mask=torch.from_numpy(rows["channel_mask"][idx]),
            seeds=[eeg_seed(cfg.seed, ids[i]) for i in idx],
            epoch_ids=[ids[i] for i in idx],
            num_images=cfg.samples_per_eeg,
        )
        generated = np.asarray(source(batch))
        if generated.dtype != np.uint8 or generated.ndim != 5 or generated.shape[:2] != (len(idx), batch.num_images):
            raise DreamdiffError(
                f"image source returned {generated.dtype} {list(generated.shape)}; expected uint8 "
                f"[{len(idx)}, {batch.num_images}, H, W, 3]"
            )
        for k, i in enumerate(idx):
            names = [png_name(ids[i], j) for j in range(batch.num_images)]
            for name, image in zip(names, generated[k], strict=True):
                Image.fromarray(image).save(output / "generated" / name)
            files.append(names)
            if int(i) in shown:
                report_images[int(i)] = (stimuli[k], generated[k])
        parts.append(score_batch(stimuli, generated, [image_ids[i] for i in idx], classifier, clip, cfg.batch_size))
        if head is not None:
            with torch.inference_mode():
                eeg_emb.append(head.model.clip_embedding(batch.eeg.to(head.device), batch.channel_mask.to(head.device)))
        if cfg.fid:
            real.append(_floats(stimuli))
            fake.append(_floats(generated).flatten(0, 1))
        log.info("evaluate: %d / %d EEGs", idx[-1] + 1, n)
    return _Pass(
        scores=concat_scores(parts),
        eeg_emb=torch.cat(eeg_emb).float().cpu() if eeg_emb else None,
        files=files,
        report_images=report_images,
        fid_real=torch.cat(real) if real else None,
        fid_fake=torch.cat(fake) if fake else None,
    )


def run(cfg: EvaluateConfig, image_source: ImageSource | None = None) -> dict[str, Any]:
    """Evaluate a generator checkpoint on held-out paired EEG; write results.json, report.html, generated/.

    ``image_source`` replaces the generator's sampling (e.g. to score a baseline, or the stimuli themselves);
    retrieval always uses the checkpoint's CLIP head.
    """
    began = time.perf_counter()
    device = _device(cfg)
    files, meta = read_paired_meta(cfg.data)
    split, test = _select(cfg, meta)
    rows = load_rows(files, meta, test)
    generator = Generator.load(cfg.checkpoint, device, dtype=inference_dtype(device, cfg.precision))
    if cfg.compile and image_source is None:
        generator.compile(torch_compile_mode(cfg.compile))
    if image_source is None and cfg.guidance_scale != 1.0 and generator.model.conditioner.null is None:
        raise DreamdiffError(
            f"guidance_scale={cfg.guidance_scale} needs a generator fine-tuned with condition dropout; this one was "
            "not (conditioner.cond_drop_prob = 0): use guidance_scale=1.0"
        )
    classifier, classifier_info = _classifier(cfg, meta, rows, test, device)
    info = _checkpoint_info(cfg.checkpoint)
    clip, clip_info = _clip(cfg, info, device)
    retrieval_skip = _retrieval_skip_reason(clip, clip_info, generator)
    output = Path(cfg.output)
    record_config(cfg, output)
    (output / "generated").mkdir(exist_ok=True)
    loaded = time.perf_counter()

    n, size = len(test), generator.spec.image_size
    ids = meta["epoch_id"][test].astype(str).tolist()
    image_ids = meta["image_id"][test].astype(str).tolist()
    source = image_source or generator_source(generator, cfg)
    head = None if retrieval_skip else generator
    done = _generate_and_score(cfg, rows, ids, image_ids, size, source, classifier, clip, head, output)
    generated = time.perf_counter()

    top_name = f"n_way_top_{cfg.top_k}"
    figures = summarise(
        done.scores,
        image_ids,
        n_way=cfg.n_way,
        top_k=cfg.top_k,
        trials=cfg.trials,
        seed=cfg.seed,
        subjects=meta["subject"][test].tolist(),
    )
    figures[top_name]["classifier"] = cfg.classifier
    if done.eeg_emb is None:
        figures.update({f"retrieval_top_{k}": {"skipped": retrieval_skip} for k in RETRIEVAL_KS})
    else:
        keys = generator.model.clip_head.target(done.scores["stim_emb"].to(done.eeg_emb.dtype))
        figures.update(eeg_image_retrieval(done.eeg_emb, keys, image_ids))
    if done.fid_real is not None and done.fid_fake is not None:
        distinct = np.unique(np.asarray(image_ids), return_index=True)[1]
        figures["fid"] = fid_or_reason(done.fid_real[torch.from_numpy(distinct)], done.fid_fake)
    context = {"protocol": split.protocol, "seed": cfg.seed, "num_eeg": n, "samples_per_eeg": cfg.samples_per_eeg}
    seen = _seen_in_finetuning(info, meta["split"][test])
    if seen:
        log.warning("evaluate: %d of the %d test EEGs are of splits the checkpoint was fine-tuned on", seen, n)
    results = {
        "stage": "evaluate",
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "data": str(Path(cfg.data).resolve()),
        "protocol": {
            "name": split.protocol,
            "description": split.description,
            "num_test_rows": len(split.test),
            "num_train_rows": len(split.train),
            "max_eeg": cfg.max_eeg,
            "checkpoint_train_splits": info.get("train_splits"),
            "test_rows_seen_in_finetuning": seen,
        },
        "seed": cfg.seed,
        "seeds": "EEG e samples from eeg_seed(seed, epoch_id) = sha256(f'{seed}/{epoch_id}')[:8] >> 1; "
        "image j of it as dreamdiff.models.generator documents; n-way trial draws from torch seed `seed`",
        "num_eeg": n,
        "samples_per_eeg": cfg.samples_per_eeg,
        "num_images": n * cfg.samples_per_eeg,
        "generation": {
            "source": "generator" if image_source is None else "injected image source",
            "sampler": cfg.sampler,
            "steps": cfg.steps,
            "guidance_scale": cfg.guidance_scale,
            "image_size": size,
            "stimuli": f"centre-cropped and resized to {size} px (the generated size)",
        },
        "classifier": classifier_info,
        "clip": clip_info,
        "metrics": {name: {**figure, **context} for name, figure in figures.items()},
        "seconds": {
            "load": round(loaded - began, 3),
            "generate_and_score": round(generated - loaded, 3),
            "total": round(time.perf_counter() - began, 3),
        },
    }
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _write_per_eeg(output, meta, test, done.scores, done.files)
    _write_report(output, cfg, results, meta, test, done.scores, done.report_images)
    top = figures[top_name]
    print(
        f"evaluate: {cfg.n_way}-way top-{cfg.top_k} {top['value']:.3f} (chance {top['chance']:.3f}) on {n} EEGs x "
        f"{cfg.samples_per_eeg} samples, protocol {split.protocol}; results: {output / 'results.json'}"
    )
    return results


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value json writes."""
    return value.item() if isinstance(value, np.generic) else value


def _write_per_eeg(
    output: Path, meta: dict[str, np.ndarray], test: np.ndarray, scores: dict[str, Tensor], files_of: list[list[str]]
) -> None:
    """One JSON line per test EEG: what it showed, its images, their classes and scores (for error analysis)."""
    gt = scores["stim_probs"].argmax(1)
    pred = scores["gen_probs"].argmax(2)
    with (output / "per_eeg.jsonl").open("w") as out:
        for k, row in enumerate(test):
            line = {name: _plain(meta[name][row]) for name in META_COLUMNS}
            line.update(generated=files_of[k], gt_class=int(gt[k]), predicted=pred[k].tolist())
            for name in ("ssim", "pcc"):
                if name in scores:
                    line[name] = [round(v, 5) for v in scores[name][k].tolist()]
            if "gen_emb" in scores:
                line["clip_similarity"] = [
                    round(v, 5) for v in F.cosine_similarity(scores["gen_emb"][k], scores["stim_emb"][k][None]).tolist()
                ]
            out.write(json.dumps(line) + "\n")


def _write_report(
    output: Path,
    cfg: EvaluateConfig,
    results: dict[str, Any],
    meta: dict[str, np.ndarray],
    test: np.ndarray,
    scores: dict[str, Tensor],
    report_images: dict[int, tuple[np.ndarray, np.ndarray]],
) -> None:
    """report.html: setup, metrics table, a stimulus | generated grid."""
    gt = scores["stim_probs"].argmax(1)
    pred = scores["gen_probs"].argmax(2)
    tiles, labels = [], []
    for k in sorted(report_images):
        stimulus, generated = report_images[k]
        tiles.append(stimulus)
        labels.append(f"GT {str(meta['class_name'][test[k]])[:24]} ({int(gt[k])})")
        for j, image in enumerate(generated):
            tiles.append(image)
            labels.append(f"sample {j}: {int(pred[k, j])}" + (" = GT" if int(pred[k, j]) == int(gt[k]) else ""))
    grid = image_grid(np.stack(tiles), labels, output / "grid.png", columns=1 + cfg.samples_per_eeg)
    table, split_name = [], results["protocol"]["name"]
    for name, figure in results["metrics"].items():
        value = figure.get("value", figure.get("skipped"))
        table.append({"metric": name, "value": value, "chance": figure.get("chance", ""), "protocol": split_name})
    setup = (
        f"{results['protocol']['description']}. {results['num_eeg']} EEGs x {results['samples_per_eeg']} samples, "
        f"seed {cfg.seed}, sampler {cfg.sampler} {cfg.steps} steps, guidance {cfg.guidance_scale}; classifier "
        f"{cfg.classifier} ({results['classifier']['num_classes']} classes); CLIP {results['clip']}. "
        f"Checkpoint {results['checkpoint']}; test rows of its fine-tuning splits: "
        f"{results['protocol']['test_rows_seen_in_finetuning']}."
    )
    write_report(
        output,
        "dreamdiff evaluate",
        [
            {"heading": "Setup", "text": setup},
            {"heading": "Metrics", "table": table},
            {
                "heading": "Stimulus | generated",
                "text": "First column: the stimulus (ground truth = the classifier's class in brackets); then the "
                "generated samples with the classifier's class.",
                "images": [grid],
            },
            {"heading": "Results (JSON)", "code": json.dumps(results, indent=2)},
        ],
    )
