"""`dreamdiff import-reference generator`: a reference generation checkpoint as a dreamdiff generator folder.

The reference's `model_state_dict` holds its whole latent diffusion model. What dreamdiff keeps of it is what the
reference trained, on top of the base SD given with `--base-model`:
- the EEG encoder (`cond_stage_model.mae`), mapped as a pretraining checkpoint's encoder is (dreamdiff.reference.
  msm_keys);
- the conditioner (`channel_mapper`, `dim_mapper`), the CLIP head (`mapping`) and the time-conditioning layer
  (`model.diffusion_model.time_embed_condtion`);
- the UNet's cross-attention (`attn2`, `norm2` of its transformer blocks), converted from the CompVis layout by
  diffusers' own `convert_ldm_unet_checkpoint`.
Every other UNet tensor must equal the base model's (the reference trains no other), which checks that `--base-model`
is the SD the checkpoint was trained from; the noise schedule must equal the base model's too. The frozen VAE
(`first_stage_model`) and CLIP image tower (`image_embedder`) are reported unused: the base model's VAE and the
stages' `clip_model` take their place. The generator folder has `profile: reference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from torch import Tensor

from dreamdiff.errors import DreamdiffError, first_line
from dreamdiff.models.conditioner import ConditionerConfig
from dreamdiff.models.diffusion import load_sd_components
from dreamdiff.models.eeg_diffusion import EEGDiffusion, GeneratorSpec, build_eeg_diffusion
from dreamdiff.models.generator import save_generator
from dreamdiff.reference.checkpoint import load_reference_checkpoint, sha256
from dreamdiff.reference.cli import SD15_CONFIGS
from dreamdiff.reference.folder import previous_import, published, write_record
from dreamdiff.reference.msm_keys import MappedMSM, count_statuses, map_msm

UNET = "model.diffusion_model."
TIME_COND = UNET + "time_embed_condtion."
ENCODER = "cond_stage_model.mae."
# reference name prefix -> ours
HEADS = {
    "cond_stage_model.channel_mapper.0.": "conditioner.token_mixer.0.",
    "cond_stage_model.channel_mapper.1.": "conditioner.token_mixer.1.",
    "cond_stage_model.dim_mapper.": "conditioner.proj.",
    "cond_stage_model.mapping.maxpool.": "clip_head.pool.",
    "cond_stage_model.mapping.fc.": "clip_head.proj.",
    TIME_COND + "0.": "time_conditioner.token_mixer.0.",
    TIME_COND + "1.": "time_conditioner.token_mixer.1.",
    TIME_COND + "2.": "time_conditioner.proj.",
}
UNUSED = {
    "first_stage_model.": "the frozen VAE: the base model's is used",
    "image_embedder.": "the frozen CLIP image tower: the stages load clip_model",
}
CONDITIONER_SHAPES = {  # the tensors the conditioner's sizes are read from, and their axes
    "cond_stage_model.channel_mapper.0.weight": 3,
    "cond_stage_model.channel_mapper.1.weight": 3,
    "cond_stage_model.dim_mapper.weight": 2,
    "cond_stage_model.mapping.fc.weight": 2,
}
SCHEDULE = ("betas", "alphas_cumprod")  # checked against the base model's scheduler
DERIVED = {  # the reference's other schedule buffers, all computed from betas
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "scale_factor",
}
SINGLE_FILE = (".ckpt", ".safetensors")
BASE_DIR = "base-model"  # where a single-file base model is converted, inside the generator folder
BASE_TOLERANCE = 1e-3  # relative norm difference allowed between an untrained UNet tensor and the base model's


def _heads(state: dict[str, Tensor]) -> dict[str, str]:
    """Reference name -> our name, for the conditioner, CLIP head and time conditioner tensors."""
    out = {}
    for name in state:
        for theirs, ours in HEADS.items():
            if name.startswith(theirs):
                out[name] = ours + name[len(theirs) :]
    return out


def conditioner_config(state: dict[str, Tensor], time_cond: bool) -> ConditionerConfig:
    """The conditioner's sizes from its tensors: token mixer N -> mid -> context tokens, projection to the UNet's
    context width, the CLIP head's width."""
    shapes = {}
    for name, ndim in CONDITIONER_SHAPES.items():
        if name not in state:
            raise DreamdiffError(
                f"CHECKPOINT: the generation checkpoint has no {name!r}; expected the reference's cond_stage_model "
                "(channel_mapper, dim_mapper, mapping)"
            )
        if state[name].ndim != ndim:
            raise DreamdiffError(f"CHECKPOINT: {name} has shape {list(state[name].shape)}; expected {ndim} axes")
        shapes[name] = state[name].shape
    mid = shapes["cond_stage_model.channel_mapper.0.weight"][0]
    tokens = shapes["cond_stage_model.channel_mapper.1.weight"][0]
    context_dim = shapes["cond_stage_model.dim_mapper.weight"][0]
    clip_dim = shapes["cond_stage_model.mapping.fc.weight"][0]
    return ConditionerConfig(
        context_tokens=tokens, context_dim=context_dim, mid_tokens=mid, clip_dim=clip_dim, time_cond=time_cond
    )


