"""The evaluate stage: split protocols, the pure scoring core, and whole runs on SynthEEG shards.

Everything is built here, not taken from the fine-tune stage: paired SynthEEG shards (preprocess on a local
Ray), a tiny SD, an UNTRAINED generator (its n-way accuracy must sit near chance), a SmallCNN judge and a
tiny random CLIP saved as a checkpoint. A "cheating" image source that returns the stimuli themselves proves
the metrics can see success through the same code path.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dreamdiff.cli import main
from dreamdiff.config import EvaluateConfig, PreprocessConfig
from dreamdiff.data import preprocess
from dreamdiff.data.reader import shard_files
from dreamdiff.data.synthetic import SynthConfig
from dreamdiff.errors import DreamdiffError
from dreamdiff.eval.classifier import load_classifier, save_classifier, train_synthetic_classifier
from dreamdiff.eval.evaluate import run
from dreamdiff.eval.scoring import eeg_image_retrieval, evaluate_images
from dreamdiff.eval.shards import read_paired_meta
from dreamdiff.eval.splits import by_block, by_image, leave_subject_out, split_rows
from dreamdiff.generation import GenerationBatch, png_name
from dreamdiff.models.clip import load_clip_image_encoder, save_random_clip
from dreamdiff.models.conditioner import ConditionerConfig
from dreamdiff.models.diffusion import build_tiny_sd, load_sd_components
from dreamdiff.models.diffusion_config import TinyDiffusionConfig
from dreamdiff.models.eeg_diffusion import GeneratorSpec, build_eeg_diffusion
from dreamdiff.models.generator import save_generator
from dreamdiff.models.msm import MSMConfig

# diffusers 0.42's DPMSolverMultistepScheduler calls np.array on a torch tensor, which numpy 2 flags
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SYNTH = SynthConfig(num_classes=8, images_per_class=10, num_subjects=2, image_size=16, seed=5)
# per class 8 train / 1 val / 1 test image; 80 trials per subject in blocks of 50 (blocks 0 and 1)
TEST_IMAGES, TRIALS_PER_SUBJECT, LAST_BLOCK_TRIALS = 8, 80, 30
METRICS = ("n_way_top_1", "clip_similarity", "ssim", "pcc", "retrieval_top_1", "retrieval_top_5")


@pytest.fixture(scope="module")
def world(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shards, generator checkpoint, classifier and CLIP checkpoint, all tiny and made here."""
    root = tmp_path_factory.mktemp("evaluate")
    preprocess.run(
        PreprocessConfig(
            output=str(root / "shards"),
            sources=[{"kind": "synthetic", "labeled": True, "synth": SYNTH.model_dump()}],
        )
    )
    torch.manual_seed(0)
    sd = build_tiny_sd(
        TinyDiffusionConfig(
            sample_size=16, block_out_channels=[32, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]
        ),
        root / "tiny-sd",
    )
    spec = GeneratorSpec(
        base_model=str(sd),
        msm=MSMConfig(preset="tiny"),
        conditioner=ConditionerConfig(context_dim=64, clip_dim=64),
        image_size=16,
    )
    clip = save_random_clip("dreamdiff-tiny", root / "clip.safetensors", seed=0)
    # what the finetune stage records beside the weights: the CLIP it aligned to and the splits it trained on
    info = {"clip_model": "dreamdiff-tiny", "clip_pretrained": str(clip), "train_splits": ["train"]}
    save_generator(build_eeg_diffusion(spec, load_sd_components(str(sd))), spec, root / "generator", info=info)
    save_classifier(train_synthetic_classifier(SYNTH, epochs=30, seed=0), root / "classifier")
    return {
        "root": root,
        "shards": root / "shards",
        "paired": root / "shards" / "paired",
        "generator": root / "generator",
        "classifier": root / "classifier",
        "clip": root / "clip.safetensors",
    }


