"""Generator checkpoints and EEG -> image sampling, with torch and diffusers alone (no Ray).

A checkpoint folder holds `generator.safetensors`, ONLY the trained tensors (encoder, conditioner, CLIP head,
time conditioner if any, and the UNet parameters of the trainable set, e.g. just attn2/norm2 for
"cross_attention"), and `generator.json`: the format version, the `GeneratorSpec` (with the base SD id or
path the UNet tensors apply to) and the trained UNet names. `Generator.load` rebuilds the base model and
overwrites those tensors.

Seeding: `seed=s` is shorthand for `seed=[s, s + 1, ..., s + B - 1]`, one seed per EEG. Image j of EEG i
starts from noise drawn on the CPU by `torch.Generator().manual_seed(k)`, with
`k = numpy.random.SeedSequence([seed_i, j]).generate_state(1, numpy.uint64)[0]`, so an image depends on its
EEG's seed and its index j only: not on the other EEGs in the batch, nor on num_images, nor on the device.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from dreamdiff.errors import DreamdiffError, unreadable_file
from dreamdiff.models.diffusion import SDComponents, compile_sd, decode_latents, load_sd_components
from dreamdiff.models.eeg_diffusion import EEGDiffusion, GeneratorSpec, build_eeg_diffusion
from dreamdiff.models.profile import Profile
from dreamdiff.models.sampling import Sampler
from dreamdiff.storage import atomic_write, sha256_of

FORMAT_VERSION = 1
WEIGHTS_FILE = "generator.safetensors"
SPEC_FILE = "generator.json"


def model_id(checkpoint: str | Path) -> str:
    """sha256 of the checkpoint's spec and weights (16 hex digits): names the model in the index and keeps a
    re-trained checkpoint from mixing its images with an older one's."""
    return sha256_of(Path(checkpoint) / SPEC_FILE, Path(checkpoint) / WEIGHTS_FILE)[:16]


REWRITE_HINT = "run finetune again to write a whole generator folder, or give another checkpoint"