def _relative_difference(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@dataclass
class Partition:
    """A generation checkpoint's tensors, sorted: the encoder (mapped), the heads (reference -> our names), the
    CompVis UNet, and the report of what is known so far."""

    encoder: MappedMSM
    heads: dict[str, str]
    conditioner: ConditionerConfig
    unet_ldm: dict[str, Tensor]
    report: dict[str, dict[str, Any]]


def partition(state: dict[str, Tensor], values: dict[str, Any]) -> Partition:
    """Sort every tensor of `state` into a part, or fail naming the ones no part knows."""
    encoder = map_msm({k[len(ENCODER) :]: v for k, v in state.items() if k.startswith(ENCODER)}, values)
    report = {ENCODER + k: entry for k, entry in encoder.report.items()}
    heads = _heads(state)
    report |= {k: {"status": "mapped", "to": v} for k, v in heads.items()}
    conditioner = conditioner_config(state, time_cond=any(k.startswith(TIME_COND) for k in state))
    unet_ldm = {k: v for k, v in state.items() if k.startswith(UNET) and not k.startswith(TIME_COND)}
    unknown = []
    for name in state:
        if name in report or name in unet_ldm or name in SCHEDULE:
            continue
        why = next((w for prefix, w in UNUSED.items() if name.startswith(prefix)), None)
        if why is None and name in DERIVED:
            why = "the noise schedule, computed from betas"
        if why is None:
            unknown.append(name)
        else:
            report[name] = {"status": "unused", "why": why}
    if unknown:
        raise DreamdiffError(
            f"CHECKPOINT: {len(unknown)} tensor(s) unknown to a reference generation checkpoint "
            f"(e.g. {unknown[:4]}); nothing was written"
        )
    return Partition(encoder, heads, conditioner, unet_ldm, report)


def import_generator(
    checkpoint: str | Path, base_model: str, out: str | Path, base_config: str = SD15_CONFIGS
) -> dict[str, Any]:
    """Import `checkpoint` on top of `base_model` (a diffusers folder, a hub id, or SD's single .ckpt/.safetensors
    file, converted into <out>/base-model with `base_config`'s component configs) into the generator folder
    `out`; returns the import record. Everything is checked before the folder appears; the same file again is
    skipped."""
    checkpoint, out = Path(checkpoint), Path(out)
    digest = sha256(checkpoint, "generator")
    earlier = previous_import(out, digest)
    if earlier is not None:
        return {**earlier, "skipped": True}
    data = load_reference_checkpoint(checkpoint, "generator")
    values = data["config"].values if data.get("config") is not None else {}
    if values.get("global_pool") is True:
        raise DreamdiffError("CHECKPOINT: its config has global_pool True; dreamdiff's conditioner reads every token")
    state: dict[str, Tensor] = data["model_state_dict"]
    parts = partition(state, values)
    with published(out) as stage:
        base, recorded_base = base_model, base_model
        if Path(base_model).suffix in SINGLE_FILE and Path(base_model).is_file():
            convert_single_file(Path(base_model), base_config, stage / BASE_DIR)
            base, recorded_base = str(stage / BASE_DIR), str(out.resolve() / BASE_DIR)
        elif Path(base_model).is_dir():
            recorded_base = str(Path(base_model).resolve())
        components = load_sd_components(base, time_cond=parts.conditioner.time_cond)
        spec = GeneratorSpec(
            base_model=recorded_base,
            msm=parts.encoder.config,
            conditioner=parts.conditioner,
            trainable="cross_attention",
            image_size=components.sample_size,
            profile="reference",
        )
        model = build_eeg_diffusion(spec, components)
        report = parts.report | _check_schedule(state, components.noise_scheduler)
        unet_state, unet_report = _convert_unet(parts.unet_ldm, components.unet, set(model.unet_trainable))
        report |= unet_report
        ours = dict(parts.encoder.state)  # "encoder.*": the same names in EEGDiffusion
        ours |= {to: state[theirs] for theirs, to in parts.heads.items()}
        ours |= {"unet." + k: v for k, v in unet_state.items()}
        _load_checked(model, ours)
        record = {
            "kind": "generator",
            "source": {"path": str(checkpoint.resolve()), "sha256": digest},
            "base_model": {"given": base_model, "used": recorded_base},
            "spec": spec.model_dump(mode="json"),
            "sizes_from": parts.encoder.sources,
            "reference_config": values,
            "reference_config_dropped": data["config"].dropped if data.get("config") is not None else [],
            "tensors": report,
            "counts": count_statuses(report),
        }
        save_generator(model, spec, stage, info={"imported_from": record["source"], "profile": "reference"})
        write_record(stage, record)
    return record


def _load_checked(model: EEGDiffusion, ours: dict[str, Tensor]) -> None:
    """Put the mapped tensors into the model, which must have exactly those names (and shapes) outside the UNet's
    untrained part."""
    expected = dict(model.state_dict())
    wrong = [k for k, v in ours.items() if k not in expected or tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in ours and not k.startswith("unet.")]
    if wrong or missing:
        raise DreamdiffError(
            f"CHECKPOINT: its tensors do not fit the inferred generator (unexpected or misshapen {wrong[:3]}, "
            f"missing {missing[:3]}); nothing was written"
        )
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=False)


