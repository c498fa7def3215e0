"""Image classifiers for the n-way metric: the synthetic-benchmark CNN, its artifact, the torchvision wrapper."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torchvision.models import VisionTransformer, ViT_H_14_Weights

from dreamdiff.data.synthetic import SynthConfig
from dreamdiff.errors import DreamdiffError
from dreamdiff.eval.classifier import (
    ImageClassifier,
    SmallCNN,
    TorchvisionClassifier,
    load_classifier,
    load_image_classifier,
    save_classifier,
    synthetic_images,
    train_synthetic_classifier,
)
from dreamdiff.eval.metrics import ground_truth_from_classifier, n_way_top_k

CFG = SynthConfig(num_classes=10, images_per_class=20, image_size=16, seed=3)


@pytest.fixture(scope="module")
def trained() -> tuple[SmallCNN, float]:
    start = time.process_time()  # CPU time: the shared build machine's load does not count
    model = train_synthetic_classifier(CFG, seed=0)
    return model, time.process_time() - start


def test_synthetic_images_follow_the_splits() -> None:
    train, train_labels = synthetic_images(CFG, ("train",))
    held_out, held_labels = synthetic_images(CFG, ("val", "test"))
    assert train.shape == (160, 3, 16, 16) and held_out.shape == (40, 3, 16, 16)
    assert train.dtype == torch.float32 and 0.0 <= float(train.min()) and float(train.max()) <= 1.0
    assert torch.bincount(train_labels).tolist() == [16] * 10
    assert torch.bincount(held_labels).tolist() == [4] * 10
    with pytest.raises(ValueError, match="splits"):
        synthetic_images(CFG, ("holdout",))


def test_trained_cnn_labels_held_out_images(trained: tuple[SmallCNN, float]) -> None:
    model, seconds = trained
    images, labels = synthetic_images(CFG, ("val", "test"))
    probs = model.predict_proba(images)
    assert probs.shape == (40, 10)
    assert torch.allclose(probs.sum(1), torch.ones(40))
    accuracy = float((ground_truth_from_classifier(probs) == labels).float().mean())
    print(f"held-out accuracy {accuracy:.3f}, trained in {seconds:.1f} CPU s")
    assert accuracy >= 0.6  # chance: 0.1
    assert seconds < 30
    # the stimuli judged against their own labels: the n-way metric's ceiling on this benchmark
    assert n_way_top_k(probs, labels, n_way=5, trials=20, generator=torch.Generator().manual_seed(0)) >= 0.6


def test_cnn_accepts_other_image_sizes(trained: tuple[SmallCNN, float]) -> None:
    model, _ = trained
    images, _ = synthetic_images(CFG.model_copy(update={"image_size": 32}), ("test",))
    assert model.predict_proba(images).shape == (len(images), 10)
    with pytest.raises(ValueError, match="images"):
        model.predict_proba(images[:, :1])


def test_save_load_round_trip(trained: tuple[SmallCNN, float], tmp_path: Path) -> None:
    model, _ = trained
    folder = save_classifier(model, tmp_path / "classifier")
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.json", "model.safetensors"]
    images, _ = synthetic_images(CFG, ("val",))
    loaded = load_image_classifier(str(folder))
    assert isinstance(loaded, SmallCNN) and isinstance(loaded, ImageClassifier)
    assert torch.equal(loaded.predict_proba(images), model.predict_proba(images))


def test_bad_classifier_specs_are_named(trained: tuple[SmallCNN, float], tmp_path: Path) -> None:
    with pytest.raises(DreamdiffError, match="vit_h_14_swag"):
        load_image_classifier(str(tmp_path / "missing"))
    with pytest.raises(DreamdiffError, match="classifier.json"):
        load_classifier(tmp_path)
    folder = save_classifier(trained[0], tmp_path / "other")
    (folder / "classifier.json").write_text(json.dumps({"kind": "resnet"}))
    with pytest.raises(DreamdiffError, match="kind"):
        load_classifier(folder)


def test_torchvision_wrapper_uses_the_swag_transforms() -> None:
    """The ViT-H/14 path without its 2.5 GB weights: a tiny torchvision ViT at the SWAG input size."""
    weights = ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1
    transforms = weights.transforms()
    assert transforms.crop_size == [518]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tiny = VisionTransformer(
            image_size=518, patch_size=74, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8, num_classes=1000
        )
    classifier = TorchvisionClassifier(tiny, transforms, num_classes=1000, batch_size=2)
    assert isinstance(classifier, ImageClassifier)
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    probs = classifier.predict_proba(images)
    assert probs.shape == (3, 1000)
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert torch.allclose(probs[2:], classifier.predict_proba(images[2:]), atol=1e-6)
