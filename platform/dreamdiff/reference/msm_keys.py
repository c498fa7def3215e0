"""The reference's MSM tensors (`MAEforEEG`) onto ours (`MaskedSignalModel`), with the sizes read from their shapes.

Every tensor of a reference state dict ends in one of three places, recorded per tensor in the report:
- "mapped": renamed (and reshaped where ours has no singleton axes) onto one of our tensors;
- "recomputed": the fixed sin-cos position tables, which we do not store; ours are computed and compared with the
  file's, and a table that differs is an error, since these weights would then not reproduce;
- "unused": tensors of the reference's optional image-reconstruction branch (`use_nature_img_loss`), which is not
  part of DreamDiffusion's method, and the mask token of its downstream encoder (`eeg_encoder`), which never
  masks.
Anything else is unknown and an error: an import never drops a tensor it does not understand.

A pretraining checkpoint holds the whole `MAEforEEG`; a generation checkpoint only the downstream encoder, whose
config then carries the decoder sizes of the reference's pretraining defaults (dreamdiff builds no decoder
downstream).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dreamdiff.errors import DreamdiffError
from dreamdiff.models.msm import MSMConfig, build_msm, sincos_positions

_BLOCK = r"(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)"
# (reference name pattern, our name template), matched on whole names
RENAMES: list[tuple[str, str]] = [
    (r"patch_embed\.proj\.(weight|bias)", r"encoder.patch_embed.\1"),
    (r"cls_token", "encoder.cls_token"),
    (rf"blocks\.{_BLOCK}", r"encoder.blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"encoder.blocks.\1.mlp.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"encoder.blocks.\1.mlp.2.\2"),
    (r"norm\.(weight|bias)", r"encoder.norm.\1"),
    (r"decoder_embed\.(weight|bias)", r"decoder.embed.\1"),
    (r"mask_token", "decoder.mask_token"),
    (rf"decoder_blocks\.{_BLOCK}", r"decoder.blocks.\1.\2.\3"),
    (r"decoder_blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"decoder.blocks.\1.mlp.0.\2"),
    (r"decoder_blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"decoder.blocks.\1.mlp.2.\2"),
    (r"decoder_norm\.(weight|bias)", r"decoder.norm.\1"),
    (r"decoder_pred\.(weight|bias)", r"decoder.pred.\1"),
]
RECOMPUTED = {"pos_embed": "embed_dim", "decoder_pos_embed": "decoder_embed_dim"}
UNUSED = re.compile(r"nature_img_.*")
# the reference's pretraining defaults (Config_MBM_EEG), for the encoder of a generation checkpoint
DEFAULT_DECODER = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}
POSITION_TOLERANCE = 1e-6  # the file's tables were computed in float64 and stored in float32, as ours


@dataclass
class MappedMSM:
    """Our config and state dict for a reference MSM, and what became of each of its tensors."""

    config: MSMConfig
    sources: dict[str, str]  # config field -> where its value came from
    state: dict[str, Tensor] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)


def count_statuses(report: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many tensors of an import report ended in each place (mapped, recomputed, verified, unused)."""
    out: dict[str, int] = {}
    for entry in report.values():
        out[entry["status"]] = out.get(entry["status"], 0) + 1
    return out


def our_name(name: str) -> str | None:
    """Our tensor name for a reference MSM tensor name, or None when no rename applies."""
    for pattern, template in RENAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, template, name)
    return None