def read_generator_meta(folder: str | Path) -> dict:
    """`generator.json` of a checkpoint folder, checked: valid JSON of our format version with a valid spec (the
    `spec` key comes back as a `GeneratorSpec`). A corrupt or foreign file fails naming it."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file() or not (Path(folder) / WEIGHTS_FILE).is_file():
        raise DreamdiffError(f"checkpoint {str(folder)!r} must hold {SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise unreadable_file(path, "a generator's JSON record", err, REWRITE_HINT) from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else type(meta).__name__
        raise DreamdiffError(
            f"checkpoint {str(folder)!r} has format_version {found!r}; this dreamdiff reads {FORMAT_VERSION}"
        )
    try:
        spec = GeneratorSpec.model_validate(meta.get("spec"))
    except ValidationError as err:
        raise unreadable_file(path, "a generator's JSON record", err, REWRITE_HINT) from err
    if not isinstance(meta.get("unet_trainable"), list):
        raise unreadable_file(path, "a generator's JSON record", KeyError("unet_trainable"), REWRITE_HINT)
    return {**meta, "spec": spec}


def check_generator_weights(folder: str | Path) -> list[str]:
    """The tensor names in a checkpoint's `generator.safetensors`, read from its header (no tensor data): a
    truncated or corrupt file fails here, naming it, rather than where the tensors are loaded."""
    path = Path(folder) / WEIGHTS_FILE
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise unreadable_file(path, "safetensors weights", err, REWRITE_HINT) from err


def save_generator(model: EEGDiffusion, spec: GeneratorSpec, folder: str | Path, info: dict | None = None) -> Path:
    """Write the trained tensors and the spec into `folder` (created if needed); `info` (JSON-able: step,
    encoder init, metrics...) is stored as is. A local base_model folder is recorded as an absolute path."""
    if not isinstance(model, EEGDiffusion):
        raise TypeError(f"model must be an EEGDiffusion (unwrap DDP first), got {type(model).__name__}")
    if spec.model_dump(exclude={"base_model"}) != model.spec.model_dump(exclude={"base_model"}):
        raise DreamdiffError("spec does not describe this model: only base_model may differ from model.spec")
    base = Path(spec.base_model).expanduser()
    if base.is_dir():
        spec = spec.model_copy(update={"base_model": str(base.resolve())})
    keep = {f"unet.{name}" for name in model.unet_trainable}
    tensors = {
        key: value.detach().contiguous().cpu()
        for key, value in model.state_dict().items()
        if not key.startswith("unet.") or key in keep
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "spec": spec.model_dump(mode="json"),
        "unet_trainable": model.unet_trainable,
        "info": info or {},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).unlink(missing_ok=True)  # an old spec must never describe new weights
    atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(folder / SPEC_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))  # last: marks complete
    return folder


def make_sampler(name: Sampler, train_config: dict, profile: Profile = "dreamdiff") -> SchedulerMixin:
    """A fresh sampling scheduler built from the training schedule's config (betas, prediction_type).

    Every sampler starts at the last training timestep ("trailing" spacing), where the latents really are
    pure noise; SD's "leading" spacing would start 25 steps at t = 960 and 250 steps at t = 996, a difference
    that is not the solver's and that keeps few-step and many-step samples apart (Lin et al., WACV 2024).
    The reference profile's PLMS runs the reference code's timesteps: leading spacing, offset 1 (250 steps:
    997, 993, ..., 1). In either spacing PNDM lists its second timestep twice (997, 993, 993, ..., 1): the first
    step is a Heun step that evaluates the UNet at 997 and at 993, as the reference's PLMS does, so 250 steps
    make 251 UNet calls.
    """
    if name == "dpm++":  # DPM-Solver++ 2M: ~25 steps match PLMS/DDIM at hundreds
        return DPMSolverMultistepScheduler.from_config(
            train_config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
        )
    if name == "ddim":
        return DDIMScheduler.from_config(train_config, timestep_spacing="trailing")
    if name == "plms" and profile == "reference":
        return PNDMScheduler.from_config(train_config, skip_prk_steps=True, timestep_spacing="leading", steps_offset=1)
    if name == "plms":  # the paper's sampler (PLMS, 250 steps): PNDM without its Runge-Kutta warm-up
        return PNDMScheduler.from_config(train_config, skip_prk_steps=True, timestep_spacing="trailing")
    raise DreamdiffError(f"sampler must be 'dpm++', 'ddim' or 'plms', got {name!r}")


def inference_dtype(device: torch.device, precision: Literal["fp32", "bf16"]) -> torch.dtype | None:
    """The weight dtype sampling loads with: bf16 on CUDA when asked (weights cast once, no per-op autocast
    casts), else None (fp32: CPUs run bf16 slowly)."""
    return torch.bfloat16 if device.type == "cuda" and precision == "bf16" else None


def image_seeds(seed: int | list[int] | None, batch: int) -> list[int]:
    """One seed per EEG (see the module docstring); None draws fresh ones."""
    if seed is None:
        return [secrets.randbits(63) for _ in range(batch)]
    seeds = [seed + i for i in range(batch)] if isinstance(seed, int | np.integer) else list(seed)
    if len(seeds) != batch or not all(isinstance(s, int | np.integer) and s >= 0 for s in seeds):
        raise DreamdiffError(f"seed must be an int >= 0 or a list of {batch} such ints (one per EEG), got {seed!r}")
    return [int(s) for s in seeds]


def initial_noise(seeds: list[int], num_images: int, shape: tuple[int, ...]) -> Tensor:
    """Noise [len(seeds) * num_images, *shape], row i * num_images + j drawn from (seeds[i], j) on the CPU."""
    rows = []
    for s in seeds:
        for j in range(num_images):
            key = int(np.random.SeedSequence([s, j]).generate_state(1, np.uint64)[0])
            rows.append(torch.randn(shape, generator=torch.Generator().manual_seed(key)))
    return torch.stack(rows)


class Generator:
    """EEG -> images with a fine-tuned EEGDiffusion: the class the server and batch generation share.

    Built by `load` from a checkpoint, or around a live model (e.g. preview grids during training): sampling
    puts the model in eval mode and restores its previous mode after.
    """

    def __init__(
        self, model: EEGDiffusion, components: SDComponents, autocast_dtype: torch.dtype | None = None
    ) -> None:
        if model.unet is not components.unet:
            raise ValueError("components.unet must be the UNet the model conditions (model.unet)")
        self.model = model
        self.components = components
        self.spec = model.spec
        self.autocast_dtype = autocast_dtype

    @property
    def device(self) -> torch.device:
        return self.components.unet.device

    @classmethod
    def load(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        base_model: str | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> Generator:
        """Load the base SD of the checkpoint (or `base_model`, e.g. the same weights in another place), put
        the trained tensors on top, cast everything to `dtype` if given. `autocast_dtype` (e.g. bfloat16 on
        CUDA) runs sampling under autocast."""
        folder = Path(folder)
        meta = read_generator_meta(folder)
        check_generator_weights(folder)  # a truncated file fails naming it, before the base model loads
        spec = meta["spec"]
        if base_model is not None:
            spec = spec.model_copy(update={"base_model": base_model})
        components = load_sd_components(
            spec.base_model, device, dtype or torch.float32, time_cond=spec.conditioner.time_cond
        )
        model = build_eeg_diffusion(spec, components)
        if model.unet_trainable != meta["unet_trainable"]:
            raise DreamdiffError(
                f"checkpoint {str(folder)!r} trained UNet tensors that base model {spec.base_model!r} names "
                "differently; was it saved on another base model or diffusers version?"
            )
        load_generator_weights(model, folder, device)
        model.eval().requires_grad_(False)
        return cls(model.to(dtype=dtype) if dtype else model, components, autocast_dtype)

    def compile(self, mode: str | None = None) -> Generator:
        """torch.compile the UNet and VAE decoder (`compile_sd`, torch.compile's `mode`): the first `generate` of
        each new batch shape compiles, so callers warm up on the shapes they will serve. Returns self."""
        compile_sd(self.components, mode)
        return self

    @torch.inference_mode()
    def generate(
        self,
        eeg: Tensor | np.ndarray,
        num_images: int = 1,
        steps: int = 25,
        sampler: Sampler = "dpm++",
        guidance_scale: float = 1.0,
        seed: int | list[int] | None = None,
        channel_mask: Tensor | np.ndarray | None = None,
    ) -> np.ndarray:
        """EEG [B, C, T] -> uint8 images [B, num_images, H, W, 3]. guidance_scale 1.0 is the paper (no
        classifier-free guidance); other values need a conditioner trained with condition dropout."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(eeg, num_images, steps, sampler, guidance_scale, seed, channel_mask)
        finally:
            self.model.train(was_training)

    def _generate(
        self,
        eeg: Tensor | np.ndarray,
        num_images: int,
        steps: int,
        sampler: Sampler,
        guidance_scale: float,
        seed: int | list[int] | None,
        channel_mask: Tensor | np.ndarray | None,
    ) -> np.ndarray:
        eeg = self._check_eeg(eeg)
        if num_images < 1 or steps < 1:
            raise DreamdiffError(f"num_images and steps must be >= 1, got {num_images} and {steps}")
        guided = guidance_scale != 1.0
        if guided and self.model.conditioner.null is None:
            raise DreamdiffError(
                f"guidance_scale={guidance_scale} needs a null context, but this generator was fine-tuned "
                "without condition dropout (conditioner.cond_drop_prob = 0); use guidance_scale=1.0"
            )
        scheduler = make_sampler(sampler, self.components.noise_scheduler.config, self.spec.profile)
        seeds = image_seeds(seed, eeg.shape[0])
        unet, device = self.components.unet, self.device
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        if channel_mask is not None:
            channel_mask = torch.as_tensor(channel_mask)
            if channel_mask.shape != eeg.shape[:2]:
                want = list(eeg.shape[:2])
                raise DreamdiffError(f"channel_mask must be {want} (True = real), got {list(channel_mask.shape)}")
            channel_mask = channel_mask.to(device).bool()
        with torch.autocast(device.type, self.autocast_dtype or torch.bfloat16, enabled=bool(self.autocast_dtype)):
            context = self.model.context(eeg, channel_mask).repeat_interleave(num_images, dim=0)
            if guided:
                context = torch.cat([self.model.conditioner.null_context(context.shape[0]), context])
            context = context.to(unet.dtype)
            class_labels = self.model.class_labels(context)  # guidance's unconditional half: from the null context
            scheduler.set_timesteps(steps, device=device)
            latents = initial_noise(seeds, num_images, shape).to(device) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(latents, t)
                x = torch.cat([x, x]) if guided else x
                pred = unet(x.to(unet.dtype), t, encoder_hidden_states=context, class_labels=class_labels).sample
                pred = pred.float()
                if guided:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                latents = scheduler.step(pred, t, latents).prev_sample
            images = decode_latents(self.components, latents)
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return pixels.reshape(eeg.shape[0], num_images, *pixels.shape[1:])

    def _check_eeg(self, eeg: Tensor | np.ndarray) -> Tensor:
        c, t = self.spec.msm.num_channels, self.spec.msm.num_samples
        eeg = torch.as_tensor(eeg)
        if eeg.ndim != 3 or eeg.shape[1:] != (c, t) or eeg.shape[0] < 1:
            raise DreamdiffError(f"eeg must be [batch, {c}, {t}], got {list(eeg.shape)}")
        eeg = eeg.to(self.device, self.model.encoder.patch_embed.weight.dtype)
        if not torch.isfinite(eeg).all():
            raise DreamdiffError("eeg holds NaN or infinite values")
        return eeg


def load_generator_weights(model: EEGDiffusion, folder: str | Path, device: str | torch.device = "cpu") -> None:
    """Put the trained tensors of a generator folder into `model`, built from the same spec on its base model."""
    path = Path(folder) / WEIGHTS_FILE
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise unreadable_file(path, "safetensors weights", err, REWRITE_HINT) from err
    _load_trained(model, tensors, model.spec.base_model)


def _load_trained(model: EEGDiffusion, tensors: dict[str, Tensor], base_model: str) -> None:
    """Put a checkpoint's tensors into `model`: all of encoder/conditioner/head, the trained UNet subset."""
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:
        raise DreamdiffError(f"checkpoint tensors do not fit base model {base_model!r} and the spec: {err}") from err
    trained = {f"unet.{name}" for name in model.unet_trainable}
    missing = [k for k in result.missing_keys if not k.startswith("unet.") or k in trained]
    if missing or result.unexpected_keys:
        raise DreamdiffError(
            f"checkpoint tensors do not match the spec: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
