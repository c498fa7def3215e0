"""The evaluate stage: generate images for held-out EEG and score them as the paper does, and more.

One process, torch alone (no Ray): read the paired rows' metadata (:mod:`dreamdiff.eval.shards`), pick the test
rows by split protocol (:mod:`dreamdiff.eval.splits`), load generator, classifier and CLIP tower
(:mod:`dreamdiff.eval.judges`; all before the expensive part, so bad input fails in seconds), then generate
``samples_per_eeg`` images per EEG batch by batch through :func:`dreamdiff.generation.generate` (the path batch
generation uses), writing PNGs and scoring each batch as it comes (:mod:`dreamdiff.eval.scoring`), so memory holds
per-image scores, not all images. Writes results.json (each figure with its protocol, seed, counts and chance
level), per_eeg.jsonl and report.html (:mod:`dreamdiff.eval.outputs`), and generated/.

Seeds: EEG ``e`` gets the sampling seed :func:`dreamdiff.generation.eeg_seed` ``(cfg.seed, epoch_id)``, so its
images do not depend on the batch, the protocol or ``max_eeg``; trial draws use ``cfg.seed``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dreamdiff.config import EvaluateConfig, record_config
from dreamdiff.errors import DreamdiffError
from dreamdiff.eval.classifier import ImageClassifier
from dreamdiff.eval.judges import choose_classifier, choose_clip
from dreamdiff.eval.outputs import write_evaluate_report, write_per_eeg
from dreamdiff.eval.scoring import (
    RETRIEVAL_KS,
    concat_scores,
    eeg_image_retrieval,
    fid_or_reason,
    float_images,
    score_batch,
    summarise,
)
from dreamdiff.eval.shards import decode_stimulus, load_rows, read_paired_meta
from dreamdiff.eval.splits import Split, split_rows
from dreamdiff.generation import ImageSource, Sampling, generate, generator_source
from dreamdiff.models.clip import FrozenClipImage
from dreamdiff.models.generator import SPEC_FILE, Generator, inference_dtype
from dreamdiff.models.sampling import torch_compile_mode

log = logging.getLogger(__name__)


def _device(cfg: EvaluateConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DreamdiffError("device: 'cuda' asked but torch sees no CUDA device; use 'auto' or 'cpu'")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _checkpoint_info(checkpoint: str) -> dict[str, Any]:
    """What fine-tuning recorded beside the weights (generator.json "info": CLIP, train splits, step...)."""
    return json.loads((Path(checkpoint) / SPEC_FILE).read_text()).get("info") or {}


def _seen_in_finetuning(info: dict[str, Any], splits: np.ndarray) -> int | None:
    """How many test rows belong to the splits the checkpoint was fine-tuned on (None: not recorded)."""
    trained = info.get("train_splits")
    return None if trained is None else int(np.isin(splits, list(trained)).sum())


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
    sampling: Sampling,
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
        epoch_ids = [ids[i] for i in idx]
        made = generate(source, rows["eeg"][idx], rows["channel_mask"][idx], epoch_ids, sampling)
        generated, batch = made.images, made.batch
        for k, i in enumerate(idx):
            for name, image in zip(made.names[k], generated[k], strict=True):
                Image.fromarray(image).save(output / "generated" / name)
            files.append(made.names[k])
            if int(i) in shown:
                report_images[int(i)] = (stimuli[k], generated[k])
        parts.append(score_batch(stimuli, generated, [image_ids[i] for i in idx], classifier, clip, cfg.batch_size))
        if head is not None:
            with torch.inference_mode():
                eeg_emb.append(head.model.clip_embedding(batch.eeg.to(head.device), batch.channel_mask.to(head.device)))
        if cfg.fid:
            real.append(float_images(stimuli))
            fake.append(float_images(generated).flatten(0, 1))
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
    classifier, classifier_info = choose_classifier(cfg, meta, rows, test, device)
    info = _checkpoint_info(cfg.checkpoint)
    clip, clip_info = choose_clip(cfg, info, device)
    retrieval_skip = _retrieval_skip_reason(clip, clip_info, generator)
    output = Path(cfg.output)
    record_config(cfg, output)
    (output / "generated").mkdir(exist_ok=True)
    loaded = time.perf_counter()

    n, size = len(test), generator.spec.image_size
    ids = meta["epoch_id"][test].astype(str).tolist()
    image_ids = meta["image_id"][test].astype(str).tolist()
    sampling = Sampling(
        num_images=cfg.samples_per_eeg,
        seed=cfg.seed,
        sampler=cfg.sampler,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
    )
    source = image_source or generator_source(generator, sampling)
    head = None if retrieval_skip else generator
    done = _generate_and_score(cfg, rows, ids, image_ids, size, source, sampling, classifier, clip, head, output)
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
    write_per_eeg(output, meta, test, done.scores, done.files)
    write_evaluate_report(output, cfg, results, meta, test, done.scores, done.report_images)
    top = figures[top_name]
    print(
        f"evaluate: {cfg.n_way}-way top-{cfg.top_k} {top['value']:.3f} (chance {top['chance']:.3f}) on {n} EEGs x "
        f"{cfg.samples_per_eeg} samples, protocol {split.protocol}; results: {output / 'results.json'}"
    )
    return results