def _count(state: dict[str, Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise DreamdiffError(f"CHECKPOINT: the {prefix} are numbered {sorted(indices)}; expected 0..{len(indices) - 1}")
    return len(indices)


def _shape(state: dict[str, Tensor], name: str, ndim: int) -> tuple[int, ...]:
    """The shape of `name`, which must exist with `ndim` axes."""
    if name not in state:
        raise DreamdiffError(f"CHECKPOINT: the MSM state dict has no {name!r}; expected a reference MAEforEEG")
    if state[name].ndim != ndim:
        raise DreamdiffError(f"CHECKPOINT: {name} has shape {list(state[name].shape)}; expected {ndim} axes")
    return tuple(state[name].shape)


def infer_config(state: dict[str, Tensor], values: dict[str, Any]) -> tuple[MSMConfig, dict[str, str]]:
    """Our `MSMConfig` (profile "reference") for a reference MSM state dict and its config's `values`, and where
    each size came from. Sizes come from the tensor shapes; the head counts (which shapes cannot tell) and the
    mask ratio come from the config."""
    embed_dim, channels, patch = _shape(state, "patch_embed.proj.weight", 3)
    hidden, _ = _shape(state, "blocks.0.mlp.fc1.weight", 2)
    tokens = _shape(state, "pos_embed", 3)[1] - 1 if "pos_embed" in state else None
    decoder = "decoder_embed.weight" in state
    heads = ["num_heads", "decoder_num_heads"] if decoder else ["num_heads"]
    missing = [k for k in heads if not isinstance(values.get(k), int)]
    if missing:
        raise DreamdiffError(
            f"CHECKPOINT: its config lacks {missing}, which the tensor shapes cannot tell; "
            "expected the reference's config object"
        )
    sizes = {
        "num_channels": channels,
        "patch_size": patch,
        "num_samples": (tokens or 512 // patch) * patch,
        "embed_dim": embed_dim,
        "depth": _count(state, "blocks"),
        "num_heads": values["num_heads"],
        "mlp_ratio": hidden / embed_dim,
    }
    source = {k: "tensor shapes" for k in sizes} | {"num_heads": "config"}
    if decoder:
        sizes |= {
            "decoder_embed_dim": _shape(state, "decoder_embed.weight", 2)[0],
            "decoder_depth": _count(state, "decoder_blocks"),
            "decoder_num_heads": values["decoder_num_heads"],
        }
        source |= {"decoder_embed_dim": "tensor shapes", "decoder_depth": "tensor shapes"}
        source["decoder_num_heads"] = "config"
    else:
        sizes |= DEFAULT_DECODER
        source |= {k: "the reference's pretraining default (no decoder in the file; unused)" for k in DEFAULT_DECODER}
    if tokens is None:
        source["num_samples"] = "default (no pos_embed in the file)"
    mask_ratio = values.get("mask_ratio")
    source["mask_ratio"] = "config" if isinstance(mask_ratio, int | float) else "default (not in the config)"
    extra = {"mask_ratio": float(mask_ratio)} if isinstance(mask_ratio, int | float) else {}
    try:
        cfg = MSMConfig(**sizes, **extra, profile="reference")
    except ValueError as err:
        raise DreamdiffError(f"CHECKPOINT: its tensors give MSM sizes {sizes} that do not fit: {err}") from None
    return cfg, source


def map_msm(state: dict[str, Tensor], values: dict[str, Any]) -> MappedMSM:
    """Map a reference MSM state dict (a whole `MAEforEEG`, or a downstream `eeg_encoder` without a decoder) onto
    our `MaskedSignalModel` names, checked: every one of our tensors (the encoder's alone for an `eeg_encoder`) is
    filled with the right shape, and the position tables are ours."""
    cfg, sources = infer_config(state, values)
    decoder = "decoder_embed.weight" in state
    with torch.device("meta"):
        expected = {
            k: tuple(v.shape) for k, v in build_msm(cfg).state_dict().items() if decoder or k.startswith("encoder.")
        }
    mapped = MappedMSM(cfg, sources)
    unknown = []
    for name, tensor in state.items():
        if name == "mask_token" and not decoder:
            mapped.report[name] = {"status": "unused", "why": "the downstream encoder's mask token (it never masks)"}
            continue
        ours = our_name(name)
        if ours is not None:
            want = expected.get(ours, ())
            token = name.endswith("token") and tensor.numel() == math.prod(want)  # [1, 1, D] -> [D]
            value = tensor.reshape(want) if token else tensor
            if tuple(value.shape) != want:
                raise DreamdiffError(
                    f"CHECKPOINT: {name} has shape {list(tensor.shape)}; the inferred model expects "
                    f"{list(want)} for {ours}"
                )
            mapped.state[ours] = value.float().contiguous()
            mapped.report[name] = {"status": "mapped", "to": ours}
        elif name in RECOMPUTED:
            mapped.report[name] = _check_positions(name, tensor, getattr(cfg, RECOMPUTED[name]), cfg.num_tokens)
        elif UNUSED.fullmatch(name):
            mapped.report[name] = {"status": "unused", "why": "the reference's optional image-reconstruction branch"}
        else:
            unknown.append(name)
    if unknown:
        raise DreamdiffError(
            f"CHECKPOINT: {len(unknown)} tensor(s) unknown to a reference MSM (e.g. {unknown[:4]}); nothing was written"
        )
    absent = sorted(set(expected) - set(mapped.state))
    if absent:
        raise DreamdiffError(f"CHECKPOINT: the MSM state dict lacks tensors for {absent[:4]}; nothing was written")
    return mapped


def _check_positions(name: str, table: Tensor, dim: int, tokens: int) -> dict[str, Any]:
    ours = sincos_positions(dim, tokens)
    if tuple(table.shape) != (1, *ours.shape):
        raise DreamdiffError(f"CHECKPOINT: {name} has shape {list(table.shape)}; expected {[1, *ours.shape]}")
    diff = float((table[0].float() - ours).abs().max())
    if diff > POSITION_TOLERANCE:
        raise DreamdiffError(
            f"CHECKPOINT: {name} is not the fixed sin-cos table (largest difference {diff:.2e}); dreamdiff computes "
            "positions itself, so these weights would not reproduce the reference"
        )
    return {"status": "recomputed", "verified": True, "max_abs_diff": diff}
