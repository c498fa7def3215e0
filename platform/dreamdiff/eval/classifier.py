"""Image classifiers that label images for the n-way top-k metric.

The paper's classifier is torchvision's ViT-H/14 with SWAG weights (ImageNet-1k, 1000 classes, 518 px
input): :func:`load_vit_h14_swag`. On SynthEEG-Image, whose classes ImageNet does not know, a small CNN
trained on the synthetic TRAIN-split stimuli plays that role (:func:`train_synthetic_classifier`); it
is saved as safetensors + JSON (:func:`save_classifier`), never pickled. Both expose
``predict_proba(images [N, 3, H, W] float in [0, 1]) -> [N, num_classes]``, and
:func:`load_image_classifier` picks one from a spec string, so evaluation has one code path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dreamdiff.data.synthetic import SynthConfig, image_class, image_split
from dreamdiff.data.synthetic_images import render_image
from dreamdiff.errors import DreamdiffError

VIT_H14_SWAG = "vit_h_14_swag"
_CONFIG_FILE = "classifier.json"
_WEIGHTS_FILE = "model.safetensors"
_SMALL_CNN = "small_cnn"


@runtime_checkable
class ImageClassifier(Protocol):
    """What the evaluation needs from a classifier: class probabilities of RGB images in [0, 1]."""

    num_classes: int

    def predict_proba(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] float in [0, 1] -> probabilities [N, num_classes] (float32)."""
        ...


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float [N, 3, H, W] in [0, 1], got {images.dtype} {list(images.shape)}")


class TorchvisionClassifier:
    """A torchvision classifier with its weights' preprocessing, run in batches (518 px ViT-H is heavy)."""

    def __init__(
        self, model: nn.Module, transforms: Callable[[Tensor], Tensor], num_classes: int, batch_size: int = 16
    ) -> None:
        self.model = model.eval()
        self.transforms = transforms
        self.num_classes = num_classes
        self.batch_size = batch_size

    @torch.inference_mode()
    def predict_proba(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] float in [0, 1] -> softmax probabilities [N, num_classes]."""
        _check_images(images)
        device = next(self.model.parameters()).device
        out = [
            self.model(self.transforms(batch.to(device))).float().softmax(dim=1)
            for batch in images.split(self.batch_size)
        ]
        return torch.cat(out)


def load_vit_h14_swag(device: str | torch.device = "cpu", batch_size: int = 16) -> TorchvisionClassifier:
    """The paper's classifier: torchvision ViT-H/14, IMAGENET1K_SWAG_E2E_V1 weights and transforms.

    The transforms resize (bicubic) and centre-crop to 518 px and apply ImageNet normalisation. The
    weights (2.5 GB) come through torchvision's hub cache: online, or placed beforehand at
    ``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``.
    """
    from torchvision.models import ViT_H_14_Weights, vit_h_14

    weights = ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1
    try:
        model = vit_h_14(weights=weights)
    except OSError as err:  # offline: urllib's URLError is an OSError
        raise DreamdiffError(
            f"classifier {VIT_H14_SWAG!r}: cannot reach its weights ({err}); download {weights.url} into "
            "$TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch) on a machine with network"
        ) from err
    return TorchvisionClassifier(model.to(device), weights.transforms(), len(weights.meta["categories"]), batch_size)


class SmallCNN(nn.Module):
    """A few conv blocks + global pooling: enough to tell the synthetic classes (shape x colour x texture).

    GroupNorm rather than BatchNorm, so train and eval modes compute the same function. Inputs of another
    size are resized to ``image_size`` first, so generated images at any resolution can be labelled.
    """

    def __init__(self, num_classes: int, image_size: int, widths: Sequence[int] = (32, 64, 64)) -> None:
        super().__init__()
        if num_classes < 2 or image_size < 4 or not widths:
            raise ValueError(
                f"need num_classes >= 2, image_size >= 4 and some widths, got {num_classes}, {image_size}, "
                f"{list(widths)}"
            )
        self.num_classes = num_classes
        self.image_size = image_size
        self.widths = tuple(int(w) for w in widths)
        layers: list[nn.Module] = []
        c_in = 3
        for i, width in enumerate(self.widths):
            layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.GroupNorm(min(8, width), width), nn.GELU()]
            if i < len(self.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] in [0, 1] -> logits [N, num_classes]."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.head(self.features(images * 2.0 - 1.0).mean(dim=(2, 3)))

    @torch.inference_mode()
    def predict_proba(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] float in [0, 1] -> softmax probabilities [N, num_classes]."""
        _check_images(images)
        return self(images.to(self.head.weight.device)).float().softmax(dim=1)