def convert_single_file(path: Path, config: str, folder: Path) -> None:
    """SD's single checkpoint file -> a diffusers folder (unet/, vae/, scheduler/) with diffusers' own
    `from_single_file`, the component configs taken from `config` (a diffusers folder or hub id of the same
    architecture; the file holds weights only). Without a vae/ in a local `config`, none is converted."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    local = Path(config).is_dir()
    options = {"config": config, "local_files_only": local}
    try:
        UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **options).save_pretrained(folder / "unet")
        if not local or (Path(config) / "vae").is_dir():
            vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", **options)
            vae.save_pretrained(folder / "vae")
        DDPMScheduler.from_pretrained(config, subfolder="scheduler", local_files_only=local).save_pretrained(
            folder / "scheduler"
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise DreamdiffError(
            f"--base-model: cannot convert {path} with the component configs of {config!r} ({first_line(err)}); "
            "give --base-config a local SD 1.5 folder (its configs are enough), or a diffusers folder as --base-model"
        ) from None


def _check_schedule(state: dict[str, Tensor], scheduler: Any) -> dict[str, dict[str, Any]]:
    report = {}
    for name in SCHEDULE:
        if name not in state:
            continue
        ours = getattr(scheduler, name).float()
        theirs = state[name].float()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-6):
            raise DreamdiffError(
                f"CHECKPOINT: its noise schedule ({name}) differs from the base model's scheduler; give the SD it "
                "was trained from as --base-model"
            )
        report[name] = {"status": "recomputed", "verified": True}
    return report


def _convert_unet(
    ldm: dict[str, Tensor], base: Any, trainable: set[str]
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """The trained UNet tensors under diffusers' names, and the report of every CompVis tensor: the trainable set
    mapped, the rest checked equal to the base model's."""
    try:
        converted = convert_ldm_unet_checkpoint(ldm, dict(base.config))
    except (KeyError, IndexError, ValueError) as err:
        raise DreamdiffError(
            f"CHECKPOINT: its UNet is not in the layout of the base model's ({first_line(err)}); give the SD it was "
            "trained from as --base-model"
        ) from None
    # diffusers' converter copies no tensor: each converted value is one of the file's, found by identity
    source = {id(v): k for k, v in ldm.items()}
    absent = sorted(name for name, value in converted.items() if id(value) not in source)
    unconverted = sorted(set(ldm) - {source[id(v)] for v in converted.values() if id(v) in source})
    base_state = base.state_dict()
    if absent or unconverted or set(converted) != set(base_state):
        odd = [f"{n} (absent)" for n in absent] + unconverted + sorted(set(converted) ^ set(base_state))
        raise DreamdiffError(
            f"CHECKPOINT: its UNet does not fit the base model's (e.g. {odd[:3]}); give the SD it was trained from "
            "as --base-model"
        )
    report, trained = {}, {}
    for name, value in converted.items():
        theirs = source[id(value)]
        if name in trainable:
            trained[name] = value
            report[theirs] = {"status": "mapped", "to": f"unet.{name}"}
            continue
        difference = _relative_difference(value, base_state[name]) if value.shape == base_state[name].shape else 1.0
        if difference > BASE_TOLERANCE:
            raise DreamdiffError(
                f"CHECKPOINT: its UNet tensor {theirs} differs from the base model's {name} (relative difference "
                f"{difference:.1e}), outside the cross-attention that the reference trains; give the SD it was "
                "trained from as --base-model (the reference trains on v1-5-pruned.ckpt's non-EMA UNet: pass that "
                "file)"
            )
        report[theirs] = {"status": "verified", "equals": f"the base model's unet.{name}"}
    return trained, report
