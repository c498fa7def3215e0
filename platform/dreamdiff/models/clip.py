"""The frozen CLIP image tower (open_clip) whose embeddings the EEG CLIP head is aligned to.

`load_clip_image_encoder("ViT-L-14", "openai")` is the paper's target space. Tests and the demo use
"dreamdiff-tiny", an open_clip config shipped in `clip_configs/` and registered here, with weights they
saved themselves (`save_random_clip`), so both go through open_clip's real config and checkpoint loading.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from dreamdiff.errors import DreamdiffError

CONFIG_DIR = Path(__file__).with_name("clip_configs")
if "dreamdiff-tiny" not in open_clip.list_models():
    open_clip.add_model_config(CONFIG_DIR)


class FrozenClipImage(nn.Module):
    """Images [B, 3, H, W] (uint8, or float in [0, 1]) -> L2-normalised CLIP embeddings [B, embed_dim].

    Preprocessing follows open_clip's eval transform on tensors: bicubic antialiased resize of the shorter
    side to `image_size`, centre crop, normalise with the model's mean/std. The tower never trains: it
    stays in eval mode whatever `.train()` is called with, and runs without autograd.
    """

    def __init__(self, visual: nn.Module, embed_dim: int, preprocess_cfg: dict) -> None:
        super().__init__()
        self.visual = visual.requires_grad_(False)
        self.embed_dim = embed_dim
        size = preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenClipImage:
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize, crop and normalise a batch into the tower's input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, height, width], got {list(images.shape)}")
        x = images.to(self.mean.device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        (h, w), (th, tw) = x.shape[-2:], self.image_size
        scale = max(th / h, tw / w)
        size = (max(th, round(h * scale)), max(tw, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - th) // 2, (size[1] - tw) // 2
        x = x[..., top : top + th, left : left + tw]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.visual(self.preprocess(images)).float(), dim=-1)


def _check_request(name: str, pretrained: str | None) -> None:
    if name not in open_clip.list_models():
        raise DreamdiffError(f"clip model {name!r} is unknown; available: {', '.join(open_clip.list_models())}")
    if pretrained is None or os.path.isfile(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        known = f"known tags for {name}: {', '.join(tags)}" if tags else f"{name} has no published weights"
        raise DreamdiffError(f"clip pretrained {pretrained!r} is neither a file nor a tag; {known}")


def load_clip_image_encoder(
    name: str = "ViT-L-14", pretrained: str | None = "openai", device: str | torch.device = "cpu"
) -> FrozenClipImage:
    """Build open_clip model `name` with weights `pretrained` (a tag, a checkpoint file, or None for a
    random init, which differs on every call unless torch is seeded) and keep its image tower, frozen.

    OpenAI's weights were trained with QuickGELU, which the plain "ViT-L-14" config lacks; a tag that says
    so switches it on, or the embeddings would silently be wrong.
    """
    _check_request(name, pretrained)
    quick_gelu = bool(pretrained and open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
    try:
        model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu, device=device)
    except RuntimeError as err:
        raise DreamdiffError(f"could not load clip {name!r} with weights {pretrained!r}: {err}") from err
    cfg = open_clip.get_model_config(name)
    visual = model.visual
    return FrozenClipImage(visual, cfg["embed_dim"], visual.preprocess_cfg).to(device)


def save_random_clip(name: str, path: str | Path, seed: int = 0) -> Path:
    """Save a seeded random open_clip model as safetensors: a stand-in checkpoint for tests and the demo,
    loaded back through `load_clip_image_encoder(name, pretrained=path)` like any real one."""
    _check_request(name, None)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DreamdiffError(f"clip checkpoint {path} must end in .safetensors (open_clip picks the loader by it)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