def _config(world: dict[str, Path], output: str, **kw: object) -> EvaluateConfig:
    base = {
        "checkpoint": str(world["generator"]),
        "data": str(world["paired"]),
        "output": str(world["root"] / output),
        "classifier": str(world["classifier"]),
        "n_way": 5,
        "trials": 50,
        "samples_per_eeg": 2,
        "steps": 8,
        "device": "cpu",
        "report_eegs": 4,
    }
    return EvaluateConfig(**{**base, **kw})


def _stimuli_by_epoch(world: dict[str, Path]) -> dict[str, np.ndarray]:
    table = pq.read_table(shard_files(world["paired"]), columns=["epoch_id", "image"])
    return {
        eid: np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        for eid, png in zip(table.column("epoch_id").to_pylist(), table.column("image").to_pylist(), strict=True)
    }


# ------------------------------------------------------------------------------------------- splits


def _hand_made_meta() -> dict[str, np.ndarray]:
    """2 subjects x 3 blocks x 4 trials; 6 images, image k shown in block k // 2 of each subject."""
    rows = [(s, b, t) for s in (1, 2) for b in range(3) for t in range(4)]
    image = [2 * b + t % 2 for _, b, t in rows]
    return {
        "subject": np.array([s for s, _, _ in rows]),
        "dataset": np.array(["D"] * len(rows)),
        "block": np.array([b for _, b, _ in rows]),
        "image_id": np.array([f"img{i}" for i in image]),
        "split": np.array(["test" if i in (4, 5) else "val" if i == 3 else "train" for i in image]),
    }


def test_split_protocols_on_hand_made_metadata() -> None:
    meta = _hand_made_meta()
    image = by_image(meta)
    assert image.protocol == "by_image" and len(image.test) == 8 and len(image.train) == 12  # val rows: neither
    assert set(meta["image_id"][image.test]) == {"img4", "img5"}
    block = by_block(meta, test_blocks=1)
    assert len(block.test) == 8 and set(meta["block"][block.test]) == {2}
    assert len(by_block(meta, test_blocks=2).test) == 16
    lso = leave_subject_out(meta, 2)
    assert len(lso.test) == 12 and set(meta["subject"][lso.test]) == {2} and len(lso.train) == 12
    for split in (image, block, lso):
        assert not set(split.train) & set(split.test) and split.description.startswith(split.protocol)
        assert np.all(np.diff(split.test) > 0)
    assert "0 of the 2 test images also occur in train" in block.description  # blocks show disjoint images here
    assert "6 of the 6 test images were shown to training subjects" in lso.description
    with pytest.raises(DreamdiffError, match="test_subject must be one of \\[1, 2\\], got 7"):
        leave_subject_out(meta, 7)
    with pytest.raises(DreamdiffError, match="would leave none to train on"):
        by_block(meta, test_blocks=3)
    leaky = {**meta, "split": np.where(np.arange(24) == 0, "test", meta["split"])}  # img0 in test and train
    with pytest.raises(DreamdiffError, match="not a split by image"):
        by_image(leaky)
    with pytest.raises(DreamdiffError, match="protocol must be one of"):
        split_rows(meta, "by_moon")


def test_split_protocols_on_shards(world: dict[str, Path]) -> None:
    _, meta = read_paired_meta(world["shards"])  # the shards root: paired files are found below it
    assert len(meta["epoch_id"]) == 2 * TRIALS_PER_SUBJECT
    sizes = {
        "by_image": (2 * TEST_IMAGES, 2 * TEST_IMAGES * 8),
        "by_block": (2 * LAST_BLOCK_TRIALS, 2 * (TRIALS_PER_SUBJECT - LAST_BLOCK_TRIALS)),
        "leave_subject_out": (TRIALS_PER_SUBJECT, TRIALS_PER_SUBJECT),
    }
    for protocol, (n_test, n_train) in sizes.items():
        split = split_rows(meta, protocol, test_subject=1)
        assert (len(split.test), len(split.train)) == (n_test, n_train), protocol
        assert not set(split.test) & set(split.train)
    test_images = set(meta["image_id"][by_image(meta).test])
    assert not test_images & set(meta["image_id"][by_image(meta).train])


# ------------------------------------------------------------------------------------ the pure core