def synthetic_images(cfg: SynthConfig, splits: Sequence[str] = ("train",)) -> tuple[Tensor, Tensor]:
    """The stimulus images of the given splits, float [N, 3, S, S] in [0, 1], and their classes [N] long."""
    wanted = set(splits)
    if not wanted or wanted - {"train", "val", "test"}:
        raise ValueError(f"splits must be among 'train', 'val', 'test', got {list(splits)}")
    indices = [i for i in range(cfg.num_classes * cfg.images_per_class) if image_split(cfg, i) in wanted]
    images = np.stack([render_image(cfg, i) for i in indices])
    labels = torch.tensor([image_class(cfg, i) for i in indices], dtype=torch.long)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, labels


def _augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Light geometric and photometric jitter, per image, beyond the generator's own per-image jitter.

    Rotation +-20 deg, scale 0.9-1.1, shift +-10 % of the side, horizontal flip, brightness x0.85-1.15: none
    changes a class's shape, colour or texture, so labels stay valid.
    """
    n = images.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-20.0, 20.0) * (math.pi / 180.0)
    scale = uniform(0.9, 1.1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, uniform(-0.2, 0.2)], dim=1),
            torch.stack([sin * flip, cos, uniform(-0.2, 0.2)], dim=1),
        ],
        dim=1,
    )  # [N, 2, 3], normalised coordinates: a shift of 0.2 is 10 % of the side
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (out * uniform(0.85, 1.15)[:, None, None, None]).clamp(0.0, 1.0)


def train_synthetic_classifier(
    cfg: SynthConfig,
    epochs: int = 40,
    batch_size: int = 32,
    lr: float = 3e-3,
    widths: Sequence[int] = (32, 64, 64),
    seed: int = 0,
) -> SmallCNN:
    """Train a SmallCNN on the TRAIN-split stimulus images of ``cfg`` (val and test never seen).

    AdamW, one-cycle schedule (15 % warm-up, cosine decay), label smoothing 0.1, augmentation as in
    :func:`_augment`; CPU, deterministic in ``seed`` (the global RNG is left as it was). The train split
    alone suffices: the synthetic classes are separable from their few training images.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    images, labels = synthetic_images(cfg, ("train",))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(cfg.num_classes, cfg.image_size, widths)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(_augment(images[batch], generator)), labels[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def save_classifier(model: SmallCNN, folder: str | Path) -> Path:
    """Write ``model.safetensors`` and ``classifier.json`` (what builds it) into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / _WEIGHTS_FILE))
    config = {
        "kind": _SMALL_CNN,
        "num_classes": model.num_classes,
        "image_size": model.image_size,
        "widths": list(model.widths),
    }
    (folder / _CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_classifier(folder: str | Path, device: str | torch.device = "cpu") -> SmallCNN:
    """Rebuild a classifier written by :func:`save_classifier` (eval mode, on ``device``)."""
    folder = Path(folder)
    config_path, weights_path = folder / _CONFIG_FILE, folder / _WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise DreamdiffError(
            f"classifier folder {folder}: expected {_CONFIG_FILE} and {_WEIGHTS_FILE} (written by save_classifier)"
        )
    try:
        config = json.loads(config_path.read_text())
        if config.get("kind") != _SMALL_CNN:
            raise ValueError(f"kind must be {_SMALL_CNN!r}, got {config.get('kind')!r}")
        model = SmallCNN(config["num_classes"], config["image_size"], config["widths"])
    except (ValueError, KeyError, TypeError) as err:
        raise DreamdiffError(f"classifier folder {folder}: bad {_CONFIG_FILE}: {err}") from err
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except RuntimeError as err:  # weights that do not fit the config (missing keys, other shapes)
        raise DreamdiffError(
            f"classifier folder {folder}: {_WEIGHTS_FILE} does not match {_CONFIG_FILE}: {err}"
        ) from err
    return model.to(device).eval()


def load_image_classifier(spec: str, device: str | torch.device = "cpu") -> ImageClassifier:
    """``"vit_h_14_swag"``: the paper's ViT-H/14; otherwise a folder written by :func:`save_classifier`."""
    if spec == VIT_H14_SWAG:
        return load_vit_h14_swag(device)
    if not Path(spec).is_dir():
        raise DreamdiffError(
            f"classifier: expected {VIT_H14_SWAG!r} or a folder written by save_classifier, got {spec!r}"
        )
    return load_classifier(spec, device)