def test_evaluate_images_sees_success_and_retrieval_sees_alignment(world: dict[str, Path]) -> None:
    classifier = load_classifier(world["classifier"])
    clip = load_clip_image_encoder("dreamdiff-tiny", str(world["clip"]))
    by_epoch = _stimuli_by_epoch(world)
    _, meta = read_paired_meta(world["paired"])
    test = by_image(meta).test
    stimuli = np.stack([by_epoch[e] for e in meta["epoch_id"][test]])
    ids = meta["image_id"][test].tolist()
    same = evaluate_images(stimuli, stimuli[:, None], ids, classifier, clip, n_way=5, subjects=meta["subject"][test])
    assert same["n_way_top_1"]["value"] == 1.0 and same["n_way_top_1"]["chance"] == 0.2
    assert set(same["n_way_top_1"]["by_subject"]) == {"0", "1"}
    for name in ("clip_similarity", "ssim", "pcc"):
        assert same[name]["value"] == pytest.approx(1.0, abs=1e-4)
        assert same[name]["chance"] < 0.999
    shuffled = stimuli[np.roll(np.arange(len(stimuli)), 3)][:, None]  # every row gets another image
    wrong = evaluate_images(stimuli, shuffled, ids, classifier, clip, n_way=5)
    assert wrong["n_way_top_1"]["value"] < 0.5 and wrong["pcc"]["value"] < 0.9
    per_image = {i: torch.randn(16, generator=torch.Generator().manual_seed(k)) for k, i in enumerate(set(ids))}
    emb = torch.stack([per_image[i] for i in ids])  # an EEG whose head hits its image's embedding exactly
    perfect = eeg_image_retrieval(emb + 0.01 * torch.randn(emb.shape), emb, ids)
    assert perfect["retrieval_top_1"]["value"] == 1.0 and perfect["retrieval_top_1"]["gallery_size"] == TEST_IMAGES
    assert perfect["retrieval_top_5"]["chance"] == 5 / TEST_IMAGES


# ------------------------------------------------------------------------------------------ whole runs


def test_untrained_generator_scores_near_chance_with_a_full_record(world: dict[str, Path]) -> None:
    cfg = _config(world, "untrained", protocol="by_image")
    results = run(cfg)
    out = Path(cfg.output)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    n = 2 * TEST_IMAGES
    assert saved["num_eeg"] == n and saved["samples_per_eeg"] == 2 and saved["seed"] == 0
    assert saved["protocol"]["name"] == "by_image" and "by_image" in saved["protocol"]["description"]
    assert saved["classifier"]["spec"] == str(world["classifier"]) and saved["classifier"]["num_classes"] == 8
    assert saved["clip"]["source"] == "checkpoint" and saved["clip"]["pretrained"] == str(world["clip"])
    assert saved["protocol"]["test_rows_seen_in_finetuning"] == 0  # by_image: no test row is of a train split
    for name in METRICS:
        figure = saved["metrics"][name]
        assert {"value", "chance", "chance_is", "protocol", "seed", "num_eeg", "samples_per_eeg"} <= set(figure), name
        assert figure["protocol"] == "by_image" and figure["num_eeg"] == n and figure["samples_per_eeg"] == 2
    top1 = saved["metrics"]["n_way_top_1"]
    assert top1["classifier"] == str(world["classifier"]) and top1["n_way"] == 5 and top1["trials"] == 50
    # an untrained generator cannot know the class: near chance (0.2), well below what the cheat reaches
    assert abs(top1["value"] - top1["chance"]) < 0.2, top1
    assert sum(s["num_eeg"] for s in top1["by_subject"].values()) == n
    assert saved["metrics"]["retrieval_top_1"]["gallery_size"] == TEST_IMAGES
    assert "fid" not in saved["metrics"]

    pngs = sorted((out / "generated").glob("*.png"))
    assert len(pngs) == n * 2 and all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in pngs)
    lines = [json.loads(line) for line in (out / "per_eeg.jsonl").read_text().splitlines()]
    assert len(lines) == n and all((out / "generated" / f).is_file() for line in lines for f in line["generated"])
    html = (out / "report.html").read_text()
    referenced = re.findall(r"<img src='([^']+)'", html)
    assert referenced and all((out / src).is_file() for src in referenced)
    assert "n_way_top_1" in html and "by_image" in html

    # an EEG's images depend on (seed, epoch_id) only: a subset run draws the same pixels
    subset = run(_config(world, "subset", protocol="by_image", max_eeg=3, fid=True))
    assert subset["num_eeg"] == 3 and subset["protocol"]["num_test_rows"] == n
    assert "skipped" in subset["metrics"]["fid"] or "value" in subset["metrics"]["fid"]
    for line in (Path(world["root"] / "subset") / "per_eeg.jsonl").read_text().splitlines():
        name = json.loads(line)["generated"][0]
        assert (world["root"] / "subset" / "generated" / name).read_bytes() == (out / "generated" / name).read_bytes()


def test_cheating_image_source_scores_near_one(world: dict[str, Path]) -> None:
    by_epoch = _stimuli_by_epoch(world)

    def cheat(batch: GenerationBatch) -> np.ndarray:
        return np.stack([np.stack([by_epoch[e]] * batch.num_images) for e in batch.epoch_ids])

    clip = {"clip_model": "dreamdiff-tiny", "clip_pretrained": str(world["clip"])}  # named here, not inherited
    cfg = _config(world, "cheat", protocol="by_block", max_eeg=12, batch_size=5, **clip)
    results = run(cfg, image_source=cheat)
    metrics = results["metrics"]
    assert results["generation"]["source"] == "injected image source"
    assert metrics["n_way_top_1"]["value"] > 0.95 and metrics["n_way_top_1"]["protocol"] == "by_block"
    assert metrics["ssim"]["value"] > 0.99 and metrics["pcc"]["value"] > 0.99
    assert metrics["clip_similarity"]["value"] > 0.99 > metrics["clip_similarity"]["chance"]
    assert results["num_eeg"] == 12 and results["protocol"]["num_test_rows"] == 2 * LAST_BLOCK_TRIALS
    assert results["clip"]["source"] == "config"
    assert results["protocol"]["test_rows_seen_in_finetuning"] > 0  # the last blocks hold train-split rows too


def test_missing_classifier_is_trained_on_the_synthetic_train_split(world: dict[str, Path]) -> None:
    folder = world["root"] / "new-classifier"
    cfg = _config(
        world, "trained-judge", classifier=str(folder), train_classifier_if_missing=True, max_eeg=4, clip_metrics=False
    )
    results = run(cfg)
    assert results["classifier"]["trained_now"] and "train-split" in results["classifier"]["trained_on"]
    assert (folder / "classifier.json").is_file() and load_classifier(folder).num_classes == SYNTH.num_classes
    assert "skipped" in results["metrics"]["retrieval_top_1"] and "clip_similarity" not in results["metrics"]


def test_bad_input_fails_with_one_line(world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (_config(world, "bad1", checkpoint=str(world["root"] / "nowhere")), "must hold generator.json"),
        (_config(world, "bad2", protocol="leave_subject_out", test_subject=9), "test_subject must be one of"),
        (_config(world, "bad3", n_way=9), "n_way \\(9\\) exceeds the classifier's 8 classes"),
        (_config(world, "bad4", classifier=str(world["root"] / "no-judge")), "classifier: expected"),
    ]
    for cfg, message in cases:
        with pytest.raises(DreamdiffError, match=message) as err:
            run(cfg)
        assert "\n" not in str(err.value)
        assert not (Path(cfg.output) / "results.json").exists()
    overrides = [f"checkpoint={world['root'] / 'nowhere'}", f"data={world['paired']}", f"output={world['root'] / 'x'}"]
    code = main(["evaluate", "--config", "evaluate-demo.yaml", *overrides])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.count("\n") == 1 and "dreamdiff evaluate: error:" in err_text


def test_png_names_are_safe_and_distinct() -> None:
    names = {png_name(e, 0) for e in ("a/b", "a_b", "a b", "../x", "SynthEEG-Image/0/0/0/1024")}
    assert len(names) == 5 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", n) for n in names)
